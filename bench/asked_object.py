"""What the single-object images of `daguerre eval` runs drew, from their report.json (docs/clip.md, "Measured").

    python bench/asked_object.py ev-single-clip [more eval folders...]

Per run, over its "single" prompts: "exact" is eval's `shape_colour` (the asked object alone); "present" the asked
object among those the classifier saw (the issue's "draws the asked object"); then the asked colour and the asked
shape among them, one object drawn, nothing drawn.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from daguerre.data.shapes import parse_caption

OBJECT = re.compile(r"(small|large) (\w+) (\w+)")


def drawn(seen: str) -> list[tuple[str, str]]:
    """(colour, shape) of each object in eval's "seen" text ("small red circle (centre); ... on black")."""
    return [(m.group(2), m.group(3)) for o in seen.rsplit(" on ", 1)[0].split("; ") if (m := OBJECT.match(o))]


def summary(report: dict) -> dict[str, float]:
    rows = [s for s in report["samples"] if s["kind"] == "single"]
    if not rows:
        raise ValueError("the report has no single-object prompts (eval --prompts single)")
    counts = dict.fromkeys(("exact", "present", "colour", "shape", "one", "empty"), 0)
    for s in rows:
        want = parse_caption(s["prompt"]).objects[0]
        objects = drawn(s["seen"])
        counts["exact"] += bool(s["shape_colour"])
        counts["present"] += (want.colour, want.shape) in objects
        counts["colour"] += any(c == want.colour for c, _ in objects)
        counts["shape"] += any(sh == want.shape for _, sh in objects)
        counts["one"] += len(objects) == 1
        counts["empty"] += not objects
    return {"n": len(rows), **{k: v / len(rows) for k, v in counts.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="folders written by daguerre eval --out")
    for run in p.parse_args().runs:
        r = summary(json.loads((Path(run) / "report.json").read_text()))
        print(f"{run}: n {r['n']}, exact {r['exact']:.1%}, present {r['present']:.1%}, asked colour drawn "
              f"{r['colour']:.1%}, asked shape drawn {r['shape']:.1%}, one object {r['one']:.1%}, "
              f"nothing {r['empty']:.1%}")


if __name__ == "__main__":
    main()
