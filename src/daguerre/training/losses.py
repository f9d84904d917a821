"""Training objectives of both stages.

Stage 1 (LDM Sec. 3.1, App. G; taming-transformers `LPIPSWithDiscriminator`): a pixel reconstruction
loss (L1 or L2), optionally a perceptual term, plus kl_weight * KL(q(z|x) || N(0, I)) summed over the
latent, plus a PatchGAN (Isola et al. 2017) with the hinge loss whose weight is adapted to the
reconstruction gradient at the last decoder layer (Esser et al. 2021, eq. 7). The LDM objective sums
the reconstruction over pixels; here it is divided by the number of pixels (a per-pixel mean, and
the KL divided by the same count), which keeps gradient norms image-size independent and kl_weight
its LDM meaning. Learned output log-variance (taming's `logvar`) is not used.

Stage 2 (LDM eq. 2): E ||target - net(z_t, t, tau(y))||^2 with target eps, v (Salimans & Ho 2022) or
x0, per-sample min-SNR-gamma weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy") and optional offset noise. Training timesteps are uniform on {0, ..., T-1} or, with
a timestep bias (diffusers' `--timestep_bias_strategy`), drawn more often from one part of the schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import ssim

LEAKY_SLOPE = 0.2  # PatchGAN LeakyReLU slope (pix2pix)
DISC_KERNEL = 4
DISC_INIT_STD = 0.02  # pix2pix / taming weight init N(0, 0.02)
DISC_MAX_CHANNEL_MULT = 8
DISC_GROUPS = 32  # GroupNorm instead of BatchNorm: the result must not depend on the per-process batch
ADAPTIVE_EPS = 1e-4  # taming: lambda = ||grad rec|| / (||grad gan|| + 1e-4)
ADAPTIVE_MAX = 1e4  # ... clamped to [0, 1e4]


# --- stage 1 ---------------------------------------------------------------------------------------------

def reconstruction_loss(x: torch.Tensor, rec: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-image mean |x - rec| ("l1") or (x - rec)^2 ("l2"): (B, C, H, W) x2 -> (B,)."""
    diff = (x.float() - rec.float()).flatten(1)
    return diff.abs().mean(1) if kind == "l1" else diff.pow(2).mean(1)


