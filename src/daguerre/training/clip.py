"""`daguerre train clip`: a contrastive image-text model (CLIP, Radford et al. 2021) on the shared loop.

Each step embeds a batch of images (augmented views, `augment`) and their captions, and minimises the
symmetric InfoNCE loss (van den Oord et al. 2018; CLIP's Fig. 3): with logits
L_ij = exp(s) cos(image_i, text_j) and the learned temperature s clamped at log 100 (`MAX_LOGIT_SCALE`, as
CLIP does), the mean of the cross-entropies image -> text (rows of L) and text -> image (columns).

Identical captions are positives. The shapes world and Fashion-MNIST repeat captions within a batch ("a red
circle" twice), so the target of image i is spread evenly over every caption equal to its own
(`positive_targets`), and symmetrically for texts; with all captions distinct it is CLIP's one-hot target.
A deterministic text tower gives equal captions equal embeddings, hence tied logits, and with tied logits
this loss equals CLIP's one-hot loss in value and in gradient: one-hot targets do not push image i away
from its caption's twin (the pushes cancel), they only state an unreachable minimum of 0 where the real
floor is the targets' entropy (log 2 for a pair). The soft targets state that floor, and make the logged
in-batch accuracy count a tie between equal captions as right (tests/test_train_clip.py holds both).

Hard negatives (`loss.swap_words`, NegCLIP, Yuksekgonul et al. 2023): each caption may bring copies with one
word of a group of mutually exclusive words swapped ("circle" -> "star"); they join the image -> text rows
only, so an image must rank its own caption above captions that differ from it in one attribute.

The data stream, the per-sample random draws (`dist.sample_generator`), EMA, checkpoints and resume are the
loop's (`loop.run`). At each sample / eval step the EMA model's zero-shot accuracy is logged
(`metrics.zero_shot`: shapes, Fashion-MNIST; a folder: held-out caption retrieval). The final file
RUN/clip.safetensors is a daguerre CLIP file (`checkpoints/clip_file.py`), its text vocabulary pruned to
the tokens the training captions contain (`train.prune_vocabulary`), with provenance and the zero-shot
results in its config; `daguerre train export RUN` writes the same file from any checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.clip_file import save_clip
from ..config import CLIPConfig
from ..fileio import atomic_path
from ..metrics import zero_shot as zs
from ..models.clip import MAX_LOGIT_SCALE, CLIPModel, init_clip_
from ..models.noisy_clip import NoisyCLIPModel, build_clip_model, init_noise_embedding_
from ..models.text_encoder import CLIPTextEncoder, prune_vocabulary
from . import dist, state
from .config import CLIPLossConfig, RunConfig, derive_clip_config, to_jsonable
from .data import batch_loader, checkpoint_split, images_of, load_items, load_train_data
from .ema import EMA
from .export import SAVE_DTYPES
from .log import RunLogger
from .loop import RunSummary, Setup, autocast, check_writable, make_optimizer, run, wrap_ddp
from .noisy_clip import (
    LatentInputs,
    LatentSource,
    fit_stem_,
    frozen_text_tower,
    noise_level_zero_shot,
    take_image_tower_,
    take_text_tower_,
)

logger = logging.getLogger("daguerre.train")
CLIP_FILE = "clip.safetensors"
RETRIEVAL_IMAGES = 256  # folder data: held-out images of the retrieval accuracy
BLUR_MIN_SIGMA = 0.1  # a drawn blur sigma below this leaves the image as it is


class Contrast(nn.Module):
    """(images, texts[, sigma]) -> ((images x texts) logits, image embeddings), float32: the training forward of
    both towers and the temperature as one module, so that DistributedDataParallel averages every gradient.
    `images` are preprocessed pixels, or with `sigma` a noise-aware CLIP's noisy latents; `texts` are token ids,
    or the embeddings (float) of a frozen text tower."""

    def __init__(self, clip: CLIPModel) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, texts: torch.Tensor,
                sigma: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.clip.encode_image(images) if sigma is None else self.clip.encode_latents(images, sigma)
        txt = texts if texts.is_floating_point() else self.clip.encode_text(texts)  # (B, D) each, maybe bf16
        with torch.autocast(images.device.type, enabled=False):  # cosines and temperature in float32
            return self.clip.logits(img.float(), txt.float()), img.float()


def positive_targets(captions: list[str], texts: list[str] | None = None) -> torch.Tensor:
    """(B, T) targets of the image -> text rows over `texts` (default: the captions themselves, T = B): row i
    spread evenly over the texts equal to caption i (module docstring). With texts = captions the matrix is
    symmetric, so it is also the text -> image target."""
    texts = captions if texts is None else texts
    index = {c: k for k, c in enumerate(dict.fromkeys([*captions, *texts]))}
    a, b = torch.tensor([index[c] for c in captions]), torch.tensor([index[c] for c in texts])
    same = (a[:, None] == b[None, :]).float()  # (B, T)
    return same / same.sum(1, keepdim=True)


def contrastive_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: (CE(rows of logits) + CE(columns)) / 2, each a batch mean.

    `logits` (B, B + N): the first B texts are the images' captions, the N after them hard negatives, which
    take part in the image -> text rows only (a text -> image column is over the B images of its caption)."""
    b = logits.shape[0]
    rows = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    cols_t = targets[:, :b].T
    cols_t = cols_t / cols_t.sum(1, keepdim=True)  # caption j's images (a row of the square part's transpose)
    cols = -(cols_t * F.log_softmax(logits[:, :b].T, dim=1)).sum(1).mean()
    return (rows + cols) / 2


