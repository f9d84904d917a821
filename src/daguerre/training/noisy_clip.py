"""The noise-aware CLIP of `daguerre train clip` (`[model] image_input = "latents"`, models/noisy_clip.py).

GLIDE (Nichol et al. 2022, sec. 3) trains its noised CLIP with CLIP's contrastive objective on noised images;
here the images are a diffusion model's latents (`model.latent_space.model`, a shipped name or a path), so that
the CLIP reads exactly what that model's sampler holds. Each training image is encoded once by the model's
autoencoder (`latents.build_or_load`: the stage-2 latent cache, keyed by the autoencoder and the data), and
each step draws per sample, from its own generator: a posterior sample z = mean + std eps', a timestep t
uniform over the model's training steps and its sigma_t (the model's own sigma table, `model_sigmas`: its
training distribution of noise levels), and noise eps; the image tower reads x = z0 + sigma_t eps, z0 =
(z - shift) * scale, with sigma_t (`NoisyCLIPModel.encode_latents`).

`loss.text_tower` names a CLIP whose text tower (and tokenizer window) the run takes frozen (the shipped
shapes-clip for the shapes model): the image tower then learns to meet fixed text embeddings, which are
embedded once per caption. `loss.distill` > 0 adds 1 - cos(E_I(x_t, sigma), E_I'(x0)) with E_I' that CLIP's own
image embedding of the clean image (computed once per training image): a dense target in the same joint space,
whose best value at high noise is the expected embedding given x_t, the quantity guidance wants.
`loss.subset_negatives` adds, per scene of several objects, the caption of a part of it as a hard negative.

Progress is the zero-shot accuracy on held-out single objects (`metrics.zero_shot`'s scenes and prompts) at
fixed noise levels (`noise_level_zero_shot`): what guidance can read at each step of sampling.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import CLIPConfig, LatentSpaceConfig, check_clip_config
from ..diffusion.schedules import model_sigmas
from ..metrics import zero_shot as zs
from ..models.clip import CLIPModel
from ..models.noisy_clip import NoisyCLIPModel
from . import dist, latents
from .config import RunConfig
from .data import TrainData, build_dataset, images_of, load_items

logger = logging.getLogger("daguerre.train")
NOISE_LEVELS = (0.25, 1.0, 2.0, 4.0, 8.0, 16.0)  # sigmas of the zero-shot accuracy logged during training
TEACHER_BATCH = 256  # images per teacher forward pass


class LatentSource:
    """The diffusion model a noise-aware CLIP is trained for: its autoencoder (float32, frozen), its sigma
    table, and the `LatentSpaceConfig` that records them."""

    def __init__(self, spec: str, device: torch.device | str) -> None:
        from ..registry import model_file, open_model

        comps, _ = open_model(spec, device=device, dtype="fp32")
        mcfg = comps.config
        vae_sha = str(mcfg.provenance.get("vae_sha256") or "")
        if not vae_sha:
            raise ValueError(f"config key model.latent_space.model: model {spec!r} does not record the autoencoder "
                             "it was trained on (provenance vae_sha256); name a model daguerre trained")
        self.model_config = mcfg
        self.vae = comps.vae.eval().requires_grad_(False)
        self.sigmas = model_sigmas(mcfg.schedule).float()  # (T,) ascending: sigma of each training timestep
        self.space = LatentSpaceConfig(
            model=spec, model_sha256=str(model_file(spec)["sha256"] or ""), vae_sha256=vae_sha,
            scale_factor=mcfg.vae.scale_factor, shift_factor=mcfg.vae.shift_factor,
            sigma_min=float(self.sigmas[0]), sigma_max=float(self.sigmas[-1]))
        self.vae_sha256 = vae_sha

    def clip_config(self, cfg: RunConfig, text: CLIPConfig | None) -> CLIPConfig:
        """The run's CLIPConfig with what the model fixes: the image tower's input is its latent grid (channels
        and size at data.size pixels), `latent_space` records it; with a frozen `text` tower, its config."""
        f, channels = self.model_config.vae.downsample_factor, self.model_config.vae.latent_channels
        if cfg.data.size % f:
            raise ValueError(f"config key data.size: {cfg.data.size} is not a multiple of the autoencoder's factor {f}")
        m = copy.deepcopy(cfg.model)
        m.vision.channels, m.vision.image_size = channels, cfg.data.size // f
        m.image_mean, m.image_std = (0.0,) * channels, (1.0,) * channels  # unused: latents are not normalised so
        m.latent_space = dataclasses.replace(self.space, sigma_data=cfg.model.latent_space.sigma_data)
        if text is not None:
            m.text_encoder = copy.deepcopy(text.text_encoder)
        try:
            check_clip_config(m, "model.")
        except ValueError as e:
            raise ValueError(f"{e} (for the latents of model {self.space.model!r})") from None
        return m

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, H, W) in [-1, 1] -> the model's clean latents z0 (posterior mean, scaled), float32."""
        device = next(self.vae.parameters()).device
        z = self.vae.encode(images.to(device)).mean.float()
        return (z - self.space.shift_factor) * self.space.scale_factor


