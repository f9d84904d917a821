"""Reading files daguerre did not write, or that may be damaged: checkpoints, their JSON configs, run state.

Every failure is one `ValueError` (or `FileNotFoundError`) that names the file, never a traceback:

- `regular_file(path)`: only regular files are opened. A named pipe (FIFO), a device (`/dev/zero`) or a
  socket would block or never end a read; they are refused from `stat`, before anything opens them.
- `parse_json(text, source)` / `read_json(path)`: JSON of at most `MAX_JSON_BYTES` and `MAX_JSON_DEPTH`
  levels of nesting. Deeper nesting (a 100 000-deep list) would exhaust the interpreter's recursion
  limit, in the parser or in any code that walks the value afterwards.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 64 * 1024**2  # a diffusers tokenizer.json is ~3 MB, every other JSON file far less
MAX_JSON_DEPTH = 100  # nesting levels of arrays and objects (daguerre's own files use fewer than 10)
_NOT_REGULAR = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it is a regular file (after symlinks); FileNotFoundError, IsADirectoryError or ValueError else."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"no such {what}: {path}") from None
    except OSError as e:  # a symlink loop, a name too long, a folder on the way that is a file
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path} is a folder; expected a {what}")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
        raise ValueError(f"{path} is {kind}, not a regular file: refusing to read it as a {what}")
    return path


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays / objects nest more than `limit` levels deep in `value` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False


def parse_json(text: str | bytes, source: str) -> Any:
    """The JSON value of `text`; ValueError naming `source` (a file, a metadata key) if it is not valid JSON
    or nests more than `MAX_JSON_DEPTH` levels deep."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"{source}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    if _depth_exceeds(value, MAX_JSON_DEPTH):
        raise ValueError(f"{source}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return value


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """The JSON object in file `path` (`parse_json`'s limits; a regular file of at most `MAX_JSON_BYTES`)."""
    path = regular_file(path, what)
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"{path}: larger than {MAX_JSON_BYTES // 1024**2} MiB: not a {what}")
    value = parse_json(data, str(path))
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
