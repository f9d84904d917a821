"""The shipped semantic-synthesis model `shapes-semantic` (issue 18, its card src/daguerre/assets/models/
shapes-semantic.md): a map without --model goes to it, and it draws held-out maps that the colour-blind judge
reads back as their maps."""

from __future__ import annotations

import numpy as np
from PIL import Image

from daguerre.cli import main
from daguerre.data.layout import LabelMap
from daguerre.data.shapes import object_masks, render_labels
from daguerre.metrics.layout import held_out_scenes, mean_iou, shape_map
from daguerre.registry import open_model, shipped_model_for


def test_a_map_without_model_goes_to_the_shipped_semantic_model(tmp_path, capsys):
    assert shipped_model_for(semantic_map=True, layout=False) == "shapes-semantic"
    comps, _ = open_model("shapes-semantic")
    dataset, held, _ = held_out_scenes(comps.config, 1)
    scene, text = dataset.sample(held[0])
    path, out = tmp_path / "map.png", tmp_path / "out.png"
    LabelMap.from_array(render_labels(scene, 64)).image().save(path)
    assert main(["generate", text, "--semantic", str(path), "--seed", "0", "-o", str(out)]) == 0
    capsys.readouterr()
    image = Image.open(out)
    assert image.size == (64, 64) and "Model: shapes-semantic" in image.text["parameters"]
    judged = shape_map(image, list(object_masks(scene, 64)))
    assert mean_iou(judged.pred, render_labels(scene, 64)) > 0.7


def test_the_shipped_semantic_model_draws_held_out_maps_in_place():
    """Four held-out scenes at the recommended settings (the card's eval measures 200: mean IoU 0.8 or more)."""
    from daguerre.pipelines.request import GenerationRequest
    from daguerre.pipelines.txt2img import txt2img

    comps, _ = open_model("shapes-semantic")
    dataset, held, _ = held_out_scenes(comps.config, 4)
    scores = []
    for k, i in enumerate(held):
        scene, text = dataset.sample(i)
        target = render_labels(scene, 64)
        req = GenerationRequest(prompt=text, semantic_map=LabelMap.from_array(target), seed=k)
        image = txt2img(comps, req.validate(comps.config))[0].image
        scores.append(mean_iou(shape_map(image, list(object_masks(scene, 64))).pred, target))
    assert np.mean(scores) > 0.7, scores
