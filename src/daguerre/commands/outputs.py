"""Where the image commands write their PNGs, under one rule: never replace a file the user did not ask to replace.

`--out x.png` with one image names the file: if anything exists there it is an error before any model
work, unless `--overwrite`. Several images (`--out x.png --n 2`: `x-00-SEED.png`, ...; or a folder:
`00000-SEED.png`, ...) are numbered, and numbering continues after the highest number already there,
so earlier results are never replaced. Every file is written atomically and created without replacing
(fileio.atomic_path, replace=False): a file that appears between the check and the write is kept, and a
numbered image then takes the next free number. The grid of several images is `grid-<first image>.png`.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .registry import UserError

FILE_SUFFIX = ".png"
_FOLDER_DIGITS = 5  # outputs/00000-SEED.png
_FILE_DIGITS = 2  # x-00-SEED.png
_RENUMBER_ATTEMPTS = 100


def add_overwrite_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (default: an existing file is an error; numbered "
                        "images always take fresh numbers)")


def _exists(path: Path) -> bool:
    """Anything at `path`: a file, a folder, or a symbolic link (even a broken one)."""
    return os.path.lexists(path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_folder(folder: Path) -> None:
    """Fail now if files cannot be created in `folder`, or (when it is missing) in the folder it would be
    created in: a file in the way, a read-only file system, no permission. Nothing is created."""
    from ..fileio import check_writable

    existing = folder
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write in {folder}: {existing} is a file, not a folder")
    check_writable(existing)


def make_folder(folder: Path) -> None:
    """Create `folder` and its parents if missing; an OS failure names the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno is None:
            raise
        raise type(e)(e.errno, f"cannot create folder {folder}: {e.strerror or e}") from e


@dataclass
class Outputs:
    """The PNG files of one run of an image command (see the module docstring).

    `file` is the one named file (a single image to a .png --out), else None and the images are numbered
    `{prefix}{number}-{seed}.png` in `folder`.
    """

    folder: Path
    file: Path | None
    prefix: str = ""
    digits: int = _FOLDER_DIGITS
    overwrite: bool = False

    def numbered_paths(self, seeds: Sequence[int]) -> list[Path]:
        """Fresh numbered paths for images of `seeds`: numbering starts after the highest number of any
        `{prefix}N-...` or `grid-{prefix}N-...` entry of the folder (so a stale grid's number is not reused)."""
        pattern = re.compile(rf"(?:grid-)?{re.escape(self.prefix)}(\d+)-")
        numbers = [int(m.group(1)) for name in os.listdir(self.folder) if (m := pattern.match(name))]
        start = max(numbers, default=-1) + 1
        return [self.folder / f"{self.prefix}{start + i:0{self.digits}d}-{s}{FILE_SUFFIX}" for i, s in enumerate(seeds)]

    def save(self, results: Sequence, grid: bool) -> list[Path]:
        """Write each result's image (with its PNG parameters) and, when `grid` and there are several, the
        grid; print each path as it is written, so that what was written before a failure is known."""
        from ..pipelines.images import make_grid
        from ..pngmeta import save_png

        make_folder(self.folder)
        written: list[Path] = []
        for result in results:
            written.append(self._save_one(save_png, result.image, result.parameters, result.seed))
            print(written[-1], flush=True)
        if grid and len(results) > 1:
            image = make_grid([r.image for r in results])
            first = written[0]
            for k in range(_RENUMBER_ATTEMPTS):
                path = first.with_name(f"grid-{first.stem}{f'-{k + 1}' if k else ''}{FILE_SUFFIX}")
                try:
                    written.append(save_png(image, path, results[0].parameters, replace=False))
                    break
                except FileExistsError:
                    continue
            else:
                raise UserError(f"could not find a free name for the grid beside {first}")
            print(written[-1], flush=True)
        return written

    def _save_one(self, save_png, image, parameters: str, seed: int) -> Path:
        if self.file is not None:
            try:
                return save_png(image, self.file, parameters, replace=self.overwrite)
            except FileExistsError:
                raise UserError(f"{self.file} appeared while the image was being made and was kept; "
                                "pass --overwrite to replace it") from None
        for _ in range(_RENUMBER_ATTEMPTS):  # another run may take the same number meanwhile
            path = self.numbered_paths([seed])[0]
            try:
                return save_png(image, path, parameters, replace=False)
            except FileExistsError:
                continue
        raise UserError(f"could not find a free number for an image in {self.folder}")


def plan_outputs(out: str, n: int, overwrite: bool, inputs: Sequence[str | os.PathLike | None] = ()) -> Outputs:
    """The `Outputs` of `--out OUT` for `n` images, checked before any model work: an existing file named
    by OUT (or an input image named as the output) is an error without `--overwrite`, and so is a folder
    that cannot take new files. Missing folders are created when the images are saved."""
    target = Path(out)
    if target.suffix.lower() != FILE_SUFFIX or target.is_dir():
        if _exists(target) and not target.is_dir():
            raise UserError(f"--out {out}: a file of that name exists; name a folder or a {FILE_SUFFIX} file")
        check_folder(target)
        return Outputs(target, None, overwrite=overwrite)
    folder = target.parent if str(target.parent) else Path(".")
    check_folder(folder)
    if n != 1:
        return Outputs(folder, None, prefix=f"{target.stem}-", digits=_FILE_DIGITS, overwrite=overwrite)
    if not overwrite:
        for source in inputs:
            if source is not None and _same_file(target, Path(source)):
                raise UserError(f"--out {out} is the input image {source}: name another file, or pass "
                                "--overwrite to replace it")
        if _exists(target):
            raise UserError(f"--out {out} exists: name another file or a folder, or pass --overwrite to replace it")
    return Outputs(folder, target, overwrite=overwrite)
