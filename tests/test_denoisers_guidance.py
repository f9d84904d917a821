"""Denoiser parameterisations against their closed forms; classifier-free guidance; inpaint blending."""

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import nn

from daguerre.config import ScheduleConfig
from daguerre.diffusion.denoisers import Denoiser
from daguerre.diffusion.sampler_names import SAMPLERS
from daguerre.diffusion.schedules import alphas_cumprod, betas_from_config, get_sigmas, model_sigmas
from daguerre.guidance import cfg_denoiser, inpaint_blend_denoiser

SHAPE = (3, 4, 6, 6)
T_INDEX = torch.tensor([0, 321, 999])  # one timestep per image


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Oracle(nn.Module):
    """Knows x0 and eps; returns the exact eps, v or x0 the parameterisation asks for, and records its inputs."""

    def __init__(self, x0, eps, prediction, abar):
        super().__init__()
        self.x0, self.eps, self.prediction, self.abar = x0, eps, prediction, abar
        self.calls = []
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x_in, t, context=None, y=None):
        self.calls.append(dict(x_in=x_in, t=t, context=context, y=y))
        a = self.abar[t.round().long()].float().view(-1, 1, 1, 1)
        if self.prediction == "epsilon":
            out = self.eps
        elif self.prediction == "v_prediction":
            out = a.sqrt() * self.eps - (1 - a).sqrt() * self.x0  # Salimans & Ho 2022
        else:
            out = self.x0
        return out.to(x_in.dtype)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_wrappers_recover_x0_from_exact_predictions(prediction):
    cfg = ScheduleConfig(prediction_type=prediction)
    abar = alphas_cumprod(betas_from_config(cfg))
    sig = model_sigmas(cfg)[T_INDEX]  # (B,) float64, the model's discrete sigmas
    x0, eps = torch.randn(SHAPE, generator=gen(0)), torch.randn(SHAPE, generator=gen(1))
    x = x0 + sig.float().view(-1, 1, 1, 1) * eps
    net = Oracle(x0, eps, prediction, abar)
    den = Denoiser(net, cfg)
    out = den(x, sig.float(), {"context": None})
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x0, atol=2e-5, rtol=1e-4)
    call = net.calls[-1]
    # c_in turns x into the DDPM latent sqrt(abar) x0 + sqrt(1 - abar) eps; c_noise is the integer t
    a = abar[T_INDEX].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(call["x_in"], x_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(call["t"], T_INDEX.float(), atol=1e-3, rtol=0)
    assert call["context"] is None and call["y"] is None
    # float64 sigmas hit the integer timesteps exactly
    assert torch.equal(den.sigma_to_t(sig), T_INDEX.double())
    if prediction != "sample":
        torch.testing.assert_close(den.predict_eps(x, sig.float()), eps, atol=1e-4, rtol=1e-4)


def test_scalar_sigma_broadcasts_and_properties():
    cfg = ScheduleConfig()
    abar = alphas_cumprod(betas_from_config(cfg))
    x0, eps = torch.randn(SHAPE, generator=gen(0)), torch.randn(SHAPE, generator=gen(1))
    den = Denoiser(Oracle(x0, eps, "epsilon", abar), cfg)
    sigma = den.sigmas[500]
    out = den(x0 + sigma.float() * eps, sigma)  # 0-dim sigma, no cond
    torch.testing.assert_close(out, x0, atol=2e-5, rtol=1e-4)
    assert den.sigma_min == pytest.approx(float(model_sigmas(cfg)[0]))
    assert den.sigma_max == pytest.approx(float(model_sigmas(cfg)[-1]))
    with pytest.raises(ValueError, match="prediction_type"):
        Denoiser(den.net, ScheduleConfig(prediction_type="flow"))


def test_conditioning_passthrough_concat_unscaled_and_dtype():
    seen = {}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, x_in, t, context=None, y=None):
            seen.update(x_in=x_in, t=t, context=context, y=y)
            return x_in[:, :4] * 0  # eps = 0

    den = Denoiser(Net(), ScheduleConfig())
    x = torch.randn(SHAPE, generator=gen(2))
    concat = torch.randn(SHAPE[0], 5, 6, 6, generator=gen(3))
    context = torch.randn(SHAPE[0], 7, 8, generator=gen(4))
    y = torch.tensor([1, 2, 3])
    sigma = torch.tensor([0.5, 2.0, 10.0])
    out = den(x, sigma, {"context": context, "y": y, "concat": concat})
    c_in = (1 / (sigma**2 + 1).sqrt()).view(-1, 1, 1, 1)
    assert seen["x_in"].dtype == torch.float64 and seen["x_in"].shape == (3, 9, 6, 6)
    torch.testing.assert_close(seen["x_in"][:, :4].float(), c_in * x)
    torch.testing.assert_close(seen["x_in"][:, 4:].float(), concat)  # concatenated unscaled
    assert seen["context"].dtype == torch.float64 and torch.equal(seen["context"].float(), context)
    assert torch.equal(seen["y"], y)
    assert out.dtype == torch.float32 and torch.equal(out, x)  # eps = 0 -> x0 = x