def hard_negatives(captions: list[str], groups: list[list[str]],
                   gens: list[torch.Generator]) -> list[str]:
    """Per caption and per word group it uses, one hard negative: the caption with one occurrence of a word of
    the group (drawn) replaced by another word of the group (drawn) (NegCLIP, Yuksekgonul et al. 2023). The
    words of a group must exclude each other ("circle", "square", ...) so that each negative is false."""
    out = []
    patterns = [re.compile(r"\b(" + "|".join(re.escape(w) for w in g) + r")\b") for g in groups]
    for text, g in zip(captions, gens, strict=True):
        for words, pattern in zip(groups, patterns, strict=True):
            found = list(pattern.finditer(text))
            if not found:
                continue
            hit = found[int(torch.randint(len(found), (1,), generator=g))]
            others = [w for w in words if w != hit.group(1)]
            new = others[int(torch.randint(len(others), (1,), generator=g))]
            out.append(text[: hit.start()] + new + text[hit.end():])
    return out


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C, H, W) blurred by a separable Gaussian of `sigma` pixels (radius 3 sigma, reflected edges)."""
    radius = min(int(math.ceil(3 * sigma)), min(img.shape[-2:]) - 1)
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[0]
    out = F.pad(img[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


def augment(x: torch.Tensor, gens: list[torch.Generator], lc: CLIPLossConfig) -> torch.Tensor:
    """Each image of x (B, C, H, W) in [-1, 1] with its own draws from its generator: a random crop resized
    back (probability crop_p, side crop_min..1), a Gaussian blur (blur_p, sigma 0..blur_sigma), Gaussian
    noise (noise_p, std 0..noise_std); the result clamped to [-1, 1]. A new tensor; x is not changed."""
    h, w = x.shape[-2:]
    out = []
    for img, g in zip(x, gens, strict=True):
        u = torch.rand(7, generator=g, dtype=torch.float64).tolist()  # always 7 draws, in this order
        if u[0] < lc.crop_p:
            side = lc.crop_min + (1 - lc.crop_min) * u[1]
            ch, cw = max(1, round(h * side)), max(1, round(w * side))
            top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
            img = F.interpolate(img[None, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                                align_corners=False)[0]
        if u[4] < lc.blur_p and lc.blur_sigma * u[5] >= BLUR_MIN_SIGMA:
            img = _gaussian_blur(img, lc.blur_sigma * u[5])
        if u[6] < lc.noise_p:
            std = lc.noise_std * float(torch.rand(1, generator=g, dtype=torch.float64))
            img = img + std * torch.randn(img.shape, generator=g)
        out.append(img.clamp(-1, 1))
    return torch.stack(out)


def window_ids(tokenizer, captions: list[str], eos: int) -> torch.Tensor:
    """Token ids (B, T) of `captions`, cut after the longest caption's end token: a causal tower's pooled
    output (at the end token) does not depend on the padding after it, so the cut is exact and cheaper."""
    ids = tokenizer(captions)
    ends = (ids == eos).int().argmax(1)  # the first end token of each row
    return ids[:, : int(ends.max()) + 1]


def build_clip(cfg: CLIPConfig, seed: int) -> CLIPModel:
    """A CLIP model (a noise-aware one for image_input "latents") with CLIP's initialisation drawn from `seed`
    (the global RNG untouched)."""
    model = build_clip_model(cfg)
    generator = torch.Generator("cpu").manual_seed(seed)
    init_clip_(model, generator)
    if isinstance(model, NoisyCLIPModel):
        init_noise_embedding_(model, generator)
    return model


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as CLIP trains: weight decay on matrices only, none on gains, biases, embeddings' class
    token and the temperature (one-dimensional or scalar parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]  # (a frozen text tower: not)
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def clamp_temperature_(model: CLIPModel) -> None:
    """Clip the learned log-temperature at MAX_LOGIT_SCALE (logits at most 100 x cosines), in place."""
    model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)


def train_clip(cfg: RunConfig, out: str | Path, *, resume: bool = False, until: int | None = None) -> Path:
    """Run the CLIP stage as configured; returns RUN/clip.safetensors, or with `until` < train.steps the
    checkpoint of step `until` (a pause: resume later with `resume`)."""
    return run(CLIPStage(cfg), cfg, out, resume=resume, until=until)


class CLIPStage:
    """The CLIP stage for `loop.run`: both towers, one optimizer, an EMA; zero-shot accuracy as its samples."""

    output = CLIP_FILE
    ema_targets = evaluated = ("clip",)

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.tokens: set[int] = set()  # token ids of every caption trained on: what a pruned vocabulary keeps
        self.source: LatentSource | None = None  # a noise-aware CLIP's diffusion model (training/noisy_clip.py)
        self.inputs: LatentInputs | None = None
        self.text_tower: dict[str, str] | None = None  # a frozen text tower's CLIP: {"clip", "sha256"}
        self.negatives: FixedNegatives | None = None

    def prepare(self, env: dist.DistEnv) -> None:
        """Before the run folder: what the stage cannot do."""
        if self.cfg.train.init_from:
            raise ValueError("config key train.init_from: the clip stage trains from scratch (no --init)")
        if self.cfg.data.kind == "shapes" and self.cfg.data.seed == zs.HELDOUT_SEED:
            raise ValueError(f"config key data.seed: {zs.HELDOUT_SEED} is the seed of the held-out zero-shot "
                             "scenes; train on another")

    def build(self, setup: Setup) -> None:
        cfg, env, data = self.cfg, setup.env, setup.data
        t = cfg.train
        self.data, self.out, self.device = data, setup.out, env.device
        text = None
        if cfg.loss.text_tower:  # a CLIP's text tower, frozen
            from ..registry import clip_path
            from ..weights.io import file_hash

            text = frozen_text_tower(cfg.loss.text_tower, self.device)
            path = clip_path(cfg.loss.text_tower)
            self.text_tower = {"clip": cfg.loss.text_tower, "sha256": file_hash(path) if path.is_file() else ""}
        if cfg.model.image_input == "latents":
            self.source = LatentSource(cfg.model.latent_space.model, self.device)
            self.model_cfg = self.source.clip_config(cfg, text.clip_config if text is not None else None)
        else:
            self.model_cfg = derive_clip_config(cfg, data.channels)
            if text is not None:
                self.model_cfg.text_encoder = dataclasses.replace(text.clip_config.text_encoder)
        model = build_clip(self.model_cfg, t.seed)
        if text is not None:
            take_text_tower_(model, text)
        model = model.to(self.device).train()
        model.gradient_checkpointing = t.gradient_checkpointing
        self.clip = model
        self.tokenizer = zs.clip_tokenizer(self.model_cfg)
        self.modules: dict[str, nn.Module] = {"clip": model}
        self.optimizers = {"clip": make_optimizer(parameter_groups(model, t.weight_decay), t)}
        self.peak_lr: dict[str, float] = {}
        self.ddp = wrap_ddp(Contrast(model), env)
        self.pool = data.train_pool
        if self.source is not None:
            sha = self.text_tower["sha256"] if self.text_tower else ""
            self.inputs = LatentInputs(cfg, data, self.source, setup.out, env, text, sha)
            self.pool = self.inputs.pool
            if text is not None:  # a frozen tower: each image's hard negatives drawn and embedded once
                self.negatives = fixed_negatives(self.inputs, text, cfg.loss, t.seed)
            if cfg.loss.init_image_tower and setup.fresh:  # (a resume has its own weights)
                take_image_tower_(model, text)
                fit_stem_(model, text, self.inputs, data, t.seed)
        self.holdout = None
        if env.is_main and cfg.data.kind == "folder" and len(data.holdout):
            self.holdout = load_items(data, data.holdout[:RETRIEVAL_IMAGES])

    def resumed(self, meta: dict[str, Any]) -> None:
        self.tokens = {int(i) for i in meta.get("caption_token_ids") or ()}

    def describe(self, env: dist.DistEnv) -> str:
        t, m = self.cfg.train, self.model_cfg
        unit = f"latent px of model {m.latent_space.model}, noise-aware" if m.latent_space else "px"
        frozen = f" (frozen: {self.text_tower['clip']}'s)" if self.text_tower else ""
        return (f"CLIP: image tower {_count(self.clip.vision_model) / 1e6:.2f} M + text tower "
                f"{_count(self.clip.text_model) / 1e6:.2f} M parameters{frozen}, {m.vision.image_size} {unit} in "
                f"{m.vision.patch_size} px patches, joint width {m.projection_dim}; {len(self.data.train_pool)} "
                f"training images on {env.world} process(es), global batch {t.batch_size * env.world * t.grad_accum}")

    def begin(self, sampler: dist.StreamSampler, start: int) -> None:
        t = self.cfg.train
        if self.inputs is not None:  # latents: the cache rows of each step, no images to read
            self.sampler = sampler
            return
        self.stream = iter(sampler.iter_steps(start, t.steps))
        n_pool = len(self.data.train_pool)
        batches = ((int(b[2][0]) // n_pool, b[3]) for b in sampler.iter_steps(start, t.steps))
        self.items = batch_loader(self.data, batches, self.cfg.data.workers)

    def step(self, step: int, micro: int, sync: bool) -> dict[str, float]:
        t, lc, device = self.cfg.train, self.cfg.loss, self.device
        clamp_temperature_(self.clip)  # CLIP clips after each optimizer step: here, before the next forward
        sigma = rows = None
        if self.inputs is not None:  # noisy latents x = z0 + sigma eps of the cache rows (training/noisy_clip.py)
            positions, rows = self.sampler.indices(step, micro)
            gens = [dist.sample_generator(t.seed, "clip", int(p)) for p in positions]
            x, sigma = self.inputs.noisy(rows, gens)
            x, sigma = x.to(device), sigma.to(device)
            captions = self.inputs.captions(rows)
        else:
            _, _, positions, _ = next(self.stream)
            items = next(self.items)
            captions = [str(it.get("caption", "")) for it in items]
            gens = [dist.sample_generator(t.seed, "clip", int(p)) for p in positions]
            x = self.clip.preprocess(augment(images_of(items), gens, lc).to(device))
        if self.negatives is not None:  # drawn and embedded once per image
            negatives, negative_embeds = self.negatives.of(rows)
            texts = captions + negatives
            text_in = torch.cat([self.inputs.caption_embeds[torch.from_numpy(rows)], negative_embeds]).to(device)
        else:
            negatives = hard_negatives(captions, lc.swap_words, gens)
            if self.inputs is not None and lc.subset_negatives:
                negatives += self.inputs.subset_negatives(rows, gens)
            texts = captions + negatives  # captions first, then negatives
            text_in = self._text_input(texts, rows)
        targets = positive_targets(captions, texts).to(device)
        with dist.maybe_no_sync(self.ddp, not sync):
            with autocast(device, t.bf16):
                logits, embeds = self.ddp(x, text_in, sigma)  # (B, B + negatives), (B, D); float32
            loss = contrastive_loss(logits, targets)
            metrics = {}
            if lc.distill and self.inputs is not None and self.inputs.teacher is not None:
                teacher = self.inputs.teacher[torch.from_numpy(rows)].to(device)
                distill = (1 - (F.normalize(embeds, dim=-1) * teacher).sum(1)).mean()
                metrics["contrastive"], metrics["distill"] = float(loss.detach()), float(distill.detach())
                loss = loss + lc.distill * distill
            (loss / t.grad_accum).backward()
        with torch.no_grad():
            hit = targets.gather(1, logits.argmax(1, keepdim=True)) > 0  # image -> text lands on a positive
        return {"loss": float(loss.detach()), "batch_accuracy": float(hit.float().mean()),
                "negatives": float(len(texts) - len(captions)),
                "logit_scale": float(self.clip.logit_scale.detach().exp()), **metrics}

    def _text_input(self, texts: list[str], rows: np.ndarray | None) -> torch.Tensor:
        """Token ids of `texts` for the text tower; with a frozen tower their embeddings: the captions' (the first
        len(rows)) from a latent run's cache, the others embedded now."""
        eos = self.model_cfg.text_encoder.eos_token_id
        cached = self.inputs.caption_embeds if self.inputs is not None else None
        if self.text_tower is None:
            ids = window_ids(self.tokenizer, texts, eos)
            self.tokens.update(int(i) for i in ids.unique())
            return ids.to(self.device)
        embeds = []
        if cached is not None:
            embeds.append(cached[torch.from_numpy(rows)].to(self.device))
            texts = texts[len(rows):]
        with torch.no_grad():
            if texts:
                embeds.append(self.clip.encode_text(window_ids(self.tokenizer, texts, eos).to(self.device)).float())
        return torch.cat(embeds)

    def sample(self, step: int, models: dict[str, nn.Module], runlog: RunLogger, *, grid: bool,
               evaluate: bool) -> None:
        """The EMA model's zero-shot accuracy (instead of image grids), logged at every sample or eval step."""
        metrics = self.evaluate(models["clip"])
        if metrics:
            runlog.log(step, {f"zero_shot_{k}": v for k, v in metrics.items()})
            logger.info("step %d: zero-shot %s", step, _summary(metrics))

    def evaluate(self, model: CLIPModel) -> dict[str, float]:
        return evaluate_clip(model, self.cfg, self.holdout, self.source)

    def checkpoint_meta(self) -> dict[str, Any]:
        # the model's config as built (a noise-aware CLIP's latent space, a frozen text tower's config): export
        # rebuilds it from here
        return {"caption_token_ids": sorted(self.tokens), "clip_config": self.model_cfg.to_dict(),
                "text_tower": self.text_tower}

    def export(self, path: Path, models: dict[str, nn.Module], summary: RunSummary) -> None:
        """The CLIP file of the EMA weights (`write_clip`), with the final zero-shot results."""
        model = models["clip"]
        record = {"steps": self.cfg.train.steps, "training_seconds": round(summary.seconds, 1),
                  "images_seen": self.cfg.train.steps * summary.global_batch, "world_size": summary.world,
                  "config_history": summary.history, "text_tower": self.text_tower}
        write_clip(model, self.cfg, record, sorted(self.tokens), self.data.description, self.evaluate(model), path)


