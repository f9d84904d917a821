"""Stage 2 with image concatenation (training/concat.py): super-resolution and 9-channel inpainting models
overfit one batch, load, and run through `daguerre upscale` / `daguerre inpaint`; the conditioning the
trainer builds equals the one the pipelines build for the same image and mask; an inpainting run stopped
at N steps and resumed to 2N equals an uninterrupted 2N run, bitwise; random crops reach DataLoader
workers (the same crops as in-process loading, new ones every epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from daguerre.cli import main
from daguerre.components import build_components
from daguerre.conditioning import LowresConcat, latent_mask
from daguerre.pipelines.images import image_to_tensor
from daguerre.pipelines.request import GenerationRequest
from daguerre.training import concat, dist
from daguerre.training.config import DataConfig, FolderData, derive_model_config, load_run_config
from daguerre.training.data import batch_loader, load_train_data
from daguerre.training.ldm import train_ldm

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"  # the shipped run configs
QUIET = ["train.progress=false", "train.sample_every=0", "train.eval_every=0"]
ONE_BATCH = ["data.n=8", "data.holdout=4", "train.batch_size=4"]  # 4 training images: exactly one batch
OVERFIT = ["train.lr=3e-3", "train.warmup_steps=5", "train.decay='constant'", "train.log_every=5",
           "loss.caption_dropout=0.0", "loss.latents='mode'", "train.ema_decay=0.9"]
STEPS = 40
LOSS_BOUND = 0.2  # min-SNR-weighted eps MSE, mean of steps 36-40 (measured ~0.10; steps 1-5 ~0.92)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _overfit(kind: str, run: Path, vae_file: Path, extra: list[str]) -> Path:
    cfg = load_run_config(CONFIGS / f"tiny_{kind}_ldm.toml", "ldm", [*QUIET, *ONE_BATCH, *OVERFIT, *extra])
    path = train_ldm(cfg, run, vae_path=vae_file)
    rows = _metrics(run)
    assert rows[-1]["step"] == cfg.train.steps
    assert rows[-1]["loss"] < LOSS_BOUND and rows[-1]["loss"] < 0.35 * rows[0]["loss"]
    return path


def test_sr_model_overfits_and_upscales_from_the_cli(tmp_path, vae_file, capsys):
    from daguerre.checkpoints import load_model
    from daguerre.pngmeta import parse_parameters, read_png_parameters

    path = _overfit("sr", tmp_path / "sr", vae_file, [f"train.steps={STEPS}", "train.checkpoint_every=0"])
    comps = load_model(path)
    cfg = comps.config
    assert cfg.concat == "lowres" and cfg.unet.in_channels == 4 + 3 and cfg.unet.num_classes == 101
    assert (tmp_path / "sr" / "samples" / f"step_{STEPS:08d}.png").is_file()
    small = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(small)
    out = tmp_path / "up.png"
    argv = ["upscale", str(small), "a red circle", "--scale", "4", "--model", str(path), "--steps", "2", "--seed", "1"]
    assert main([*argv, "--noise-level", "30", "-o", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    params = parse_parameters(read_png_parameters(out))[2]
    assert params["Upscale"] == "4" and params["Noise level"] == "30"
    capsys.readouterr()
    assert main([*argv, "--noise-level", "101", "-o", str(tmp_path / "never.png")]) == 2  # trained on 0..100
    assert "noise level must be a whole number in [0, 100]" in capsys.readouterr().err


def test_inpaint_model_overfits_resumes_exactly_and_inpaints_from_the_cli(tmp_path, vae_file):
    from daguerre.checkpoints import load_model

    half = STEPS // 2
    common = ["train.checkpoint_every=20", "train.keep_last=3", "data.flip=true", "loss.offset_noise=0.05"]
    path = _overfit("inpaint", tmp_path / "ref", vae_file, [*common, f"train.steps={STEPS}"])
    # the same run stopped after `half` steps (it writes its checkpoint and model), then resumed to STEPS
    cut = load_run_config(CONFIGS / "tiny_inpaint_ldm.toml", "ldm",
                          [*QUIET, *ONE_BATCH, *OVERFIT, *common, f"train.steps={half}"])
    train_ldm(cut, tmp_path / "run", vae_path=vae_file)
    cut.train.steps = STEPS
    train_ldm(cut, tmp_path / "run", vae_path=vae_file, resume=True)
    a = load_file(str(tmp_path / "ref" / "checkpoints" / f"step_{STEPS:08d}" / "state.safetensors"))
    b = load_file(str(tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}" / "state.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert "reusing the pixel cache" in (tmp_path / "run" / "train.log").read_text()

    comps = load_model(path)
    assert comps.config.concat == "inpaint" and comps.config.unet.in_channels == 2 * 4 + 1
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "x.png"
    assert main(["inpaint", str(tmp_path / "in.png"), str(tmp_path / "mask.png"), "a red circle", "--model",
                 str(path), "--steps", "2", "--seed", "1", "--strength", "1", "--mask-blur", "0", "-o", str(out)]) == 0
    got, src = np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "in.png"))
    assert got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got[mask == 0], src[mask == 0])
    assert not np.array_equal(got[mask > 0], src[mask > 0])


def _concat_setup(tmp_path: Path, kind: str, extra: list[str]):
    """A small shapes TrainData, the derived model config, random components and the trainer's ConcatInputs."""
    cfg = load_run_config(CONFIGS / f"tiny_{kind}_ldm.toml", "ldm", ["data.n=6", "data.holdout=2", *extra])
    cfg.model.vae = derive_model_config(load_run_config(CONFIGS / "tiny_vae.toml", "vae"), 3, None).vae  # as train_ldm
    data = load_train_data(cfg.data)
    comps = build_components(derive_model_config(cfg, 3, None), seed=3)
    inputs = concat.build_concat_inputs(comps.config, cfg, data, comps.vae, tmp_path / "cache", dist.DistEnv())
    return data, comps, inputs


