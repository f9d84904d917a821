"""docs/images/layout-shapes.png: the shipped layout adapter on held-out layouts of its shapes world.

    python bench/layout_grid.py --out docs/images/layout-shapes.png          # model: shapes-gligen

Columns: the first eight held-out scenes of the model's data (those `daguerre eval` measures first), image k
seed k; rows: the layout (each box in its phrase's colour), the image drawn from the layout with the scene's
caption as prompt, and with no prompt (the layout alone). Shown at 2x (nearest neighbour). docs/usage.md.
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

import daguerre

CELL, LABEL = 128, 84  # a 64x64 image at 2x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-gligen")
    p.add_argument("--n", type=int, default=8, help="held-out scenes (columns)")
    p.add_argument("--out", default="docs/images/layout-shapes.png")
    args = p.parse_args()
    from daguerre.data.layout import draw_layout, parse_layout
    from daguerre.metrics.layout import held_out_scenes

    pipe = daguerre.load(args.model)
    dataset, held, _ = held_out_scenes(pipe.components.config, args.n)
    rows = ["layout", "caption", "no prompt"]
    grid = Image.new("RGB", (LABEL + CELL * len(held), CELL * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, name in enumerate(rows):
        draw.text((4, r * CELL + CELL // 2 - 6), name, fill=(0, 0, 0))
    for k, i in enumerate(held):
        _, caption = dataset.sample(i)
        objects = parse_layout([{"phrase": ph, "box": list(b)} for ph, b in dataset.layout(i)], f"scene {i}")
        images = [draw_layout(objects, 64, 64)]
        images += [pipe(prompt, layout=objects, seed=k)[0].image for prompt in (caption, "")]
        for r, image in enumerate(images):
            big = image.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
            grid.paste(big, (LABEL + k * CELL, r * CELL))
        print(f"{k}: {caption}")
    grid.save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
