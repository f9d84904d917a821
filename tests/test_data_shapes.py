"""The shapes world: determinism, captions that say exactly what is drawn, true relations, parse inverts caption."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from daguerre.data import collate
from daguerre.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    HOLLOW_SHAPES,
    REGIONS,
    RELATIONS,
    RING_INNER,
    SHAPES,
    SIZE_RADIUS,
    SIZE_SYNONYMS,
    SUPERSAMPLE,
    ObjectSpec,
    PromptSpec,
    Relation,
    Scene,
    ShapesDataset,
    caption,
    parse_caption,
    render,
    sample_prompts,
    sample_scene,
)

SIZE = 64
N_VARIETY = 2000
COLOUR_TOL = 6  # uint8 levels: a fully covered pixel is the exact colour after box averaging
CANONICAL = {"below": "above", "to the right of": "to the left of"}


@pytest.fixture(scope="module")
def samples() -> list[tuple[Scene, str]]:
    ds = ShapesDataset(N_VARIETY, seed=7)
    return [ds.sample(i) for i in range(N_VARIETY)]


def test_items_are_a_function_of_seed_and_index():
    a, b = ShapesDataset(30, seed=3), ShapesDataset(30, seed=3)
    later = b[17]  # access order must not matter
    for i in (0, 5, 29):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] and x["scene"] == y["scene"]
    assert torch.equal(a[17]["image"], later["image"])
    other = ShapesDataset(30, seed=4)
    assert sum(other.sample(i) != a.sample(i) for i in range(30)) >= 28
    item = a[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    with pytest.raises(IndexError):
        a[30]


def _canonical(scene_or_spec, rel: Relation) -> tuple:
    """(subject (colour, shape), relation, object (colour, shape)) with below/right turned into above/left."""
    subj, obj = scene_or_spec.objects[rel.subject], scene_or_spec.objects[rel.object]
    s, o, r = (subj.colour, subj.shape), (obj.colour, obj.shape), rel.relation
    return (o, CANONICAL[r], s) if r in CANONICAL else (s, r, o)


def _words(text: str, phrase: str) -> int:
    return len(re.findall(rf"\b{phrase}\b", text))


def test_captions_mention_exactly_the_scene(samples):
    """Word-level check, independent of the parser: colours, shapes, sizes, relation and positions."""
    colour_re = "|".join(COLOURS)
    for scene, text in samples[:600]:
        rest = re.sub(rf"\b({colour_re}) background\b", "", text)
        bg = re.findall(rf"\b({colour_re}) background\b", text)
        assert bg in ([], [scene.background]), text
        for obj in scene.objects:
            assert _words(rest, f"{obj.colour} {obj.shape}") == 1, (text, obj)
        assert sum(_words(rest, c) for c in COLOURS) == len(scene.objects), text
        assert sum(_words(rest, s) for s in SHAPES) == len(scene.objects), text
        size_words = {w: size for size, ws in SIZE_SYNONYMS.items() for w in ws}
        n_said = len(re.findall(r"\b(" + "|".join(size_words) + r")\b", rest))
        n_bound = 0
        for obj in scene.objects:  # "large red circle" (natural) or "red circle, large" (tags)
            for pattern in (rf"\b(\w+) {obj.colour} {obj.shape}\b", rf"\b{obj.colour} {obj.shape}, (\w+)"):
                word = (re.findall(pattern, rest) or [""])[0]
                if word in size_words:
                    assert size_words[word] == obj.size, (text, obj)
                    n_bound += 1
        assert n_said == n_bound, text  # no size word that is not bound to an object
        said_rel = [r for r in RELATIONS if f" {r} " in rest]
        assert len(said_rel) == (scene.relation is not None), text
        if said_rel:
            rest = rest.replace(said_rel[0], " ")
        positional = set(re.findall(r"\b(top|bottom|left|right|centre|center|middle)\b", rest))
        allowed = {w for o in scene.objects for w in o.region.split()} | {"center", "middle"}
        assert positional <= allowed, text


def test_complete_captions_name_every_size_and_background():
    for i in range(200):
        rng = np.random.default_rng((11, i))
        scene = sample_scene(rng)
        text = caption(scene, rng, complete=True)
        spec = parse_caption(text)
        assert spec.background == scene.background
        assert all(o.size is not None for o in spec.objects), text
        related = {scene.relation.subject, scene.relation.object} if scene.relation else set()
        assert sum(o.region is not None for o in spec.objects) == len(scene.objects) - len(related), text


def _alone(scene: Scene, k: int) -> np.ndarray:
    """Mask (H, W) of the pixels object k paints when drawn alone on the scene's background."""
    img = np.asarray(render(Scene((scene.objects[k],), scene.background), SIZE)).astype(int)
    return np.abs(img - np.array(COLOURS[scene.background])).sum(-1) > 0


