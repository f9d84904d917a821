"""CLIP: a text tower and an image tower trained to agree (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision").

Both towers map into one joint space: the text tower is the causal transformer of `text_encoder.py`
(pooled at the end-of-text token, then `text_projection`), the image tower a vision transformer
(Dosovitskiy et al. 2021): the image cut into patch_size x patch_size patches, each linearly embedded
(a strided convolution without bias), a learned class token prepended, position embeddings added, a
LayerNorm, pre-LN transformer layers (no mask), the final class token LayerNormed and projected
(`visual_projection`). Training pulls the unit-length embeddings of matching pairs together and pushes
the others apart, with logits `exp(logit_scale) * cos(image, text)` (a learned temperature).

Module names are those of transformers' `CLIPModel` (`text_model.*`, `vision_model.*`,
`text_projection`, `visual_projection`, `logit_scale`, and the "pre_layrnorm" spelling), so its state
dict is a transformers checkpoint's. `CLIPModel` is a `CLIPTextEncoder` with the image tower beside it:
called on token ids it is the text encoder a diffusion model conditions on (SD v1's is CLIP ViT-L/14's
text tower).

Images enter as (B, 3, H, W) in [-1, 1], daguerre's pixel range; `preprocess` resizes, centre-crops and
normalises them as CLIP's own preprocessing does, in torch, so that it can be differentiated through
(CLIP guidance, daguerre.guidance).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIPConfig, TextEncoderConfig, VisionConfig
from .text_encoder import ACTIVATIONS, CLIPEncoder, CLIPTextEncoder

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature so that logits are at most 100x cosines


class CLIPVisionEmbeddings(nn.Module):
    """Patch embedding + class token + position embeddings: (B, C, S, S) -> (B, 1 + patches, width)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, patches, width)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight.to(patches.dtype)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)  # transformers' spelling
        # the text tower's layers, made non-causal: a ViT layer is the same pre-LN block
        self.encoder = CLIPEncoder(_as_layer_config(cfg))
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


def _as_layer_config(cfg: VisionConfig) -> TextEncoderConfig:
    """The fields `CLIPEncoderLayer` reads, from a vision config (bidirectional attention)."""
    return TextEncoderConfig(
        width=cfg.width, layers=cfg.layers, heads=cfg.heads, mlp_dim=cfg.mlp_dim, activation=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps, causal=False,
    )


class CLIPModel(CLIPTextEncoder):
    """CLIP's two towers and temperature. `encode_image` / `encode_text` give the projected embeddings
    (not normalised), `forward_logits` the (images x texts) logits; calling the model on token ids is the
    text encoder's forward (hidden states for a U-Net to attend to, and the projected pooled output)."""

    def __init__(self, cfg: CLIPConfig):
        if cfg.vision.activation not in ACTIVATIONS:
            raise ValueError(f"vision activation {cfg.vision.activation!r} is not supported: use one of {ACTIVATIONS}")
        if cfg.vision.width % cfg.vision.heads:
            raise ValueError(f"vision width {cfg.vision.width} is not divisible by heads {cfg.vision.heads}")
        super().__init__(cfg.text_encoder)
        self.clip_config = cfg
        dim = cfg.projection_dim
        self.vision_model = CLIPVisionTransformer(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.width, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.register_buffer("image_mean", torch.tensor(cfg.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(cfg.image_std).view(1, -1, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return self.clip_config.vision.image_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> CLIP's input: the shorter side resized to `image_size` (bicubic,
        antialiased), the centre square cropped, each channel normalised by CLIP's mean and std.
        Differentiable; an image already `image_size` square is only normalised."""
        if images.ndim != 4 or images.shape[1] != self.clip_config.vision.channels:
            raise ValueError(f"images must be (batch, {self.clip_config.vision.channels}, height, width), "
                             f"got {tuple(images.shape)}")
        size = self.image_size
        h, w = images.shape[-2:]
        if (h, w) != (size, size):
            short = min(h, w)  # the longer side truncated, as torchvision's Resize in CLIP's preprocessing
            nh, nw = max(size, size * h // short), max(size, size * w // short)
            images = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            top, left = (nh - size) // 2, (nw - size) // 2
            images = images[..., top: top + size, left: left + size]
        pixels = (images + 1) / 2  # [0, 1]
        mean, std = self.image_mean.to(pixels), self.image_std.to(pixels)
        return (pixels - mean) / std

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, C, image_size, image_size) -> image embeddings (B, projection_dim)."""
        size = self.image_size
        if pixels.ndim != 4 or pixels.shape[-2:] != (size, size):
            raise ValueError(f"pixels must be (batch, channels, {size}, {size}) after preprocess(), "
                             f"got {tuple(pixels.shape)}")
        vm = self.vision_model
        dtype = self.visual_projection.weight.dtype
        x = vm.pre_layrnorm(vm.embeddings(pixels.to(dtype)))
        for layer in vm.encoder.layers:
            x = self._run_layer(layer, x)
        return self.visual_projection(vm.post_layernorm(x[:, 0]))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> text embeddings (B, projection_dim): the pooled, projected end-of-text state."""
        return self(input_ids).pooled

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(images x texts) logits: exp(logit_scale) times the cosine similarity of each pair."""
        image_embeds = F.normalize(image_embeds.float(), dim=-1)
        text_embeds = F.normalize(text_embeds.float(), dim=-1)
        return self.logit_scale.float().exp() * image_embeds @ text_embeds.T

    def forward_logits(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """`logits` of preprocessed images against token ids: transformers' `logits_per_image`."""
        return self.logits(self.encode_image(pixels), self.encode_text(input_ids))


def init_clip_(model: CLIPModel, generator: torch.Generator | None = None) -> CLIPModel:
    """CLIP's initialisation for training from scratch (Radford et al.'s code): normal weights with
    std width^-0.5 for embeddings and attention, scaled by depth for the residual projections, zero biases,
    unit LayerNorms; the temperature at `logit_scale_init`."""
    cfg = model.clip_config

    def normal_(t: torch.Tensor, std: float) -> None:
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=generator) * std)

    for tower, width, layers in (
        (model.text_model, cfg.text_encoder.width, cfg.text_encoder.layers),
        (model.vision_model, cfg.vision.width, cfg.vision.layers),
    ):
        attn_std = width ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for layer in tower.encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                normal_(proj.weight, attn_std)
            normal_(layer.self_attn.out_proj.weight, proj_std)
            normal_(layer.mlp.fc1.weight, fc_std)
            normal_(layer.mlp.fc2.weight, proj_std)
    emb = model.text_model.embeddings
    normal_(emb.token_embedding.weight, 0.02)
    normal_(emb.position_embedding.weight, 0.01)
    vemb = model.vision_model.embeddings
    width = cfg.vision.width
    normal_(vemb.class_embedding, width ** -0.5)
    normal_(vemb.position_embedding.weight, width ** -0.5)
    if isinstance(vemb.patch_embedding, nn.Conv2d):  # (a noise-aware CLIP's stem: models/noisy_clip.py)
        fan_in = cfg.vision.channels * cfg.vision.patch_size ** 2
        normal_(vemb.patch_embedding.weight, fan_in ** -0.5)
    normal_(model.text_projection.weight, cfg.text_encoder.width ** -0.5)
    normal_(model.visual_projection.weight, width ** -0.5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        model.logit_scale.fill_(cfg.logit_scale_init)
    return model

