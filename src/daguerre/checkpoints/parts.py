"""The parts of a model a load can read alone (`components.PARTS`): the text encoder, the U-Net, the VAE's encoder
and its decoder.

`reading_parts(parts)` makes every load inside it read only those parts' weights (`weights.partial`: the others'
large tensors are left out, their networks built on the meta device): what `Components.acquire` reads a
released network with. Which part a tensor belongs to is told by its name in a single file (the SD prefixes of
`detect`, daguerre checkpoints included) or by its component folder in a diffusers folder (the VAE's tensors
split by their `encoder.` / `decoder.` names). A tensor of no known part is always read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..components import check_parts
from ..weights.partial import skipping
from .detect import EMA_PREFIX, TEXT_PREFIX_CLIP, TEXT_PREFIX_OPENCLIP, UNET_PREFIX, VAE_PREFIX

# inside the VAE (both formats name these halves alike): the first name of a key -> its part
VAE_HALVES = {"encoder": "vae_encoder", "quant_conv": "vae_encoder", "decoder": "vae_decoder",
              "post_quant_conv": "vae_decoder"}
# single files: key prefix -> part (the EMA copies belong to the U-Net)
SINGLE_FILE_PREFIXES = ((UNET_PREFIX, "unet"), (EMA_PREFIX, "unet"), (TEXT_PREFIX_CLIP, "text_encoder"),
                        (TEXT_PREFIX_OPENCLIP, "text_encoder"))
DIFFUSERS_FOLDERS = {"unet": "unet", "text_encoder": "text_encoder"}  # component folder -> part ("vae": split)


def part_of(path: Path, key: str) -> str | None:
    """The part of a model the tensor `key` of the weight file `path` belongs to, or None if it cannot tell."""
    folder = path.parent
    if (folder.parent / "model_index.json").is_file():  # a component folder of a diffusers pipeline
        if folder.name == "vae":
            return VAE_HALVES.get(key.split(".", 1)[0])
        return DIFFUSERS_FOLDERS.get(folder.name)
    if key.startswith(VAE_PREFIX):
        return VAE_HALVES.get(key[len(VAE_PREFIX):].split(".", 1)[0])
    return next((part for prefix, part in SINGLE_FILE_PREFIXES if key.startswith(prefix)), None)


@contextlib.contextmanager
def reading_parts(parts: Iterable[str]) -> Iterator[None]:
    """While the context lasts, model loads read the weights of `parts` only (module docstring)."""
    wanted = check_parts(parts)

    def skip(path: Path, key: str) -> bool:
        part = part_of(path, key)
        return part is not None and part not in wanted

    with skipping(skip):
        yield