def _gens(positions: list[int]) -> list[torch.Generator]:
    return [dist.sample_generator(0, "ldm", p) for p in positions]


def test_sr_conditioning_is_the_pipelines_for_the_same_lowres_image(tmp_path):
    from daguerre.pipelines.upscale import sr_plan

    data, comps, inputs = _concat_setup(tmp_path, "sr", ["data.flip=true", "data.lowres_noise=0"])
    assert comps.config.unet.num_classes is None and inputs.pixels.shape == (4, 2, 3, 8, 8)
    rows, views = torch.tensor([2, 1]), torch.tensor([1, 0])
    c_train, y = inputs.step(rows, views, _gens([0, 1]), torch.device("cpu"))
    assert y is None and c_train.shape == (2, 3, 16, 16)  # the 8x8 low-res image on the 16x16 latent grid
    for k in range(2):
        hr = concat.pil_of(concat.to_uint8(data.dataset[int(data.train_pool[rows[k]])]["image"]))
        if views[k]:
            hr = hr.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = tmp_path / f"low{k}.png"
        concat.downscale(hr, 4).save(path)  # what a user would give `daguerre upscale`
        req = GenerationRequest(task="upscale", init_image=str(path), upscale_factor=4.0, steps=1)
        req = req.validate(comps.config)
        plan = sr_plan(comps, req, image_to_tensor(req.init_image))
        assert torch.equal(plan.cond["concat"], c_train[k:k + 1])

    # with noise augmentation: levels from the per-sample generators, c = a c0 + s eps with the pipeline's (a, s)
    data, comps, inputs = _concat_setup(tmp_path / "noisy", "sr", ["data.lowres_noise=300"])
    rows = torch.arange(4).repeat(4)
    draws = inputs.draw(rows, torch.zeros(16, dtype=torch.long), _gens(list(range(16))))
    c_noisy, y = inputs.build(draws, torch.device("cpu"))
    assert torch.equal(y, draws["level"]) and 0 <= int(y.min()) and int(y.max()) <= 300 and len(set(y.tolist())) > 8
    clean, _ = inputs.build({"lowres": draws["lowres"]}, torch.device("cpu"))
    for k in range(16):
        a, s = LowresConcat.noise_scales(int(y[k])) or (1.0, 0.0)
        torch.testing.assert_close(c_noisy[k], a * clean[k] + s * draws["eps"][k], rtol=0, atol=1e-6)
    again = inputs.draw(rows, torch.zeros(16, dtype=torch.long), _gens(list(range(16))))
    assert torch.equal(again["level"], draws["level"]) and torch.equal(again["eps"], draws["eps"])


