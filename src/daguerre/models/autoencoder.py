"""The first-stage autoencoder of latent diffusion, KL- or VQ-regularised (Rombach et al. 2022, Sec. 3.1, App. G).

An encoder E maps an image x in [-1, 1] to the moments of a diagonal Gaussian posterior q(z | x);
a decoder D maps a latent z back to pixels. The KL term of the posterior to N(0, I) keeps the
latent space close to a standard normal (the "KL-reg" of the paper, weighted ~1e-6 in training). With
`VAEConfig.regularizer = "vq"` the encoder gives one latent (no variance) and the decoder starts with a
vector quantiser (the "VQ-reg", models/vq.py; CompVis `VQModel`).
Module and parameter names follow CompVis `ldm/modules/diffusionmodules/model.py`, so the
`first_stage_model.*` weights of a Stable Diffusion checkpoint load after stripping that prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import VAEConfig
from ..nn.attention import attention
from .vq import PointLatent, VectorQuantizer

LOGVAR_MIN = -30.0  # CompVis DiagonalGaussianDistribution clamps the log-variance to this range
LOGVAR_MAX = 20.0
NORM_EPS = 1e-6  # GroupNorm epsilon of the LDM autoencoder (`Normalize`)
ATTN_HEADS = 1  # the autoencoder's self-attention is single-headed over all channels
DOWN_PADDING = (0, 1, 0, 1)  # asymmetric (left, right, top, bottom) padding before the stride-2 conv
KL_DIMS = (1, 2, 3)  # the KL and NLL are summed over channels and space, one value per sample


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))) of the autoencoder (LDM Sec. 3.1).

    Built from the encoder's moments (B, 2*C, h, w): the first C channels are the mean, the last C
    the log-variance (clamped to [-30, 20] as CompVis does).
    """

    def __init__(self, moments: torch.Tensor):
        self.moments = moments  # (B, 2*C, h, w)
        self.mean, logvar = torch.chunk(moments, 2, dim=1)  # (B, C, h, w) each
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps (the reparameterisation trick, Kingma & Welling 2014).

        eps ~ N(0, I) is drawn in float32 on the generator's device (a CPU generator by convention,
        so a seed gives the same latent on any device), then moved to the mean's device and dtype.
        Without a generator it comes from the global RNG of the mean's device.
        """
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || other) summed over C, H, W -> (B,); `other` defaults to N(0, I).

        KL(N(m1, v1) || N(m2, v2)) = 1/2 [(m1 - m2)^2 / v2 + v1 / v2 - 1 - log v1 + log v2] per element.
        """
        if other is None:
            kl = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            kl = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * kl.sum(dim=KL_DIMS)

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood -log q(sample | x) summed over C, H, W -> (B,)."""
        nll = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * nll.sum(dim=KL_DIMS)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 `nin_shortcut` when the width changes (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 in every LDM autoencoder: omitted
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, q/k/v/proj_out as 1x1 convs (CompVis `AttnBlock`)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, H*W, C)
        out = attention(q, k, v, ATTN_HEADS, upcast=True)  # (B, H*W, C)
        out = out.transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: pad right and bottom by one, then a 3x3 stride-2 convolution (CompVis `Downsample`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, DOWN_PADDING))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then a 3x3 convolution (CompVis `Upsample`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block.{j}` ResNet blocks, each followed by `attn.{j}` when the level has attention,
    then an optional `downsample` (encoder, resample="down") or `upsample` (decoder, resample="up")."""

    def __init__(
        self, in_channels: int, out_channels: int, n_blocks: int, use_attn: bool, groups: int, resample: str | None
    ):
        super().__init__()
        widths = [in_channels] + [out_channels] * n_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1], groups) for j in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels, groups) for _ in range(n_blocks) if use_attn)
        self.downsample = Downsample(out_channels) if resample == "down" else None
        self.upsample = Upsample(out_channels) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class MidBlock(nn.Module):
    """The bottleneck: ResNet block, self-attention, ResNet block (`mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _moments(cfg: VAEConfig) -> int:
    """The encoder's output channels: mean and log-variance (KL), or the latent alone (VQ)."""
    return cfg.latent_channels if cfg.regularizer == "vq" else 2 * cfg.latent_channels


