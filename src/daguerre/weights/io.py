"""Reading weight files safely: safetensors, `.ckpt`/`.pt`/`.pth`/`.bin` pickles (weights only), hashes.

Pickled checkpoints are read only with `torch.load(weights_only=True)`, whose restricted unpickler builds
tensors and plain containers and refuses every other global, so a file cannot run code on load. Real
Stable Diffusion `.ckpt` files from the CompVis training runs also hold PyTorch Lightning callback state
(`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` as a dict key) and a few numpy scalars;
those names are admitted as `_InertStub` objects that only record their arguments: nothing from the file
is executed and nothing is imported, and the stubs never reach the model (only `state_dict` is used).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..quantize import read_hook
from ..untrusted import regular_file
from .partial import skips

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format caps its JSON header at 100 MB
_HASH_CHUNK = 1 << 20  # bytes read at a time when hashing
READ_CHUNK = 1 << 22  # bytes read at a time when a tensor is converted while it is read (`_read_tensor`)
A1111_HASH_CHARS = 10  # AUTOMATIC1111 "Model hash": the first 10 hex digits of the file's sha256

# Globals found in CompVis/Lightning training checkpoints that are data, not code: admitted as inert stubs.
LIGHTNING_STUB_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.model_checkpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
)


class _InertStub:
    """Stands in for a foreign class or function while unpickling: records its arguments, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _InertStub:
        obj = super().__new__(cls)
        obj.__dict__["_stub_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_stub_state"] = state

    def __repr__(self) -> str:
        return "<inert stub>"


def describe_bytes(head: bytes) -> str:
    """A short human description of what a file starting with `head` looks like (for error messages)."""
    if not head:
        return "an empty file"
    signatures = [
        (b"PK\x03\x04", "a zip archive"),
        (b"\x89PNG", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"GIF8", "a GIF image"),
        (b"\x1f\x8b", "a gzip archive"),
        (b"version https://git-lfs", "a Git LFS pointer (the weights were not downloaded: run `git lfs pull`)"),
        (b"<!DOCTYPE html", "an HTML page (a failed download?)"),
        (b"<html", "an HTML page (a failed download?)"),
        (b"\x80", "a Python pickle"),
    ]
    for sig, what in signatures:
        if head.lower().startswith(sig.lower()):
            return what
    text = head[:256]
    try:
        s = text.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of no known format"
    s = s.lstrip()
    if s.startswith("{") or s.startswith("["):
        return "a JSON/text file"
    if all(c.isprintable() or c in "\r\n\t" for c in s):
        return "a text file"
    return "binary data of no known format"


def sniff(path: Path) -> str:
    """'safetensors', 'torch-zip' (torch.save), 'pickle' (legacy torch.save) or a description of something else.

    Only a regular file is opened (`untrusted.regular_file`): a FIFO or a device such as /dev/zero is refused.
    """
    with open(regular_file(path, "checkpoint file"), "rb") as f:
        head = f.read(512)
        size = os.fstat(f.fileno()).st_size
    if len(head) >= 8:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= _SAFETENSORS_MAX_HEADER and head[8:9] == b"{":
            if 8 + n > size:
                raise ValueError(
                    f"{path}: truncated safetensors file ({size} bytes, but its header alone claims {8 + n}); "
                    "download or write it again"
                )
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    return describe_bytes(head)