def test_relations_and_boxes_hold_in_rendered_pixels(samples):
    checked = 0
    for scene, _ in samples[:400]:
        masks = [_alone(scene, k) for k in range(len(scene.objects))]
        extents = []
        for obj, m in zip(scene.objects, masks, strict=True):
            ys, xs = np.nonzero(m)
            extent = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # pixel box, exclusive end
            # the box is tight: pixel rounding (1) plus the rasteriser's rounding of vertices (1/4 pixel at 4x)
            assert np.allclose(extent, np.array(obj.bbox) * SIZE, atol=1.0 + 1 / SUPERSAMPLE), (obj, extent)
            extents.append(extent)
        overlap = np.sum(masks, axis=0)
        assert overlap.max() <= 1, "objects overlap"
        if scene.relation is not None:
            s, o = extents[scene.relation.subject], extents[scene.relation.object]
            gap = {"above": o[1] - s[3], "below": s[1] - o[3], "to the left of": o[0] - s[2],
                   "to the right of": s[0] - o[2]}[scene.relation.relation]
            assert gap >= 2, (scene.relation, s, o)  # at least two clear pixel rows/columns between them
            checked += 1
    assert checked > 100


def test_rendered_colours_match_the_scene(samples):
    for scene, _ in samples[:300]:
        img = np.asarray(render(scene, SIZE)).astype(int)
        bg = np.array(COLOURS[scene.background])
        for obj in scene.objects:
            want = np.array(COLOURS[obj.colour])
            cx, cy = obj.position[0] * SIZE, obj.position[1] * SIZE
            if obj.shape in HOLLOW_SHAPES:  # the hole shows the background, the stroke the colour
                assert np.abs(img[int(cy), int(cx)] - bg).max() <= COLOUR_TOL, obj
                mid = SIZE_RADIUS[obj.size] * SIZE * (1 + RING_INNER) / 2
                cx += mid
            assert np.abs(img[int(cy), int(cx)] - want).max() <= COLOUR_TOL, obj
            x0, y0, x1, y1 = (int(round(v * SIZE)) for v in obj.bbox)
            patch = img[y0:y1, x0:x1].reshape(-1, 3)
            # every pixel of the box is a blend of the object's colour and the background (anti-aliased edges)
            d = want - bg
            alpha = np.clip((patch - bg) @ d / (d @ d), 0, 1)
            residual = np.abs(patch - (bg + alpha[:, None] * d)).max()
            assert residual <= COLOUR_TOL, obj


def test_parse_caption_inverts_caption(samples):
    for k, (scene, text) in enumerate(samples[:1000]):
        spec = parse_caption(text)
        assert isinstance(spec, PromptSpec) and spec.matches(scene), text
        assert len(spec.objects) == len(scene.objects)
        by_kind = {(o.colour, o.shape): o for o in scene.objects}
        for o in spec.objects:
            truth = by_kind[(o.colour, o.shape)]
            assert o.size in (None, truth.size) and o.region in (None, truth.region), text
        assert spec.background in (None, scene.background)
        assert (spec.relation is None) == (scene.relation is None), text
        if scene.relation is not None:
            assert _canonical(spec, spec.relation) == _canonical(scene, scene.relation), text
        if k < 50:  # a wrong attribute or a reversed relation does not match
            wrong = PromptSpec((ObjectSpec(spec.objects[0].shape, "nocolour"),) + spec.objects[1:],
                               spec.relation, spec.background)
            assert not wrong.matches(scene)
            if spec.relation is not None:
                r = spec.relation
                flipped = PromptSpec(spec.objects, Relation(r.object, r.relation, r.subject), spec.background)
                assert not flipped.matches(scene)


@pytest.mark.parametrize("prompt", [
    "", "a photo of a cat", "a red", "a large", "red circle above", "above a red circle",
    "a red circle above a blue square below a green star", "a red circle on a purple background",
    "a red circle, large, small", "a red circle at the top on the left", "two red circles",
])
def test_parse_caption_rejects_prompts_outside_the_grammar(prompt):
    with pytest.raises(ValueError, match="shapes-world grammar"):
        parse_caption(prompt)


def test_parse_caption_accepts_hand_written_prompts():
    spec = parse_caption("A big grey star in the top-left corner, and a circle in the center.")
    assert spec.objects[0].size == "large" and spec.objects[0].colour == "gray" and spec.objects[0].region == "top left"
    assert spec.objects[1].shape == "circle" and spec.objects[1].colour is None and spec.objects[1].region == "centre"
    spec = parse_caption("a white background with a red heart to the left of a blue ring")
    assert spec.background == "white" and spec.relation == Relation(0, "to the left of", 1)


def test_variety(samples):
    scenes = [s for s, _ in samples]
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.colour for o in objs} == set(COLOURS)
    assert {o.size for o in objs} == {"small", "large"}
    assert {o.region for o in objs} == set(REGIONS)
    assert {s.relation.relation for s in scenes if s.relation} == set(RELATIONS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert all(o.colour != s.background for s in scenes for o in s.objects)
    assert len({t for _, t in samples}) > 0.95 * len(samples)


@pytest.mark.parametrize("kind,n_objects", [("single", 1), ("relation", 2)])
def test_sample_prompts(kind, n_objects):
    prompts = sample_prompts(kind, 40, seed=1)
    assert prompts == sample_prompts(kind, 40, seed=1)
    for p in prompts:
        assert len(p.spec.objects) == n_objects and (p.spec.relation is not None) == (kind == "relation")
        assert all(o.size is not None and o.colour is not None for o in p.spec.objects)
        assert p.spec.matches(p.scene)
    with pytest.raises(ValueError, match="prompt kind"):
        sample_prompts("triple", 1)


def test_dataloader_batches():
    loader = torch.utils.data.DataLoader(ShapesDataset(6, seed=0, size=32), batch_size=3, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 32, 32) and len(batch["caption"]) == 3
    assert all(isinstance(s, Scene) for s in batch["scene"])