def evaluate_clip(model: CLIPModel, cfg: RunConfig, holdout: list[dict[str, Any]] | None,
                  source: LatentSource | None = None) -> dict[str, float]:
    """Zero-shot accuracy of the run's data kind on `sample.zero_shot_images` held-out images ({} when 0): the
    shapes world's or Fashion-MNIST's (`metrics.zero_shot`), or for a folder caption retrieval among the
    `holdout` items; for a noise-aware CLIP (the latents of `source`'s model) the shapes world's at each noise
    level (`noisy_clip.noise_level_zero_shot`)."""
    n = cfg.sample.zero_shot_images
    was_training = model.training
    model.eval()
    try:
        if n == 0:
            return {}
        if source is not None:
            return noise_level_zero_shot(model, source, n) if cfg.data.kind == "shapes" else {}
        if cfg.data.kind == "folder":
            if not holdout:
                return {}
            items = holdout[:n]
            return zs.retrieval_accuracy(model, zs.clip_tokenizer(model.clip_config), images_of(items),
                                         [str(it.get("caption", "")) for it in items])
        root = cfg.data.fashion_mnist.root if cfg.data.kind == "fashion_mnist" else None
        return zs.zero_shot(model, cfg.data.kind, n, root=root, size=cfg.data.size)
    finally:
        model.train(was_training)


