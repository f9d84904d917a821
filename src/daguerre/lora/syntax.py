"""How a user names LoRAs: AUTOMATIC1111's `<lora:name:weight>` in the prompt, `--lora FILE:WEIGHT`, and the
folder (`--lora-dir`) where named LoRAs are found; the A1111 short hash written to the PNG parameters.

`<lora:NAME>`, `<lora:NAME:W>` and `<lora:NAME:W_TE:W_UNET>` (also `te=`, `unet=`; `<lyco:...>` is the same)
apply the file whose stem is NAME in the LoRA folder with weight W (default 1) on the text encoder and the
U-Net, or W_TE and W_UNET apart, as A1111 does; the tag is removed from the text the encoder reads.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .formats import LORA_EXTENSIONS

TAG = re.compile(r"<(lora|lyco):([^>]*)>")
MAX_LORAS = 16  # LoRAs one request applies
MAX_LORA_WEIGHT = 100.0  # |weight|: A1111's slider stops at 2; beyond 100 a LoRA only breaks the model
MAX_FOLDER_FILES = 10_000  # files of a LoRA / embeddings folder listed
HASH_KEY = "Lora hashes"  # A1111's PNG parameters key: "name: hash, name2: hash2"
TI_HASH_KEY = "TI hashes"  # the same for the textual-inversion embeddings a prompt calls
SHORT_HASH = 12  # A1111 (extensions-builtin/Lora/network.py): the first 12 hex digits of the sha256


@dataclass(frozen=True)
class LoraRef:
    """One LoRA a request applies: `name` (a name in the LoRA folder, or a path for `--lora`), its weights on
    the text encoder and the U-Net, and whether it came from a prompt tag (else from the `loras` field)."""

    name: str
    text_weight: float = 1.0
    unet_weight: float = 1.0
    from_prompt: bool = False

    def tag(self) -> str:
        """The A1111 prompt tag of this LoRA (its file's stem)."""
        name = Path(self.name).stem if not self.from_prompt else self.name
        if self.text_weight == self.unet_weight:
            return f"<lora:{name}:{self.text_weight:g}>"
        return f"<lora:{name}:{self.text_weight:g}:{self.unet_weight:g}>"


def _weight(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: LoRA weight {text!r} is not a number") from None
    if not math.isfinite(value) or abs(value) > MAX_LORA_WEIGHT:
        raise ValueError(f"{where}: LoRA weight {text} must be a finite number in [-{MAX_LORA_WEIGHT:g}, "
                         f"{MAX_LORA_WEIGHT:g}]")
    return value


def prompt_loras(prompt: str) -> list[LoraRef]:
    """The LoRA tags of a prompt, in order (A1111's syntax: positional weights, `te=` / `unet=` named ones)."""
    refs = []
    for match in TAG.finditer(prompt):
        where = f"prompt tag {match.group(0)}"
        items = match.group(2).split(":")
        name = items[0].strip()
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise ValueError(f"{where}: a LoRA is named by its file's name in the LoRA folder, without a path")
        positional = [i for i in items[1:] if "=" not in i]
        named = dict(i.split("=", 1) for i in items[1:] if "=" in i)
        unknown = sorted(set(named) - {"te", "unet", "dyn"})
        if unknown or len(positional) > 3:
            raise ValueError(f"{where}: expected <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
        te = _weight(named.get("te", positional[0] if positional else "1"), where)
        unet = _weight(named.get("unet", positional[1] if len(positional) > 1 else str(te)), where)
        refs.append(LoraRef(name, te, unet, from_prompt=True))
    return refs


def strip_tags(prompt: str) -> str:
    """The prompt without its LoRA tags (what the text encoder reads)."""
    return TAG.sub("", prompt)


def parse_lora_arg(value: str | tuple | list) -> LoraRef:
    """`--lora FILE:WEIGHT` (or FILE, weight 1; or a (file, weight) pair from the API) as a `LoraRef`."""
    if isinstance(value, LoraRef):  # a request validated before
        return value
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or not isinstance(value[0], (str, os.PathLike)):
            raise ValueError(f"a LoRA is 'FILE:WEIGHT' or a (file, weight) pair, got {value!r}")
        name, weight = os.fspath(value[0]), _weight(str(value[1]), f"LoRA {value[0]}")
        return LoraRef(name, weight, weight)
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"a LoRA is 'FILE:WEIGHT' or a (file, weight) pair, got {value!r}")
    value = os.fspath(value)
    head, sep, tail = value.rpartition(":")
    try:
        float(tail)
    except ValueError:
        head, tail = value, "1"
    if not sep:
        head = value
    if not head.strip():
        raise ValueError(f"LoRA {value!r}: no file named")
    weight = _weight(tail, f"LoRA {value}")
    return LoraRef(head, weight, weight)


def request_loras(prompt: str, negative: str, given) -> tuple[LoraRef, ...]:
    """Every LoRA a request applies: those of the `loras` field (`given`: FILE:WEIGHT texts or pairs), then the
    prompt's tags; at most MAX_LORAS. A tag in the negative prompt is an error (A1111 applies them from the
    prompt only)."""
    if TAG.search(negative or ""):
        raise ValueError("the negative prompt has a <lora:...> tag: LoRAs are applied from the prompt only")
    if given is not None and (isinstance(given, (str, os.PathLike)) or not isinstance(given, (list, tuple))):
        raise ValueError(f"loras must be a list of 'FILE:WEIGHT' texts or (file, weight) pairs, got {given!r}")
    given = [v for v in given or () if not (isinstance(v, LoraRef) and v.from_prompt)]  # these come again
    refs = (*(parse_lora_arg(v) for v in given), *prompt_loras(prompt or ""))
    if len(refs) > MAX_LORAS:
        raise ValueError(f"{len(refs)} LoRAs in one request, more than {MAX_LORAS}")
    return refs


def list_folder(folder: str | os.PathLike | None, extensions: tuple[str, ...], what: str) -> dict[str, Path]:
    """Stem -> path of the files with `extensions` under `folder` (recursively, sorted; the first of a stem
    wins), at most MAX_FOLDER_FILES; {} without a folder."""
    if folder is None:
        return {}
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no {what} folder {root}")
    found: dict[str, Path] = {}
    for i, path in enumerate(sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())):
        if i >= MAX_FOLDER_FILES:
            raise ValueError(f"{what} folder {root} holds more than {MAX_FOLDER_FILES} files")
        found.setdefault(path.stem, path)
    return found


def list_loras(folder: str | os.PathLike | None) -> dict[str, Path]:
    """Name -> file of every LoRA in `folder` (`list_folder`)."""
    return list_folder(folder, LORA_EXTENSIONS, "LoRA")


def find_lora(ref: LoraRef, folder: str | os.PathLike | None) -> Path:
    """The file a LoRA reference names: a tag's name in the LoRA folder only; a `--lora` value as a path, else as
    a name in the folder. FileNotFoundError says where it looked."""
    if not ref.from_prompt:
        path = Path(ref.name).expanduser()
        if path.is_file():
            return path
    found = list_loras(folder)
    if ref.name in found:
        return found[ref.name]
    if folder is None:
        raise FileNotFoundError(f"no LoRA {ref.name!r}: not a file, and no LoRA folder is set to look in (--lora-dir "
                                "DIR; daguerre.load(..., lora_dir=DIR))")
    names = ", ".join(sorted(found)[:20]) or "none"
    raise FileNotFoundError(f"no LoRA {ref.name!r} in LoRA folder {folder} (it holds: {names})")


def a1111_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's hash of a LoRA file: the sha256 of a safetensors file's tensor data (after its header: the
    "addnet" hash, unchanged by metadata edits), of the whole file otherwise; `short_hash` is its first 12 digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if Path(path).suffix.lower() == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def short_hash(path: str | os.PathLike) -> str:
    return a1111_hash(path)[:SHORT_HASH]


def lora_metadata(path: Path) -> dict:
    """The metadata of a LoRA file as A1111 lists it: a safetensors header's strings (JSON ones parsed, within
    `untrusted.parse_json`'s bounds), read without the tensors; {} for a pickle (never loaded to be listed)."""
    from ..untrusted import parse_json

    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError):
        return {}
    out = {}
    for key, value in raw.items():
        if isinstance(value, str) and value[:1] in "{[":
            try:
                value = parse_json(value, f"{path} metadata {key}")
            except ValueError:
                pass
        out[key] = value
    return out


def describe_loras(folder: str | os.PathLike | None) -> list[dict]:
    """AUTOMATIC1111's `/sdapi/v1/loras`: [{name, alias, path, metadata}] of every LoRA in `folder`; the alias is
    the name kohya's trainer stored (`ss_output_name`), else the file's name."""
    out = []
    for name, path in list_loras(folder).items():
        metadata = lora_metadata(path)
        alias = metadata.get("ss_output_name")
        out.append({"name": name, "alias": alias if isinstance(alias, str) and alias else name, "path": str(path),
                    "metadata": metadata})
    return out