def _run(module: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """module(x), recomputed in the backward pass instead of storing activations when `use_checkpoint`."""
    if use_checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H/f, W/f) (CompVis `Encoder`, double_z),
    or for a VQ autoencoder the latent (B, latent_channels, H/f, W/f) (double_z false)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        n = len(widths)
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(n):
            in_width = widths[max(i - 1, 0)]  # the level above (finer) feeds this one
            resample = "down" if i != n - 1 else None  # every level but the coarsest halves the resolution
            self.down.append(
                Level(in_width, widths[i], cfg.num_res_blocks, i in cfg.attn_levels, cfg.norm_groups, resample)
            )
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        self.norm_out = _norm(widths[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], _moments(cfg), 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = _run(level, h, self.gradient_checkpointing)
        h = _run(self.mid, h, self.gradient_checkpointing)  # (B, ch * mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 * latent_channels (KL) or latent_channels, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f) (CompVis `Decoder`).

    `up.{i}` is the level at resolution i (up.0 the finest); they run from `up.{n-1}` to `up.0`,
    each with num_res_blocks + 1 ResNet blocks.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        n = len(widths)
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        self.up = nn.ModuleList()
        for i in range(n):
            in_width = widths[min(i + 1, n - 1)]  # the level below (coarser) feeds this one
            resample = "up" if i != 0 else None  # every level but the finest doubles the resolution
            self.up.append(
                Level(in_width, widths[i], cfg.num_res_blocks + 1, i in cfg.attn_levels, cfg.norm_groups, resample)
            )
        self.norm_out = _norm(widths[0], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, ch * mult[-1], h, w)
        h = _run(self.mid, h, self.gradient_checkpointing)
        for level in reversed(self.up):
            h = _run(level, h, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, h*f, w*f)


class AutoencoderKL(nn.Module):
    """The first stage of latent diffusion: x -> q(z | x) -> z -> x_hat (LDM Sec. 3.1, CompVis `AutoencoderKL`),
    or with `regularizer = "vq"` x -> z -> quantise(z) -> x_hat (CompVis `VQModel`, its `quantize` module).

    `encode` returns the posterior of un-scaled latents (a VQ autoencoder: the pre-quantisation latent as a
    `PointLatent`, which the diffusion model works on); `decode` quantises first when the autoencoder is VQ;
    `scale_latents` maps them to the diffusion
    model's latent space, z_diffusion = (z - shift_factor) * scale_factor (LDM Sec. 4.3.2, App. D.1).
    Everything runs in the dtype of the parameters, on the device of the parameters.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(_moments(cfg), _moments(cfg), 1)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.latent_channels) if cfg.regularizer == "vq" else None
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute each level's activations in the backward pass (less memory, ~30% more compute)."""
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = bool(value)
        self.decoder.gradient_checkpointing = bool(value)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussian | PointLatent:
        """Image (B, in_channels, H, W) in [-1, 1] -> posterior over latents (B, latent_channels, H/f, W/f)
        (VQ: the pre-quantisation latent)."""
        moments = self.quant_conv(self.encoder(x.to(self.dtype)))  # (B, 2 * latent_channels or latent_channels, ...)
        return PointLatent(moments) if self.quantize is not None else DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Un-scaled latents (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f), roughly in [-1, 1].

        A VQ autoencoder replaces each latent vector by its nearest code first (LDM's `decode_first_stage`
        through `VQModelInterface.decode`), unless `force_not_quantize` (z already quantised)."""
        z = z.to(self.dtype)
        if self.quantize is not None and not force_not_quantize:
            z = self.quantize(z).z_q
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a posterior sample (or its mode): returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents -> diffusion latents: (z - shift_factor) * scale_factor."""
        return (z - self.config.shift_factor) * self.config.scale_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> autoencoder latents: z / scale_factor + shift_factor (inverse of `scale_latents`)."""
        return z / self.config.scale_factor + self.config.shift_factor
