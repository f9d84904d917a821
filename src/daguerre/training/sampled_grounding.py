"""Token grounding on the model's own sampling runs (issue 22, `loss.grounding_source = "samples"`).

Token grounding (`grounding`, TokenCompose) supervises the cross-attention of an object's words with its mask on
noised training images. At the noisiest timesteps such an x_t says almost nothing of where the object is, so the
loss asks for attention at places the network cannot know, and a grounded model learns to spread a word's
attention over every place the object could be, which draws it twice. A sampling run has no such ambiguity: where
each object ends up is a function of the run's own states. So this source grounds the attention where the sampler
makes it:

1. before training, the model the run starts from (`--init`) draws `loss.grounding_runs` images of training
   captions with its recommended settings (`Pipeline.request`: sampler, steps, CFG), and every U-Net call's
   conditional rows are kept: the network's input x, its timestep and its output (`record_runs`);
2. each finished image is read by colour (`metrics.layout.classify_colours`): a run is kept only when every object
   of its caption is drawn exactly once (one region of its colour, no second one at least a quarter of its size)
   with the right shape (`fit_shape`), and the objects' regions become its masks at the latent's resolution;
3. while training, each micro-batch adds `loss.grounding_batch` states of the kept runs (a run and a step drawn from
   the sample's generator) to the network call, and the grounding loss is taken on their attention
   (`GroundingRecorder`) rather than on the training images'; with `loss.grounding_keep_weight` the MSE of the
   network's output there to the --init model's recorded output is added too, holding the sampling path the runs
   took while the attention moves.

The runs are written to the run folder (`RUNS_FILE`) once, so a resumed run grounds on the same ones.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shapes import object_words
from .grounding import GroundingBatch, background, rest_words, word_token_positions

logger = logging.getLogger(__name__)

RUNS_FILE = "grounding_runs.safetensors"
MIN_PIXELS = 12  # an object's region of fewer pixels is no object drawn
COPY_SHARE = 0.25  # a second region of the colour at least this share of the first's size is the object drawn twice
LOG_EVERY = 32  # runs drawn between two progress lines
MAX_ATTEMPTS = 4  # at most this many runs are drawn for each one asked (runs that fail the check are not kept)


@dataclass
class SampledRuns:
    """The kept sampling runs: run r took `x[r, s]` (the U-Net's input at its s-th conditional call, timestep
    `t[r, s]`) to `pred[r, s]`; its caption is training row `rows[r]`; pair k grounds token `pair_tokens[k]` of
    run `pair_runs[k]` on `pair_masks[k]` (the object's share of each latent cell in the run's final image)."""

    x: torch.Tensor  # (R, S, C, h, w) float32
    t: torch.Tensor  # (R, S) float32
    pred: torch.Tensor  # (R, S, C, h, w) float32
    rows: torch.Tensor  # (R,) int64
    pair_runs: torch.Tensor  # (P,) int64
    pair_tokens: torch.Tensor  # (P,) int64
    pair_masks: torch.Tensor  # (P, h, w) float32

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).contiguous() for k in self.__dataclass_fields__}

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, gen: torch.Generator, count: int, offset: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, GroundingBatch]:
        """`count` states of runs drawn from `gen`: (x, t, the recorded outputs, the runs' training rows, the
        pairs), the pairs' samples numbered from `offset` (the rows of the network call they join)."""
        runs = [int(torch.randint(0, len(self), (1,), generator=gen)) for _ in range(count)]
        steps = [int(torch.randint(0, self.x.shape[1], (1,), generator=gen)) for _ in range(count)]
        samples, tokens, masks = [], [], []
        for i, r in enumerate(runs):
            k = torch.nonzero(self.pair_runs == r).flatten()
            samples += [offset + i] * len(k)
            tokens.append(self.pair_tokens[k])
            masks.append(self.pair_masks[k])
        pairs = GroundingBatch(torch.tensor(samples, dtype=torch.long), torch.cat(tokens), torch.cat(masks).to(device))
        r, s = torch.tensor(runs), torch.tensor(steps)
        return self.x[r, s].to(device), self.t[r, s], self.pred[r, s].to(device), self.rows[r], pairs


