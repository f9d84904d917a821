"""Run folders, checkpoints, model files and run configs written by the previous release keep working (issue 14).

The fixture is made by the previous release's own code, not committed: `git archive PREVIOUS src` extracts it and
a subprocess (`python -m daguerre.training ...` with PYTHONPATH on it) trains a short tiny_vae and tiny_ldm run
with checkpoints and a model file, and exports a checkpoint. Today's code then resumes both runs, exports a
checkpoint the old code wrote (equal to the old code's export), loads the old model file and the export, and
reads the old flat-key TOML configs and the run's config.json.
Without the git history this fails, naming what it needs: it never skips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import daguerre
from daguerre.cli import main
from daguerre.config import ModelConfig
from daguerre.training.config import load_run_config

REPO = Path(__file__).resolve().parents[1]
PREVIOUS = "defff09"  # the last commit before the training half's rewrite (issue 14); tests/test_golden.py's base
QUIET = ["train.progress=false", "train.sample_every=0", "train.eval_every=0", "train.log_every=1"]
VAE_SETS = [*QUIET, "train.steps=2", "train.checkpoint_every=2", "data.n=12", "data.holdout=2", "train.batch_size=2"]
LDM_SETS = [*QUIET, "train.checkpoint_every=2", "train.keep_last=3", "data.n=12", "data.holdout=4",
            "train.batch_size=4"]


def _sets(items: list[str]) -> list[str]:
    return [f"--set={item}" for item in items]


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> Path:
    """A folder with the previous release's code (`src/`) and its runs (`runs/vae`, `runs/ldm`)."""
    root = tmp_path_factory.mktemp("previous")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS, "src"], capture_output=True)
    if archive.returncode != 0:
        pytest.fail(f"this test makes its fixture with the previous release's code, commit {PREVIOUS} of {REPO}: "
                    f"`git archive {PREVIOUS}` failed ({archive.stderr.decode().strip()}); run it in a git "
                    "checkout with the history (git fetch --unshallow)")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    runs = root / "runs"
    for args in (["vae", "--config", "tiny_vae", "--out", str(runs / "vae"), *_sets(VAE_SETS)],
                 ["ldm", "--config", "tiny_ldm", "--vae", str(runs / "vae" / "vae.safetensors"),
                  "--out", str(runs / "ldm"), *_sets([*LDM_SETS, "train.steps=4"])],
                 ["export", str(runs / "ldm"), "--step", "2", "--out", str(root / "old_export.safetensors")]):
        done = subprocess.run([sys.executable, "-m", "daguerre.training", *args], cwd=root, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"the previous release's {args[0]} run failed:\n{done.stderr[-3000:]}"
    old_code = subprocess.run([sys.executable, "-c", "import daguerre; print(daguerre.__file__)"], env=env,
                              capture_output=True, text=True, check=True).stdout
    assert Path(old_code.strip()).is_relative_to(root), "the fixture must be made by the previous release's code"
    shutil.copyfile(runs / "ldm" / "model.safetensors", root / "old_model.safetensors")  # kept: resuming replaces
    shutil.copyfile(runs / "ldm" / "config.json", root / "old_config.json")  # the run's files
    return root


def _step(folder: Path) -> int:
    return json.loads((folder / "state.json").read_text())["step"]


def test_old_runs_resume_export_and_load(previous, tmp_path):
    runs = previous / "runs"
    stored = json.loads((previous / "old_config.json").read_text())["data"]
    assert stored["n"] == 12 and "shapes" not in stored  # the previous release's flat [data] keys
    # resume the runs with today's code (the old checkpoints' flat run_config must match today's config)
    assert main(["train", "ldm", "--config", "tiny_ldm", "--vae", str(runs / "vae" / "vae.safetensors"),
                 "--out", str(runs / "ldm"), "--resume", *_sets([*LDM_SETS, "train.steps=6"])]) == 0
    checkpoints = sorted((runs / "ldm" / "checkpoints").iterdir())
    assert [_step(c) for c in checkpoints] == [2, 4, 6]
    # export the step-2 checkpoint the previous release wrote, and load it and the old model file
    exported = tmp_path / "step2.safetensors"
    assert main(["train", "export", str(runs / "ldm"), "--step", "2", "--out", str(exported)]) == 0
    for path in (previous / "old_model.safetensors", exported, runs / "ldm" / "model.safetensors"):
        pipe = daguerre.load(str(path))
        assert pipe.config.unet.context_dim == pipe.config.text_encoder.width
        (image,) = pipe("a red circle", steps=2, seed=0)
        assert image.image.size == (32, 32) and image.seed == 0
    # the autoencoder run last: its new vae.safetensors is not the one the LDM run trained on
    assert main(["train", "vae", "--config", "tiny_vae", "--out", str(runs / "vae"), "--resume",
                 *_sets([*VAE_SETS, "train.steps=3"])]) == 0
    assert [_step(c) for c in sorted((runs / "vae" / "checkpoints").iterdir())] == [2, 3]
    with safe_open(str(exported), "pt") as f:
        data = json.loads(f.metadata()["daguerre_config"])["provenance"]["run_config"]["data"]
    assert data["shapes"]["n"] == 12 and "n" not in data  # written in today's form
    # today's export (from the checkpoint, its data read only for what an old checkpoint lacks) is the
    # previous release's (which resumed the run on its latent cache), byte for byte in every tensor and
    # equal in its config but for the time and the run config's form
    old, new = _model_file(previous / "old_export.safetensors"), _model_file(exported)
    assert old == new


def _model_file(path: Path) -> tuple[dict, dict]:
    """A model file's tensors (name -> dtype, shape, bytes) and config without the time and the run config."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: (str(t.dtype), tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                   for k in f.keys() for t in [f.get_tensor(k)]}
        config = ModelConfig.from_json(f.metadata()["daguerre_config"]).to_dict()  # as read today (new keys filled)
    for key in ("training_seconds", "finished", "run_config"):
        config["provenance"].pop(key)
    return tensors, config


def test_old_run_configs_read_as_today(previous):
    """Every shipped run TOML of the previous release (flat [data] keys) loads as today's shipped file, and
    the old run's config.json as the TOML it came from with the same --set keys."""
    old = sorted((previous / "src" / "daguerre" / "assets" / "configs").glob("*.toml"))
    assert len(old) >= 12
    for path in old:
        stage = "vae" if path.stem.endswith("_vae") else "ldm"
        assert load_run_config(path, stage) == load_run_config(path.stem, stage), path.name
        assert "[data.shapes]" not in path.read_text()
    resolved = load_run_config(previous / "old_config.json", "ldm")
    assert resolved.data.shapes.n == 12 and resolved.data.folder is None
    assert resolved == load_run_config("tiny_ldm", "ldm", [*LDM_SETS, "train.steps=4"])
