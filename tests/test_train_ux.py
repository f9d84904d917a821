"""Training runs a user can watch and trust (issue 17, point 4): sample grids with each image's prompt or class
under it and several seeds per prompt; the loss in the log without the progress bar; the caption source named
at start-up; `daguerre info` listing a class model's classes; a warning for `[sample]` keys a model ignores;
SIGINT / SIGTERM stopping with a checkpoint and the command that continues the run; the held-out split drawn at
random with data.seed (and the latent cache following it); a finished run resumed keeping its final file."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont
from safetensors.torch import load_file

from daguerre.cli import main
from daguerre.conditioning import conditioner_for
from daguerre.data.split import holdout_split
from daguerre.training.config import SampleConfig, load_run_config
from daguerre.training.data import LAST_SPLIT, RANDOM_SPLIT, describe_data, load_train_data
from daguerre.training.ldm import train_ldm
from daguerre.training.loop import EXPORT_RECORD, TrainingInterrupted, run
from daguerre.training.samples import MIN_CELL, captioned_grid, ignored_sample_settings, sample_grid, wrap_caption
from daguerre.training.vae import VAEStage
from test_golden import weights_digest
from test_training_loop import SETS as TOY_SETS
from test_training_loop import ToyStage
from test_training_runs import CONFIGS, QUIET, _class_folder


@pytest.fixture(autouse=True)
def _sigint_as_in_a_terminal():
    """A run keeps SIGINT ignored when it starts ignored (`nohup cmd &`: the shell's rule for background jobs), so
    these tests start from Python's own Ctrl-C handler, however pytest itself was started."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


VAE_SETS = [*QUIET, "data.n=16", "data.holdout=4", "train.batch_size=4", "train.steps=6", "train.log_every=2",
            "train.checkpoint_every=3"]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- 1. sample grids: captions and seeds per prompt ----------------------------------------------------------

def test_captions_wrap_to_the_cell_and_end_in_an_ellipsis_when_too_long():
    font = ImageFont.load_default()
    lines = wrap_caption("a purple heart to the left of an orange diamond", font, 92)
    assert len(lines) > 1 and all(font.getlength(line) <= 92 for line in lines)
    assert " ".join(lines) == "a purple heart to the left of an orange diamond"  # nothing lost when it fits
    cut = wrap_caption("a purple heart to the left of an orange diamond " * 4, font, 92, max_lines=3)
    assert len(cut) == 3 and cut[-1].endswith("...") and all(font.getlength(line) <= 92 for line in cut)
    long = wrap_caption("supercalifragilisticexpialidocious", font, 40)  # one word wider than the cell: cut
    assert len(long) > 1 and all(font.getlength(line) <= 40 for line in long)
    assert "".join(long).replace("...", "") in "supercalifragilisticexpialidocious"


def test_captioned_grid_enlarges_small_images_and_writes_each_caption_under_its_image():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    captions = ["a photo of a horse", "a photo of a horse", "a photo of a frog", ""]
    out = np.asarray(captioned_grid(images, captions, cols=2))
    scale = -(-MIN_CELL // 32)  # 32-pixel samples are enlarged to at least MIN_CELL
    w = 32 * scale
    assert out.shape[1] == 2 * (w + 2) + 2
    cell_h = (out.shape[0] - 2) // 2 - 2
    cells, strips = [], []
    for i in range(4):
        r, c = divmod(i, 2)
        x, y = 2 + c * (w + 2), 2 + r * (cell_h + 2)
        cells.append(out[y:y + w, x:x + w])
        strips.append(out[y + w:y + cell_h, x:x + w])
    for image, cell in zip(images, cells, strict=True):  # the image itself, enlarged by pixel repetition
        assert np.array_equal(cell, np.asarray(image.resize((w, w), Image.Resampling.NEAREST)))
    assert (strips[0] < 100).any()  # dark text on the light strip
    assert np.array_equal(strips[0], strips[1]) and not np.array_equal(strips[0], strips[2])
    assert (strips[3] == 255).all()  # no caption, no ink
    with pytest.raises(ValueError, match="2 images and 1 captions"):
        captioned_grid(images[:2], captions[:1], cols=2)
    other = captioned_grid(images[:1], ["日本語のプロンプト ✓ é " * 20], cols=1)  # any script, any length
    assert other.size == captioned_grid(images[:1], ["a purple heart to the left of an orange diamond " * 4],
                                        cols=1).size  # cut to 3 lines as a long Latin caption is


def test_sample_grid_draws_several_seeds_per_prompt_and_captions_them():
    import daguerre
    from daguerre.pipelines.request import GenerationRequest
    from daguerre.pipelines.txt2img import txt2img

    comps = daguerre.load("random:tiny").components
    sample = SampleConfig(prompts=["a red circle", "a blue square"], seeds_per_prompt=2, steps=2, seed=5)
    grid = np.asarray(sample_grid(comps, sample))
    w = comps.config.sample_size * -(-MIN_CELL // comps.config.sample_size)
    assert grid.shape[1] == 2 * (w + 2) + 2  # two seeds of one prompt side by side, a prompt per row
    cell_h = (grid.shape[0] - 2) // 2 - 2
    for i, (prompt, seed) in enumerate([("a red circle", 5), ("a red circle", 6), ("a blue square", 5),
                                        ("a blue square", 6)]):
        r, c = divmod(i, 2)
        x, y = 2 + c * (w + 2), 2 + r * (cell_h + 2)
        req = GenerationRequest(prompt=prompt, steps=2, sampler=sample.sampler, schedule=sample.schedule,
                                cfg_scale=sample.cfg_scale, seed=seed).validate(comps.config)
        expected = txt2img(comps, req)[0].image.resize((w, w), Image.Resampling.NEAREST)
        assert np.array_equal(grid[y:y + w, x:x + w], np.asarray(expected)), (prompt, seed)
    with pytest.raises(ValueError, match="sample.seeds_per_prompt"):
        load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", ["sample.seeds_per_prompt=0"])


# --- a class-conditional run: grid of class names, the ignored prompts warned about, `info` lists the classes --

@pytest.fixture(scope="module")
def class_run(tmp_path_factory, vae_file) -> Path:
    tmp = tmp_path_factory.mktemp("class_run")
    root = _class_folder(tmp / "images", corrupt=False)
    cfg = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", [
        *QUIET, "data.kind='folder'", f"data.root='{root}'", "data.holdout=2", "train.steps=2", "train.batch_size=4",
        "model.conditioning='class'", "train.sample_every=2", "sample.steps=2", "sample.seeds_per_prompt=2",
        "sample.prompts=['a red square']"])
    train_ldm(cfg, tmp / "run", vae_path=vae_file)
    return tmp / "run"


def test_a_class_run_names_its_caption_source_warns_of_ignored_prompts_and_captions_grids_by_class(class_run):
    log = (class_run / "train.log").read_text()
    assert "captions: class folders (2 classes)" in log
    assert "[sample] prompts are ignored: this is a class-conditional model" in log
    grid = Image.open(class_run / "samples" / "step_00000002.png")
    w = 32 * -(-MIN_CELL // 32)
    assert grid.size[0] == 2 * (w + 2) + 2  # 2 classes x 2 seeds: 2 columns, one class per row
    assert grid.size[1] > 2 * (w + 2)  # with a caption strip under each row of images


def test_info_lists_a_class_conditional_models_classes(class_run, capsys):
    assert main(["info", str(class_run / "model.safetensors"), "--no-hash"]) == 0
    out = capsys.readouterr().out
    assert "classes:         2: 0 blue, 1 red" in out
    assert main(["info", "shapes", "--no-hash"]) == 0  # a text-conditional model has no classes line
    assert "classes:" not in capsys.readouterr().out


def test_ignored_sample_settings_are_named_for_each_kind_of_model():
    import daguerre

    text_cfg = daguerre.load("random:tiny").config
    import dataclasses

    class_cfg = dataclasses.replace(text_cfg, conditioning="class", class_names=["cat", "dog"])
    none_cfg = dataclasses.replace(text_cfg, conditioning="none", class_names=None)
    given = SampleConfig(prompts=["a cat"], labels=[1])
    assert ignored_sample_settings(conditioner_for(text_cfg), SampleConfig()) == []
    [labels] = ignored_sample_settings(conditioner_for(text_cfg), given)
    assert labels.startswith("[sample] labels are ignored: this is a text-conditional model")
    [prompts] = ignored_sample_settings(conditioner_for(class_cfg), given)
    assert prompts.startswith("[sample] prompts are ignored: this is a class-conditional model")
    assert ignored_sample_settings(conditioner_for(class_cfg), SampleConfig()) == []  # defaults: no warning
    assert len(ignored_sample_settings(conditioner_for(none_cfg), given)) == 2
    assert "sample.n_unconditional" in ignored_sample_settings(conditioner_for(none_cfg), given)[0]
    inpaint = dataclasses.replace(text_cfg, concat="inpaint")
    assert ignored_sample_settings(conditioner_for(inpaint), SampleConfig(prompts=["", ""])) == []
    [concat] = ignored_sample_settings(conditioner_for(inpaint), SampleConfig(prompts=["a cat"]))
    assert "their own captions" in concat


# --- 2. the loss in the log without the progress bar; 3. the caption source --------------------------------

def test_without_the_progress_bar_every_logged_step_is_a_line_of_the_log(tmp_path):
    cfg = load_run_config(CONFIGS / "tiny_vae.toml", "vae", [*VAE_SETS, "train.checkpoint_every=0"])
    from daguerre.training.vae import train_vae

    train_vae(cfg, tmp_path)
    log = (tmp_path / "train.log").read_text()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == [2, 4, 6]
    for r in losses:
        assert f"step {r['step']}/6: loss {r['loss']:.4g}, " in log
    assert "images/s, ETA 0:00:0" in log


def _images(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(root / name)


def test_the_caption_source_of_a_folder_is_named(tmp_path, caplog):
    from daguerre.data.folder import ImageFolder

    plain = tmp_path / "plain"
    _images(plain, ["a.png", "b.png", "c.png"])
    assert ImageFolder(plain, size=8).caption_source == "none"
    (plain / "a.txt").write_text("a red square")
    assert ImageFolder(plain, size=8).caption_source == ".txt sidecars (1 of 3 images, empty captions for the rest)"
    (plain / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "red"}\n')
    assert ImageFolder(plain, size=8).caption_source == "metadata.jsonl"
    classes = tmp_path / "classes"
    _images(classes, ["cat/1.png", "cat/2.png", "dog/1.png"])
    assert ImageFolder(classes, size=8).caption_source == "class folders (2 classes)"
    (classes / "dog" / "1.txt").write_text("a dog")
    assert ImageFolder(classes, size=8).caption_source == (".txt sidecars (1 of 3 images, class folders (2 classes) "
                                                           "for the rest)")
    caplog.set_level(logging.INFO, logger="daguerre.train")
    cfg = load_run_config(CONFIGS / "tiny_vae.toml", "vae", ["data.kind='folder'", f"data.root='{plain}'",
                                                              "data.holdout=1", "data.size=8"])
    load_train_data(cfg.data)
    assert f"data: folder {plain}, 3 images (1 held out, drawn at random with data.seed 0); captions: " \
           "metadata.jsonl" in caplog.text
    load_train_data(load_run_config(CONFIGS / "tiny_vae.toml", "vae", ["data.n=10", "data.holdout=2"]).data)
    assert "captions: built in: the shapes world's scene descriptions" in caplog.text


# --- 6. SIGINT / SIGTERM: a checkpoint of the step, the command that continues --------------------------------

class SignalledStage(ToyStage):
    """The toy stage, sending this process `signals` during step `at`."""

    def __init__(self, cfg, at: int, signals: tuple[int, ...]) -> None:
        super().__init__(cfg)
        self.at, self.signals = at, signals

    def step(self, step: int, micro: int, sync: bool) -> dict[str, float]:
        if step == self.at and micro == 0:
            for sig in self.signals:
                os.kill(os.getpid(), sig)
        return super().step(step, micro, sync)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_checkpoints_the_step_and_a_resume_ends_as_an_uninterrupted_run(sig, tmp_path):
    cfg = load_run_config(None, "vae", TOY_SETS)  # checkpoints every 2 steps; the signal comes in step 3
    whole = run(ToyStage(cfg), cfg, tmp_path / "whole")
    with pytest.raises(TrainingInterrupted) as stopped:
        run(SignalledStage(cfg, at=2, signals=(sig,)), cfg, tmp_path / "run")
    assert stopped.value.signal_name == signal.Signals(sig).name and stopped.value.step == 3
    assert stopped.value.checkpoint == tmp_path / "run" / "checkpoints" / "step_00000003"
    assert (stopped.value.checkpoint / "state.json").is_file() and not (tmp_path / "run" / "toy.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert f"stopped by {signal.Signals(sig).name} after step 3 of 6" in (tmp_path / "run" / "train.log").read_text()
    resumed = run(ToyStage(cfg), cfg, tmp_path / "run", resume=True)
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_stops_at_once(tmp_path):
    cfg = load_run_config(None, "vae", TOY_SETS)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(SignalledStage(cfg, at=2, signals=(signal.SIGINT, signal.SIGINT)), cfg, tmp_path)
    assert not isinstance(stopped.value, TrainingInterrupted)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]  # no step 3


def test_the_cli_prints_the_checkpoint_and_the_command_that_continues_the_run(tmp_path, capsys, monkeypatch):
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert main(["train", "vae", "--config", "tiny_vae", "--out", str(whole), *_sets(VAE_SETS)]) == 0
    step = VAEStage.step

    def interrupted_once(self, i, micro, sync):
        if i == 3 and not (out / "checkpoints" / "step_00000004").exists():
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, i, micro, sync)

    monkeypatch.setattr(VAEStage, "step", interrupted_once)
    capsys.readouterr()
    assert main(["train", "vae", "--config", "tiny_vae", "--out", str(out), *_sets(VAE_SETS)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == f"daguerre train vae: stopped by SIGINT after step 4: saved the checkpoint " \
                      f"{out / 'checkpoints' / 'step_00000004'}"
    command = err[-1].removeprefix("continue with: ")
    assert command == shlex.join(["daguerre", "train", "vae", "--config", "tiny_vae", "--out", str(out),
                                  *_sets(VAE_SETS), "--resume"])
    assert main(shlex.split(command)[1:]) == 0  # the printed command, as a user would paste it
    assert weights_digest(load_file(str(out / "vae.safetensors"))) == \
        weights_digest(load_file(str(whole / "vae.safetensors")))


def test_an_interrupt_before_the_first_checkpoint_still_prints_the_command(tmp_path, capsys, monkeypatch):
    import daguerre.training.loop as loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "load_train_data", interrupted)
    assert main(["train", "vae", "--out", str(tmp_path), "--set", "train.progress=false"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == "daguerre train vae: interrupted before its first checkpoint"
    assert err[-1] == f"continue with: daguerre train vae --out {tmp_path} --set train.progress=false --resume"


# --- 7. the held-out split: at random with data.seed; the latent cache follows it; older runs keep theirs -----

def test_the_held_out_split_is_drawn_at_random_with_the_data_seed():
    cfg = load_run_config(CONFIGS / "tiny_vae.toml", "vae", ["data.n=40", "data.holdout=8", "data.seed=3"]).data
    data = load_train_data(cfg)
    train, held = holdout_split(40, 8, seed=3)
    assert np.array_equal(data.holdout, held) and np.array_equal(data.train_pool, train)
    assert not np.array_equal(data.holdout, np.arange(32, 40)) and data.split == RANDOM_SPLIT
    old = load_train_data(cfg, LAST_SPLIT)  # a run begun before the random split keeps the last items
    assert np.array_equal(old.holdout, np.arange(32, 40)) and np.array_equal(old.train_pool, np.arange(32))
    assert describe_data(cfg) == {**describe_data(cfg, LAST_SPLIT), "split": "random"}  # a new latent-cache key


def test_the_latent_cache_holds_the_training_images_of_the_split(tmp_path, vae_file):
    """Two runs on one folder that differ in data.seed hold out different images: each gets its own latent
    cache, holding exactly its training images (nothing of the other split is reused)."""
    from safetensors import safe_open

    root = _class_folder(tmp_path / "images", corrupt=False)
    caches = {}
    for seed in (0, 1):
        cfg = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", [
            *QUIET, "data.kind='folder'", f"data.root='{root}'", "data.holdout=4", "train.steps=1",
            "train.batch_size=4", f"data.seed={seed}", f"data.cache_dir='{tmp_path / 'cache'}'"])
        train_ldm(cfg, tmp_path / f"run{seed}", vae_path=vae_file)
        assert "reusing the latent cache" not in (tmp_path / f"run{seed}" / "train.log").read_text()
        new = [f for f in (tmp_path / "cache").iterdir() if f.name not in caches.values() and f.name != "text"]
        [caches[seed]] = [f.name for f in new]
        with safe_open(str(tmp_path / "cache" / caches[seed] / "shard_00000.safetensors"), "pt") as f:
            index = f.get_tensor("index").numpy()
        assert np.array_equal(index, holdout_split(12, 4, seed)[0])
    assert caches[0] != caches[1]


def test_a_run_begun_before_the_random_split_resumes_on_its_own_split(tmp_path, caplog):
    cfg = load_run_config(CONFIGS / "tiny_vae.toml", "vae", VAE_SETS)
    from daguerre.training.vae import train_vae

    train_vae(cfg, tmp_path, until=3)
    meta_file = tmp_path / "checkpoints" / "step_00000003" / "state.json"
    meta = json.loads(meta_file.read_text())
    assert meta["split"] == RANDOM_SPLIT
    del meta["split"]  # as a checkpoint of the previous release
    meta_file.write_text(json.dumps(meta))
    path = train_vae(cfg, tmp_path, resume=True)
    assert "4 held out, the last ones, as when this run began" in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "checkpoints" / "step_00000006" / "state.json").read_text())["split"] == LAST_SPLIT
    from daguerre.checkpoints.vae_file import load_vae

    assert "split" not in load_vae(path)[1].provenance["data"]  # the description (and cache key) of that split


# --- 8. a finished run resumed keeps its final file ------------------------------------------------------------

def test_resuming_a_finished_vae_run_keeps_its_file_so_the_ldm_trained_on_it_resumes(tmp_path, capsys):
    vae_run, ldm_run = tmp_path / "vae", tmp_path / "ldm"
    vae_argv = ["train", "vae", "--config", "tiny_vae", "--out", str(vae_run), *_sets(VAE_SETS)]
    assert main(vae_argv) == 0
    vae = vae_run / "vae.safetensors"
    sha = _sha(vae)
    ldm_argv = ["train", "ldm", "--config", "tiny_ldm", "--vae", str(vae), "--out", str(ldm_run),
                *_sets([*QUIET, "data.n=12", "data.holdout=4", "train.batch_size=4", "train.checkpoint_every=1"])]
    assert main([*ldm_argv, "--set", "train.steps=1"]) == 0
    assert main([*vae_argv, "--resume"]) == 0  # the finished autoencoder run, resumed
    assert _sha(vae) == sha and "the run finished at step 6" in (vae_run / "train.log").read_text()
    assert main([*ldm_argv, "--set", "train.steps=2", "--resume"]) == 0  # trains on: the same autoencoder
    os.remove(vae_run / EXPORT_RECORD)  # a run finished before the record: the file newer than its checkpoint
    assert main([*vae_argv, "--resume"]) == 0 and _sha(vae) == sha
    capsys.readouterr()
    assert main([*vae_argv, "--set", "train.steps=4", "--resume"]) == 2  # a checkpoint beyond train.steps
    assert "already at step 6, beyond train.steps 4" in capsys.readouterr().err


def test_a_final_file_older_than_the_end_of_the_run_or_missing_is_written_again(tmp_path):
    from daguerre.checkpoints.vae_file import load_vae

    argv = ["train", "vae", "--config", "tiny_vae", "--out", str(tmp_path), *_sets(VAE_SETS)]
    assert main(argv) == 0
    vae = tmp_path / "vae.safetensors"
    assert main([*argv, "--set", "train.steps=8", "--until", "7", "--resume"]) == 0  # a pause at step 7
    assert load_vae(vae)[1].provenance["steps"] == 6  # the file of step 6 is still there
    assert main([*argv, "--set", "train.steps=7", "--resume"]) == 0  # the run now ends at step 7: a new file
    assert load_vae(vae)[1].provenance["steps"] == 7
    assert json.loads((tmp_path / EXPORT_RECORD).read_text())["step"] == 7
    os.remove(vae)
    assert main([*argv, "--set", "train.steps=7", "--resume"]) == 0 and vae.is_file()  # missing: written again
