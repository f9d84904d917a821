"""The figures of `daguerre explain` and the one self-contained HTML page that shows them (issue 22).

Every sub-command returns a list of `Figure`s: a PNG already written, the one sentence that says what it shows,
and any files that go with it (arrays such as `maps.safetensors`). `write_page` writes one HTML file that holds
every image as a `data:` URI with its sentence under it, so the page can be mailed or opened anywhere on its own;
the extra files are linked by their path relative to the page.

Plots are drawn with matplotlib's object-oriented API (`new_figure`, `save_figure`: no pyplot, so no global
state and no display backend), imported only when a figure is drawn: matplotlib is the optional extra
`daguerre[explain]` and `require_matplotlib` names it when it is missing. Everything is written atomically
(daguerre.fileio); with `replace=False` (the default) an existing file is never replaced.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fileio import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import matplotlib.figure

INSTALL_HINT = "pip install 'daguerre[explain]'"
PAGE_NAME = "index.html"
DPI = 100  # pixels per inch of the saved PNGs: a figsize of (8, 3) inches is 800 x 300 pixels
MAX_PAGE_IMAGE_BYTES = 64 * 1024 * 1024  # the images one page embeds, at most (base64 makes them 4/3 larger)


@dataclass(frozen=True)
class Figure:
    """One figure of an explanation: the PNG at `path`, the sentence that says what it shows, and the files
    that go with it (e.g. the arrays a figure was drawn from), linked from the page. `title` is an optional
    heading above the figure."""

    path: Path
    caption: str
    extras: tuple[Path, ...] = field(default=())
    title: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "extras", tuple(Path(p) for p in self.extras))


def require_matplotlib() -> Any:
    """Import matplotlib (the `explain` extra) or fail with one line naming the extra to install."""
    try:
        import matplotlib
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise ValueError(f"daguerre explain draws its figures with matplotlib, which is not installed: "
                         f"{INSTALL_HINT}") from None
    return matplotlib


def new_figure(width: float, height: float) -> matplotlib.figure.Figure:
    """A matplotlib figure of `width` x `height` inches (DPI pixels per inch), not attached to any pyplot state."""
    require_matplotlib()
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(fig: matplotlib.figure.Figure, path: str | os.PathLike, *, replace: bool = False) -> Path:
    """Render `fig` to a PNG at `path`, written atomically; an existing file is an error unless `replace`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue(), replace=replace)
    return path


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def _link(extra: Path, out_dir: Path) -> str:
    """The href of an extra file: its path relative to the page's folder when it lies inside it."""
    try:
        rel = extra.resolve().relative_to(out_dir.resolve())
    except ValueError:
        rel = extra.resolve()
    return rel.as_posix()


# wide figures (a trajectory's rows of steps) keep their pixels up to 110rem; the sentences stay at reading width
_STYLE = """body{font-family:system-ui,sans-serif;max-width:110rem;margin:2rem auto;padding:0 1rem;color:#222}
figure{margin:2rem 0}img{max-width:100%;border:1px solid #ddd}
figcaption,h1,h2{max-width:50rem}figcaption{margin-top:.5rem;line-height:1.4}.extras{font-size:.9em;color:#555}"""


def render_page(title: str, figures: Sequence[Figure], out_dir: str | os.PathLike = ".") -> str:
    """The HTML text of the page: every figure's PNG embedded as a data URI, its caption beneath it, its extra
    files linked relative to `out_dir` (where the page will be written). All text is HTML-escaped."""
    out_dir = Path(out_dir)
    total = sum(f.path.stat().st_size for f in figures)
    if total > MAX_PAGE_IMAGE_BYTES:
        raise ValueError(f"the figures of '{title}' take {total} bytes, more than one page embeds "
                         f"({MAX_PAGE_IMAGE_BYTES}); draw fewer or smaller figures")
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for f in figures:
        parts.append("<figure>")
        if f.title:
            parts.append(f"<h2>{html.escape(f.title)}</h2>")
        parts.append(f'<img src="{_data_uri(f.path)}" alt="{html.escape(f.caption)}">')
        parts.append(f"<figcaption>{html.escape(f.caption)}")
        if f.extras:
            links = ", ".join(f'<a href="{html.escape(_link(e, out_dir))}">{html.escape(e.name)}</a>'
                              for e in f.extras)
            parts.append(f'<div class="extras">Files: {links}</div>')
        parts.append("</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_page(out_dir: str | os.PathLike, title: str, figures: Sequence[Figure], *,
               replace: bool = False, name: str = PAGE_NAME) -> Path:
    """Write the one self-contained HTML page of `figures` as `out_dir/name` (atomically; an existing page is
    an error unless `replace`) and return its path."""
    out_dir = Path(out_dir)
    missing = [str(f.path) for f in figures if not f.path.is_file()]
    if missing:
        raise FileNotFoundError(f"cannot put figure {missing[0]} on the page: no such file")
    path = out_dir / name
    atomic_write_text(path, render_page(title, figures, out_dir), replace=replace)
    return path
