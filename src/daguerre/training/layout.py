"""Layout models in stage 2 (`model.conditioning = "layout"`): each training row's layout, and the sample grids.

A layout model's condition is the prompt and the layout of its scene: every object's phrase and box
(`data.shapes.ShapesDataset.layout`), as tokens (`data.layout.encode_layout`), computed once per run for the
training rows (`layout_rows`, a few milliseconds per scene) and read by `conditioning.LayoutConditioner.batch`,
which gives dropped rows the empty layout. A GLIGEN adapter model (`model.conditioning = "gligen"`) reads each
object as its box and its phrase's pooled embedding by the frozen text encoder (`grounding_rows`: each distinct
phrase encoded once per run, a row's grounding inputs assembled when its batch is drawn, `GroundingTable`). The
sample grids (`LayoutSamples`) show the first training rows: their layout, the model's image from the layout and
the row's caption, from the layout alone (empty prompt), and the training image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..config import GligenConfig, LayoutConfig
from ..data.layout import LayoutObject, draw_layout, encode_layout, parse_layout
from ..models.gligen import GROUNDING_FIELDS, box_overlaps, gligen_phrase_dim, phrase_embeddings
from .concat import MAX_SAMPLE_IMAGES, pil_of, to_uint8
from .data import TrainData, load_items

if TYPE_CHECKING:
    from ..components import Components
    from ..conditioning import Conditioner
    from .config import SampleConfig
    from .latents import LatentSet

logger = logging.getLogger("daguerre.train")
PHRASE_BATCH = 256  # phrases per text-encoder call when the training phrases are embedded


@dataclass
class LayoutRows:
    """What a layout model's conditioner reads of the training rows: captions, labels, and layout tokens."""

    captions: list[str]
    labels: torch.Tensor | None
    layouts: torch.Tensor | GroundingTable  # (N, max_objects, phrase_words + 4) int64; GLIGEN: a GroundingTable
    objects: list[tuple[LayoutObject, ...]]  # each row's layout, as given


def row_layout(data: TrainData, index: int) -> tuple[LayoutObject, ...]:
    """The layout of dataset item `index` (a dataset with `layout(i)`: the shapes world)."""
    raw = getattr(data.dataset, "dataset", data.dataset)
    if not hasattr(raw, "layout"):
        raise ValueError("a layout model trains on scenes whose objects and boxes are known: data.kind = 'shapes'")
    return parse_layout([{"phrase": p, "box": list(b)} for p, b in raw.layout(int(index))], f"item {index}")


def layout_rows(lat: LatentSet, data: TrainData, cfg: LayoutConfig) -> LayoutRows:
    """The layouts of the training rows (`data.train_pool`, the latent cache's order), encoded for `cfg`."""
    began = time.monotonic()
    objects = [row_layout(data, i) for i in data.train_pool]
    layouts = torch.stack([encode_layout(o, cfg) for o in objects]) if objects else torch.zeros(0, dtype=torch.long)
    logger.info("layouts of %d training scenes (%d objects) in %.1f s", len(objects), sum(map(len, objects)),
                time.monotonic() - began)
    return LayoutRows(captions=lat.captions, labels=lat.labels, layouts=layouts, objects=objects)


