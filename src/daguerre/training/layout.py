"""Layout models in stage 2 (`model.conditioning = "layout"`): each training row's layout, and the sample grids.

A layout model's condition is the prompt and the layout of its scene: every object's phrase and box
(`data.shapes.ShapesDataset.layout`), as tokens (`data.layout.encode_layout`), computed once per run for the
training rows (`layout_rows`, a few milliseconds per scene) and read by `conditioning.LayoutConditioner.batch`,
which gives dropped rows the empty layout. The sample grids (`LayoutSamples`) show the first training rows:
their layout, the model's image from the layout and the row's caption, from the layout alone (empty prompt),
and the training image.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..config import LayoutConfig
from ..data.layout import LayoutObject, draw_layout, encode_layout, parse_layout
from .concat import MAX_SAMPLE_IMAGES, pil_of, to_uint8
from .data import TrainData, load_items

if TYPE_CHECKING:
    from ..components import Components
    from ..conditioning import Conditioner
    from .config import SampleConfig
    from .latents import LatentSet

logger = logging.getLogger("daguerre.train")


@dataclass
class LayoutRows:
    """What a layout model's conditioner reads of the training rows: captions, labels, and layout tokens."""

    captions: list[str]
    labels: torch.Tensor | None
    layouts: torch.Tensor  # (N, max_objects, phrase_words + 4) int64
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