@contextlib.contextmanager
def _recording(unet: torch.nn.Module, reference: torch.Tensor, calls: list[tuple[torch.Tensor, ...]]
               ) -> Iterator[None]:
    """Keep (x, t, output) of the rows of every U-Net call whose context is `reference` (the prompt's)."""
    from ..pipelines.common import conditional_rows

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], out: torch.Tensor) -> None:
        x, t = args[0], args[1] if len(args) > 1 else kwargs["timesteps"]
        context = args[2] if len(args) > 2 else kwargs.get("context")
        rows = conditional_rows(context, reference) if context is not None else []
        if len(rows):  # the first: a batch of one image (a prompt equal to its negative: CFG's conditional half)
            ts = torch.as_tensor(t, dtype=torch.float32).flatten().cpu()
            ts = ts.expand(len(x)) if ts.numel() == 1 else ts  # a scalar timestep is every row's
            first = rows[:1]
            calls.append((x[first.to(x.device)].float().cpu(), ts[first], out[first.to(out.device)].float().cpu()))

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def object_regions(image: Any, scene: Any) -> list[np.ndarray] | None:
    """Each object of `scene` as `image` draws it ((H, W) bool), or None when one is missing, drawn twice or of
    another shape (module docstring, 2)."""
    from ..metrics.layout import COLOUR_NAMES, box_of, classify_colours, components, fit_shape

    colours = classify_colours(np.asarray(image.convert("RGB")))
    if len({o.colour for o in scene.objects}) != len(scene.objects):
        return None  # two objects of one colour cannot be told apart by colour
    out = []
    for obj in scene.objects:
        regions = components(colours == COLOUR_NAMES.index(obj.colour))
        ids, sizes = np.unique(regions[regions > 0], return_counts=True)
        if len(ids) == 0 or sizes.max() < MIN_PIXELS or (sizes >= COPY_SHARE * sizes.max()).sum() != 1:
            return None
        region = regions == ids[sizes.argmax()]
        if fit_shape(region, box_of(region))[0] != obj.shape:
            return None
        out.append(region)
    return out


def record_runs(init: str | Path, captions: Sequence[str], scenes: Sequence[Any], rows: Sequence[int], n: int,
                seed: int, tokenizer: Any, latent_size: tuple[int, int], colours: bool, device: torch.device,
                rest: bool = False) -> SampledRuns:
    """Draw images of the training rows `rows` (captions and scenes given) with the model `init` until `n` runs
    pass the check (at most MAX_ATTEMPTS x n tried, in order), run i from seed `seed + i`; the runs' recorded
    states and pairs (module docstring, 1-2). ValueError when none passes."""
    import daguerre

    from ..pipelines.common import conditioning
    from ..pipelines.txt2img import txt2img

    pipe = daguerre.load(str(init), device=device, dtype="fp32")  # the conditional rows found by their context
    components = pipe.components
    xs, ts, preds, kept, pr, pt, pm = [], [], [], [], [], [], []
    tried = 0
    for i, (row, text, scene) in enumerate(zip(rows, captions, scenes, strict=True)):
        if len(kept) >= n or tried >= MAX_ATTEMPTS * n:
            break
        tried += 1
        if tried % LOG_EVERY == 0:
            logger.info("recording the model's own runs: %d kept of %d drawn (%d wanted)", len(kept), tried, n)
        req = pipe.request(text, seed=seed + i)
        cond, _ = conditioning(components, req, components.device)
        calls: list[tuple[torch.Tensor, ...]] = []
        components.acquire("unet")
        with torch.no_grad(), _recording(components.unet, cond["context"].to(components.unet.dtype), calls):
            image = txt2img(components, req)[0].image
        regions = object_regions(image, scene)
        if not regions:  # an object missing, doubled or misshapen (None), or a scene of none: nothing to ground
            continue
        positions = word_token_positions(tokenizer, text)
        r = len(kept)
        objects = object_words(scene, text)
        masks = F.adaptive_avg_pool2d(torch.from_numpy(np.stack(regions)).float()[:, None], latent_size)[:, 0]
        entries = [(positions[w.shape] + (positions[w.colour] if colours else []), m) for w, m in zip(objects, masks,
                                                                                                      strict=True)]
        if rest:  # loss.grounding_rest: the words that name no object, on the background
            entries.append(([p for i in rest_words(text, objects) for p in positions[i]], background(masks)))
        for tokens, mask in entries:
            for p in tokens:
                pr.append(r)
                pt.append(p)
                pm.append(mask)
        xs.append(torch.cat([c[0] for c in calls]))
        ts.append(torch.cat([c[1] for c in calls]))
        preds.append(torch.cat([c[2] for c in calls]))
        kept.append(row)
    if not kept:
        raise ValueError(f"loss.grounding_source 'samples': none of the {tried} images the model {init} drew passed "
                         "the check (each object once, of its shape): the model cannot ground its own runs")
    logger.info("token grounding on the model's own runs: %d of %d drawn kept (each object once, of its shape)",
                len(kept), tried)
    return SampledRuns(torch.stack(xs), torch.stack(ts), torch.stack(preds), torch.tensor(kept, dtype=torch.long),
                       torch.tensor(pr, dtype=torch.long), torch.tensor(pt, dtype=torch.long), torch.stack(pm))


def load_or_record(path: Path, make: Any, is_main: bool) -> SampledRuns:
    """The runs of `path`, or made by `make()` (on the main process) and written there atomically first."""
    from safetensors.torch import load_file

    from ..fileio import atomic_save_safetensors
    from . import dist

    if not path.exists() and is_main:
        atomic_save_safetensors(make().tensors(), path)
    dist.barrier()
    return SampledRuns(**load_file(str(path)))
