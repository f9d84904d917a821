"""Reconstruction quality of the autoencoder: PSNR and SSIM (Wang, Bovik, Sheikh & Simoncelli 2004).

Both take images in [-1, 1] (the model's range) and measure them on the [0, 1] scale (data range 1).
SSIM follows the paper's reference implementation: an 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, local statistics over the "valid" positions only (no padding), population
(not sample) covariances, the SSIM map averaged over positions and channels, one value per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 1.0
MIN_MSE = 1e-12  # PSNR of identical images is capped instead of infinite


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], float32, clamped."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio 10 log10(1 / MSE) in dB per image: (B, C, H, W) x2 -> (B,)."""
    mse = (to_unit(x) - to_unit(y)).pow(2).flatten(1).mean(1).clamp_min(MIN_MSE)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian (size,) float64 the 2-D window is the outer product of."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Mean structural similarity per image: (B, C, H, W) x2 in [-1, 1] -> (B,) (module docstring).

    SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
    C1 = (K1 L)^2, C2 = (K2 L)^2, with Gaussian-weighted local means and (co)variances.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) batches of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} are smaller than the {window}x{window} window")
    a, b = to_unit(x).double(), to_unit(y).double()
    c = a.shape[1]
    g = gaussian_window(window, sigma).to(a.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()  # (C, 1, k, k), depthwise

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)  # (B, C, H - k + 1, W - k + 1): valid positions only

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1).float()


def latent_scale(latents: torch.Tensor) -> float:
    """scale_factor = 1 / std of the latents (LDM Sec. 4.3.2 / App. D.1: unit-variance diffusion latents)."""
    std = float(latents.double().std())
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"cannot measure a latent scale factor: latent std is {std}")
    return 1.0 / std
