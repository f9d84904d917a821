"""Adapter files (issue 18): the tensors a model adds to a frozen base model, with the name and sha256 of that base.

A GLIGEN model (docs/layout.md, route 2) is its base text model, unchanged bit for bit, plus a grounding net and
gated layers. Its whole file repeats the base (the shapes model's 26 MB); its adapter file holds only what the base
file lacks (6.8 MB for the shapes adapter) and names the base, so a shipped adapter costs its own weights only.

The format (docs/formats.md): a safetensors file whose metadata has `format = "daguerre-adapter"`, the whole
model's `daguerre_config` (the config its whole file would have), `base_model` (the base's name: a shipped model's,
else its file's stem) and `base_sha256` (the sha256 of the base's file); its tensors are those of the whole model's
single file that the base file lacks, under the same keys. `save_adapter` writes it only when every other tensor
of the whole model is the base file's bit for bit (same name, shape, dtype and value), so loading
(`with_base`: the base's tensors and the adapter's, read under the adapter's config) gives the whole file's
tensors exactly: the same model, the same images. The base is found by name among the shipped models, or is the
file the user gives (`base`); a base whose sha256 is not the recorded one is refused, naming both hashes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import __version__
from ..components import Components
from ..fileio import atomic_save_safetensors
from ..weights.io import file_hash, read_shapes, read_state_dict
from ..weights.strict import few
from . import detect as d
from .shipped import shipped_models
from .single_file import CONFIG_KEY, DAGUERRE_FORMAT, single_file_state_dict

ADAPTER_FORMAT = "daguerre-adapter"  # safetensors metadata "format" of an adapter file
BASE_NAME_KEY = "base_model"  # metadata: the base model's name (a shipped model's, else its file's stem)
BASE_SHA_KEY = "base_sha256"  # metadata: the sha256 of the base model's file
SHA256_HEX = 64


def is_adapter(metadata: Mapping[str, str]) -> bool:
    """Whether a weight file's metadata is an adapter file's."""
    return metadata.get("format") == ADAPTER_FORMAT


def base_record(path: Path, metadata: Mapping[str, str]) -> tuple[str, str]:
    """(base name, base sha256) an adapter file records; ValueError for a file that records them badly."""
    name, sha = metadata.get(BASE_NAME_KEY), metadata.get(BASE_SHA_KEY)
    if not name or not isinstance(sha, str) or len(sha) != SHA256_HEX or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"{path}: an adapter file must record its base model's name ({BASE_NAME_KEY}) and the "
                         f"sha256 of its file ({BASE_SHA_KEY}, 64 hex digits); this one has {name!r} and {sha!r}")
    return name, sha


def find_base(path: Path, metadata: Mapping[str, str], base: str | os.PathLike | None = None, *,
              rebase: bool = False) -> Path:
    """The base model file of the adapter file `path`: `base` (a file or a shipped model's name) when given, else
    the shipped model of the recorded name; checked to be the file the adapter was trained on (its sha256), unless
    `rebase` (a training run that continues the adapter on `base`, another model: `train.init_base`)."""
    name, want = base_record(path, metadata)
    shipped = shipped_models()
    how = "give the base model's file with --base FILE (Python: daguerre.load(..., base=FILE))"
    if base is None:
        found = shipped.get(name)
        if found is None:
            names = ", ".join(sorted(shipped)) or "none installed"
            raise FileNotFoundError(f"{path} is an adapter for the model {name!r} (sha256 {want}), which is not a "
                                    f"shipped model here ({names}); {how}")
    else:
        found = shipped.get(str(base), Path(base).expanduser())
        if not found.is_file():
            raise FileNotFoundError(f"base model {base}: no such file, nor a shipped model; the adapter {path} needs "
                                    f"the model file {name!r} (sha256 {want})")
    if is_adapter(read_shapes(found)[1]):
        raise ValueError(f"the base {found} of the adapter {path} is itself an adapter file: give the whole model "
                         f"file {name!r} (sha256 {want})")
    got = file_hash(found)
    if got != want and not rebase:
        raise ValueError(f"{path} is an adapter for the model {name!r} with sha256 {want}, but its base {found} has "
                         f"sha256 {got}: an adapter works on the very weights it was trained on; {how} (the file "
                         f"of sha256 {want})")
    return found


def with_base(adapter: Mapping[str, torch.Tensor], metadata: Mapping[str, str], base: Mapping[str, torch.Tensor],
              path: Path, base_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the whole model: the base file's tensors and the adapter's, under the adapter's config
    (a daguerre checkpoint's metadata, with the base named in it)."""
    both = sorted(set(adapter) & set(base))
    if both:
        raise ValueError(f"{path}: {len(both)} of its tensors are also in its base {base_path} ({few(both)}): an "
                         "adapter holds only what its base lacks")
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path}: an adapter file without its model's config ({CONFIG_KEY})")
    return {**base, **adapter}, {**metadata, "format": DAGUERRE_FORMAT}


def save_adapter(components: Components, path: str | os.PathLike, base: Path, base_name: str, *,
                 dtype: torch.dtype | None = None) -> int:
    """Write the adapter file of `components` on the base model file `base` (named `base_name`), atomically:
    the tensors of its single file (floating ones in `dtype`) that `base` lacks; returns their number. A
    ValueError names the tensors when any other differs from the base file's (the model is not its base plus an
    adapter: write its whole file instead)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"an adapter file is a .safetensors file: {path} has another extension")
    base_sd, base_metadata = read_state_dict(base)
    if is_adapter(base_metadata):
        raise ValueError(f"the base {base} is itself an adapter file: an adapter goes on a whole model file (write "
                         "the whole model instead)")
    whole = single_file_state_dict(components)
    adapter, differ = {}, []
    for key, tensor in whole.items():
        stored = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        theirs = base_sd.get(key)
        if theirs is None:
            adapter[key] = tensor
        elif theirs.dtype != stored.dtype or theirs.shape != stored.shape or not torch.equal(theirs, stored.cpu()):
            differ.append(key)
    missing = [k for k in base_sd if k not in whole and not d.is_ignored(k)]
    if differ or missing or not adapter:
        what = (f"{len(differ)} of its tensors differ from the base's ({few(differ)})" if differ else
                f"the base has {len(missing)} tensors the model lacks ({few(missing)})" if missing else
                "it adds nothing to the base")
        raise ValueError(f"the model is not an adapter on {base}: {what}; only a model that leaves its base's "
                         "weights as they are (a GLIGEN adapter trained on that very file) can be written as one; "
                         "write the whole model instead")
    metadata = {CONFIG_KEY: components.config.to_json(), "format": ADAPTER_FORMAT, "daguerre_version": __version__,
                BASE_NAME_KEY: base_name, BASE_SHA_KEY: file_hash(base)}
    atomic_save_safetensors(adapter, path, metadata, dtype=dtype)
    return len(adapter)


def base_name_of(base: Path) -> str:
    """The name an adapter records for its base file: the shipped model's of the same sha256, else the file's stem."""
    sha = file_hash(base)
    return next((name for name, p in sorted(shipped_models().items()) if file_hash(p) == sha), base.stem)