class FixedNegatives:
    """Each cache row's hard negatives, drawn once, and their embeddings by a frozen text tower (`fixed_negatives`)."""

    def __init__(self, texts: list[list[str]], embeds: torch.Tensor) -> None:
        self.texts, self.embeds = texts, embeds
        self.offsets = np.concatenate([[0], np.cumsum([len(t) for t in texts])])

    def of(self, rows: np.ndarray) -> tuple[list[str], torch.Tensor]:
        """The negatives of `rows` in order, and their embeddings (M, D)."""
        texts = [t for r in rows for t in self.texts[int(r)]]
        index = np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows] or [np.zeros(0, int)])
        return texts, self.embeds[torch.from_numpy(index.astype(np.int64))]


def fixed_negatives(inputs: LatentInputs, text: CLIPModel, lc: CLIPLossConfig, seed: int) -> FixedNegatives:
    """Per cache row of a latent run with a frozen text tower, its hard negatives drawn once from a generator of
    its own (seed, "clip-negatives", row): the word swaps of `lc.swap_words` (`hard_negatives`) and with
    `lc.subset_negatives` a part of its scene; embedded once by `text` (embedding them at every step cost as much
    as the image tower's forward and backward). Kept in the latent cache folder, keyed by what they depend on."""
    from safetensors.torch import load_file

    from ..fileio import atomic_save_safetensors
    from ..untrusted import parse_json

    key = json.dumps({"text": text.clip_config.to_json(), "swap": lc.swap_words, "subset": lc.subset_negatives,
                      "seed": seed, "rows": len(inputs)}, sort_keys=True)
    path = inputs.lat.folder / f"negatives_{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            texts = parse_json(f.metadata()["texts"], f"{path}: the negatives metadata")
        return FixedNegatives(texts, load_file(str(path))["embeds"])
    texts = []
    for r in range(len(inputs)):
        g = dist.sample_generator(seed, "clip-negatives", r)
        row = np.array([r])
        own = hard_negatives(inputs.captions(row), lc.swap_words, [g])
        if lc.subset_negatives:
            own += inputs.subset_negatives(row, [g])
        texts.append(own)
    flat = [t for own in texts for t in own]
    logger.info("embedding %d hard negatives of %d training images once -> %s", len(flat), len(texts), path)
    eos = text.clip_config.text_encoder.eos_token_id
    tokenizer = zs.clip_tokenizer(text.clip_config)
    device = text.logit_scale.device
    with torch.no_grad():
        embeds = [text.encode_text(window_ids(tokenizer, flat[i:i + zs.BATCH], eos).to(device)).float().cpu()
                  for i in range(0, len(flat), zs.BATCH)]
    result = FixedNegatives(texts, torch.cat(embeds) if embeds else torch.zeros(0, text.clip_config.projection_dim))
    atomic_save_safetensors({"embeds": result.embeds.contiguous()}, path, {"texts": json.dumps(texts)})
    return result


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def prune_clip(model: CLIPModel, keep: list[int]) -> CLIPModel:
    """A copy of `model` whose text tower keeps only the token-embedding rows of `keep` (`prune_vocabulary`:
    outputs are unchanged for every prompt made of kept tokens; other tokens embed as zeros)."""
    cfg = model.clip_config
    sd = model.state_dict()
    text_keys = [k for k in sd if k.startswith(("text_model.", "text_projection."))]
    text = CLIPTextEncoder(cfg.text_encoder).to(model.logit_scale)
    text.load_state_dict({k: sd[k] for k in text_keys})
    pruned = prune_vocabulary(text, keep)
    new = build_clip_model(dataclasses.replace(cfg, text_encoder=pruned.config)).to(model.logit_scale)
    new.load_state_dict({**{k: v for k, v in sd.items() if k not in text_keys}, **pruned.state_dict()})
    return new.train(model.training)


