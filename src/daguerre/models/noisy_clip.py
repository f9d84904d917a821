"""A noise-aware CLIP: an image tower that reads a diffusion model's noisy latents and their noise level
(GLIDE's "noised CLIP", Nichol et al. 2022, sec. 3; the noisy classifier of Dhariwal & Nichol 2021, sec. 4).

CLIP guidance through the decoded x0 estimate (daguerre.guidance.clip_guided_denoiser) asks a CLIP trained on
clean images to read the blurry early estimates of sampling. GLIDE's answer is a CLIP trained on the noisy
images themselves: its image embedding E_I(x_t, sigma) is compared with the text's E_T(c), and the gradient of
that similarity with respect to x_t itself steers the sampler, as classifier guidance does with
grad log p(c | x_t). Nothing is decoded, and a step needs one small forward and backward pass.

Here the image tower is CLIP's vision transformer over the latent grid: x (B, C, h, w) in the sampler's
variables (x = z0 + sigma eps, z0 the model's scaled VAE latent) is read as x / sqrt(sigma^2 + sigma_data^2)
(EDM's c_in; with sigma_data = 1 exactly the VP x_t the diffusion model was trained on), cut into
patch_size x patch_size patches of all C channels, and every token (class token included) gets the embedding
of the noise level added: a sinusoidal embedding of c_noise = log(sigma) / 4 (EDM's) through a two-layer MLP
(`noise_embedding`, as a U-Net's time embedding). The text tower, the projections and the temperature are
CLIP's (`CLIPModel`); `latent_space` in the config names whose latents the tower reads (the autoencoder's
identity, the scale factor, the sigma range).

`vision.stem_blocks` > 0 deepens the stem (`LatentStem`) with that many residual blocks at the latent resolution
(`vision.stem_width` channels; GroupNorm, SiLU, 3x3 convolutions, the noise embedding added per channel in each,
as a U-Net's residual blocks take their time embedding): the image read at full resolution, knowing sigma, before
the patches (a hybrid ViT, Dosovitskiy et al. 2021, sec. 3.1). Their second convolutions start at zero, so such a
stem starts as the one-convolution stem.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import CLIPConfig, ModelConfig
from ..nn.embeddings import timestep_embedding
from .clip import CLIPModel

NOISE_FREQUENCY = 1000.0  # c_noise is scaled by this before the sinusoids (their longest period: 10000)


class NoiseEmbedding(nn.Module):
    """sigma (B,) -> (B, width): sinusoids of 1000 log(sigma) / 4, then Linear, SiLU, Linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.linear_1 = nn.Linear(width, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        c_noise = sigma.float().log() / 4  # EDM's c_noise
        features = timestep_embedding(NOISE_FREQUENCY * c_noise, self.width).to(self.linear_1.weight.dtype)
        return self.linear_2(nn.functional.silu(self.linear_1(features)))


class StemBlock(nn.Module):
    """A residual block at the latent resolution: h + conv2(SiLU(GN(conv1(SiLU(GN(h))) + W emb))), emb the
    noise embedding (a U-Net's ResBlock with its time embedding, without dropout)."""

    def __init__(self, channels: int, emb_width: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(STEM_GROUPS, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_width, channels)
        self.norm2 = nn.GroupNorm(STEM_GROUPS, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        y = self.conv1(nn.functional.silu(self.norm1(h)))
        if emb is not None:
            y = y + self.emb_proj(nn.functional.silu(emb))[:, :, None, None].to(y.dtype)
        return h + self.conv2(nn.functional.silu(self.norm2(y)))


STEM_GROUPS = 8  # GroupNorm groups of the stem's blocks (vision.stem_width must be a multiple)


class LatentStem(nn.Module):
    """Latents (B, C, h, w) -> patch tokens (B, width, h/p, w/p): a 3x3 convolution over the latent grid, `blocks`
    residual blocks given the noise embedding (none: the shipped stem), GELU, and the p x p patch convolution (a
    convolutional stem in place of ViT's linear patch embedding: a latent patch alone does not say what its pixels
    are, its neighbours help)."""

    def __init__(self, channels: int, width: int, patch: int, blocks: int = 0, stem_width: int = 0) -> None:
        super().__init__()
        inner = stem_width or width
        self.conv_in = nn.Conv2d(channels, inner, 3, padding=1)
        self.blocks = nn.ModuleList(StemBlock(inner, width) for _ in range(blocks))
        self.proj = nn.Conv2d(inner, width, patch, stride=patch)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """`emb` (B, width): the noise embedding the blocks take (None: as if zero, the blocks' state at init)."""
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.proj(nn.functional.gelu(h))


class NoisyCLIPModel(CLIPModel):
    """CLIP whose image tower reads noisy latents and sigma (module docstring): `encode_latents(x, sigma)`
    gives the image embeddings; the text tower, `encode_text` and `logits` are CLIP's. It reads no pixels:
    `preprocess` and `encode_image` refuse."""

    def __init__(self, cfg: CLIPConfig) -> None:
        if cfg.image_input != "latents" or cfg.latent_space is None:
            raise ValueError(f"a noise-aware CLIP needs image_input 'latents' and a latent_space; config "
                             f"{cfg.name!r} has image_input {cfg.image_input!r}")
        super().__init__(cfg)
        v = cfg.vision
        if v.stem_width % STEM_GROUPS:
            raise ValueError(f"config key model.vision.stem_width: {v.stem_width} is not a multiple of {STEM_GROUPS} "
                             "(the GroupNorm groups of the stem's blocks)")
        if v.stem_blocks == 0 and v.stem_width and v.stem_width != v.width:
            raise ValueError(f"config key model.vision.stem_width: {v.stem_width} without stem_blocks; set stem_blocks "
                             "or leave stem_width 0")
        # the patch embedding reads latents through a convolutional stem
        self.vision_model.embeddings.patch_embedding = LatentStem(v.channels, v.width, v.patch_size, v.stem_blocks,
                                                                  v.stem_width)
        self.noise_embedding = NoiseEmbedding(v.width)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the latents the tower reads."""
        v = self.clip_config.vision
        return v.channels, v.image_size, v.image_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.clip_config.name} is a noise-aware CLIP: it reads a diffusion model's noisy "
                         "latents (encode_latents), not pixels; use a pixel CLIP to score images")

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.preprocess(pixels)

    def encode_latents(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Noisy latents x (B, C, h, w) = z0 + sigma eps at noise level sigma ((B,) or a number) -> image
        embeddings (B, projection_dim), differentiable with respect to x. sigma is clamped to the latent space's
        [sigma_min, sigma_max] for the noise embedding (sigma 0 reads as sigma_min)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f"latents must be (batch, {', '.join(map(str, self.latent_shape))}), got {tuple(x.shape)}")
        ls = self.clip_config.latent_space
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(-1).float()
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"{sigma.shape[0]} sigmas for a batch of {x.shape[0]} latents")
        sigma = sigma.clamp(max(ls.sigma_min, 1e-8), ls.sigma_max)
        c_in = 1 / (sigma**2 + ls.sigma_data**2).sqrt()  # (B,)
        vm = self.vision_model
        emb_layer = vm.embeddings
        dtype = self.visual_projection.weight.dtype
        emb = self.noise_embedding(sigma).to(dtype)  # (B, width)
        patches = emb_layer.patch_embedding((x.float() * c_in[:, None, None, None]).to(dtype), emb)
        patches = patches.flatten(2).transpose(1, 2)  # (B, patches, width), as CLIPVisionEmbeddings
        cls = emb_layer.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        tokens = torch.cat([cls, patches], dim=1) + emb_layer.position_embedding.weight.to(patches.dtype)
        tokens = tokens + emb[:, None, :]
        h = vm.pre_layrnorm(tokens)
        for layer in vm.encoder.layers:
            h = self._run_layer(layer, h)
        return self.visual_projection(vm.post_layernorm(h[:, 0]))


def build_clip_model(cfg: CLIPConfig) -> CLIPModel:
    """The CLIP model a config describes: `NoisyCLIPModel` for image_input "latents", else `CLIPModel`."""
    return NoisyCLIPModel(cfg) if cfg.image_input == "latents" else CLIPModel(cfg)


def init_noise_embedding_(model: NoisyCLIPModel, generator: torch.Generator | None = None) -> None:
    """The initialisation of what a noise-aware CLIP adds to CLIP: the stem's convolutions (its blocks' first
    convolution and noise projection included) and the noise MLP's first layer normal with std fan_in^-0.5, zero
    biases, and the MLP's last layer and the blocks' second convolutions zero (the tower starts blind to sigma, as
    a U-Net's zero-initialised output layers start silent: a tower taken from a pixel CLIP then starts as it
    was, and a stem with blocks as the one without)."""
    stem = model.vision_model.embeddings.patch_embedding
    normal = [model.noise_embedding.linear_1, stem.conv_in, stem.proj]
    zero = [model.noise_embedding.linear_2]
    for block in stem.blocks:
        normal += [block.conv1, block.emb_proj]
        zero.append(block.conv2)
    with torch.no_grad():
        for layer in normal:
            fan_in = layer.weight[0].numel()
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / math.sqrt(fan_in))
            layer.bias.zero_()
        for layer in zero:
            layer.weight.zero_()
            layer.bias.zero_()


def check_latent_space(cfg: CLIPConfig, model: ModelConfig, model_name: str, latent_hw: tuple[int, int]) -> None:
    """ValueError, one line, unless the noise-aware CLIP `cfg` reads the latents of diffusion model `model`
    (named `model_name`) at latent size `latent_hw`: the same autoencoder (the sha256 of the VAE file the model
    was trained on, its provenance `vae_sha256`: the CLIP's autoencoder file, or the very model file whose
    latents the CLIP learnt, as a stage-2 fine-tune given that model as `--vae` records; stage 2 never changes the
    autoencoder), latent channels, scale and shift factors, and latent size."""
    ls = cfg.latent_space
    if ls is None:
        return
    channels, size = cfg.vision.channels, cfg.vision.image_size
    own = f"{cfg.name} is a noise-aware CLIP of model {ls.model or '?'}'s latents"
    vae_sha = str(model.provenance.get("vae_sha256") or "")
    why = None
    if vae_sha not in {ls.vae_sha256, ls.model_sha256} - {""}:
        why = (f"model {model_name!r} has another autoencoder (sha256 {vae_sha[:16] or 'unknown'}, not "
               f"{ls.vae_sha256[:16]})")
    elif model.vae.latent_channels != channels:
        why = f"model {model_name!r} has {model.vae.latent_channels} latent channels, not {channels}"
    elif not (math.isclose(model.vae.scale_factor, ls.scale_factor, rel_tol=1e-6)
              and math.isclose(model.vae.shift_factor, ls.shift_factor, rel_tol=1e-6, abs_tol=1e-9)):
        why = (f"model {model_name!r} scales its latents by {model.vae.scale_factor:.6g} (shift "
               f"{model.vae.shift_factor:g}), not {ls.scale_factor:.6g} (shift {ls.shift_factor:g})")
    if why:
        raise ValueError(f"{own}: {why}; guide it with a CLIP that reads pixels (--clip) or one trained on its latents")
    if tuple(latent_hw) != (size, size):
        f = model.vae.downsample_factor
        raise ValueError(f"{own}, {size}x{size} latents ({size * f}x{size * f} px images); the request's are "
                         f"{latent_hw[0]}x{latent_hw[1]} ({latent_hw[0] * f}x{latent_hw[1] * f} px): generate at "
                         f"{size * f}x{size * f}")
