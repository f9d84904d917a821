"""Larger semantic maps in LDM's sense (issue 18, docs/layout.md): a canvas of K x K held-out scenes, each at
the training size (`data.shapes.tile_scenes`, `metrics.layout.tile_plan`), measured by `daguerre eval
--map-tiles K`: the canvas draws as its tiles side by side, the judge finds every object of the world's own
drawing of it (one colour and shape in two tiles too), canvases keep their scenes distinct, and the flags'
refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daguerre.cli import main
from daguerre.data.shapes import LABELS, ShapesDataset, render, render_labels, tile_scenes
from daguerre.metrics.layout import check_map_size, mean_iou, predicted_map, tile_plan, tile_regions
from daguerre.training.config import load_run_config
from daguerre.training.ldm import train_ldm

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"
SIZE = 32


def _scenes(background: str, count: int, *, off_edges: bool = False):
    data = ShapesDataset(400, seed=3, size=SIZE, max_objects=4, placement="free")
    margin = 1.5 / SIZE  # the world clips a shape whose outline reaches past its image's edge by a sub-pixel

    def inside(scene) -> bool:
        return all(min(o.bbox[:2]) >= margin and max(o.bbox[2:]) <= 1 - margin for o in scene.objects)

    out = [s for s in map(data.scene, range(data.n)) if s.background == background and (inside(s) or not off_edges)]
    return out[:count]


def _grid(parts: list[np.ndarray], k: int) -> np.ndarray:
    return np.concatenate([np.concatenate(parts[r * k:(r + 1) * k], 1) for r in range(k)], 0)


@pytest.mark.parametrize("k", [2, 3])
def test_a_canvas_draws_as_its_tiles_side_by_side(k):
    for background in ("black", "white"):
        scenes = _scenes(background, k * k, off_edges=True)
        canvas = tile_scenes(scenes, k)
        assert canvas.background == background and canvas.relation is None
        assert len(canvas.objects) == sum(len(s.objects) for s in scenes)
        assert np.array_equal(render_labels(canvas, k * SIZE), _grid([render_labels(s, SIZE) for s in scenes], k))
        assert np.array_equal(np.asarray(render(canvas, k * SIZE)),
                              _grid([np.asarray(render(s, SIZE)) for s in scenes], k))
        last = canvas.objects[-1]  # the last tile's last object: in the bottom right tile, at its size
        assert last.scale == pytest.approx(1 / k) and min(last.position) > (k - 1) / k and last.region != "top left"


def test_shapes_reaching_a_tiles_edge_differ_only_beside_it():
    """Where a scene's own image clips a shape at its edge, the canvas draws that sub-pixel sliver in the next
    tile: the maps differ at most in the pixel rows and columns beside the tile borders."""
    k = 3
    scenes = _scenes("black", k * k)
    canvas = render_labels(tile_scenes(scenes, k), k * SIZE)
    tiles = _grid([render_labels(s, SIZE) for s in scenes], k)
    border = np.zeros(canvas.shape, bool)
    for b in range(1, k):
        border[b * SIZE - 1:b * SIZE + 1] = border[:, b * SIZE - 1:b * SIZE + 1] = True
    assert np.array_equal(canvas[~border], tiles[~border])
    assert (canvas != tiles).mean() < 0.002


def test_the_judge_finds_every_object_of_a_drawn_canvas_even_a_colour_and_shape_twice():
    scenes = _scenes("black", 4, off_edges=True)
    scenes[3] = scenes[0]  # the same objects in two tiles: each must be looked for in its own tile
    canvas = tile_scenes(scenes, 2)
    target = render_labels(canvas, 2 * SIZE)
    colours = [(o.colour, LABELS.index(o.shape)) for o in canvas.objects]
    where = tile_regions(scenes, target, 2)
    assert len(where) == len(canvas.objects) and all(w.any() for w in where)
    pred = predicted_map(render(canvas, 2 * SIZE), target, colours, where)
    alone = [predicted_map(render(s, SIZE), render_labels(s, SIZE), [(o.colour, LABELS.index(o.shape))
                                                                     for o in s.objects]) for s in scenes]
    assert np.array_equal(pred, _grid(alone, 2))  # each tile judged as its scene alone
    by_label = predicted_map(render(canvas, 2 * SIZE), target, colours)  # where its label is: one of the twins
    assert mean_iou(pred, target) > mean_iou(by_label, target) + 0.1
    wrong = predicted_map(render(tile_scenes([scenes[0]] + scenes[1:3] + [_scenes("black", 5)[4]], 2), 2 * SIZE),
                          target, colours, where)
    assert mean_iou(wrong, target) < mean_iou(pred, target)  # another scene in the last tile scores lower


def test_canvases_take_distinct_scenes_of_one_background_and_reuse_them_only_when_short():
    held = list(range(100, 140))
    backgrounds = ["white" if i % 4 == 0 else "black" for i in held]  # 10 white, 30 black
    plan = tile_plan(held, backgrounds, 8, 2, seed=0)
    bg = dict(zip(held, backgrounds, strict=True))
    assert all(len(c) == 4 and len(set(c)) == 4 and len({bg[i] for i in c}) == 1 for c in plan)
    first = tile_plan(held, backgrounds, 9, 2, seed=0)  # one pass: 7 black canvases and 2 white ones
    assert len({i for c in first for i in c}) == 36 and [c[0] for c in first] == sorted(c[0] for c in first)
    assert first[:2] == [[100, 104, 108, 112], [101, 102, 103, 105]] and first[:8] == plan
    more = tile_plan(held, backgrounds, 30, 2, seed=0)
    assert more[:9] == first and all(len(set(c)) == 4 and len({bg[i] for i in c}) == 1 for c in more)
    assert len({tuple(c) for c in more}) > 20  # later passes are shuffled, not the first pass again
    assert [c[0] for c in tile_plan(held, backgrounds, 4, 3, seed=0)] == [100, 101, 113, 125]  # 1 white, 3 black
    with pytest.raises(ValueError, match="fewer than 16 on one background: --map-tiles 4 needs 16"):
        tile_plan(held[:20], backgrounds[:20], 1, 4, seed=0)


def test_tile_scenes_refuses_a_wrong_count_and_objects_of_the_canvas_colour():
    scenes = _scenes("white", 4)
    with pytest.raises(ValueError, match="k \\* k scenes, got k=2 and 3 scenes"):
        tile_scenes(scenes[:3], 2)
    black = next(s for s in _scenes("white", 40) if any(o.colour == "black" for o in s.objects))
    with pytest.raises(ValueError, match="invisible on the canvas's black background"):
        tile_scenes([black], 1, background="black")


@pytest.mark.parametrize(("extra", "message"), [
    (["--map-tiles", "2", "--map-scale", "2"], "--map-scale 2 and --map-tiles 2: choose one way"),
    (["--map-tiles", "9"], "map tiles must be a whole number in [1, 8], got 9"),
    (["--map-tiles", "0"], "map tiles must be a whole number in [1, 8], got 0"),
])
def test_eval_refuses_bad_map_flags_before_loading_a_model(tmp_path, capsys, extra, message):
    assert main(["eval", "--model", str(tmp_path / "absent.safetensors"), "--out", str(tmp_path / "e"),
                 "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    with pytest.raises(ValueError, match="choose one way"):
        check_map_size(4, 4)


def test_eval_measures_a_semantic_model_on_canvases_of_held_out_scenes(tmp_path, vae_file, capsys):
    quick = ["train.progress=false", "data.n=40", "data.holdout=12", "train.batch_size=4", "train.steps=2",
             "train.sample_every=0", "train.checkpoint_every=0"]
    path = train_ldm(load_run_config(CONFIGS / "tiny_semantic_ldm.toml", "ldm", quick), tmp_path / "run",
                     vae_path=vae_file)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(path), "--n", "3", "--map-tiles", "2", "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "semantic map" and report["tiles"] == 2 and report["scale"] == 1
    assert report["size"] == 64 and report["n"] == 3 and len(report["items"]) == 3
    from daguerre.data.split import holdout_split

    held = holdout_split(40, 12, 0)[1].tolist()
    assert all(len(it["tiles"]) == 4 and set(it["tiles"]) <= set(held) for it in report["items"])
    assert report["ceiling"]["mean_iou"] > 0.7 and 0 <= report["mean_iou"] <= 1
    assert report["ceiling"]["colour_adherence"] == 1.0 and 0 <= report["objects_found"] <= 1
    assert report["objects"] == sum(it["objects"] for it in report["items"]) > 0
    assert 0 <= report["colour_adherence"] <= 1 and 0 <= report["mean_iou_by_colour"] <= 1
    assert Image.open(out / "grid.png").size[0] == 3 * 64
    printed = capsys.readouterr().out
    assert "2x2 tiles of held-out scenes, 3 canvases" in printed and "colour adherence" in printed


def test_tiles_are_refused_for_a_layout_model_and_beside_a_scale():
    from daguerre.components import build_components
    from daguerre.metrics.layout import evaluate_spatial
    from daguerre.training.config import derive_model_config

    cfg = load_run_config(CONFIGS / "tiny_layout_ldm.toml", "ldm")
    cfg.model.vae = derive_model_config(load_run_config(CONFIGS / "tiny_vae.toml", "vae"), 3, None).vae
    comps = build_components(derive_model_config(cfg, 3, None))
    with pytest.raises(ValueError, match="--map-tiles 2: model 'tiny-layout' draws from layouts, not semantic maps"):
        evaluate_spatial(comps, 1, 0, {}, tiles=2)
    with pytest.raises(ValueError, match="--map-scale 2 and --map-tiles 3: choose one way"):
        evaluate_spatial(comps, 1, 0, {}, scale=2, tiles=3)
