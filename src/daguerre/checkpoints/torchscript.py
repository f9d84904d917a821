"""The tensors of a TorchScript archive (OpenAI CLIP's `.pt` files), read without running anything in it.

`torch.jit.load` compiles and runs the Python-like code an archive carries (`code/`), and a plain
unpickler builds whatever classes and calls whatever functions `data.pkl` names: either would let a
file run code. This reader does neither. A TorchScript archive is a zip holding `ARCHIVE/data.pkl` (the
module tree: objects of `__torch__.*` classes whose attributes are submodules, tensors and plain
values), each tensor's bytes in `ARCHIVE/data/KEY`, and the code. `data.pkl` is read by a restricted
unpickler that only

- builds inert records for `__torch__.*` objects (a name and an attribute dict; the class is never looked up),
- rebuilds tensors (`torch._utils._rebuild_tensor_v2`) from their storage bytes, its bounds checked,
- makes empty dicts (`collections.OrderedDict()`, a tensor's backward hooks) and plain lists
  (`torch.jit._pickle`'s list builders and type tags),

and refuses every other global, every other call and every attribute-setting (BUILD) on anything but
an inert record, with a ValueError naming what the file asked for. The code in `code/` is never read.
The tensors come out named by their attribute path (`visual.conv1.weight`), as `module.state_dict()`
would name them, plus tensor attributes that are not parameters (such as `attn_mask`).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

MAX_PICKLE_BYTES = 64 * 1024**2  # OpenAI ViT-L/14's data.pkl is well under 1 MB: the tensors are separate entries
MAX_DEPTH = 64  # nesting of modules walked (CLIP's is about 6)
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LIST_BUILDERS = ("build_intlist", "build_floatlist", "build_boollist", "build_tensorlist", "build_doublelist")


def torchscript_prefix(path: str | Path) -> str | None:
    """The archive folder (`ViT-B-32`) if `path` is a TorchScript zip (data.pkl beside constants.pkl or
    code/), else None (a torch.save zip, another zip, not a zip)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "data.pkl":
            prefix = parts[0]
            if f"{prefix}/constants.pkl" in names or any(n.startswith(f"{prefix}/code/") for n in names):
                return prefix
    return None


class _ScriptClass:
    """Stands for a `__torch__.*` class named in data.pkl: never imported, never called."""

    def __init__(self, name: str):
        self.name = name


class ScriptObject:
    """An object of a TorchScript class: its class name and attributes, nothing else."""

    def __init__(self, class_name: str):
        self.class_name = class_name
        self.attributes: dict[str, Any] = {}


class _StorageType:
    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


class _Storage:
    """A flat tensor of one storage's elements (or only its dtype and length, reading shapes)."""

    def __init__(self, flat: torch.Tensor | None, dtype: torch.dtype, numel: int):
        self.flat, self.dtype, self.numel = flat, dtype, numel


def _empty_dict(*args: Any) -> dict:
    if args:
        raise pickle.UnpicklingError("collections.OrderedDict with arguments: only the empty dict of tensor hooks "
                                     "is read")
    return {}


def _type_tag(value: Any, _type: Any) -> Any:
    return value


def _as_list(values: Any) -> list:
    return list(values)


