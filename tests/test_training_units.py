"""The parts of the training loops, against oracles: SSIM/PSNR (analytic and an independent numpy
implementation), min-SNR weights and v targets (diffusers), EMA (diffusers EMAModel = CompVis LitEma),
learning-rate schedule, optimizer/RNG state round trips, the distributed sampler, the PatchGAN losses,
checkpoint folders and the latent cache key."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d

from daguerre.config import ScheduleConfig
from daguerre.diffusion.schedules import alphas_cumprod, betas_from_config
from daguerre.training import dist, losses, state
from daguerre.training.config import TrainConfig
from daguerre.training.ema import EMA
from daguerre.training.loop import lr_at, make_optimizer
from daguerre.training.metrics import gaussian_window, psnr, ssim

# --- metrics ---------------------------------------------------------------------------------------------

def _ssim_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 written independently: separable Gaussian filtering with scipy, 'valid' crop."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    g /= g.sum()

    def filt(x):
        y = correlate1d(correlate1d(x, g, axis=0, mode="constant"), g, axis=1, mode="constant")
        return y[5:-5, 5:-5]

    vals = []
    for c in range(a.shape[0]):
        x, y = a[c], b[c]
        mx, my = filt(x), filt(y)
        sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
        c1, c2 = 0.01**2, 0.03**2
        vals.append(((2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean())
    return float(np.mean(vals))


def test_ssim_matches_an_independent_implementation():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 24, 20, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    got = ssim(x, y)
    for i in range(3):
        want = _ssim_numpy(((x[i] + 1) / 2).double().numpy(), ((y[i] + 1) / 2).double().numpy())
        assert got[i].item() == pytest.approx(want, abs=1e-6)
    assert torch.allclose(ssim(y, x), got)  # symmetric


def test_ssim_and_psnr_analytic_cases():
    x = torch.full((1, 1, 16, 16), -0.2)  # 0.4 on the [0, 1] scale
    y = torch.full((1, 1, 16, 16), 0.6)  # 0.8
    c1 = 0.01**2
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim(x, y).item() == pytest.approx((2 * 0.4 * 0.8 + c1) / (0.4**2 + 0.8**2 + c1), rel=1e-5)
    assert psnr(x, y).item() == pytest.approx(10 * math.log10(1 / 0.4**2), rel=1e-5)
    assert gaussian_window().sum().item() == pytest.approx(1.0)


# --- diffusion loss ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_and_targets_match_diffusers(prediction):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          num_train_timesteps=1000, prediction_type=prediction)
    abar_all = alphas_cumprod(betas_from_config(ScheduleConfig())).float()
    t = torch.tensor([0, 3, 50, 200, 500, 999])
    abar = abar_all[t]
    snr = compute_snr(sched, t)
    gamma = 5.0
    want = torch.stack([snr, gamma * torch.ones_like(snr)]).min(dim=0)[0]  # diffusers train_text_to_image.py
    want = want / snr if prediction == "epsilon" else want / (snr + 1)
    torch.testing.assert_close(losses.min_snr_weights(abar, gamma, prediction), want.float(), rtol=1e-4, atol=1e-7)
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(6, 4, 5, 5, generator=gen), torch.randn(6, 4, 5, 5, generator=gen)
    target = losses.diffusion_target(prediction, x0, noise, abar)
    oracle = noise if prediction == "epsilon" else sched.get_velocity(x0, noise, t)
    torch.testing.assert_close(target, oracle, rtol=1e-5, atol=1e-5)
    assert torch.equal(losses.min_snr_weights(abar, 0.0, prediction), torch.ones(6))


def test_min_snr_weights_at_zero_terminal_snr_are_finite():
    abar = torch.tensor([0.0, 0.5, 1 - 1e-7])
    for prediction in ("epsilon", "v_prediction", "sample"):
        assert torch.isfinite(losses.min_snr_weights(abar, 5.0, prediction)).all()


# --- EMA, learning rate, optimizer and RNG state ---------------------------------------------------------

def test_ema_matches_diffusers_ema_model_with_litema_warmup():
    from diffusers.training_utils import EMAModel

    net = torch.nn.Linear(4, 3)
    ours = EMA(net, decay=0.95, warmup=True)
    ref = EMAModel(net.parameters(), decay=0.95, update_after_step=-1, use_ema_warmup=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(30):
        net(torch.randn(2, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        ours.update(net)
        ref.step(net.parameters())
    for (name, _), shadow in zip(net.named_parameters(), ref.shadow_params, strict=True):
        torch.testing.assert_close(ours.shadow[name], shadow, rtol=1e-6, atol=1e-7)


def test_learning_rate_schedule():
    t = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [lr_at(s, t) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # cosine decay is monotone
    assert lr_at(100, t) == pytest.approx(1e-4)
    assert lr_at(55, t) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way: the mean of lr and min_lr
    t.decay = "constant"
    assert lr_at(80, t) == 1e-3


def test_optimizer_state_round_trip_continues_bitwise():
    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
        return net, make_optimizer(net.parameters(), TrainConfig(lr=1e-2, weight_decay=0.1))

    def step(net, opt, k):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(k))
        net(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    a, opt_a = make()
    for k in range(6):
        step(a, opt_a, k)
    b, opt_b = make()
    for k in range(3):
        step(b, opt_b, k)
    tensors, meta = state.optimizer_state(opt_b, "optim.x.")
    weights = state.module_tensors(b, "m.")
    c, opt_c = make()
    state.load_module_tensors(c, weights, "m.")
    state.load_optimizer_state(opt_c, tensors, meta, "optim.x.")
    for k in range(3, 6):
        step(c, opt_c, k)
    for p, q in zip(a.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q)


def test_rng_state_round_trip():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    tensors, meta = state.rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    state.set_rng_state(tensors, meta)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


# --- data stream -------------------------------------------------------------------------------------------

def test_stream_sampler_splits_the_global_batch_over_ranks_and_microsteps():
    pool = np.arange(10, 47)  # 37 images
    one = dist.StreamSampler(pool, seed=5, batch=8, world=1, rank=0, accum=1)
    split = [dist.StreamSampler(pool, seed=5, batch=2, world=2, rank=r, accum=2) for r in range(2)]
    for step in range(12):
        pos1, idx1 = one.indices(step, 0)
        parts = [s.indices(step, m) for s in split for m in range(2)]
        assert sorted(np.concatenate([p for p, _ in parts]).tolist()) == pos1.tolist()
        assert sorted(np.concatenate([i for _, i in parts]).tolist()) == sorted(idx1.tolist())
    epoch = np.concatenate([one.indices(s, 0)[1] for s in range(5)])[:37]
    assert sorted(epoch.tolist()) == pool.tolist()  # every image once per epoch
    other = dist.StreamSampler(pool, seed=6, batch=8, world=1, rank=0, accum=1)
    assert not np.array_equal(other.indices(0, 0)[1], one.indices(0, 0)[1])


def test_sample_generators_are_per_position():
    a = torch.rand(3, generator=dist.sample_generator(0, "ldm", 7))
    b = torch.rand(3, generator=dist.sample_generator(0, "ldm", 7))
    c = torch.rand(3, generator=dist.sample_generator(0, "ldm", 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- PatchGAN ----------------------------------------------------------------------------------------------

def test_patch_discriminator_and_hinge_losses():
    d = losses.PatchDiscriminator(3, channels=8, layers=3)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # pix2pix 70x70 PatchGAN on 64 px: 6x6 patches
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert losses.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert losses.generator_loss(fake).item() == pytest.approx(1.5)
    w = losses.adaptive_weight(torch.full((4,), 3.0), torch.full((4,), 4.0), 0.5)
    assert w.item() == pytest.approx(0.5 * 6.0 / (8.0 + 1e-4))


def test_unknown_perceptual_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="loss.perceptual"):
        losses.perceptual_loss("vgg", torch.device("cpu"))
    fn = losses.perceptual_loss("ssim", torch.device("cpu"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(fn(x, x), torch.zeros(2), atol=1e-6)


# --- checkpoint folders ------------------------------------------------------------------------------------

def test_checkpoints_are_complete_folders_and_pruned(tmp_path):
    for step in (10, 20, 30):
        state.save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"step": step}, keep_last=2)
    (tmp_path / "checkpoints" / "step_00000040.tmp-abc").mkdir()  # a folder left by a killed writer
    assert [s for s, _ in state.list_checkpoints(tmp_path)] == [20, 30]
    tensors, meta = state.load_checkpoint(state.latest_checkpoint(tmp_path))
    assert meta["step"] == 30 and torch.equal(tensors["w"], torch.full((2,), 30.0))
    for step in (40, 50, 60, 70):  # keep_every also keeps the multiples of 20 (for exports of the curve)
        state.save_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, {"step": step}, keep_last=2, keep_every=20)
    assert [s for s, _ in state.list_checkpoints(tmp_path)] == [20, 40, 60, 70]


def test_latent_cache_key_depends_on_vae_data_and_flip():
    from daguerre.training.latents import cache_key

    base = cache_key("aa", {"kind": "shapes", "n": 10}, False, 8)
    assert base == cache_key("aa", {"n": 10, "kind": "shapes"}, False, 8)
    assert len({base, cache_key("ab", {"kind": "shapes", "n": 10}, False, 8),
                cache_key("aa", {"kind": "shapes", "n": 11}, False, 8),
                cache_key("aa", {"kind": "shapes", "n": 10}, True, 8)}) == 4


def test_shapes_scene_mix_keys_reach_the_dataset_and_join_the_cache_key_only_when_set():
    from daguerre.training.config import DataConfig, ShapesData
    from daguerre.training.data import LAST_SPLIT, build_dataset, describe_data

    base = DataConfig(kind="shapes", shapes=ShapesData(n=40))
    old = {"kind": "shapes", "n": 40, "seed": 0, "size": 64, "max_objects": 3}  # a run begun before the random split
    assert describe_data(base, LAST_SPLIT) == old and describe_data(base) == {**old, "split": "random"}
    pairs = DataConfig(kind="shapes", shapes=ShapesData(n=40, min_objects=2, max_objects=2, p_relation=1.0))
    assert describe_data(pairs)["p_relation"] == 1.0 and describe_data(pairs)["min_objects"] == 2
    scenes = [build_dataset(pairs).sample(i)[0] for i in range(40)]
    assert all(len(s.objects) == 2 and s.relation is not None for s in scenes)


def test_resume_accepts_keys_added_by_a_newer_version_only_at_their_defaults(tmp_path):
    """A run stored before a config key existed resumes when the key has its default value now."""

    from daguerre.training.config import load_run_config, to_jsonable
    from daguerre.training.loop import prepare_run_dir

    cfg = load_run_config(None, "ldm")
    stored = to_jsonable(cfg.to_dict())
    del stored["train"]["grad_clip"]  # as if written by a version without this key
    ckpt = state.save_checkpoint(tmp_path, 10, {"w": torch.zeros(1)},
                                 {"run_config": stored, "step": 10, "optimizers": {}, "ema_updates": {}}, keep_last=1)
    env = dist.DistEnv()
    resume = prepare_run_dir(tmp_path, cfg, True, env)
    assert resume.folder == ckpt and resume.phase == [] and resume.skipped == []
    changed = load_run_config(None, "ldm", ["train.grad_clip=0.5"])
    with pytest.raises(ValueError, match="train.grad_clip was None and is now 0.5|train.grad_clip"):
        prepare_run_dir(tmp_path, changed, True, env)
    with pytest.raises(ValueError, match="--until 10: the run is already at step 10"):  # before any set-up
        prepare_run_dir(tmp_path, cfg, True, env, until=10)
    assert prepare_run_dir(tmp_path, cfg, True, env, until=11).folder == ckpt


def test_timestep_bias_draws_the_chosen_steps_multiplier_times_as_often():
    """later / earlier / range: the biased steps are drawn `multiplier` times as often per step as the
    others (empirical frequencies of 40000 draws); none is torch.randint, draw for draw."""
    from daguerre.training.losses import draw_timestep, timestep_cdf

    T, n = 1000, 40_000
    cases = {("later", 0.25, 0, 1000): range(750, 1000), ("earlier", 0.1, 0, 1000): range(0, 100),
             ("range", 0.25, 200, 400): range(200, 400)}
    for (strategy, portion, begin, end), biased in cases.items():
        cdf = timestep_cdf(strategy, T, 3.0, portion, begin, end)
        g = torch.Generator().manual_seed(0)
        ts = torch.cat([draw_timestep(g, T, cdf) for _ in range(n)])
        assert ts.min() >= 0 and ts.max() <= T - 1
        k = len(biased)
        expected = 3 * k / (3 * k + (T - k))
        inside = ((ts >= biased.start) & (ts < biased.stop)).double().mean().item()
        assert abs(inside - expected) < 0.015, (strategy, inside, expected)
        per_step_in = inside / k
        per_step_out = (1 - inside) / (T - k)
        assert 2.6 < per_step_in / per_step_out < 3.4
    assert timestep_cdf("none", T, 3.0) is None and timestep_cdf("later", T, 1.0) is None
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert all(torch.equal(draw_timestep(a, T, None), torch.randint(0, T, (1,), generator=b)) for _ in range(50))


def test_timestep_bias_config_errors_name_the_key():
    from daguerre.training.config import load_run_config

    for extra, key in [(["loss.timestep_bias='latest'"], "loss.timestep_bias"),
                       (["loss.timestep_bias='later'", "loss.timestep_bias_multiplier=0"],
                        "loss.timestep_bias_multiplier"),
                       (["loss.timestep_bias='later'", "loss.timestep_bias_portion=1.5"], "loss.timestep_bias_portion"),
                       (["loss.timestep_bias='range'", "loss.timestep_bias_begin=500", "loss.timestep_bias_end=400"],
                        "loss.timestep_bias_begin")]:
        with pytest.raises(ValueError, match=key):
            load_run_config(None, "ldm", extra)


def test_a_deeply_nested_metadata_line_is_one_error_naming_the_line(tmp_path):
    """A folder dataset's metadata.jsonl is read like every untrusted JSON: a 100 000-deep line is one
    ValueError naming file and line, not a RecursionError."""
    from PIL import Image

    from daguerre.data import ImageFolder

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n' + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: JSON nested too deeply"):
        ImageFolder(tmp_path, size=8)