def write_clip(model: CLIPModel, cfg: RunConfig, record: dict[str, Any], tokens: list[int], data: dict[str, Any],
               zero_shot: dict[str, float], path: Path) -> Path:
    """Write the CLIP file of a run: `model` (the EMA weights) with its temperature clamped, the vocabulary
    pruned to the training captions' `tokens` (`train.prune_vocabulary`), provenance (`record`, the data, the
    run config, the zero-shot results) in its config, stored in `train.save_dtype`."""
    t = cfg.train
    clamp_temperature_(model)
    if t.prune_vocabulary and tokens and not cfg.loss.text_tower:  # (a frozen text tower is kept as it is)
        model = prune_clip(model, tokens)
        logger.info("text vocabulary pruned to the %d tokens of the training captions",
                    len(model.clip_config.text_encoder.token_ids))
    provenance = {
        "stage": "clip", **{k: v for k, v in record.items() if v or k != "config_history"},
        "parameters": {"vision": _count(model.vision_model), "text": _count(model.text_model)},
        "weights": "ema" if t.ema_decay > 0 else "raw", "data": data, "zero_shot": zero_shot,
        "run_config": to_jsonable(cfg.to_dict()), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    model.clip_config = dataclasses.replace(model.clip_config, provenance=provenance)
    save_clip(model, path, dtype=SAVE_DTYPES[t.save_dtype])
    logger.info("wrote %s (zero-shot: %s)", path, _summary(zero_shot) or "not measured")
    return path


def export_clip_checkpoint(folder: Path, meta: dict[str, Any], out: Path) -> Path:
    """Write the CLIP file of clip-stage checkpoint `folder` (its EMA weights, as a run of its step would have
    written, zero-shot results included) to `out`, reading the run folder only."""
    try:
        cfg = RunConfig.from_dict(meta["run_config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{folder / state.META_FILE}: its run_config is not valid: {e}") from None
    step = int(meta["step"])
    cfg.train.steps = step
    check_writable(out.parent)
    data = load_train_data(cfg.data, checkpoint_split(meta))  # the run's held-out split
    holdout = load_items(data, data.holdout[:RETRIEVAL_IMAGES]) if cfg.data.kind == "folder" else None
    if meta.get("clip_config") is not None:  # the config as the run built it
        model_cfg = CLIPConfig.from_dict(meta["clip_config"])
    else:
        model_cfg = derive_clip_config(cfg, data.channels)
    model = build_clip(model_cfg, cfg.train.seed)
    source = LatentSource(cfg.model.latent_space.model, "cpu") if model_cfg.latent_space is not None else None
    tensors, _ = state.load_checkpoint(folder)
    try:
        state.load_module_tensors(model, tensors, "model.clip.")
        if "clip" in meta["ema_updates"]:
            ema = EMA(model, 0.0)
            ema.load_tensors(tensors, "ema.clip.", int(meta["ema_updates"]["clip"]))
            ema.copy_to(model)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot export {folder}: its weights do not fit its run config "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    model.eval().requires_grad_(False)
    world = int(meta["world"])
    record = {"steps": step, "training_seconds": round(float(meta.get("seconds", 0.0)), 1),
              "images_seen": step * cfg.train.batch_size * world * cfg.train.grad_accum, "world_size": world,
              "config_history": list(meta.get("config_history", [])), "text_tower": meta.get("text_tower")}
    tokens = [int(i) for i in meta.get("caption_token_ids") or ()]
    with tempfile.TemporaryDirectory(prefix="daguerre-export-") as tmp:
        made = write_clip(model, cfg, record, tokens, data.description, evaluate_clip(model, cfg, holdout, source),
                          Path(tmp) / CLIP_FILE)
        with atomic_path(out) as target:
            shutil.copyfile(made, target)
    return out