class _Reader(pickle._Unpickler):  # the pure-Python unpickler: its opcode table can be restricted
    """Unpickles data.pkl with only the globals, calls and BUILDs of the module docstring."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, storage: Any, path: Path):
        import io

        super().__init__(io.BytesIO(data))
        self._storage, self._path = storage, path
        self._rebuild_tensor = self._rebuild  # one bound method, so that REDUCE can recognise it
        self._calls = {id(f) for f in (_empty_dict, _type_tag, _as_list, self._rebuild_tensor)}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptClass(f"{module}.{name}")
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return _empty_dict
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return _type_tag
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return _as_list
        raise pickle.UnpicklingError(f"global {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"persistent id {str(pid)[:80]} (expected a tensor storage)")
        return self._storage(pid[2], pid[1].dtype, pid[4])

    def _rebuild(self, storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> torch.Tensor:
        """A tensor of `storage` (torch._utils._rebuild_tensor_v2's arguments), inside the storage's bounds."""
        ints = (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) and all(isinstance(v, int) and v >= 0 for v in (*size, *stride)))
        if not isinstance(storage, _Storage) or not ints or offset < 0:
            raise pickle.UnpicklingError("a malformed tensor record")
        numel = 1
        for s in size:
            numel *= s
        last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
        if numel and last >= storage.numel:
            raise pickle.UnpicklingError(f"a tensor of shape {list(size)} reaching past its storage of "
                                         f"{storage.numel} elements")
        if storage.flat is None:
            return torch.empty_strided(size, stride, dtype=storage.dtype, device="meta")
        return storage.flat.as_strided(size, stride, offset)

    # the opcodes that call or build: only the allowed functions, only inert records
    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in self._calls or not isinstance(args, tuple):
            raise pickle.UnpicklingError(f"a call of {getattr(func, 'name', type(func).__name__)}")
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not isinstance(cls, _ScriptClass) or args:
            raise pickle.UnpicklingError(f"an object of {getattr(cls, 'name', type(cls).__name__)}")
        self.append(ScriptObject(cls.name))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, ScriptObject) or not isinstance(state, dict):
            raise pickle.UnpicklingError(f"setting the state of a {type(inst).__name__}")
        inst.attributes.update({str(k): v for k, v in state.items()})

    def _refuse(self) -> None:
        raise pickle.UnpicklingError("an opcode TorchScript archives do not use (INST, OBJ, NEWOBJ_EX or EXT)")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.BUILD[0]] = load_build
    for _op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse


def read_torchscript(path: str | Path, *, dtype: torch.dtype | None = None,
                     shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a TorchScript archive by attribute path (module docstring); floating-point ones
    converted to `dtype` as they are read. `shapes_only`: tensors on the meta device, no data read.
    ValueError naming the file and what it asked for if it is not a plain module tree of tensors."""
    path = Path(path)
    prefix = torchscript_prefix(path)
    if prefix is None:
        raise ValueError(f"{path}: not a TorchScript archive (no data.pkl beside constants.pkl or code/)")
    with zipfile.ZipFile(path) as z:
        byteorder = f"{prefix}/byteorder"
        if byteorder in z.namelist() and z.read(byteorder).strip() not in (b"", b"little"):
            raise ValueError(f"{path}: a big-endian TorchScript archive; save its weights on a little-endian "
                             "machine as safetensors and load that")
        info = z.getinfo(f"{prefix}/data.pkl")
        if info.file_size > MAX_PICKLE_BYTES:
            raise ValueError(f"{path}: its data.pkl is {info.file_size} bytes, more than a module tree needs "
                             f"({MAX_PICKLE_BYTES} at most)")
        storages: dict[str, _Storage] = {}

        def storage(key: str, st_dtype: torch.dtype, numel: int) -> _Storage:
            if key in storages:
                return storages[key]
            nbytes = numel * st_dtype.itemsize
            name = f"{prefix}/data/{key}"
            try:
                entry = z.getinfo(name)
            except KeyError:
                raise pickle.UnpicklingError(f"a tensor whose storage {name} is not in the archive") from None
            if entry.file_size != nbytes:
                raise pickle.UnpicklingError(f"storage {name} of {entry.file_size} bytes, not the {nbytes} its "
                                             f"{numel} elements of {st_dtype} need")
            flat = None
            if not shapes_only:
                buf = bytearray(z.read(name))
                flat = torch.frombuffer(buf, dtype=st_dtype) if buf else torch.empty(0, dtype=st_dtype)
            storages[key] = _Storage(flat, st_dtype, numel)
            return storages[key]

        try:
            root = _Reader(z.read(info), storage, path).load()
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"refusing to load {path}: its data.pkl asks for {e}, which is not part of a module's weights "
                "(daguerre reads TorchScript archives without running their code or building their classes). "
                "If you trust the file, save its state_dict with safetensors in a tool you trust and load that"
            ) from None
        except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, RuntimeError) as e:
            raise ValueError(f"{path}: cannot read its data.pkl as a module tree ({type(e).__name__}: {e}); "
                             "truncated or corrupt?") from None
    tensors: dict[str, torch.Tensor] = {}
    _collect(root, "", tensors, set(), 0, path)
    if not tensors:
        raise ValueError(f"{path}: a TorchScript archive without tensors")
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors


def _collect(node: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int], depth: int, path: Path) -> None:
    """The tensors under `node` (an inert module record, or a dict of them) into `out`, by dotted path."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: modules nested more than {MAX_DEPTH} deep: not a model's module tree")
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, ScriptObject):
        items = node.attributes.items()
    else:
        items = node.items() if isinstance(node, dict) else ()
    for name, value in items:
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, (ScriptObject, dict)):
            _collect(value, key + ".", out, seen, depth + 1, path)
