"""The shipped GLIGEN adapter `shapes-gligen` (issue 18, its card src/daguerre/assets/models/shapes-gligen.md): a
layout without --model goes to it, it loads over the shipped `shapes` model it names, and it draws held-out
layouts' objects in their boxes."""

from __future__ import annotations

import numpy as np
from PIL import Image

from daguerre.cli import main
from daguerre.data.layout import parse_layout
from daguerre.metrics.layout import held_out_scenes, score_layout
from daguerre.registry import open_model, shipped_model_for


def test_a_layout_without_model_goes_to_the_shipped_gligen_adapter(tmp_path, capsys):
    assert shipped_model_for(semantic_map=False, layout=True) == "shapes-gligen"
    assert shipped_model_for(semantic_map=True, layout=False) == "shapes-semantic"  # maps still go there
    out = tmp_path / "out.png"
    # boxes of the world's large objects (0.32 image widths)
    boxes = {"a big red circle": [0.1, 0.1, 0.42, 0.42], "a big blue square": [0.55, 0.55, 0.87, 0.87]}
    args = [w for phrase, b in boxes.items() for w in ("--box", f"{phrase}:{','.join(map(str, b))}")]
    prompt = "a big red circle and a big blue square on a black background"  # the caption: how GLIGEN is used
    assert main(["generate", prompt, *args, "--seed", "0", "-o", str(out)]) == 0
    capsys.readouterr()
    image = Image.open(out)
    assert image.size == (64, 64) and "Model: shapes-gligen" in image.text["parameters"]
    scores = score_layout(image, parse_layout([{"phrase": p, "box": b} for p, b in boxes.items()], "test"))
    assert all(s["iou"] > 0.5 for s in scores), scores


def test_the_shipped_adapter_draws_held_out_layouts_in_their_boxes():
    """Eight held-out layouts at the recommended settings, with their scenes' captions (the card's eval measures
    200)."""
    from daguerre.pipelines.request import GenerationRequest
    from daguerre.pipelines.txt2img import txt2img

    comps, _ = open_model("shapes-gligen")
    gligen = comps.config.unet.gligen
    assert gligen.attend == "boxes" and tuple(gligen.extra_levels) == (0,) and gligen.shape_freqs == 4
    dataset, held, _ = held_out_scenes(comps.config, 8)
    ious = []
    for k, i in enumerate(held):
        _, text = dataset.sample(i)
        objects = parse_layout([{"phrase": p, "box": list(b)} for p, b in dataset.layout(i)], f"scene {i}")
        req = GenerationRequest(prompt=text, layout=objects, seed=k)
        image = txt2img(comps, req.validate(comps.config))[0].image
        ious += [o["iou"] for o in score_layout(image, objects)]
    assert np.mean(ious) > 0.5, ious