def frozen_text_tower(spec: str, device: torch.device | str) -> CLIPModel:
    """The CLIP whose text tower a run takes frozen (`loss.text_tower`), float32 on `device`."""
    from ..registry import open_clip

    clip = open_clip(spec, device=device)
    if clip.clip_config.latent_space is not None:
        raise ValueError(f"config key loss.text_tower: {spec} is a noise-aware CLIP; name a CLIP that reads pixels")
    return clip


def take_text_tower_(model: CLIPModel, source: CLIPModel) -> None:
    """Copy `source`'s text tower and text projection into `model` (same text config) and freeze them."""
    sd = {k: v for k, v in source.state_dict().items() if k.startswith(("text_model.", "text_projection."))}
    missing = [k for k in model.state_dict() if k.startswith(("text_model.", "text_projection.")) and k not in sd]
    if missing:
        raise ValueError(f"config key loss.text_tower: its text tower lacks {missing[:3]}")
    model.load_state_dict(sd, strict=False)
    model.text_model.requires_grad_(False)
    model.text_projection.requires_grad_(False)


def take_image_tower_(model: NoisyCLIPModel, source: CLIPModel) -> int:
    """Start `model`'s image tower from pixel CLIP `source`'s (`loss.init_image_tower`): its class token, position
    embeddings, layer norms, transformer layers and visual projection; the stem, the noise embedding and the
    temperature (model.logit_scale_init: noisy images call for a softer one than clean images) stay as
    initialised (the stem is then fitted, `fit_stem_`, to read latents as `source`'s patch embedding reads pixels). The
    two towers must have the same token grid, width and layers: ValueError naming the first tensor that differs.
    Returns the tensors taken."""
    own = model.state_dict()
    take = {k: v for k, v in source.state_dict().items()
            if k.startswith(("vision_model.", "visual_projection.")) and not k.startswith(STEM_PREFIX)}
    for k, v in take.items():
        if k not in own or own[k].shape != v.shape:
            shape = tuple(own[k].shape) if k in own else "absent"
            raise ValueError(f"config key loss.init_image_tower: {k} of the text_tower CLIP is {tuple(v.shape)}, the "
                             f"run's image tower's {shape}: give model.vision the text_tower CLIP's width, layers, "
                             "heads and MLP, and a token grid of its size")
    model.load_state_dict(take, strict=False)
    return len(take)


STEM_PREFIX = "vision_model.embeddings.patch_embedding."
STEM_FIT_IMAGES = 2048  # training images whose patch tokens the stem is fitted to
STEM_FIT_STEPS = 1000  # Adam steps of the fit, batch STEM_FIT_BATCH, learning rate STEM_FIT_LR
STEM_FIT_BATCH = 64
STEM_FIT_LR = 2e-3


def fit_stem_(model: NoisyCLIPModel, source: CLIPModel, inputs: LatentInputs, data: TrainData,
              seed: int) -> float:
    """Fit `model`'s stem to read clean latents as `source`'s patch embedding reads the pixels they encode: Adam
    on the mean squared difference of the patch tokens over the first STEM_FIT_IMAGES training images, the rest of
    the model untouched (`loss.init_image_tower`: without it the transformer taken from `source` would first see
    random tokens, and their large gradients undo it). Draws from a generator seeded `seed`; returns the final
    error relative to the tokens' variance."""
    stem = model.vision_model.embeddings.patch_embedding
    n = min(STEM_FIT_IMAGES, len(inputs))
    rows = np.arange(n)
    device = next(stem.parameters()).device
    with torch.no_grad():
        pixels = images_of(load_items(data, inputs.dataset_index[rows]))
        target = torch.cat([source.vision_model.embeddings.patch_embedding(source.preprocess(chunk.to(device)))
                            for chunk in pixels.split(TEACHER_BATCH)])  # (n, width, g, g)
        space = inputs.source.space
        z0 = ((inputs.lat.mean[torch.from_numpy(rows), 0] - space.shift_factor) * space.scale_factor).to(device)
        u = z0 / (space.sigma_min**2 + space.sigma_data**2) ** 0.5  # what the tower reads at the lowest noise
    variance = target.var(dim=(0, 2, 3)).mean()
    opt = torch.optim.Adam(stem.parameters(), lr=STEM_FIT_LR)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(STEM_FIT_STEPS):
        batch = torch.randint(n, (STEM_FIT_BATCH,), generator=gen).to(device)
        loss = (stem(u[batch]) - target[batch]).pow(2).mean() / variance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        error = float(sum((stem(a) - b).pow(2).sum() for a, b in zip(u.split(256), target.split(256), strict=True))
                      / target.numel() / variance)
    logger.info("stem fitted to %s's patch tokens on %d clean latents: relative error %.3f", source.clip_config.name,
                n, error)
    return error


