"""docs/images/clip-guidance-grid.png: the shipped shapes model unguided and CLIP-guided, the same seed per column.

    python bench/clip_guidance_grid.py --out docs/images/clip-guidance-grid.png   # guide: shapes-noisy-clip

Rows: --cfg 0 (unconditional), --cfg 0 with CLIP guidance, the model's CFG, its CFG with CLIP guidance; columns:
eight single-object prompts, seed 1 to 8 (docs/clip.md).
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

import daguerre

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a purple heart", "an orange ring",
           "a cyan diamond", "a pink cross"]
CELL, LABEL, HEAD = 64, 84, 26


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", default=None, help="the guiding CLIP (default: the one that guides the shipped shapes "
                   "model by default, registry.guide_for_model)")
    p.add_argument("--scale", type=float, default=None, help="CLIP guidance scale (default: the recommended)")
    p.add_argument("--out", default="docs/images/clip-guidance-grid.png")
    args = p.parse_args()
    from daguerre.pipelines.request import CLIP_GUIDANCE
    from daguerre.registry import guide_for_model

    guide = {"clip_guidance": args.scale or CLIP_GUIDANCE, "clip_model": args.clip or guide_for_model("shapes")}
    rows = [("cfg 0", {"cfg_scale": 0}), ("cfg 0 + CLIP", {"cfg_scale": 0, **guide}), ("model's cfg", {}),
            ("cfg + CLIP", guide)]
    pipe = daguerre.load("shapes")
    grid = Image.new("RGB", (LABEL + CELL * len(PROMPTS), HEAD + CELL * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, prompt in enumerate(PROMPTS):
        for k, word in enumerate(prompt.split(" ", 1)[1].split()):
            draw.text((LABEL + c * CELL + 4, 2 + 11 * k), word, fill=(0, 0, 0))
    for r, (name, fields) in enumerate(rows):
        draw.text((4, HEAD + r * CELL + CELL // 2 - 6), name, fill=(0, 0, 0))
        for c, prompt in enumerate(PROMPTS):
            image = pipe(prompt, seed=c + 1, **fields)[0].image
            grid.paste(image, (LABEL + c * CELL, HEAD + r * CELL))
    grid.save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