class GroundingTable:
    """The GLIGEN grounding inputs of the training rows: `table[rows]` is (B, max_objects, 5 + phrase_dim) float32,
    per object its box, mask 1 and phrase embedding, padding objects all zero (models/gligen.py). `embeddings` is
    the (P, phrase_dim) table of the distinct phrases, or a function that makes it, called when the first batch
    is drawn: by then a resumed run has its text encoder's weights back from the checkpoint."""

    def __init__(self, boxes: torch.Tensor, phrase_ids: torch.Tensor,
                 embeddings: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        self.boxes = boxes  # (N, max_objects, 4) float32
        self.phrase_ids = phrase_ids  # (N, max_objects) int64 rows of `embeddings`, -1 for no object
        self._embeddings = embeddings

    @property
    def embeddings(self) -> torch.Tensor:
        if callable(self._embeddings):
            self._embeddings = self._embeddings()
        return self._embeddings

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        ids = self.phrase_ids[rows]  # (B, M)
        present = ids >= 0
        out = torch.zeros(*ids.shape, GROUNDING_FIELDS + self.embeddings.shape[1])
        out[..., :4] = self.boxes[rows] * present[..., None]
        out[..., 4] = present.float()
        out[..., GROUNDING_FIELDS:] = self.embeddings[ids.clamp(min=0)] * present[..., None]
        return out


def grounding_rows(lat: LatentSet, data: TrainData, cfg: GligenConfig, text_encoder: torch.nn.Module,
                   tokenizer: Any) -> LayoutRows:
    """The layouts of the training rows for a GLIGEN model: boxes, and each distinct phrase embedded once by the
    (frozen) `text_encoder` (`models.gligen.phrase_embeddings`) when the first batch is drawn."""
    began = time.monotonic()
    objects = [row_layout(data, i) for i in data.train_pool]
    too_many = next((len(o) for o in objects if len(o) > cfg.max_objects), None)
    if too_many is not None:
        raise ValueError(f"a training scene has {too_many} objects, more than unet.gligen.max_objects = "
                         f"{cfg.max_objects}; raise it or lower data.shapes.max_objects")
    phrases = sorted({o.phrase for layout in objects for o in layout})
    index = {p: i for i, p in enumerate(phrases)}

    def embed() -> torch.Tensor:
        began = time.monotonic()
        out = torch.cat([phrase_embeddings(text_encoder, tokenizer, phrases[i:i + PHRASE_BATCH], cfg.phrase_pool)
                         for i in range(0, len(phrases), PHRASE_BATCH)]) if phrases else torch.zeros(0, cfg.phrase_dim)
        logger.info("%d distinct phrases embedded in %.1f s", len(phrases), time.monotonic() - began)
        return out

    if gligen_phrase_dim(text_encoder, cfg.phrase_pool) != cfg.phrase_dim:
        raise ValueError(f"unet.gligen.phrase_dim is {cfg.phrase_dim} but the text encoder's phrase embeddings "
                         f"(phrase_pool {list(cfg.phrase_pool)}) are {gligen_phrase_dim(text_encoder, cfg.phrase_pool)}"
                         " wide")
    boxes = torch.zeros(len(objects), cfg.max_objects, 4)
    ids = torch.full((len(objects), cfg.max_objects), -1, dtype=torch.long)
    for r, layout in enumerate(objects):
        for j, o in enumerate(layout):
            boxes[r, j] = torch.tensor(o.box)
            ids[r, j] = index[o.phrase]
    logger.info("grounding inputs of %d training scenes (%d objects, %d distinct phrases) in %.1f s", len(objects),
                sum(map(len, objects)), len(phrases), time.monotonic() - began)
    return LayoutRows(captions=lat.captions, labels=lat.labels, layouts=GroundingTable(boxes, ids, embed),
                      objects=objects)


BOX_WEIGHT_AREA = 1 / 16  # the box area (a quarter of the image's side squared) given exactly box_weight more


def box_loss_weights(layout: torch.Tensor, h: int, w: int, box_weight: float) -> torch.Tensor:
    """(B, 1, h, w) float32 weights of the diffusion loss for GLIGEN grounding inputs `layout` (B, N, 5 + phrase_dim;
    `loss.box_weight`): 1, plus box_weight x BOX_WEIGHT_AREA / area for each object whose box overlaps the
    position's cell, scaled to a mean of 1 per image. A small object's few cells then weigh as much in the loss
    as a large one's many; rows without objects (dropped, or empty layouts) keep uniform weights."""
    boxes, mask = layout[..., :4].float(), layout[..., 4].float()
    inside = box_overlaps(boxes, mask, h, w).float()  # (B, hw, N)
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp_min(1.0 / (h * w))  # (B, N)
    extra = inside @ (box_weight * BOX_WEIGHT_AREA / area * mask)[..., None]  # (B, hw, 1)
    weights = 1.0 + extra[..., 0]
    return (weights / weights.mean(1, keepdim=True)).reshape(-1, 1, h, w)


class LayoutSamples:
    """The sample grid of a layout model: the first training rows (MAX_SAMPLE_IMAGES at most), drawn through
    `txt2img` with their layouts (fixed seeds, the [sample] steps, sampler and guidance); rows: the layout, the
    image with the row's caption, the image from the layout alone, the training image."""

    def __init__(self, rows: LayoutRows, data: TrainData, size: int, count: int) -> None:
        n = min(count, MAX_SAMPLE_IMAGES, len(rows.objects))
        self.items = [{"caption": rows.captions[i], "layout": rows.objects[i]} for i in range(n)]
        self.originals = [pil_of(to_uint8(item["image"])) for item in load_items(data, data.train_pool[:n])]
        self.size = size

    def apply(self, x_t: torch.Tensor, kwargs: dict[str, Any], rows: torch.Tensor, views: torch.Tensor,
              gens: list[torch.Generator], device: torch.device) -> torch.Tensor:
        return x_t  # nothing concatenated: the layout is the conditioner's

    @torch.no_grad()
    def sample_grid(self, components: Components, sample: SampleConfig) -> Image.Image:
        from ..conditioning import conditioner_for
        from ..pipelines.request import GenerationRequest
        from ..pipelines.txt2img import txt2img
        from .samples import grid

        conditioner: Conditioner = conditioner_for(components.config)
        rows: list[list[Image.Image]] = [[], [], [], []]
        for i, (item, original) in enumerate(zip(self.items, self.originals, strict=True)):
            common = {"steps": sample.steps, "sampler": sample.sampler, "schedule": sample.schedule,
                      "cfg_scale": conditioner.guidance_scale(sample.cfg_scale), "seed": sample.seed + i,
                      "width": self.size, "height": self.size, "layout": item["layout"]}
            rows[0].append(draw_layout(item["layout"], self.size, self.size))
            for row, prompt in ((rows[1], item["caption"]), (rows[2], "")):
                req = GenerationRequest(prompt=prompt, **common).validate(components.config)
                row.append(txt2img(components, req)[0].image)
            rows[3].append(original)
        return grid([im for row in rows for im in row], cols=len(self.items))