class LatentInputs:
    """What a noise-aware CLIP run reads besides the loop's stream: the cached posteriors of the training images
    (`latents.LatentSet`, rows in the order of data.train_pool), the model's sigma table, the frozen text
    tower's caption embeddings, the teacher embeddings of `loss.distill`, and the scenes of subset negatives."""

    def __init__(self, cfg: RunConfig, data: TrainData, source: LatentSource, out: Path, env: dist.DistEnv,
                 text: CLIPModel | None, text_sha256: str = "") -> None:
        self.cfg, self.source = cfg, source
        cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "latents"
        self.lat = latents.build_or_load(source.vae, source.vae_sha256, data, False, cache_root, env)
        self.pool = np.arange(len(self.lat))
        self.dataset_index = data.train_pool  # cache row -> dataset index
        self.dataset = build_dataset(cfg.data) if cfg.loss.subset_negatives else None
        self.caption_embeds = embed_texts(text, self.lat.captions) if text is not None else None
        self.teacher = None
        if cfg.loss.distill > 0 and text is not None:
            self.teacher = teacher_embeddings(text, text_sha256, data, self.lat.folder)

    def __len__(self) -> int:
        return len(self.lat)

    def noisy(self, rows: np.ndarray, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, sigma) of the cache rows: per sample from its generator, in this order, a timestep t uniform over
        the model's training steps, the posterior noise and the diffusion noise; x = z0 + sigma_t eps."""
        lat, space, sigmas = self.lat, self.source.space, self.source.sigmas
        shape = tuple(lat.mean.shape[2:])
        t, post, eps = [], [], []
        for g in gens:
            t.append(torch.randint(len(sigmas), (1,), generator=g))
            post.append(torch.randn(shape, generator=g))
            eps.append(torch.randn(shape, generator=g))
        index = torch.from_numpy(rows)
        z = lat.mean[index, 0] + lat.std[index, 0] * torch.stack(post)
        z0 = (z - space.shift_factor) * space.scale_factor
        sigma = sigmas[torch.cat(t)]  # (B,)
        return z0 + sigma[:, None, None, None] * torch.stack(eps), sigma

    def captions(self, rows: np.ndarray) -> list[str]:
        return [self.lat.captions[int(r)] for r in rows]

    def subset_negatives(self, rows: np.ndarray, gens: list[torch.Generator]) -> list[str]:
        """Per scene of two or more objects, the caption of a part of it: one of its objects, or (three objects,
        half the time) all but one, the part and the phrasing drawn from the sample's generator."""
        from ..data.shapes import Scene, caption

        out = []
        for r, g in zip(rows, gens, strict=True):
            scene = self.dataset.sample(int(self.dataset_index[int(r)]))[0]
            objects = scene.objects
            if len(objects) < 2:
                continue
            u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
            k = int(u[0] * len(objects))
            keep = (objects[k],) if len(objects) == 2 or u[1] < 0.5 else tuple(o for j, o in enumerate(objects)
                                                                              if j != k)
            rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=g)))
            out.append(caption(Scene(keep, scene.background, None), rng))
        return out


@torch.no_grad()
def embed_texts(clip: CLIPModel, texts: list[str]) -> torch.Tensor:
    """(N, D) float32 text embeddings (not normalised) of `texts`, by `clip`'s text tower."""
    tokenizer = zs.clip_tokenizer(clip.clip_config)
    device = clip.logit_scale.device
    out = [clip.encode_text(tokenizer(texts[i:i + zs.BATCH]).to(device)).float().cpu()
           for i in range(0, len(texts), zs.BATCH)]
    return torch.cat(out) if out else torch.zeros(0, clip.clip_config.projection_dim)


