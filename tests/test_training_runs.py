"""Whole training runs on tiny configs (CPU, one thread): both stages overfit one batch, the final model
loads and generates, a run killed with SIGKILL and resumed ends bitwise equal to an uninterrupted one,
two torchrun processes match one process with the same global batch, and a corrupt image in a folder
dataset is skipped by name or stops the run, as `data.on_error` says."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from daguerre.checkpoints.vae_file import load_vae
from daguerre.cli import main
from daguerre.training.config import load_run_config
from daguerre.training.export import export_checkpoint
from daguerre.training.ldm import train_ldm
from daguerre.training.vae import train_vae
from test_golden import SIGKILL_RESUMED, golden, weights_digest

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"  # the shipped run configs
QUIET = ["train.progress=false", "train.sample_every=0", "train.eval_every=0", "train.checkpoint_every=0"]
ONE_BATCH = ["data.n=12", "data.holdout=4", "train.batch_size=8"]  # 8 training images: exactly one batch
OVERFIT = ["train.lr=3e-3", "train.warmup_steps=10", "train.decay='constant'", "train.log_every=10"]
OVERFIT_STEPS = 80
VAE_L1_BOUND = 0.2  # mean |x - x_hat| on [-1, 1], steps 71-80 (measured ~0.12; first 10 steps ~0.6)
LDM_LOSS_BOUND = 0.15  # min-SNR-weighted eps MSE, steps 71-80, posterior mode (measured ~0.05; first 10 steps ~0.8)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _captions(run: Path) -> list[str]:
    """The training captions of a stage-2 run, from its latent cache."""
    from daguerre.training.latents import MANIFEST, _load

    manifest = next((run / "latents").glob(f"*/{MANIFEST}"))
    return _load(manifest.parent, json.loads(manifest.read_text())["shards"]).captions


def _cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_vae_overfits_one_batch_and_writes_its_outputs(tmp_path):
    cfg = load_run_config(CONFIGS / "tiny_vae.toml", "vae",
                          [*QUIET, *ONE_BATCH, *OVERFIT, f"train.steps={OVERFIT_STEPS}"])
    path = train_vae(cfg, tmp_path)
    rows = [r for r in _metrics(tmp_path) if "rec" in r]
    assert rows[-1]["step"] == OVERFIT_STEPS
    assert rows[-1]["rec"] < VAE_L1_BOUND and rows[-1]["rec"] < 0.4 * rows[0]["rec"]
    held = [r for r in _metrics(tmp_path) if "holdout_psnr" in r]
    assert held and 0 < held[-1]["holdout_ssim"] <= 1
    vae, model_cfg = load_vae(path)
    prov = model_cfg.provenance
    assert prov["steps"] == OVERFIT_STEPS and prov["run_config"]["train"]["lr"] == 3e-3
    assert model_cfg.vae.scale_factor != 1.0 and model_cfg.vae.in_channels == 3
    with Image.open(tmp_path / "samples" / f"recon_{OVERFIT_STEPS:08d}.png") as im:
        assert im.size[1] > 2 * 32  # originals above reconstructions


def test_ldm_overfits_one_batch_and_the_model_generates(tmp_path, vae_file, capsys):
    from daguerre.checkpoints import load_model
    from daguerre.pipelines.request import GenerationRequest
    from daguerre.pipelines.txt2img import txt2img

    run = tmp_path / "run"
    cfg = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm",
                          [*QUIET, *ONE_BATCH, *OVERFIT, f"train.steps={OVERFIT_STEPS}", "loss.caption_dropout=0.0",
                           "loss.latents='mode'", "train.checkpoint_every=40", "train.ema_decay=0.9"])
    path = train_ldm(cfg, run, vae_path=vae_file)
    rows = _metrics(run)
    assert rows[-1]["step"] == OVERFIT_STEPS and rows[-1]["loss"] < LDM_LOSS_BOUND
    assert rows[-1]["loss"] < 0.4 * rows[0]["loss"]
    assert (run / "samples" / f"step_{OVERFIT_STEPS:08d}.png").is_file()

    comps = load_model(path)
    prov = comps.config.provenance
    assert prov["steps"] == OVERFIT_STEPS and prov["training_seconds"] > 0 and prov["weights"] == "ema"
    assert prov["run_config"]["stage"] == "ldm"
    assert comps.config.defaults == {"steps": 4, "sampler": "DPM++ 2M", "schedule": "Automatic",
                                     "cfg_scale": 3.0}  # tiny_ldm.toml [sample]
    from daguerre.checkpoints.summary import describe
    from daguerre.commands.info import format_info

    text = format_info(describe(path))
    assert "recommends:      steps 4, sampler DPM++ 2M, schedule Automatic, cfg_scale 3.0" in text
    assert f"trained:         {OVERFIT_STEPS} steps, {OVERFIT_STEPS * 8:,} images" in text
    assert comps.config.vae.scale_factor == load_vae(vae_file)[1].vae.scale_factor
    final = load_file(str(run / "checkpoints" / f"step_{OVERFIT_STEPS:08d}" / "state.safetensors"))
    for k, v in comps.unet.state_dict().items():  # the file holds the EMA weights (stored in float16)
        assert torch.equal(v, final[f"ema.unet.{k}"].half().float()), k
    kept = comps.config.text_encoder.token_ids  # pruned to the tokens of the training captions
    assert kept is not None and len(kept) < 100
    assert set(kept) == {i for c in ["", *_captions(run)] for i in comps.tokenizer(c)[0].tolist()}
    for k, v in comps.text_encoder.state_dict().items():
        ref = final[f"ema.text_encoder.{k}"].half().float()
        if k.endswith("token_embedding.weight"):
            ref = torch.cat([ref[list(kept)], torch.zeros(1, ref.shape[1])])
        assert torch.equal(v, ref), k
    request = GenerationRequest(prompt="a red circle", steps=2, seed=0, cfg_scale=2.0)
    images = txt2img(comps, request.validate(comps.config))
    assert images[0].image.size == (32, 32)

    # `daguerre train export`: checkpoint 40 as a model, and the last checkpoint gives the final model again

    assert main(["train", "export", str(run), "--step", "40", "--out", str(tmp_path / "at40.safetensors")]) == 0
    at40 = load_model(tmp_path / "at40.safetensors")
    assert at40.config.provenance["steps"] == 40 and at40.config.provenance["images_seen"] == 40 * 8
    mid = load_file(str(run / "checkpoints" / "step_00000040" / "state.safetensors"))
    for k, v in at40.unet.state_dict().items():
        assert torch.equal(v, mid[f"ema.unet.{k}"].half().float()), k
    last = load_model(export_checkpoint(run))
    assert last.config.text_encoder == comps.config.text_encoder and last.config.defaults == comps.config.defaults
    for a, b in ((last.unet, comps.unet), (last.text_encoder, comps.text_encoder)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert main(["train", "export", str(run), "--step", "7"]) == 2  # one line naming the steps there are
    if (read_only := _read_only_folder()) is not None:  # refused before the export's work, in one line
        capsys.readouterr()
        assert main(["train", "export", str(run), "--out", str(read_only / "model.safetensors")]) == 2
        line = _error_line(capsys)
        assert line.startswith(f"daguerre train: error: cannot write in the output folder {read_only}"), line
    assert (run / "latents").is_dir()  # reused by a second run of the same data on the same VAE:
    again = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm",
                            [*QUIET, *ONE_BATCH, "train.steps=1", f"data.cache_dir='{run / 'latents'}'"])
    train_ldm(again, tmp_path / "again", vae_path=vae_file)
    assert "reusing the latent cache" in (tmp_path / "again" / "train.log").read_text()


def _run(cmd: list[str], timeout: float = 300) -> None:
    """Run a training command in its own process group; on a timeout or failure stop the whole group."""
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]


def _train_cmd(stage: str, run: Path, vae: Path | None, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "daguerre.training", stage, "--config", str(CONFIGS / f"tiny_{stage}.toml"),
           "--out", str(run)]
    if vae is not None:
        cmd += ["--vae", str(vae)]
    for item in extra:
        cmd += ["--set", item]
    return cmd


def _killed_and_resumed(tmp_path: Path, stage: str, vae: Path | None, extra: list[str], steps: int, every: int
                        ) -> tuple[dict, dict]:
    """The final checkpoint state of an uninterrupted run and of the same run killed with SIGKILL once its first
    checkpoint (step `every`) is written, then resumed."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(_train_cmd(stage, ref, vae, extra))
    proc = subprocess.Popen(_train_cmd(stage, run, vae, extra), env=_cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = run / "checkpoints" / f"step_{every:08d}"
    deadline = time.monotonic() + 120
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "checkpoints" / f"step_{steps:08d}").exists()
    _run(_train_cmd(stage, run, vae, extra) + ["--resume"])
    a = load_file(str(ref / "checkpoints" / f"step_{steps:08d}" / "state.safetensors"))
    b = load_file(str(run / "checkpoints" / f"step_{steps:08d}" / "state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return a, b


def test_sigkill_and_resume_gives_bitwise_the_same_weights(tmp_path, vae_file):
    steps, every = 40, 10
    extra = [*QUIET, f"train.steps={steps}", f"train.checkpoint_every={every}", "train.keep_last=5",
             "train.log_every=5", "data.n=64", "data.holdout=8", "loss.offset_noise=0.05", "data.flip=true"]
    _, b = _killed_and_resumed(tmp_path, "ldm", vae_file, extra, steps, every)
    run = tmp_path / "run"
    assert weights_digest(b) == golden(SIGKILL_RESUMED)  # and to the run before the training rewrite (issue 14)
    steps_logged = [r["step"] for r in _metrics(run) if "loss" in r]
    assert steps_logged == list(range(5, steps + 1, 5))  # the killed run's extra lines were dropped


def test_until_pauses_and_a_resume_continues_exactly_and_records_phase_changes(tmp_path, vae_file, monkeypatch):
    """--until N checkpoints N and stops (no model file); --resume then ends bitwise where an uninterrupted
    run does. A training-phase key (loss.offset_noise) may change at a resume: the change is kept in the
    checkpoints' and the model's config history; other keys still refuse."""
    from daguerre.checkpoints import load_model

    extra = [*QUIET, "train.steps=6", "data.n=24", "data.holdout=4", "train.batch_size=4", "train.keep_last=5"]
    cfg = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", extra)
    train_ldm(cfg, tmp_path / "ref", vae_path=vae_file)
    paused = train_ldm(cfg, tmp_path / "run", vae_path=vae_file, until=3)
    assert paused == tmp_path / "run" / "checkpoints" / "step_00000003" and paused.is_dir()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="--until 2: the run is already at step 3"):
        train_ldm(cfg, tmp_path / "run", vae_path=vae_file, resume=True, until=2)
    train_ldm(cfg, tmp_path / "run", vae_path=vae_file, resume=True)
    a = load_file(str(tmp_path / "ref" / "checkpoints" / "step_00000006" / "state.safetensors"))
    b = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000006" / "state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    shutil.copytree(tmp_path / "ref", tmp_path / "phase")
    longer = ["train.steps=8"]
    with pytest.raises(ValueError, match="train.lr was"):
        train_ldm(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", [*extra, *longer, "train.lr=0.5"]),
                  tmp_path / "phase", vae_path=vae_file, resume=True)
    offset = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm",
                             [*extra, *longer, "loss.offset_noise=0.2", "sample.schedule='Uniform'"])
    path = train_ldm(offset, tmp_path / "phase", vae_path=vae_file, resume=True)
    change = {"step": 6, "key": "loss.offset_noise", "from": 0.0, "to": 0.2}
    meta = json.loads((tmp_path / "phase" / "checkpoints" / "step_00000008" / "state.json").read_text())
    assert meta["config_history"] == [change]
    assert load_model(path).config.provenance["config_history"] == [change]  # (sample.* is no phase)
    assert load_model(path).config.defaults["schedule"] == "Uniform"
    from daguerre.checkpoints.summary import describe
    from daguerre.commands.info import format_info

    assert "phase:           from step 6: loss.offset_noise 0.0 -> 0.2" in format_info(describe(path))
    v = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", [*extra, "train.steps=10", "loss.offset_noise=0.2",
                                                           "model.schedule.prediction_type='v_prediction'"])
    path = train_ldm(v, tmp_path / "phase", vae_path=vae_file, resume=True)  # a new target restarts the EMA
    meta = json.loads((tmp_path / "phase" / "checkpoints" / "step_00000010" / "state.json").read_text())
    assert meta["ema_updates"]["unet"] == 2 and meta["config_history"][-1]["key"] == "model.schedule.prediction_type"
    assert load_model(path).config.schedule.prediction_type == "v_prediction"
    c = load_file(str(tmp_path / "phase" / "checkpoints" / "step_00000008" / "state.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("model.unet."))  # it trained on

    # a timestep-bias phase: the loop draws its timesteps from the biased distribution
    from daguerre.training import losses

    seen = []

    def recording(g, n_steps, cdf):
        seen.append(cdf)
        return draw(g, n_steps, cdf)

    draw = losses.draw_timestep
    monkeypatch.setattr(losses, "draw_timestep", recording)
    bias = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm",
                           [*extra, "train.steps=11", "loss.offset_noise=0.2", "loss.timestep_bias='later'",
                            "loss.timestep_bias_multiplier=4.0", "model.schedule.prediction_type='v_prediction'"])
    train_ldm(bias, tmp_path / "phase", vae_path=vae_file, resume=True)
    assert seen and all(c is not None and c[749] < 0.5 for c in seen)  # 750 of 1000 steps hold 3/7 of the mass
    meta = json.loads((tmp_path / "phase" / "checkpoints" / "step_00000011" / "state.json").read_text())
    assert {c["key"] for c in meta["config_history"] if c["step"] == 10} == {"loss.timestep_bias",
                                                                             "loss.timestep_bias_multiplier"}


def test_init_fine_tunes_and_grows_a_model_that_starts_as_the_same_function(tmp_path, vae_file):
    """`--init MODEL` starts a run from a model's weights; a run that adds an attention level starts as
    the same function (the new spatial transformers end in zero layers), its pruned vocabulary restored.
    A run that lacks the model's tensors, or shapes them otherwise, or another autoencoder, is refused."""
    from daguerre.checkpoints import load_model
    from daguerre.models.text_encoder import CLIPTextEncoder
    from daguerre.models.unet import UNetModel
    from daguerre.training.init import init_ldm

    base = [*QUIET, "data.n=24", "data.holdout=4", "train.batch_size=4"]
    source = train_ldm(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", [*base, "train.steps=3"]),
                       tmp_path / "a", vae_path=vae_file)
    frozen = ["train.lr=0.0", "train.ema_decay=0.0", "train.steps=1", "model.unet.attention_levels=[0,1]",
              "data.max_objects=1"]  # single objects: captions without the relation words the model knew
    args = ["train", "ldm", "--config", str(CONFIGS / "tiny_ldm.toml"), "--vae", str(vae_file),
            "--out", str(tmp_path / "grown"), "--init", str(source)]
    assert main([*args, *[f"--set={kv}" for kv in [*base, *frozen]]]) == 0
    a, b = load_model(source), load_model(tmp_path / "grown" / "model.safetensors")
    assert b.config.unet.attention_levels == (0, 1) and a.config.unet.attention_levels == (1,)
    init = b.config.provenance["init"]
    assert init["file"] == source.name and init["new_tensors"]["unet"] > 0 and init["new_tensors"]["text_encoder"] == 0
    from daguerre.checkpoints.summary import describe
    from daguerre.commands.info import format_info

    line = f"initialised:     from {source.name} (sha256 {init['sha256'][:16]}), {init['new_tensors']['unet']} new"
    assert line in format_info(describe(tmp_path / "grown" / "model.safetensors"))
    assert set(a.config.text_encoder.token_ids) <= set(b.config.text_encoder.token_ids)  # no word forgotten
    above = set(a.tokenizer.encode("above")) - {49406, 49407}  # without start / end
    seen = {i for c in _captions(tmp_path / "grown") for i in a.tokenizer.encode(c)}
    assert above and above.isdisjoint(seen) and above <= set(b.config.text_encoder.token_ids)
    ids = a.tokenizer(["a red circle above a blue square"])
    ctx_a, ctx_b = (c.text_encoder(ids, output_pooled=False).hidden for c in (a, b))
    torch.testing.assert_close(ctx_b, ctx_a, rtol=0, atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(b.unet(x, t, context=ctx_a.expand(2, -1, -1)),
                                   a.unet(x, t, context=ctx_a.expand(2, -1, -1)), rtol=0, atol=1e-5)
    # the grown run resumes without repeating --init (the checkpoints hold the weights and the record)
    assert main(["train", "ldm", "--config", str(CONFIGS / "tiny_ldm.toml"), "--vae", str(vae_file), "--out",
                 str(tmp_path / "grown"), "--resume", *[f"--set={kv}" for kv in [*base, *frozen[:2]]],
                 "--set=train.steps=2", "--set=model.unet.attention_levels=[0,1]", "--set=data.max_objects=1"]) == 0
    assert load_model(tmp_path / "grown" / "model.safetensors").config.provenance["init"] == init

    from daguerre.training.config import derive_model_config

    def nets(**unet):
        mc = derive_model_config(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm",
                                                 [*base, *[f"model.unet.{k}={v}" for k, v in unet.items()]]), 3, None)
        return UNetModel(mc.unet), CLIPTextEncoder(mc.text_encoder)

    with pytest.raises(ValueError, match="tensors this run's U-Net lacks"):
        init_ldm(tmp_path / "grown" / "model.safetensors", *nets(), a.config.provenance["vae_sha256"])
    with pytest.raises(ValueError, match="differ in shape"):
        init_ldm(source, *nets(model_channels=48), a.config.provenance["vae_sha256"])
    with pytest.raises(ValueError, match="not on this run's --vae"):
        init_ldm(source, *nets(), "0" * 64)
    with pytest.raises(FileNotFoundError, match="--init .*nothing.safetensors: no such model"):  # before caching
        train_ldm(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", [*base, "train.init_from='nothing.safetensors'"]),
                  tmp_path / "none", vae_path=vae_file)
    assert not (tmp_path / "none" / "latents").exists()


def test_vae_init_copies_an_autoencoder(tmp_path, vae_file):
    """`train.init_from` in stage 1: the run's autoencoder starts as the file's."""
    cfg = load_run_config(CONFIGS / "tiny_vae.toml", "vae",
                          [*QUIET, *ONE_BATCH, "train.lr=0.0", "train.ema_decay=0.0", "train.steps=1",
                           f"train.init_from='{vae_file}'"])
    path = train_vae(cfg, tmp_path)
    src, dst = load_vae(vae_file)[0], load_vae(path)
    assert dst[1].provenance["init"]["file"] == vae_file.name
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst[0].state_dict()[k], v, rtol=0, atol=1e-3 * (1 + float(v.abs().max())))


