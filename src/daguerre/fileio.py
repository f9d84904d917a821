"""Atomic writes: everything daguerre writes appears complete or not at all (shared/DESIGN.md, "Data flow rules").

A file is written to a temporary name in the destination's directory, flushed and fsync'ed, then renamed
over the destination with `os.replace` (atomic on POSIX and Windows within one file system). A folder is
built under `DST.tmp-XXXX` and swapped into place the same way; an old folder at DST is moved aside first
and removed only after the new one is in place. On any error the temporary file or folder is removed and
the destination is left as it was.

With `replace=False` a file is created without replacing anything: the finished temporary file is
hard-linked to the destination (`os.link` fails if the name exists, atomically, so a file that
appears between a caller's check and the write is never clobbered) and its temporary name removed.
An OS failure while writing (read-only or full disk, no permission) is raised as the same `OSError`
class with a message naming the destination, its folder and the OS reason.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_TMP_MARK = ".tmp-"  # temporary names are f"{name}{_TMP_MARK}{random}"
_NAME_ATTEMPTS = 100
_FILE_MODE = 0o666  # before the umask, as open() uses
_DIR_MODE = 0o777


def _fresh_name(folder: Path, stem: str, make) -> Path:
    """Create a new file or folder `folder/{stem}{_TMP_MARK}{random}` with `make(path)`, retrying on a clash.

    Unlike tempfile's 0600 files / 0700 folders, what is made here gets the user's umask permissions,
    as a plain `open(..., "w")` would: the temporary is renamed into place and becomes the output.
    """
    for _ in range(_NAME_ATTEMPTS):
        candidate = folder / f"{stem}{_TMP_MARK}{secrets.token_hex(4)}"
        try:
            make(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary name for {stem} in {folder}")


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE))


def _fsync_dir(folder: Path) -> None:
    """Flush a directory entry (the rename) to disk where the OS allows it (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


# os.link's errors on a file system without hard links (FAT, some network and FUSE file systems)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


class _Exists(FileExistsError):
    """The destination of a write with replace=False exists; raised as is (not as a write failure)."""


def _write_error(e: OSError, path: Path, folder: Path) -> OSError:
    """`e` as the same OSError class, its message naming the destination, its folder and the OS reason."""
    message = f"cannot write {path.name} in folder {folder}: {e.strerror or e}"
    try:
        return type(e)(e.errno, message)
    except TypeError:  # an OSError subclass with its own constructor
        return OSError(e.errno, message)


def _link_new(tmp_path: Path, path: Path) -> None:
    """Give the finished `tmp_path` the name `path` only if that name is free (FileExistsError otherwise)."""
    try:
        os.link(tmp_path, path)
    except FileExistsError:
        raise _Exists(errno.EEXIST, f"{path} exists", str(path)) from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        # no hard links here: claim the name with an exclusive create, then rename over our own placeholder
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE))
        except FileExistsError:
            raise _Exists(errno.EEXIST, f"{path} exists", str(path)) from None
        try:
            os.replace(tmp_path, path)
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()  # our empty placeholder
            raise
        return
    with contextlib.suppress(OSError):
        tmp_path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it to `path`, on error delete it.

    The caller writes the whole file to the yielded path (with any library that takes a file name).
    With `replace=False` an existing `path` (even one that appears while the file is written) is left
    alone and FileExistsError raised.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
    try:
        tmp_path = _fresh_name(folder, f".{path.name}", _new_file)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno is None:
            raise
        raise _write_error(e, path, folder) from e
    try:
        yield tmp_path
        if not tmp_path.exists():
            raise OSError(f"nothing was written to the temporary file for {path}")
        _fsync_file(tmp_path)
        if replace:
            os.replace(tmp_path, path)
        else:
            _link_new(tmp_path, path)
        _fsync_dir(folder)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(e, OSError) and e.errno is not None and not isinstance(e, _Exists):
            raise _write_error(e, path, folder) from e
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, replace: bool = True) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename); `replace` as in
    `atomic_path`."""
    with atomic_path(path, replace=replace) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, replace: bool = True) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), replace=replace)


def check_writable(folder: str | os.PathLike) -> None:
    """Fail now, as a write into `folder` would (read-only, no permission, not a folder), by creating and
    removing a temporary file there: a long computation should not end in a write that cannot succeed.
    (A full disk shows only when the data is written.)"""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write in {folder}: no such folder")
    try:
        probe_write(folder)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno is None:
            raise
        raise type(e)(e.errno, f"cannot write in folder {folder}: {e.strerror or e}") from e


def probe_write(folder: str | os.PathLike) -> None:
    """Create and remove a temporary file in `folder`, raising the OSError a write there would raise (as root,
    permission bits do not stop a write: only trying does)."""
    _fresh_name(Path(folder), ".daguerre-write-check", _new_file).unlink()


# torch dtype name -> safetensors dtype code (https://github.com/huggingface/safetensors, format spec)
SAFETENSORS_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_HEADER_ALIGN = 8  # the data section starts on an 8-byte boundary (the header is padded with spaces)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
    *,
    replace: bool = True,
) -> None:
    """Save `tensors` as a safetensors file, atomically, streaming one tensor at a time.

    The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
    offsets; `__metadata__` -> strings) padded to 8 bytes, then the raw little-endian tensor bytes.
    Writing tensor by tensor keeps the extra memory to one tensor (safetensors' own `save_file`
    first serialises every tensor to bytes, doubling the memory of a multi-GB model). With `dtype`,
    floating-point tensors are converted as they are written; `replace` as in `atomic_path`.
    """
    import torch

    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; writing them on a big-endian machine is not supported")
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    items = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: not a tensor ({type(t).__name__})")
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        code = SAFETENSORS_CODES.get(str(out_dtype).removeprefix("torch."))
        if code is None:
            raise ValueError(f"{name}: dtype {out_dtype} cannot be stored in safetensors by daguerre")
        nbytes = t.numel() * out_dtype.itemsize
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        items.append((t, out_dtype))
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-(len(head) + _HEADER_LEN_BYTES) % _HEADER_ALIGN)
    with atomic_path(path, replace=replace) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for t, out_dtype in items:
            if t.numel():
                flat = t.detach().to(device="cpu", dtype=out_dtype).contiguous().reshape(-1)
                f.write(memoryview(flat.view(torch.uint8).numpy()))


_HEADER_LEN_BYTES = 8  # the u64 header length


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder `DST.tmp-XXXX` beside `path`; on success it replaces `path`.

    An existing folder at `path` is renamed aside, the new one renamed into place, then the old one
    removed, so `path` is never a half-written folder. An existing *file* at `path` is an error.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {parent} does not exist")
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot write a folder at {path}: a file of that name exists; remove it or pick another name")
    tmp = _fresh_name(parent, path.name, lambda p: os.mkdir(p, _DIR_MODE))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        old = None
        if path.exists():
            old = _fresh_name(parent, f"{path.name}.old", lambda p: os.mkdir(p, _DIR_MODE))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the previous folder back
                os.replace(old / path.name, path)
                shutil.rmtree(old, ignore_errors=True)
            raise
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