def teacher_embeddings(teacher: CLIPModel, teacher_sha256: str, data: TrainData, folder: Path) -> torch.Tensor:
    """(N, D) unit-length image embeddings by `teacher` (its file's sha256 `teacher_sha256`) of the clean training
    images (data.train_pool order), computed once and kept in the latent cache `folder` they belong to."""
    from safetensors.torch import load_file

    from ..fileio import atomic_save_safetensors

    path = folder / f"teacher_{teacher_sha256[:16] or teacher.clip_config.name}.safetensors"
    if path.is_file():
        return load_file(str(path))["embeds"]
    logger.info("teacher image embeddings of %d training images -> %s", len(data.train_pool), path)
    device = teacher.logit_scale.device
    out = []
    with torch.no_grad():
        for i in range(0, len(data.train_pool), TEACHER_BATCH):
            x = images_of(load_items(data, data.train_pool[i:i + TEACHER_BATCH])).to(device)
            out.append(F.normalize(teacher.encode_image(teacher.preprocess(x)).float(), dim=-1).cpu())
    embeds = torch.cat(out)
    atomic_save_safetensors({"embeds": embeds}, path, {})
    return embeds


@torch.no_grad()
def noise_level_zero_shot(model: NoisyCLIPModel, source: LatentSource, n: int,
                          levels: tuple[float, ...] = NOISE_LEVELS) -> dict[str, float]:
    """Zero-shot accuracy on `n` held-out single-object scenes (`metrics.zero_shot`'s) at each noise level: the
    scenes' latents z0 + sigma eps (eps fixed by a seed) against every colour x shape prompt. Keys
    `both_sigma_<s>`, `shape_sigma_<s>`, `colour_sigma_<s>` (fractions), and `both_mean` over the levels."""
    from ..data.shapes import ShapesDataset

    prompts = zs.shape_colour_prompts()
    device = model.logit_scale.device
    texts = F.normalize(embed_texts(model, [p for _, _, p in prompts]), dim=-1).to(device)
    size = model.latent_shape[-1] * source.model_config.vae.downsample_factor
    data = ShapesDataset(n, seed=zs.HELDOUT_SEED, size=size, min_objects=1, max_objects=1)
    items = [data[i] for i in range(n)]
    z0 = torch.cat([source.encode(torch.stack([it["image"] for it in items[i:i + zs.BATCH]]))
                    for i in range(0, n, zs.BATCH)]).to(device)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(zs.HELDOUT_SEED)).to(device)
    truth = [(it["scene"].objects[0].shape, it["scene"].objects[0].colour) for it in items]
    out: dict[str, float] = {}
    for s in levels:
        sigma = torch.full((n,), float(s), device=device)
        embeds = torch.cat([model.encode_latents(x, sg) for x, sg in zip((z0 + s * eps).split(zs.BATCH),
                                                                            sigma.split(zs.BATCH), strict=True)])
        best = (F.normalize(embeds.float(), dim=-1) @ texts.T).argmax(1).tolist()
        shape = sum(prompts[k][0] == t[0] for k, t in zip(best, truth, strict=True)) / n
        colour = sum(prompts[k][1] == t[1] for k, t in zip(best, truth, strict=True)) / n
        both = sum(prompts[k][:2] == t for k, t in zip(best, truth, strict=True)) / n
        out.update({f"both_sigma_{s:g}": both, f"shape_sigma_{s:g}": shape, f"colour_sigma_{s:g}": colour})
    out["both_mean"] = float(np.mean([out[f"both_sigma_{s:g}"] for s in levels]))
    out["images"] = n
    return out


def noisy_zero_shot(model: NoisyCLIPModel, kind: str, n: int) -> dict[str, float]:
    """`noise_level_zero_shot` of a noise-aware CLIP on the latents of the model it names (its latent_space.model,
    a shipped name), which must be the one it was trained on (`check_latent_space`); shapes world only."""
    from ..models.noisy_clip import check_latent_space

    if kind != "shapes":
        raise ValueError(f"a noise-aware CLIP's zero-shot accuracy is measured on the shapes world, not {kind!r}")
    if n < 1:
        raise ValueError(f"zero-shot evaluation needs at least 1 image, got {n}")
    space = model.clip_config.latent_space
    source = LatentSource(space.model, model.logit_scale.device)
    size = model.latent_shape[-1]
    check_latent_space(model.clip_config, source.model_config, space.model, (size, size))
    return noise_level_zero_shot(model, source, n)
