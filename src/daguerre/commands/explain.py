"""`daguerre explain WHAT ...`: figures that show how latent diffusion works, and one HTML page (docs/explain.md).

WHAT is one of `daguerre.explain.EXPLAINERS` (noising, schedules, trajectory, attention, autoencoder,
samplers); its module (`daguerre.explain.<WHAT>`) is imported only now, adds its own arguments to the
common ones below and returns its figures, which go on `--out DIR/index.html`. Like `generate`, nothing is
ever replaced without `--overwrite`: a folder that already holds a page is refused before any model work,
and every file is created without replacing (fileio.atomic_path, replace=False).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..explain import EXPLAINERS
from ..precision import AUTO, CLI_CHOICES
from .outputs import add_overwrite_argument, check_folder, make_folder
from .registry import command

DEFAULT_OUT = "explain"  # figures of WHAT go to explain/WHAT unless --out says otherwise


def _add_arguments(p: argparse.ArgumentParser) -> None:
    lines = "\n".join(f"  {name:<12} {text}" for name, text in EXPLAINERS.items())
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = f"what to explain:\n{lines}\n\n`daguerre explain WHAT --help` lists WHAT's options (docs/explain.md)."
    p.add_argument("what", choices=list(EXPLAINERS), metavar="WHAT", help=f"one of {', '.join(EXPLAINERS)}")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="WHAT's arguments and options")


def add_common_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """The options every explain sub-command takes: the model and how it runs, the seed, where figures go."""
    p.add_argument("--model", "-m", default=None, help="checkpoint file, diffusers folder, shipped model name, "
                   "or random:PRESET (default: the shipped default model)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, mps (default: cpu)")
    p.add_argument("--dtype", default=AUTO, choices=CLI_CHOICES, help="compute dtype of the networks (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--out", "-o", type=Path, default=Path(DEFAULT_OUT) / what,
                   help=f"folder of the figures and index.html (default {DEFAULT_OUT}/{what})")
    add_overwrite_argument(p)


def build_parser(what: str) -> argparse.ArgumentParser:
    """The argument parser of `daguerre explain WHAT` (imports WHAT's module)."""
    from ..explain import module

    p = argparse.ArgumentParser(prog=f"daguerre explain {what}", description=EXPLAINERS[what])
    module(what).add_arguments(p)
    add_common_arguments(p, what)
    return p


def check_out(folder: Path, overwrite: bool) -> None:
    """Before any model work: `folder` can be written in, and does not hold an earlier page unless `overwrite`."""
    from ..explain.page import PAGE_NAME

    check_folder(folder)
    if (folder / PAGE_NAME).exists() and not overwrite:
        raise ValueError(f"{folder} already holds an explanation ({PAGE_NAME}): name another folder with --out, "
                         "or pass --overwrite to replace its files")


@command("explain", "figures that show how latent diffusion works: noising, schedules, trajectory, attention, "
         "autoencoder, samplers (docs/explain.md)", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..explain import module
    from ..explain.page import require_matplotlib, write_page

    sub = build_parser(args.what).parse_args(args.rest)
    require_matplotlib()
    check_out(sub.out, sub.overwrite)
    make_folder(sub.out)
    figures = module(args.what).run(sub)
    page = write_page(sub.out, f"daguerre explain {args.what}", figures, replace=sub.overwrite)
    for f in figures:
        print(f.path)
        for extra in f.extras:
            print(extra)
    print(page)
    print(f"daguerre explain {args.what}: {len(figures)} figure(s); open {page} in a browser", file=sys.stderr)
    return 0