def test_inpaint_conditioning_is_the_pipelines_for_the_same_image_and_mask(tmp_path):
    from daguerre.pipelines.inpaint import inpaint_plan

    data, comps, inputs = _concat_setup(tmp_path, "inpaint", ["data.mask_full=0.0"])
    rows, views = torch.tensor([3, 0]), torch.tensor([0, 1])
    draws = inputs.draw(rows, views, _gens([5, 6]))
    c_train, y = inputs.build(draws, torch.device("cpu"))
    assert y is None and c_train.shape == (2, 1 + 4, 16, 16)
    for k in range(2):
        image = concat.pil_of(concat.to_uint8(data.dataset[int(data.train_pool[rows[k]])]["image"]))
        if views[k]:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = Image.fromarray((draws["mask"][k, 0].numpy() * 255).astype(np.uint8))
        assert 0 < float(draws["mask"][k].mean()) < 1  # mask_full = 0: partial masks only
        req = GenerationRequest(task="inpaint", init_image=image, mask=mask, mask_blur=0, steps=1)
        req = req.validate(comps.config)
        plan = inpaint_plan(comps, req, req.init_image, req.mask)
        c_pipe = plan.cond["concat"]
        assert torch.equal(c_pipe[:, :1], latent_mask(draws["mask"][k:k + 1], 2))
        torch.testing.assert_close(c_pipe, c_train[k:k + 1], rtol=0, atol=1e-5)  # VAE batch of 1 vs 2


def test_random_masks_are_per_sample_reproducible_and_a_fraction_is_full():
    masks = [concat.random_mask(g, 32, 24, 0.25) for g in _gens(list(range(400)))]
    assert all(m.shape == (1, 32, 24) and set(m.unique().tolist()) <= {0.0, 1.0} for m in masks)
    assert torch.equal(masks[7], concat.random_mask(_gens([7])[0], 32, 24, 0.25))
    full = sum(bool(m.all()) for m in masks) / len(masks)
    assert 0.18 < full < 0.32
    partial = [float(m.mean()) for m in masks if not m.all()]
    assert min(partial) > 0 and 0.05 < float(np.mean(partial)) < 0.6
    assert len({m.numpy().tobytes() for m in masks}) > 0.7 * len(masks)


@pytest.mark.parametrize("extra, message", [
    (["model.concat='bogus'"], "model.concat"),
    (["model.concat='lowres'", "model.conditioning='class'"], "model.conditioning"),
    (["model.concat='lowres'", "data.lowres_factor=3"], "data.lowres.factor: data.size 32"),
    (["model.concat='lowres'", "data.lowres_factor=16"], "data.lowres.factor: must be in"),
    (["model.concat='inpaint'", "data.mask_full=1.5"], "data.inpaint.mask_full: must be in"),
    (["model.concat='lowres'", "data.lowres.noise=1000"], "data.lowres.noise: must be in"),
    (["data.mask_full=0.5"], "data.mask_full: 0.5 is a key of .data.inpaint. mask_full, but model.concat is None"),
])
def test_bad_concat_settings_name_their_key(extra, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", extra)


def test_random_crops_change_per_epoch_and_are_the_same_with_workers(tmp_path):
    root = tmp_path / "wide"
    root.mkdir()
    x = np.linspace(0, 255, 96)
    for i in range(4):
        arr = np.stack([np.tile(x, (24, 1)), np.tile(x[::-1], (24, 1)), np.full((24, 96), 60 * i)], -1)
        Image.fromarray(arr.astype(np.uint8)).save(root / f"{i}.png")
    data = load_train_data(DataConfig(kind="folder", folder=FolderData(root=str(root), crop="random", captions="none"),
                                      size=16, holdout=0))
    batches = [(0, np.array([0, 1, 2, 3])), (0, np.array([2, 3])), (1, np.array([0, 1, 2, 3]))]

    def crops(workers: int) -> list[list[bytes]]:
        return [[it["image"].numpy().tobytes() for it in items] for items in batch_loader(data, batches, workers)]

    in_process, with_workers = crops(0), crops(2)
    assert in_process == with_workers
    assert in_process[0][2:] == in_process[1]  # same epoch, same crops
    moved = [a != b for a, b in zip(in_process[0], in_process[2], strict=True)]
    assert sum(moved) >= 3  # a new epoch, new crops (a crop may land on the same offset by chance)