def ssim_loss(x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """1 - SSIM per image: a structural term that needs no pretrained network."""
    return 1.0 - ssim(x, rec)


# name -> factory(device) -> loss(x, rec) -> (B,). No pretrained VGG/LPIPS weights ship with daguerre:
# register one with `register_perceptual("lpips", factory)` (docs/training.md, "Perceptual loss").
PERCEPTUAL: dict[str, Callable[[torch.device], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "ssim": lambda device: ssim_loss,
}


def register_perceptual(
    name: str, factory: Callable[[torch.device], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
) -> None:
    """Make `loss.perceptual = name` available: `factory(device)` returns loss(x, rec) -> (B,)."""
    PERCEPTUAL[name] = factory


def perceptual_loss(name: str, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in PERCEPTUAL:
        raise ValueError(
            f"config key loss.perceptual: {name!r} is not registered (known: {', '.join(sorted(PERCEPTUAL))}); "
            "pretrained VGG/LPIPS weights are not shipped: register one with "
            "daguerre.training.losses.register_perceptual (docs/training.md)"
        )
    return PERCEPTUAL[name](device)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(DISC_GROUPS, channels), channels)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017; taming `NLayerDiscriminator`): a grid of real/fake logits per image.

    conv4x4/2 -> LeakyReLU, then `layers - 1` conv4x4/2 -> norm -> LeakyReLU, one conv4x4/1 -> norm ->
    LeakyReLU, and a conv4x4/1 to one channel; 3 layers see 70x70 patches. GroupNorm replaces BatchNorm.
    """

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, DISC_KERNEL, 2, 1), nn.LeakyReLU(LEAKY_SLOPE)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, DISC_MAX_CHANNEL_MULT)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(channels * prev, channels * mult, DISC_KERNEL, stride, 1, bias=False),
                    _norm(channels * mult), nn.LeakyReLU(LEAKY_SLOPE)]
        seq.append(nn.Conv2d(channels * mult, 1, DISC_KERNEL, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, DISC_INIT_STD)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, DISC_INIT_STD)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, h, w) logits
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) (Lim & Ye 2017)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial loss -E[D(x_hat)]."""
    return -logits_fake.mean()


def adaptive_weight(grad_rec: torch.Tensor, grad_gan: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """lambda = disc_weight ||grad_rec|| / (||grad_gan|| + 1e-4), clamped to [0, 1e4] (Esser et al. 2021, eq. 7).

    The gradients are those of the reconstruction and adversarial losses w.r.t. the last decoder layer's
    weight (averaged over processes before this call, so every process agrees on lambda).
    """
    w = grad_rec.norm() / (grad_gan.norm() + ADAPTIVE_EPS)
    return w.clamp(0.0, ADAPTIVE_MAX).detach() * disc_weight


# --- stage 2 ---------------------------------------------------------------------------------------------

def diffusion_target(
    prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor
) -> torch.Tensor:
    """What the network learns to output at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.

    "epsilon": eps (DDPM); "v_prediction": v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022);
    "sample": x0. `abar` is (B,) float, broadcast over the latent dimensions.
    """
    a = abar.reshape(-1, *([1] * (x0.ndim - 1)))
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def min_snr_weights(abar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023, Sec. 3.4), (B,) float.

    With SNR(t) = abar / (1 - abar), the weight that turns each parameterisation's MSE into
    min(SNR, gamma) times the x0-MSE is min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1)
    for v and min(SNR, gamma) for x0. gamma = 0 gives uniform weights (1).
    """
    if gamma <= 0:
        return torch.ones_like(abar)
    snr = abar / (1 - abar).clamp_min(torch.finfo(abar.dtype).tiny)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr > gamma, gamma / snr.clamp_min(gamma), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                 pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean_b w_b * mean((pred_b - target_b)^2), computed in float32; `pixel_weights` (B, 1, H, W), when given,
    weigh each position's squared error inside the mean (`layout.box_loss_weights`: mean 1 per image)."""
    err = (pred.float() - target.float()).pow(2)
    if pixel_weights is not None:
        err = err * pixel_weights.float()
    return (weights * err.flatten(1).mean(1)).mean()


def timestep_cdf(strategy: str, n_steps: int, multiplier: float, portion: float = 0.25, begin: int = 0,
                 end: int | None = None) -> torch.Tensor | None:
    """The cumulative distribution (T,) float64 of biased training timesteps, or None for uniform ones.

    "later": the noisiest round(portion T) steps are drawn `multiplier` times as often as the others (the
    steps where the layout of an image is decided); "earlier": the least noisy ones (fine detail);
    "range": the steps [begin, end). A sample is t = #{i : cdf[i] <= u} for u ~ U[0, 1).
    """
    if strategy == "none" or multiplier == 1.0:
        return None
    w = torch.ones(n_steps, dtype=torch.float64)
    k = max(1, min(n_steps, round(portion * n_steps)))
    if strategy == "later":
        w[n_steps - k:] *= multiplier
    elif strategy == "earlier":
        w[:k] *= multiplier
    elif strategy == "range":
        w[begin:n_steps if end is None else end] *= multiplier
    else:
        raise ValueError(f"unknown timestep bias {strategy!r}; choose none, later, earlier or range")
    cdf = w.cumsum(0)
    return cdf / cdf[-1]


def draw_timestep(g: torch.Generator, n_steps: int, cdf: torch.Tensor | None) -> torch.Tensor:
    """One training timestep (1,) int64 from generator `g`: uniform, or from `cdf` (timestep_cdf)."""
    if cdf is None:
        return torch.randint(0, n_steps, (1,), generator=g)
    u = torch.rand(1, generator=g, dtype=torch.float64)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=n_steps - 1)
