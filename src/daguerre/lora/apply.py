"""LoRAs merged into a model's weights, switchable without reading the model again.

A LoRA is merged: W' = W + sum_i w_i * Delta W_i, computed in float32 from the original W and stored in the
layer's dtype (so several LoRAs give the same weights in any order, and a bf16 model is rounded once). The
original tensor of every adapted layer is kept aside (the merged one is a new tensor), so changing the
request's LoRAs puts the originals back before merging the new set: the server switches LoRAs per request,
and a request without LoRAs runs the model as it was loaded. Merged weights cost nothing per step; the extra
memory is one copy of the adapted layers. With `release_after_use` (a one-shot run) a part read again from
its file is merged again as it is acquired (`Components.acquire` calls `Adapters.acquired`), and a released
part's originals are dropped with it. Quantised (int8) or compiled networks are refused: their weights are
not the layers' tensors.

`Adapters` holds this state for one `Components` (`components.adapters`), with the LoRA and embeddings
folders the model's requests name files in; `prepare(components, request)` is what `run_plan` calls.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .formats import LoraFile, read_lora
from .syntax import HASH_KEY, TI_HASH_KEY, LoraRef, find_lora, short_hash
from .targets import TEXT, UNET, Target, resolve, target_table

if TYPE_CHECKING:
    from ..components import Components
    from .embeddings import EmbeddingTable

Use = tuple[LoraFile, float, float]  # a LoRA with its text-encoder and U-Net weights
PART_OF = {UNET: "unet", TEXT: "text_encoder"}


def plan(components: Components, uses: list[Use]) -> dict[Target, list[tuple[object, float]]]:
    """Target layer -> [(LoraLayer, weight)] of `uses`, checked: every layer of every file must name a layer of
    this model (a ValueError lists those that do not: never a partial application)."""
    _check_mergeable(components, {UNET} if components.text_encoder is None else {UNET, TEXT})
    table = target_table(components)
    out: dict[Target, list] = defaultdict(list)
    for lora, te_weight, unet_weight in uses:
        unknown = []
        for key, layer in lora.layers.items():
            target = resolve(table, key)
            if target is None:
                unknown.append(key)
                continue
            weight = te_weight if target.part == TEXT else unet_weight
            if weight != 0:
                out[target].append((layer, weight))
        if unknown:
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise ValueError(f"LoRA {lora.name}: {len(unknown)} of its {len(lora.layers)} layers match no layer of "
                             f"model {components.config.name!r}: {', '.join(sorted(unknown)[:5])}{more}; a LoRA "
                             "of another architecture (SD 1.x, SD 2.x, SDXL) or of a format daguerre does not read")
    return dict(out)


def _check_mergeable(components: Components, parts: set[str]) -> None:
    from ..compile import is_compiled
    from ..quantize import is_quantized

    for part in parts:
        module = components.unet if part == UNET else components.text_encoder
        if is_quantized(module):
            raise ValueError("LoRAs are merged into the weights, and this model's are int8 (--quantize int8): load "
                             "it without quantisation to apply LoRAs")
        if part == UNET and is_compiled(module):
            raise ValueError("a compiled U-Net (--compile) keeps its own copy of the weights: load the model without "
                             "compiling it to apply LoRAs")


def merge_(components: Components, layers: dict[Target, list], parts: set[str]) -> dict[Target, torch.Tensor]:
    """Merge `layers` (`plan`) into the resident `parts` of `components`; returns the original weight tensor of
    every layer it changed. Every delta of a part is computed before any weight changes, so a LoRA that does
    not fit leaves the part as it was."""
    _check_mergeable(components, parts)
    originals: dict[Target, torch.Tensor] = {}
    try:
        for part in sorted(parts):
            _merge_part(components, layers, part, originals)
    except Exception:
        restore_(components, originals)
        raise
    return originals


def _merge_part(components: Components, layers: dict[Target, list], part: str,
                originals: dict[Target, torch.Tensor]) -> None:
    """Merge the layers of `part` into it, its originals added to `originals` (all deltas computed first)."""
    root = components.unet if part == UNET else components.text_encoder
    new = {}
    for target, items in layers.items():
        if target.part != part:
            continue
        weight = root.get_submodule(target.module).weight
        total = weight.detach().float()
        for layer, w in items:
            total = total + w * layer.delta(weight.shape).to(weight.device)
        merged = torch.empty_like(weight.detach())
        merged.copy_(total)
        new[target] = merged
    with torch.no_grad():
        for target, merged in new.items():
            param = root.get_submodule(target.module).weight
            originals[target] = param.data
            param.data = merged


def restore_(components: Components, originals: dict[Target, torch.Tensor]) -> None:
    """Put the original weights `merge_` returned back into their layers."""
    with torch.no_grad():
        for target, tensor in originals.items():
            root = components.unet if target.part == UNET else components.text_encoder
            root.get_submodule(target.module).weight.data = tensor


def merge_loras(components: Components, loras: list[tuple[str | os.PathLike | LoraFile, float]]) -> None:
    """Merge LoRA files (each with one weight for both networks) into `components` for good (what `daguerre convert
    --lora` does; the originals are not kept)."""
    uses = [(lora if isinstance(lora, LoraFile) else read_lora(lora), w, w) for lora, w in loras]
    layers = plan(components, uses)
    merge_(components, layers, {t.part for t in layers})


class Adapters:
    """The LoRAs merged into one model and the folders its requests name LoRAs and embeddings in (module
    docstring). `set` makes the merged set the one a request asks for."""

    def __init__(self, lora_dir: str | os.PathLike | None = None, embeddings_dir: str | os.PathLike | None = None):
        self.lora_dir = None if lora_dir is None else Path(lora_dir).expanduser()
        self.embeddings_dir = None if embeddings_dir is None else Path(embeddings_dir).expanduser()
        for folder, what in ((self.lora_dir, "LoRA"), (self.embeddings_dir, "embeddings")):
            if folder is not None and not folder.is_dir():
                raise FileNotFoundError(f"no {what} folder {folder}")
        self._key: tuple = ()  # what is merged: ((path, size, mtime, te weight, unet weight), ...)
        self._layers: dict[Target, list] = {}
        self._originals: dict[Target, torch.Tensor] = {}
        self._files: dict[tuple, LoraFile] = {}  # the merged LoRAs by (path, size, mtime)
        self._hashes: dict[tuple, str] = {}  # their A1111 short hashes
        self._embeddings: EmbeddingTable | None = None

    def _read(self, path: Path) -> tuple[tuple, LoraFile]:
        stat = path.stat()
        stamp = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if stamp not in self._files:
            self._files[stamp] = read_lora(path)
        return stamp, self._files[stamp]

    def _hash(self, stamp: tuple, path: Path) -> str:
        if stamp not in self._hashes:
            self._hashes[stamp] = short_hash(path)
        return self._hashes[stamp]

    def set(self, components: Components, refs: tuple[LoraRef, ...]) -> dict[str, str]:
        """Merge exactly the LoRAs `refs` name (found with `syntax.find_lora` in `lora_dir`) into the resident
        parts of `components` (the others as they are acquired); returns their A1111 `Lora hashes`."""
        found = [(ref, find_lora(ref, self.lora_dir)) for ref in refs]
        read = [(ref, *self._read(path)) for ref, path in found]
        key = tuple((*stamp, ref.text_weight, ref.unet_weight) for ref, stamp, _ in read)
        hashes = {}
        for ref, stamp, lora in read:
            name = (ref.name if ref.from_prompt else lora.name).replace(":", "").replace(",", "")
            hashes[name] = self._hash(stamp, lora.path)
        if key != self._key:
            layers = plan(components, [(lora, ref.text_weight, ref.unet_weight) for ref, _, lora in read])
            self.clear(components)
            resident = {p for p in (UNET, TEXT) if p in {t.part for t in layers} and components.resident(PART_OF[p])}
            self._originals = merge_(components, layers, resident)
            self._key, self._layers = key, layers
        used = {stamp for _, stamp, _ in read}  # only the merged LoRAs stay in memory (to merge into parts read again)
        self._files = {k: v for k, v in self._files.items() if k in used}
        return {HASH_KEY: ", ".join(f"{n}: {h}" for n, h in hashes.items())} if hashes else {}

    def clear(self, components: Components) -> None:
        """Put every merged layer back as it was loaded."""
        restore_(components, self._originals)
        self._key, self._layers, self._originals = (), {}, {}

    def acquired(self, components: Components, parts: frozenset[str]) -> None:
        """`parts` were read again from the model's file: merge the current LoRAs into them."""
        touched = {t.part for t in self._layers if PART_OF[t.part] in parts}
        if touched:
            self._originals.update(merge_(components, self._layers, touched))

    def released(self, parts: frozenset[str]) -> None:
        """`parts` were released: their originals go too (they are read again from the file)."""
        self._originals = {t: v for t, v in self._originals.items() if PART_OF[t.part] not in parts}

    def embeddings(self, components: Components) -> EmbeddingTable | None:
        """The textual-inversion embeddings of `embeddings_dir` that fit this model's text encoder (read once)."""
        if self.embeddings_dir is None or components.text_encoder is None:
            return None
        if self._embeddings is None:
            from .embeddings import load_embeddings

            self._embeddings = load_embeddings(self.embeddings_dir, components.config.text_encoder)
        return self._embeddings