def test_vae_resume_with_discriminator_is_exact(tmp_path):
    extra = [*QUIET, "data.n=40", "data.holdout=8", "train.steps=8", "train.checkpoint_every=4", "train.keep_last=3",
             "loss.disc_weight=0.5", "loss.disc_start=2", "loss.disc_channels=8", "loss.disc_layers=2",
             "loss.perceptual=ssim", "loss.perceptual_weight=0.1", "train.batch_size=4", "train.grad_accum=2",
             "data.flip=true"]
    cfg = load_run_config(CONFIGS / "tiny_vae.toml", "vae", extra)
    train_vae(cfg, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000008")
    with pytest.raises(ValueError, match="--resume"):
        train_vae(cfg, tmp_path / "b")
    train_vae(cfg, tmp_path / "b", resume=True)
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000008" / "state.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000008" / "state.safetensors"))
    assert any(k.startswith("optim.disc.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "a" / "vae.safetensors").read_bytes() != b""  # (the file embeds timings; weights compared above)
    changed = load_run_config(CONFIGS / "tiny_vae.toml", "vae", [*extra, "train.lr=1e-2"])
    with pytest.raises(ValueError, match="train.lr"):
        train_vae(changed, tmp_path / "b", resume=True)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, vae_file):
    common = [*QUIET, "train.steps=6", "data.n=64", "data.holdout=8", "train.checkpoint_every=6"]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_train_cmd("ldm", tmp_path / "two", vae_file, [*common, "train.batch_size=2", "train.grad_accum=2"])[1:]]
    _run(two)
    _run(_train_cmd("ldm", tmp_path / "one", vae_file, [*common, "train.batch_size=8"]))
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step_00000006" / "state.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step_00000006" / "state.safetensors"))
    assert json.loads((tmp_path / "two" / "checkpoints" / "step_00000006" / "state.json").read_text())["world"] == 2
    for k in a:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-6, msg=k)


