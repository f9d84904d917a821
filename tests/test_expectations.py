"""bench/expectations.py: each measured checkpoint's wall-clock seconds are the run's own clock at that checkpoint
(its state.json `seconds`), not a sum of the logged session-average speeds (which a resume's gap or a slow start
would skew); points measured before take it too, and a checkpoint without a clock gives no wall_s."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from daguerre.training.state import STATE_FORMAT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import expectations  # noqa: E402

BATCH = 8


def _run(tmp_path: Path) -> Path:
    """A stage-2 run of two sessions: steps 100 and 200 in the first (the second with a slow interval, which the
    session-average speed logged at 200 blurs), a resume from 200 after a day's pause, step 300 in the second."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"batch_size": BATCH}}))
    clock = {100: 10.0, 200: 40.0, 300: 50.0}  # training seconds: 10 s, 30 s, then 10 s after the resume
    logged = [(100, 1000.0, 100 * BATCH / 10.0), (200, 1030.0, 200 * BATCH / 40.0),
              (300, 1030.0 + 86400 + 10, 100 * BATCH / 10.0)]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time": t, "loss": 0.1, "images_per_s": r})
                                               + "\n" for s, t, r in logged))
    for step in (100, 200, 300, 400):
        folder = run / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        meta = {"format": STATE_FORMAT, "step": step, **({"seconds": clock[step]} if step in clock else {})}
        (folder / "state.json").write_text(json.dumps(meta))  # step 400: a checkpoint that kept no clock
    return run


def _fake_daguerre(*args: str) -> None:
    """`daguerre train export` and `daguerre eval` stood in for: eval writes a report of fixed numbers."""
    if args[0] == "eval":
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True)
        report = {"distribution": {"fd": 2.0, "fd_floor": 1.0, "kid": {"mean": 0.1}, "kid_floor": {"mean": 0.01}},
                  "adherence": {"class": {"class": 0.5, "class_stderr": 0.05}}}
        (out / "report.json").write_text(json.dumps(report))


def test_wall_seconds_are_the_checkpoints_clock_for_new_and_earlier_points(tmp_path, monkeypatch):
    run, out = _run(tmp_path), tmp_path / "points.json"
    assert expectations.training_seconds(run) == {100: 10.0, 200: 40.0, 300: 50.0}
    earlier = {"step": 100, "images": 100 * BATCH, "wall_s": 999.0, "fd": 2.0}  # measured by the old rule
    out.write_text(json.dumps({"label": "x", "run": str(run), "points": [earlier]}))
    monkeypatch.setattr(expectations, "_daguerre", _fake_daguerre)
    args = argparse.Namespace(run=str(run), out=str(out), label="x", quiet_images_per_s=10.0, vae_minutes=0.0,
                              steps=None)
    expectations.measure(args, [])
    points = {p["step"]: p for p in json.loads(out.read_text())["points"]}
    assert sorted(points) == [100, 200, 300, 400]
    assert {s: p.get("wall_s") for s, p in points.items()} == {100: 10.0, 200: 40.0, 300: 50.0, 400: None}
    assert points[300]["cpu_hours_quiet"] == pytest.approx(300 * BATCH / 10.0 / 3600, abs=1e-3)


def test_a_damaged_checkpoint_state_is_named(tmp_path):
    run = _run(tmp_path)
    (run / "checkpoints" / "step_00000200" / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="step_00000200"):
        expectations.training_seconds(run)


PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, vae_file) -> Path:
    """A four-step tiny stage-2 run keeping its checkpoints at steps 2 and 4."""
    from daguerre.training.config import load_run_config
    from daguerre.training.ldm import train_ldm

    configs = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"
    run = tmp_path_factory.mktemp("progress") / "run"
    cfg = load_run_config(configs / "tiny_ldm.toml", "ldm",
                          ["train.steps=4", "train.checkpoint_every=2", "train.keep_last=2", "train.sample_every=0",
                           "train.eval_every=0", "train.lr=3e-3", "train.warmup_steps=1", "train.ema_decay=0.5",
                           "data.n=12", "data.holdout=4"])
    train_ldm(cfg, run, vae_path=vae_file)
    return run


def _in_process(*args: str) -> None:
    from daguerre.cli import main

    assert main(list(args)) == 0, args


def test_progress_draws_every_kept_point_with_one_seed_and_names_the_missing(tiny_run, tmp_path, monkeypatch,
                                                                            capsys):
    """One row per measured point whose checkpoint is kept (step 3 was measured but is gone), a column per prompt,
    every cell the image that step's export draws for that prompt at the one seed, upscaled by nearest."""
    from PIL import Image

    import daguerre

    monkeypatch.setattr(expectations, "_daguerre", _in_process)  # the real export, without a new interpreter
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"label": "tiny", "points": [
        {"step": s, "cpu_hours_quiet": s / 100, "adherence": 0.1 * s} for s in (2, 3, 4)]}))
    png, scale, seed = tmp_path / "grid.png", 2, 5
    assert expectations.progress(tiny_run, points, PROMPTS, seed, str(png), scale) == [2, 4]
    assert "steps [3]" in capsys.readouterr().out
    grid = np.asarray(Image.open(png).convert("RGB"))
    side = 32 * scale + expectations.GRID_PAD
    rows = {}
    for r, step in enumerate((2, 4)):
        model = tmp_path / f"step{step}.safetensors"
        _in_process("train", "export", str(tiny_run), "--step", str(step), "--out", str(model))
        pipe = daguerre.load(str(model))
        y = grid.shape[0] - (2 - r) * side
        rows[step] = grid[y:y + 32 * scale]
        for c, prompt in enumerate(PROMPTS):
            x = grid.shape[1] - (len(PROMPTS) - c) * side
            want = pipe(prompt, seed=seed, n=1)[0].image.convert("RGB").resize((32 * scale,) * 2, Image.NEAREST)
            assert np.array_equal(grid[y:y + 32 * scale, x:x + 32 * scale], np.asarray(want)), (step, prompt)
    assert not np.array_equal(rows[2], rows[4])  # the rows differ by training time


def test_progress_refuses_points_of_another_run(tiny_run, tmp_path):
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"label": "other", "points": [{"step": 1000, "cpu_hours_quiet": 0.5}]}))
    with pytest.raises(ValueError, match=r"points\.json.*\[1000\].*\[2, 4\]"):
        expectations.progress(tiny_run, points, PROMPTS, 1, str(tmp_path / "grid.png"))