def adapters_of(components: Components) -> Adapters:
    """The components' `Adapters`, made (without folders) if they have none yet."""
    if components.adapters is None:
        components.adapters = Adapters()
    return components.adapters


def attach(components: Components, lora_dir: str | os.PathLike | None = None,
           embeddings_dir: str | os.PathLike | None = None) -> Adapters:
    """Give `components` the LoRA and embeddings folders its requests name files in (their `Adapters`)."""
    if components.adapters is not None:
        components.adapters.clear(components)
    components.adapters = Adapters(lora_dir, embeddings_dir)
    return components.adapters


def prepare(components: Components, request) -> dict[str, str]:
    """Before a run: merge the request's LoRAs (`request.loras`, resolved by `validate`) into `components`, and
    undo those of an earlier request; returns the PNG parameters to add (`Lora hashes`, and `TI hashes` of the
    embeddings the prompts call)."""
    refs = tuple(request.loras or ())
    if not refs and components.adapters is None:
        return {}
    params = adapters_of(components).set(components, refs)
    table = components.adapters.embeddings(components)
    used = table.used_in(request.prompt, request.negative_prompt) if table is not None else []
    if used:  # A1111's TI hashes: the embeddings the prompts call
        params[TI_HASH_KEY] = ", ".join(f"{name}: {table.loaded[name].short_hash()}" for name in used)
    return params