def test_bf16_checkpointing_frozen_text_and_unconditional_runs(tmp_path, vae_file):
    fast = [*QUIET, "data.n=24", "data.holdout=4", "train.steps=3", "train.batch_size=4", "train.bf16=true",
            "train.gradient_checkpointing=true"]
    train_vae(load_run_config(CONFIGS / "tiny_vae.toml", "vae", fast), tmp_path / "vae")
    train_ldm(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", [*fast, "model.schedule.prediction_type='v_prediction'",
                                                                 "loss.train_text_encoder=false"]),
              tmp_path / "ldm", vae_path=vae_file)
    train_ldm(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", [*fast, "model.conditioning='none'",
                                                                 "sample.n_unconditional=2"]),
              tmp_path / "uncond", vae_path=vae_file)
    from daguerre.checkpoints import load_model

    uncond = load_model(tmp_path / "uncond" / "model.safetensors")
    assert uncond.text_encoder is None and uncond.config.unet.num_classes is None
    for run in ("vae", "ldm", "uncond"):
        rows = [r for r in _metrics(tmp_path / run) if "loss" in r]
        assert rows and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)


def _class_folder(root: Path, corrupt: bool) -> Path:
    rng = np.random.default_rng(0)
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / name).mkdir(parents=True)
        for i in range(6):
            arr = np.clip(np.array(colour) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    if corrupt:
        (root / "red" / "0_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    return root


def test_corrupt_image_in_a_folder_is_skipped_by_name_or_fatal(tmp_path, vae_file, capsys):
    from daguerre.checkpoints import load_model
    from daguerre.pipelines.request import GenerationRequest
    from daguerre.pipelines.txt2img import txt2img

    root = _class_folder(tmp_path / "images", corrupt=True)
    extra = [*QUIET, "data.kind='folder'", f"data.root='{root}'", "data.holdout=2", "train.steps=3",
             "train.batch_size=4", "model.conditioning='class'"]
    cfg = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", [*extra, "data.on_error='skip'"])
    path = train_ldm(cfg, tmp_path / "skip", vae_path=vae_file)
    assert "0_broken.png" in (tmp_path / "skip" / "train.log").read_text()
    comps = load_model(path)
    assert comps.config.class_names == ["blue", "red"] and comps.config.unet.num_classes == 3
    out = txt2img(comps, GenerationRequest(class_label="red", steps=2, seed=0, cfg_scale=2.0).validate(comps.config))
    assert out[0].image.size == (32, 32)

    capsys.readouterr()
    sets = [a for item in [*extra[:-1], "data.on_error='raise'", "train.batch_size=12"] for a in ("--set", item)]
    code = main(["train", "vae", "--config", str(CONFIGS / "tiny_vae.toml"), "--out", str(tmp_path / "raise"), *sets])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's INFO lines: one error line
    assert code == 2 and last.startswith("daguerre train: error:") and "0_broken.png" in last and "on_error" in last


def _file(path: Path) -> tuple[dict[str, bytes], dict]:
    """A model file's tensors (name -> dtype, shape and raw bytes) and its config without the time-dependent keys."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: (str(t.dtype), tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                   for k in f.keys() for t in [f.get_tensor(k)]}
        meta = dict(f.metadata())
    config = json.loads(meta.pop("daguerre_config"))
    for key in ("training_seconds", "finished"):
        config["provenance"].pop(key)
    return tensors, {**meta, "config": config}


@pytest.mark.parametrize("conditioning", ["text", "class"])
def test_export_needs_only_the_checkpoint_no_data_no_caches(conditioning, tmp_path, vae_file):
    """`train export` builds the model from the checkpoint alone: with the image folder and the latent cache
    deleted, the last checkpoint exports as the run's own model file, byte for byte in every tensor (EMA
    weights; the text encoder's vocabulary pruned to the training captions) and in the metadata apart from the
    time-dependent keys; the class names (of a class-conditional model) come from the checkpoint too."""
    from daguerre.checkpoints import load_model

    root = _class_folder(tmp_path / "images", corrupt=False)
    run = tmp_path / "run"
    cfg = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", [
        *QUIET, "data.kind='folder'", f"data.root='{root}'", "data.holdout=2", "train.steps=2", "train.batch_size=4",
        f"model.conditioning='{conditioning}'", "train.checkpoint_every=1", f"data.cache_dir='{run / 'latents'}'"])
    model = train_ldm(cfg, run, vae_path=vae_file)
    shutil.rmtree(root)
    shutil.rmtree(run / "latents")
    exported = export_checkpoint(run, out=tmp_path / "exported.safetensors")
    assert _file(exported) == _file(model)
    comps = load_model(exported)
    if conditioning == "class":
        assert comps.config.class_names == ["blue", "red"]
    else:
        assert len(comps.config.text_encoder.token_ids) < 20  # the captions "blue" and "red", and the special tokens
    at1 = load_model(export_checkpoint(run, step=1, out=tmp_path / "at1.safetensors"))
    mid = load_file(str(run / "checkpoints" / "step_00000001" / "state.safetensors"))
    assert at1.config.provenance["steps"] == 1
    for k, v in at1.unet.state_dict().items():
        assert torch.equal(v, mid[f"ema.unet.{k}"].half().float()), k
    meta_file = run / "checkpoints" / "step_00000001" / "state.json"  # an autoencoder the run did not train on
    meta_file.write_text(meta_file.read_text().replace(json.loads(meta_file.read_text())["vae_sha256"], "0" * 64))
    with pytest.raises(ValueError, match=f"autoencoder {vae_file} is not the file it trained on"):
        export_checkpoint(run, step=1, out=tmp_path / "other.safetensors")


TINY_VAE_RUN = [*QUIET, "data.n=12", "data.holdout=2", "train.batch_size=2", "train.checkpoint_every=1",
                "train.keep_last=5"]


def _train_vae_cli(run: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "vae", "--config", "tiny_vae", "--out", str(run),
            *[a for item in [*TINY_VAE_RUN, f"train.steps={steps}"] for a in ("--set", item)], *extra]


def _error_line(capsys) -> str:
    """The last stderr line, after the run's INFO lines; no traceback anywhere."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err, err
    return err.strip().splitlines()[-1]


def test_resume_skips_damaged_checkpoints_and_names_them(tmp_path, capsys):
    """A newest checkpoint cut short (a crash, a full disk) or with a garbage state.json: --resume goes on
    from the newest one that reads, saying which step and which file it skipped and why; when none reads,
    one line naming the files. The damaged folder is rewritten when the run reaches its step."""
    from safetensors.torch import load_file as load

    run = tmp_path / "run"
    assert main(_train_vae_cli(run, 3)) == 0
    ckpts = run / "checkpoints"
    cut = ckpts / "step_00000003" / "state.safetensors"
    cut.write_bytes(cut.read_bytes()[:1000])
    capsys.readouterr()
    assert main(_train_vae_cli(run, 4, "--resume")) == 0
    err = capsys.readouterr().err
    assert "skipped the damaged checkpoint" in err and f"{cut}: truncated safetensors file" in err
    assert "resumed from step 2 (checkpoint" in err
    assert load(str(cut)).keys() and (ckpts / "step_00000004").is_dir()  # step 3 written again, then step 4

    (ckpts / "step_00000004" / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(_train_vae_cli(run, 5, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"{ckpts / 'step_00000004' / 'state.json'}: JSON nested too deeply" in err
    assert "resumed from step 3 (checkpoint" in err

    for folder in ckpts.iterdir():
        (folder / "state.json").write_text('{"format": "daguerre-train-state-1", "step": ')
    assert main(_train_vae_cli(run, 6, "--resume")) == 2
    line = _error_line(capsys)
    assert line.startswith("daguerre train: error: cannot resume") and "no checkpoint reads" in line
    assert f"{ckpts / 'step_00000005' / 'state.json'}: not valid JSON" in line
    assert (run / "config.json").is_file()  # nothing written is lost

    (run / "config.json").write_text('{"stage": "vae", "train": {"steps": "many"}}')  # --config RUN/config.json
    assert main(["train", "vae", "--config", str(run / "config.json"), "--out", str(tmp_path / "other")]) == 2
    assert f"{run / 'config.json'}: config key train.steps: expected a whole number" in _error_line(capsys)


def test_a_full_disk_or_a_read_only_folder_is_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch):
    """The disk fills while checkpoint 2 is written: one line naming the run folder, exit 2, checkpoint 1
    intact, and the run continues from it with --resume once there is space. An output folder that
    cannot be written (for `train` and `train export`) is one line before any work."""
    import errno

    from daguerre.training import state

    real = state.atomic_save_safetensors
    calls = []

    def full_after_one(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write() on a full disk raises
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(state, "atomic_save_safetensors", full_after_one)
    run = tmp_path / "run"
    assert main(_train_vae_cli(run, 3)) == 2
    line = _error_line(capsys)
    assert line.startswith("daguerre train: error: cannot write") and str(run) in line
    assert "No space left on device" in line and "--resume" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]  # no half-written folder
    monkeypatch.setattr(state, "atomic_save_safetensors", real)
    assert main(_train_vae_cli(run, 3, "--resume")) == 0
    assert "resumed from step 1" in capsys.readouterr().err and (run / "vae.safetensors").is_file()

    read_only = _read_only_folder()
    if read_only is None:
        pytest.skip("no read-only folder to test with")
    for argv in (_train_vae_cli(read_only / "run", 1), _train_vae_cli(read_only, 1)):
        assert main(argv) == 2
        line = _error_line(capsys)
        assert line.startswith("daguerre train: error: cannot write in the output folder") and str(read_only) in line


def _read_only_folder() -> Path | None:
    """/sys: read-only even for root, for whom permission bits do not stop a write (None if writable here)."""
    folder = Path("/sys")
    if not folder.is_dir():
        return None
    try:
        (folder / ".daguerre-probe").touch()
    except OSError:
        return folder
    (folder / ".daguerre-probe").unlink()
    return None


def test_export_of_an_autoencoder_run_says_how_to_end_it_at_a_step(tmp_path, capsys):
    """`train export` makes models of stage-2 runs; on an autoencoder run it says how to get its file at the
    newest checkpoint (issue 17's new-user check), and the command it names writes vae.safetensors."""
    run = tmp_path / "run"
    assert main(_train_vae_cli(run, 3)) == 0
    (run / "vae.safetensors").unlink()  # as if it had been stopped after step 3 of more
    capsys.readouterr()
    assert main(["train", "export", str(run)]) == 2
    line = _error_line(capsys)
    assert "is an autoencoder checkpoint" in line and f"--out {run} --resume --set train.steps=3" in line
    assert main(_train_vae_cli(run, 3, "--resume")) == 0
    assert (run / "vae.safetensors").is_file()