def _convert(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating-point tensors to `dtype` (None: unchanged); integer and bool tensors are kept as they are."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _read_safetensors(path: Path, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file, each read with plain file reads straight into its own tensor,
    converted to `dtype` on the way (`_read_tensor`). The `safetensors` library checks the header (dtypes,
    shapes, offsets inside the file, no gaps); reading through its memory map instead would keep every touched
    page of the file resident until the end, so an fp16 file loaded as bf16 would peak at twice the model's size."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            names = list(f.keys())
        with open(path, "rb") as raw:
            (n,) = struct.unpack("<Q", raw.read(8))
            header = json.loads(raw.read(n))
            if sys.byteorder == "little":
                scratch = bytearray(READ_CHUNK)  # one conversion buffer for the whole file
                hook = read_hook()  # int8 quantisation while reading, inside `quantize.int8_loading`
                tensors = {}
                for k in names:
                    if skips(path, k, header[k]["shape"]):  # a network this load does not build (weights.partial)
                        tensors[k] = _read_tensor(raw, 8 + n, header[k], dtype, scratch, meta=True)
                        continue
                    t = _read_tensor(raw, 8 + n, header[k], dtype, scratch)
                    if hook is not None:
                        t = hook(k, t, functools.partial(_reread, path, 8 + n, header[k], dtype))
                    tensors[k] = t
            else:  # safetensors data is little-endian: let the library swap the bytes
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    tensors = {k: _convert(f.get_tensor(k), dtype) for k in names}
    except (SafetensorError, OSError, RuntimeError, KeyError, json.JSONDecodeError) as e:
        size = path.stat().st_size
        raise ValueError(f"{path}: not a valid safetensors file ({size} bytes; {e}); truncated or corrupt?") from None
    return tensors, metadata


def _read_tensor(raw, data_start: int, entry: dict[str, Any], dtype: torch.dtype | None,
                 scratch: bytearray, meta: bool = False) -> torch.Tensor:
    """One tensor of a safetensors file whose header entry the library has checked (little-endian data),
    floating-point data converted to `dtype` (None: as stored).

    Stored as wanted, the bytes are read straight into the tensor's memory; otherwise `scratch`-sized pieces
    are read and converted into the tensor one at a time, each element cast as `Tensor.to` casts it. So a
    tensor costs its final size and no more: no whole-tensor read buffer is allocated and freed per tensor,
    whose freed holes between the kept tensors the C allocator would not give back to the system (an fp16
    SD 1.5 loaded as bf16 held ~0.6 GiB more than its weights that way). With `meta` nothing is read: a meta tensor
    of the shape and dtype it would have."""
    stored = SAFETENSORS_DTYPES.get(entry["dtype"])
    if stored is None:
        raise RuntimeError(f"unsupported dtype {entry['dtype']}")
    want = dtype if dtype is not None and stored.is_floating_point else stored
    start, end = entry["data_offsets"]
    out = torch.empty(entry["shape"], dtype=want, device="meta" if meta else "cpu")
    if out.numel() * stored.itemsize != end - start:
        raise RuntimeError(f"{end - start} bytes for shape {entry['shape']} in {entry['dtype']}")
    if meta:
        return out
    raw.seek(data_start + start)
    flat = out.view(-1)
    if want == stored:
        if flat.numel() and raw.readinto(flat.view(torch.uint8).numpy()) != end - start:
            raise OSError("the file ends inside a tensor")
        return out
    step = len(scratch) // stored.itemsize
    view = memoryview(scratch)
    for i in range(0, flat.numel(), step):
        count = min(step, flat.numel() - i)
        nbytes = count * stored.itemsize
        if raw.readinto(view[:nbytes]) != nbytes:
            raise OSError("the file ends inside a tensor")
        flat[i:i + count].copy_(torch.frombuffer(scratch, dtype=stored, count=count))
    return out


def _reread(path: Path, data_start: int, entry: dict[str, Any], dtype: torch.dtype | None) -> torch.Tensor:
    """One tensor of a safetensors file read again (what a `quantize.ReadHook` gets as `reread`)."""
    with open(path, "rb") as raw:
        return _read_tensor(raw, data_start, entry, dtype, bytearray(READ_CHUNK))


# safetensors header dtype names -> torch dtypes (those a checkpoint may plausibly hold)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_shapes(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, str], Callable[[str], torch.Tensor]]:
    """(tensors on the meta device: names, shapes, dtypes; metadata; value_of(key) -> real tensor) of a weight file.

    For safetensors only the header is read (a tensor is read when `value_of` asks for it); pickles are
    loaded whole, as `read_state_dict` does.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_file() and sniff(path) == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                shapes = {}
                for k in f.keys():  # noqa: SIM118
                    sl = f.get_slice(k)
                    dt = SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dt is None:
                        raise ValueError(f"{path}: tensor {k} has unsupported dtype {sl.get_dtype()}")
                    shapes[k] = torch.empty(sl.get_shape(), dtype=dt, device="meta")
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a valid safetensors file ({e}); truncated or corrupt?") from None

        def value_of(key: str) -> torch.Tensor:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_tensor(key)

        return shapes, metadata, value_of
    sd, metadata = read_state_dict(path)
    return sd, metadata, sd.__getitem__


def _offending_global(err: Exception) -> str:
    """The global a refused pickle asked for, from torch's UnpicklingError message."""
    msg = str(err)
    m = re.search(r"GLOBAL (\S+)", msg) or re.search(r"function (\S+)", msg) or re.search(r"got (<[^>]*>)", msg)
    return m.group(1) if m else msg.splitlines()[0][:200]


def safe_torch_load(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True, map_location="cpu")`, with Lightning/numpy metadata as inert stubs.

    A pickle that needs any other global (a function it would call, a class it would build) is refused
    with a ValueError naming that global; nothing in the file is executed.
    """
    path = regular_file(path, "checkpoint file")
    stubs = [(type(name.rsplit(".", 1)[-1], (_InertStub,), {}), name) for name in LIGHTNING_STUB_GLOBALS]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        bad = _offending_global(e)
        raise ValueError(
            f"refusing to load {path}: the pickle needs `{bad}`, which would run code when unpickled "
            "(daguerre only unpickles plain tensors, torch.load weights_only=True). If you trust the file, "
            "load it in a tool you trust, save its state_dict with safetensors.torch.save_file, and use that "
            ".safetensors file (e.g. `daguerre convert it.safetensors out.safetensors`)"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: cannot read it as a PyTorch checkpoint ({e}); truncated or corrupt?") from None


def _tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded pickle: the object itself or its `state_dict` entry; tensors only."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{path}: the state dict holds {len(bad)} non-tensor entries (e.g. {', '.join(map(str, bad[:3]))}); "
            "save only the tensors"
        )
    return {str(k): v for k, v in obj.items()}


def read_state_dict(
    path: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of one weight file (on the CPU) and its string metadata.

    Tensors keep their stored dtype, or with `dtype` the floating-point ones are converted while
    reading, one at a time (so loading an fp16 file as fp32 never holds both copies).

    Safetensors files are recognised by content, pickles (`.ckpt`, `.pt`, `.pth`, `.bin`) are read with
    `safe_torch_load`; a `{"state_dict": ...}` wrapper is unwrapped. Anything else is a ValueError that
    says what the file looks like.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a weight file")
    kind = sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path, dtype)
    if kind in ("torch-zip", "pickle"):
        sd = _tensor_dict(safe_torch_load(path), path)
        for k in list(sd):
            sd[k] = _convert(sd[k], dtype)
        return sd, {}
    raise ValueError(
        f"{path}: not a checkpoint (it looks like {kind}); expected a .safetensors file, a PyTorch "
        ".ckpt/.pt/.pth/.bin file or a diffusers folder"
    )


def file_hash(path: str | os.PathLike) -> str:
    """The full sha256 of a file (hex), cached in memory by (path, size, mtime)."""
    path = regular_file(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    _HASH_CACHE[key] = digest = h.hexdigest()
    return digest


def short_hash(path: str | os.PathLike) -> str:
    """The AUTOMATIC1111 "Model hash" of a checkpoint file: the first 10 hex digits of its sha256."""
    return file_hash(path)[:A1111_HASH_CHARS]


_HASH_CACHE: dict[tuple[str, int, int], str] = {}