# --- classifier-free guidance ----------------------------------------------------------------------

class CountingDenoiser:
    """A plain-function denoiser, nonlinear in x and in the context; counts calls and batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, cond=None):
        self.batches.append(x.shape[0])
        c = cond["context"].mean(dim=(1, 2)).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        s = sigma.view(-1, 1, 1, 1)
        return torch.tanh(x * c) / (1 + s) + 0.1 * c


def cfg_inputs(seed=0, uncond_tokens=7):
    g = gen(seed)
    x = torch.randn(SHAPE, generator=g) * 3
    sigma = torch.tensor([0.3, 1.5, 8.0])
    cond = {"context": torch.randn(SHAPE[0], 7, 8, generator=g) + 1}
    uncond = {"context": torch.randn(SHAPE[0], uncond_tokens, 8, generator=g)}
    return x, sigma, cond, uncond


def test_cfg_scale_one_is_conditional_with_one_call():
    x, sigma, cond, uncond = cfg_inputs()
    den = CountingDenoiser()
    out = cfg_denoiser(den, uncond, 1.0)(x, sigma, cond)
    assert den.batches == [SHAPE[0]]
    assert torch.equal(out, CountingDenoiser()(x, sigma, cond))


@pytest.mark.parametrize("uncond_tokens", [7, 5])
def test_cfg_batches_into_one_call_and_matches_two_calls(uncond_tokens):
    x, sigma, cond, uncond = cfg_inputs(uncond_tokens=uncond_tokens)
    den = CountingDenoiser()
    scale = 7.5
    out = cfg_denoiser(den, uncond, scale)(x, sigma, cond)
    ref = CountingDenoiser()
    c, u = ref(x, sigma, cond), ref(x, sigma, uncond)
    # one doubled batch when the contexts can be stacked, two calls (different token counts) otherwise
    assert den.batches == ([2 * SHAPE[0]] if uncond_tokens == 7 else [SHAPE[0], SHAPE[0]])
    torch.testing.assert_close(out, u + scale * (c - u), atol=1e-6, rtol=1e-6)
    eps = (x - out) / sigma.view(-1, 1, 1, 1)  # the same guidance in eps space
    eps_c, eps_u = (x - c) / sigma.view(-1, 1, 1, 1), (x - u) / sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, eps_u + scale * (eps_c - eps_u), atol=1e-5, rtol=1e-5)


def test_cfg_uncond_batch_one_and_inherited_concat():
    x, sigma, cond, uncond = cfg_inputs()
    seen = []

    def den(x, sigma, cond):
        seen.append(cond)
        return x * cond["concat"].mean() + cond["context"].mean(dim=(1, 2)).view(-1, 1, 1, 1)

    cond = {**cond, "concat": torch.ones(SHAPE[0], 1, 6, 6)}
    uncond1 = {"context": uncond["context"][:1]}
    out = cfg_denoiser(den, uncond1, 3.0)(x, sigma, cond)
    assert len(seen) == 1 and seen[0]["concat"].shape[0] == 2 * SHAPE[0]
    c = den(x, sigma, cond)
    u = den(x, sigma, {"context": uncond["context"][:1].expand(SHAPE[0], -1, -1), "concat": cond["concat"]})
    torch.testing.assert_close(out, u + 3.0 * (c - u))


def test_cfg_rescale_zero_is_plain_and_rescale_matches_diffusers_in_eps_space():
    x, sigma, cond, uncond = cfg_inputs()
    den = CountingDenoiser()
    scale, phi = 5.0, 0.7
    plain = cfg_denoiser(den, uncond, scale)(x, sigma, cond)
    assert torch.equal(cfg_denoiser(den, uncond, scale, rescale=0.0)(x, sigma, cond), plain)
    out = cfg_denoiser(den, uncond, scale, rescale=phi)(x, sigma, cond)
    s = sigma.view(-1, 1, 1, 1)
    eps_c = (x - den(x, sigma, cond)) / s
    eps_u = (x - den(x, sigma, uncond)) / s
    ref = rescale_noise_cfg(eps_u + scale * (eps_c - eps_u), eps_c, guidance_rescale=phi)
    torch.testing.assert_close((x - out) / s, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, plain)


def test_cfg_rescale_of_a_v_model_is_in_v_space_like_diffusers():
    cfg = ScheduleConfig(prediction_type="v_prediction")

    def net(x_in, t, context=None, y=None):
        return torch.sin(x_in * 2 + t.view(-1, 1, 1, 1) / 500) * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    den = Denoiser(net, cfg)
    x, _, cond, uncond = cfg_inputs()
    sigma = den.sigmas[T_INDEX].float()
    scale, phi = 4.0, 0.5
    out = cfg_denoiser(den, uncond, scale, rescale=phi)(x, sigma, cond)
    t = T_INDEX.float()
    x_in = x / (sigma**2 + 1).sqrt().view(-1, 1, 1, 1)
    v_c, v_u = net(x_in, t, cond["context"]), net(x_in, t, uncond["context"])
    v = rescale_noise_cfg(v_u + scale * (v_c - v_u), v_c, guidance_rescale=phi)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(out, x / (s**2 + 1) - s / (s**2 + 1).sqrt() * v, atol=1e-4, rtol=1e-4)


def test_cfg_errors():
    with pytest.raises(ValueError, match="rescale"):
        cfg_denoiser(CountingDenoiser(), {}, 7.0, rescale=1.5)
    with pytest.raises(ValueError, match="rescale_space"):
        cfg_denoiser(CountingDenoiser(), {}, 7.0, rescale_space="logit")


# --- inpaint blending ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "lms", "unipc", "plms", "ddim"])
def test_inpaint_blend_keeps_known_region(name):
    def den(x, sigma, cond=None):  # pulls everything towards 2
        return torch.full_like(x, 2.0) + 0.1 * torch.tanh(x)

    known = torch.randn(SHAPE, generator=gen(5))
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 2:5, 1:4] = 1  # repaint a square
    sigmas = get_sigmas("karras", 8, model_sigmas(ScheduleConfig()))
    noise = torch.randn(SHAPE, generator=gen(6))
    x_init = known + sigmas[0].float() * noise
    trace = []
    out = SAMPLERS[name](inpaint_blend_denoiser(den, known, mask), x_init, sigmas,
                           callback=lambda d: trace.append((d["x"], float(d["sigma"]))))
    keep = mask.expand(SHAPE) == 0
    torch.testing.assert_close(out[keep], known[keep], atol=1e-5, rtol=1e-5)
    assert (out[~keep] - known[~keep]).abs().mean() > 0.5  # the masked square was repainted
    for x, s in trace:  # the known region stays a consistently noised copy of the known latents
        torch.testing.assert_close(x[keep], (known + s * noise)[keep], atol=1e-4, rtol=1e-4)
