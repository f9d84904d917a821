"""Token grounding in stage 2 (issue 22; training/grounding.py, TokenCompose): the caption's words of each object
found in the tokenizer's window for every phrasing of the shapes grammar, the loss's oracle values on constructed
attention, a weight of 0 that is the old training bit for bit, a tiny run whose grounding loss falls, resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import daguerre
from daguerre.data.shapes import ShapesDataset, caption, object_masks, object_words, render_labels, sample_scene
from daguerre.models.tokenizer import CLIPTokenizer
from daguerre.training.config import load_run_config
from daguerre.training.grounding import (
    GroundingBatch,
    GroundingRecorder,
    GroundingTargets,
    layer_size,
    pair_losses,
    rest_words,
    word_token_positions,
)
from daguerre.training.ldm import train_ldm

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"
QUIET = ["train.progress=false", "train.sample_every=0", "train.eval_every=0", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def test_each_objects_words_point_at_its_colour_and_shape_tokens_in_every_phrasing(tokenizer):
    """300 random scenes (1-4 objects, relations, both styles, backgrounds, grid and free placement), two captions
    each: the positions of each object's noun and colour decode to its shape and colour, in the window the model
    reads (`tokenizer([caption])`)."""
    styles = set()
    for i in range(300):
        rng = np.random.default_rng((7, i))
        scene = sample_scene(rng, min_objects=1, max_objects=4, p_relation=0.6,
                             placement=("grid", "free")[i % 2])
        for complete in (False, True):
            text = caption(scene, rng, complete=complete)
            styles.add("," in text.split(" ")[1] if len(text.split()) > 1 else None)
            ids = tokenizer([text])[0]
            positions = word_token_positions(tokenizer, text)
            words = object_words(scene, text)
            assert len(words) == len(scene.objects)
            for obj, w in zip(scene.objects, words, strict=True):
                assert tokenizer.decode(ids[positions[w.shape]]) == obj.shape, text
                assert tokenizer.decode(ids[positions[w.colour]]) == obj.colour, text
    assert styles >= {True, False}  # tag ("red circle, ...") and natural captions both seen


def test_word_positions_with_the_frozen_encoders_wordpiece_tokenizer(tmp_path):
    """The MiniLM tokenizer (a frozen text encoder's): a word's pieces, punctuation alone left out."""
    from daguerre.models.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, "a", "red", "circle", "play", "##ing", ","]))
    tok = WordPieceTokenizer(tmp_path / "vocab.txt", max_length=16)
    assert word_token_positions(tok, "a red circle, playing") == [[1], [2], [3], [5, 6]]
    assert word_token_positions(WordPieceTokenizer(tmp_path / "vocab.txt", max_length=4), "a red circle") == [
        [1], [2], []]  # cut off by the window


def test_a_text_that_is_no_caption_of_the_scene_is_refused(tokenizer):
    scene, _ = ShapesDataset(4, seed=3).sample(0)
    with pytest.raises(ValueError, match="not a caption of this scene"):
        object_words(scene, "a purple unicorn")


def test_object_masks_are_the_rendered_objects():
    ds = ShapesDataset(20, seed=5, max_objects=3)
    for i in range(20):
        scene = ds.scene(i)
        masks, labels = object_masks(scene, 64), render_labels(scene, 64)
        union = masks.any(0)
        assert (union == (labels > 0)).mean() > 0.99  # the same pixels as the semantic map (ties aside)
        assert not (masks.sum(0) > 1).any()  # objects never overlap


def test_the_rest_words_are_those_that_name_no_object_and_look_at_the_background(tokenizer):
    """loss.grounding_rest: every word but an object's colour, shape and size words is grounded on the background,
    the share of each latent cell no object covers; the objects' entries are those without it."""
    natural = "a large red circle above a small blue square on a black background"
    assert [natural.split()[i] for i in rest_words(natural, _words(2, 3, 7, 8))] == [
        "a", "above", "a", "on", "a", "black", "background"]
    assert [w for i, w in enumerate("red circle, large, top".split())
            if i in rest_words("red circle, large, top", _words(0, 1))] == ["top"]
    ds = ShapesDataset(30, seed=3, max_objects=3, p_relation=0.5)
    data = SimpleNamespace(dataset=ds, train_pool=np.arange(30))
    captions = [ds[i]["caption"] for i in range(30)]
    plain = GroundingTargets(data, captions, tokenizer, (16, 16), "nouns")
    rest = GroundingTargets(data, captions, tokenizer, (16, 16), "nouns", rest=True)
    for row in range(30):
        (tokens, masks), (tokens_r, masks_r) = plain.row(row), rest.row(row)
        assert tokens_r[:-1] == tokens and torch.equal(masks_r[:-1], masks)
        assert torch.allclose(masks_r.sum(0), torch.ones(16, 16), atol=1e-6)  # objects and background cover all
        scene, ids = ds.scene(row), tokenizer([captions[row]])[0]
        named = {w for o in scene.objects for w in (o.colour, o.shape)}
        words = tokenizer.decode(ids[tokens_r[-1]]).split() if tokens_r[-1] else []
        assert not named & set(words) and not {"small", "large", "little", "big"} & set(words), captions[row]
        assert len(words) == len(rest_words(captions[row], object_words(scene, captions[row])))


def _words(*indices: int) -> tuple:
    """ObjectWords of (colour, shape) index pairs."""
    from daguerre.data.shapes import ObjectWords

    return tuple(ObjectWords(indices[i], indices[i + 1]) for i in range(0, len(indices), 2))


def _batch(masks: torch.Tensor) -> GroundingBatch:
    k = masks.shape[0]
    return GroundingBatch(torch.zeros(k, dtype=torch.long), torch.arange(1, k + 1), masks)


def test_the_token_loss_is_0_inside_the_mask_and_1_outside():
    mask = torch.zeros(2, 16)
    mask[:, :4] = 1.0
    inside = torch.zeros(2, 16)
    inside[:, :4] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    outside = torch.zeros(2, 16)
    outside[:, 8:] = 0.125
    token, pixel = pair_losses(inside, mask)
    assert torch.allclose(token, torch.zeros(2))
    token, pixel_out = pair_losses(outside, mask)
    assert torch.allclose(token, torch.ones(2))
    assert (pixel_out > pixel).all()  # the pixel term prefers the map on the mask too
    half = torch.full((1, 16), 1 / 16)
    assert torch.allclose(pair_losses(half, mask[:1])[0], torch.tensor([0.75 ** 2]))


def test_the_recorder_reads_the_probabilities_of_the_pairs_tokens():
    """Queries and keys built so that at each position of a 4x4 map token 1 takes all the attention in the mask's
    top half and none below: the token loss is 0 with the top half as the mask, 1 with the bottom half."""
    heads, d, s = 2, 4, 5
    big = 30.0
    k = torch.zeros(1, s, heads * d)
    k[0, 1, 0::d] = 1.0  # token 1's key: dimension 0 of every head
    k[0, 2, 1::d] = 1.0  # token 2's key: dimension 1
    q = torch.zeros(1, 16, heads * d)
    q[0, :8, 0::d] = big  # top half: token 1
    q[0, 8:, 1::d] = big  # bottom half: token 2
    top = torch.zeros(1, 4, 4)
    top[0, :2] = 1.0
    for mask, want in ((top, 0.0), (1 - top, 1.0)):
        rec = GroundingRecorder(_batch(mask), (4, 4))
        rec(q, k, k, heads)
        token, _ = rec.losses()
        assert abs(float(token) - want) < 1e-4
    assert layer_size(16, (8, 8)) == (4, 4) and layer_size(4, (7, 7)) == (2, 2)
    rec = GroundingRecorder(_batch(top), (4, 4), heights=(2,))
    rec(q, k, k, heads)  # a 4x4 layer, only 2x2 ones asked for
    assert float(rec.losses()[0]) == 0.0 and not rec.token
    third = torch.zeros(1, 4, 4)
    third[0, 2] = 1.0  # the bottom half's first row only: half of token 2's attention lies in it
    for dilation, ring, want in ((0, 1.0, 0.25), (1, 1.0, 0.0), (1, 0.5, 0.0625)):  # grown by one pixel, the
        rec = GroundingRecorder(GroundingBatch(torch.tensor([0]), torch.tensor([2]), third), (4, 4),  # mask covers
                                dilation=dilation, ring=ring)  # the bottom half (its last row counting `ring`)
        rec(q, k, k, heads)
        assert abs(float(rec.losses()[0]) - want) < 1e-4, (dilation, ring)


def test_pairs_below_the_min_timestep_are_grounded_only_at_the_other_heights():
    """loss.grounding_min_timestep_heights: a pair marked `coarse_only` (its sample below the min timestep) is left
    out at the layers of the heights named and counted at the others; each (pair, layer call) counts once."""
    torch.manual_seed(0)
    heads, d, s = 2, 4, 5
    masks = torch.rand(2, 8, 8)
    pairs = GroundingBatch(torch.tensor([0, 1]), torch.tensor([1, 2]), masks).marking(torch.tensor([False, True]))
    assert pairs.coarse_only.tolist() == [False, True]
    assert pairs.of_samples(torch.tensor([True, True])).coarse_only.tolist() == [False, True]
    k = torch.randn(2, s, heads * d)
    q8, q4 = torch.randn(2, 64, heads * d), torch.randn(2, 16, heads * d)
    rec = GroundingRecorder(pairs, (8, 8), fine=(8,))
    rec(q8, k, k, heads)  # an 8x8 layer: the first pair alone
    rec(q4, k, k, heads)  # a 4x4 layer: both
    assert [len(x) for x in rec.token] == [1, 2]
    first = GroundingRecorder(GroundingBatch(torch.tensor([0]), torch.tensor([1]), masks[:1]), (8, 8))
    first(q8, k, k, heads)
    both = GroundingRecorder(GroundingBatch(torch.tensor([0, 1]), torch.tensor([1, 2]), masks), (8, 8))
    both(q4, k, k, heads)
    assert torch.allclose(rec.losses()[0], torch.cat([first.token[0], both.token[0]]).mean())
    unmarked = GroundingRecorder(GroundingBatch(torch.tensor([0, 1]), torch.tensor([1, 2]), masks), (8, 8), fine=(8,))
    unmarked(q8, k, k, heads)  # nothing marked: the heights change nothing
    assert len(unmarked.token[0]) == 2


def _run(tmp_path: Path, vae_file: Path, name: str, extra: list[str], until: int | None = None,
         resume: bool = False) -> Path:
    base = [*QUIET, "data.shapes.n=40", "data.holdout=8", "train.batch_size=4", "train.log_every=1",
            "train.keep_last=5", "train.warmup_steps=0", "train.decay='constant'", "data.shapes.min_objects=2",
            "data.shapes.max_objects=2"]
    cfg = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", [*base, *extra])
    train_ldm(cfg, tmp_path / name, vae_path=vae_file, until=until, resume=resume)
    return tmp_path / name


def _state(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "state.safetensors"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_weight_0_is_the_old_training_bit_for_bit(tmp_path, vae_file, monkeypatch):
    """With loss.grounding_weight 0 (the default) no recorder is hung and no term added: the run equals one whose
    stage never heard of grounding (the step of the stage before it, patched back in)."""
    from daguerre.training import ldm

    new = _run(tmp_path, vae_file, "new", ["train.steps=3"])

    def old_step(self, step, micro, sync):
        assert self.grounding is None
        t, lc, device = self.cfg.train, self.cfg.loss, self.device
        positions, idx = self.sampler.indices(step, micro)
        gens = [ldm.dist.sample_generator(t.seed, "ldm", int(p)) for p in positions]
        b = self.objective.draw(gens, self.lat, idx, device)
        dropped = b.drop < lc.caption_dropout
        text_dropped = b.drop < lc.caption_dropout + lc.text_dropout
        kwargs = self.conditioner.batch(b.rows, dropped, self.rows, device, self.text, text_dropped)
        x_t = self.concat_in.apply(b.x_t, kwargs, b.rows, b.view, gens, device)
        with ldm.dist.maybe_no_sync(self.model, not sync):
            with ldm.autocast(device, t.bf16):
                pred = self.model(x_t, b.t.float().to(device), **kwargs)
            loss = self.objective.loss(pred, b)
            (loss / t.grad_accum).backward()
        return {"loss": float(loss.detach())}

    monkeypatch.setattr(ldm.LDMStage, "step", old_step)
    old = _run(tmp_path, vae_file, "old", ["train.steps=3"])
    a, b = _state(new, 3), _state(old, 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all("grounding_loss" not in r for r in _metrics(new))


def test_a_few_grounded_steps_lower_the_grounding_loss_and_resume_bitwise(tmp_path, vae_file):
    """A tiny run on two-object scenes with a strong grounding weight: the grounding loss of its last steps is
    below its first steps' (and logged beside the loss); paused and resumed, it ends bitwise equal, with
    gradient accumulation and flipped views."""
    on = ["loss.grounding_weight=5.0", "loss.grounding_pixel_weight=0.05", "loss.grounding_words='nouns+colours'",
          "train.lr=3e-3", "train.grad_accum=2", "data.flip=true"]
    ref = _run(tmp_path, vae_file, "ref", [*on, "train.steps=30"])
    logged = [r for r in _metrics(ref) if "grounding_loss" in r]
    assert len(logged) == 30 and all("loss" in r and "grounding_pixel_loss" in r for r in logged)
    first = np.mean([r["grounding_loss"] for r in logged[:5]])
    last = np.mean([r["grounding_loss"] for r in logged[-5:]])
    assert last < 0.96 * first, (first, last)  # measured 0.92 -> 0.85
    _run(tmp_path, vae_file, "run", [*on, "train.steps=30"], until=17)
    run = _run(tmp_path, vae_file, "run", [*on, "train.steps=30"], resume=True)
    a, b = _state(ref, 30), _state(run, 30)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_of_samples_keeps_the_pairs_of_the_marked_samples():
    masks = torch.arange(4 * 2 * 2, dtype=torch.float32).reshape(4, 2, 2)
    pairs = GroundingBatch(torch.tensor([0, 0, 1, 2]), torch.tensor([3, 5, 4, 7]), masks)
    kept = pairs.of_samples(torch.tensor([True, False, True]))
    assert kept.samples.tolist() == [0, 0, 2] and kept.tokens.tolist() == [3, 5, 7]
    assert torch.equal(kept.masks, masks[[0, 1, 3]])


def test_grounding_max_timestep_grounds_only_the_less_noisy_samples(tmp_path, vae_file):
    """At max timestep 1 no sample of a short run is grounded (its training timesteps are >= 1), nor at min timestep
    999 (none of its 12 draws is t = 999): the grounding loss is 0 at every step, while the same run grounding every
    sample logs it; the first step's diffusion loss is the
    same in both (grounding changes the backward pass only)."""
    on = ["loss.grounding_weight=1.0", "train.steps=3", "train.log_every=1"]
    every = _metrics(_run(tmp_path, vae_file, "every", on))
    none = _metrics(_run(tmp_path, vae_file, "none", [*on, "loss.grounding_max_timestep=1"]))
    assert all(r["grounding_loss"] > 0 for r in every if "grounding_loss" in r)
    assert [r["grounding_loss"] for r in none if "grounding_loss" in r] == [0.0, 0.0, 0.0]
    top = _metrics(_run(tmp_path, vae_file, "top", [*on, "loss.grounding_min_timestep=999"]))  # t = 999 alone: none
    assert [r["grounding_loss"] for r in top if "grounding_loss" in r] == [0.0, 0.0, 0.0]  # of these 12 draws
    assert [r["loss"] for r in every if "loss" in r][0] == [r["loss"] for r in none if "loss" in r][0]
    two = [*on, "model.unet.attention_levels=[0, 1]", "loss.grounding_min_timestep=999"]  # maps 16x16 and 8x8
    coarse = _metrics(_run(tmp_path, vae_file, "coarse", [*two, "loss.grounding_min_timestep_heights=[16]"]))
    assert all(r["grounding_loss"] > 0 for r in coarse if "grounding_loss" in r)  # the 8x8 layers: every sample
    held = _metrics(_run(tmp_path, vae_file, "held", [*two, "loss.grounding_min_timestep_heights=[16, 8]"]))
    assert [r["grounding_loss"] for r in held if "grounding_loss" in r] == [0.0, 0.0, 0.0]


def test_grounding_under_gradient_checkpointing_gives_the_same_gradients(tmp_path, vae_file):
    on = ["loss.grounding_weight=1.0", "train.steps=2"]
    plain = _run(tmp_path, vae_file, "plain", on)
    ckpt = _run(tmp_path, vae_file, "ckpt", [*on, "train.gradient_checkpointing=true"])
    a, b = _state(plain, 2), _state(ckpt, 2)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if k.startswith("model."))


@pytest.mark.parametrize(("setting", "match"), [
    ("loss.grounding_weight=-1.0", "loss.grounding_weight: must be a number >= 0"),
    ("loss.grounding_words='verbs'", "grounding_words"),
    ("loss.grounding_resolutions=[0]", "loss.grounding_resolutions"),
    ("loss.grounding_pixel_weight=1.0", "set loss.grounding_weight > 0 too"),
    ("loss.grounding_max_timestep=500", "set loss.grounding_weight > 0 too"),
    ("loss.grounding_max_timestep=0", "loss.grounding_max_timestep: 0; give an integer from 1"),
    ("loss.grounding_max_timestep=1001", "loss.grounding_max_timestep: 1001"),
    ("loss.grounding_dilation=1", "set loss.grounding_weight > 0 too"),
    ("loss.grounding_rest=true", "set loss.grounding_weight > 0 too"),
    ("loss.grounding_min_timestep_heights=[8]", "names the layers loss.grounding_min_timestep holds for; set that"),
    ("loss.grounding_min_timestep_heights=[0]", r"loss.grounding_min_timestep_heights: \[0\]; give distinct"),
    ("loss.grounding_exclude=['output_blocks.4.1']", "set loss.grounding_weight > 0 too"),
    ("loss.grounding_exclude=['']", r"loss.grounding_exclude: \[''\]; give transformer names"),
    ("loss.grounding_min_timestep=500", "set loss.grounding_weight > 0 too"),
    ("loss.grounding_min_timestep=1000", "loss.grounding_min_timestep: 1000; give an integer from 0 to"),
    ("loss.grounding_dilation=-1", "loss.grounding_dilation: -1; give an integer from 0 to 8"),
    ("loss.grounding_ring=0.5", "it weighs the ring loss.grounding_dilation adds; set that too"),
    ("loss.grounding_ring=2.0", "loss.grounding_ring: 2.0; give a number from 0 to 1"),
])
def test_grounding_keys_are_checked(setting, match):
    with pytest.raises(ValueError, match=match):
        load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", [setting])


def test_grounding_exclude_leaves_the_named_transformers_alone():
    """loss.grounding_exclude: the named transformers' cross-attention (a name or its prefix at a dot) gets no
    recorder, every other one does; an unknown name or one that excludes everything is refused by name."""
    from daguerre.models.unet import cross_attention_layers
    from daguerre.training.grounding import grounded_layers, grounding

    unet = daguerre.load("shapes").components.unet
    found = cross_attention_layers(unet)
    assert len(found) == 11 and "output_blocks.4.1" in found
    kept = grounded_layers(unet, ["output_blocks.4.1", "middle_block"])
    assert len(kept) == 9 and found["output_blocks.4.1"] not in kept and found["middle_block.1"] not in kept
    recorder = GroundingRecorder(_batch(torch.ones(1, 16, 16)), (16, 16))
    with grounding(unet, recorder, ["output_blocks"]):
        assert [n for n, m in found.items() if m.recorder is recorder] == [n for n in found
                                                                           if not n.startswith("output_blocks")]
    assert all(m.recorder is None for m in found.values())
    with pytest.raises(ValueError, match="loss.grounding_exclude: output_blocks.9.1: no such cross-attention layer; "
                                         "this U-Net's: input_blocks.4.1"):
        grounded_layers(unet, ["output_blocks.9.1"])
    with pytest.raises(ValueError, match="leaves no cross-attention layer to ground"):
        grounded_layers(unet, ["input_blocks", "middle_block", "output_blocks"])


def test_grounding_needs_shapes_data_and_a_text_model():
    with pytest.raises(ValueError, match="needs stage 'ldm', data.kind 'shapes' and model.conditioning 'text'"):
        load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", ["loss.grounding_weight=1.0", "model.conditioning='none'"])


def test_a_teacher_starts_at_zero_loss_resumes_bitwise_and_must_stay_the_same_file(tmp_path, vae_file):
    """loss.teacher_weight: the --init model, frozen, predicts on the run's inputs: at the first step the run's
    network is that model, so the term is exactly 0, then it grows as the network moves (here under a strong
    grounding term), logged as teacher_loss; paused and resumed the run ends bitwise as one uninterrupted run;
    resuming with another --init file is refused; without --init, or for a GLIGEN run, the key is refused."""
    import shutil

    first = _run(tmp_path, vae_file, "first", ["train.steps=2"]) / "model.safetensors"
    init = tmp_path / "init.safetensors"
    shutil.copy(first, init)
    on = [f"train.init_from='{init}'", "loss.teacher_weight=1.0", "loss.grounding_weight=5.0", "train.lr=3e-3",
          "train.steps=8"]
    ref = _run(tmp_path, vae_file, "ref", on)
    logged = [r["teacher_loss"] for r in _metrics(ref)]
    assert len(logged) == 8 and logged[0] == 0.0 and logged[-1] > 0.0, logged
    _run(tmp_path, vae_file, "run", on, until=5)
    run = _run(tmp_path, vae_file, "run", on, resume=True)
    a, b = _state(ref, 8), _state(run, 8)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _run(tmp_path, vae_file, "moved", on, until=3)
    shutil.copy(ref / "model.safetensors", init)  # another file where the teacher was
    with pytest.raises(ValueError, match="its teacher, --init .* is not the file the run began from"):
        _run(tmp_path, vae_file, "moved", on, resume=True)
    with pytest.raises(ValueError, match="loss.teacher_weight: 1.0 needs stage 'ldm' fine-tuning a model"):
        load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", ["loss.teacher_weight=1.0"])
    with pytest.raises(ValueError, match="a GLIGEN run keeps its base frozen already"):
        load_run_config(CONFIGS / "tiny_gligen_ldm.toml", "ldm", [f"train.init_from='{init}'",
                                                                  "loss.teacher_weight=1.0"])
    with pytest.raises(ValueError, match="loss.teacher_weight: must be a number >= 0"):
        load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", ["loss.teacher_weight=-1.0"])


# --- grounding on the model's own sampling runs (loss.grounding_source = "samples") ----------------------------

def test_object_regions_finds_each_object_once_and_refuses_a_copy_or_a_wrong_shape():

    from daguerre.data.shapes import Scene, render
    from daguerre.training.sampled_grounding import object_regions

    rng = np.random.default_rng(3)
    scene = next(s for s in (sample_scene(rng, min_objects=2, max_objects=2) for _ in range(100))
                 if len({o.colour for o in s.objects}) == 2 and all(o.size == "small" for o in s.objects))
    image = render(scene, 64)
    found = object_regions(image, scene)
    truth = object_masks(scene, 64)
    assert found is not None and len(found) == 2
    for region, mask in zip(found, truth, strict=True):
        assert (region & mask).sum() / (region | mask).sum() > 0.7  # the rendered object (edge pixels: 70 of 90)
    a, b = scene.objects

    def clear(box):
        return 0 <= box[0] and box[2] <= 1 and 0 <= box[1] and box[3] <= 1 and all(
            box[2] + 0.05 < o.bbox[0] or o.bbox[2] + 0.05 < box[0] or box[3] + 0.05 < o.bbox[1]
            or o.bbox[3] + 0.05 < box[1] for o in scene.objects)

    moves = [(dx, dy) for dx in np.linspace(-0.8, 0.8, 17) for dy in np.linspace(-0.8, 0.8, 17)]
    dx, dy = next(m for m in moves if clear((a.bbox[0] + m[0], a.bbox[1] + m[1], a.bbox[2] + m[0], a.bbox[3] + m[1])))
    copy = dataclasses.replace(a, position=(a.position[0] + dx, a.position[1] + dy),
                               bbox=(a.bbox[0] + dx, a.bbox[1] + dy, a.bbox[2] + dx, a.bbox[3] + dy))
    assert object_regions(render(Scene((a, b, copy), scene.background), 64), scene) is None
    other = next(s for s in ("circle", "square", "triangle") if s != a.shape)
    wrong = Scene((dataclasses.replace(a, shape=other), b), scene.background, scene.relation)
    assert object_regions(image, wrong) is None


def test_recorded_runs_are_the_models_own_calls_and_images(tmp_path):
    """record_runs with the shipped shapes model: each kept run holds one state per conditional U-Net call of its
    sampling (the model's recommended steps), the output recorded is the U-Net's on that state's input, and each
    pair's mask is its object as the run's image draws it, at the latent's size."""
    import daguerre
    from daguerre.training.sampled_grounding import object_regions, record_runs

    pipe = daguerre.load("shapes", dtype="fp32")
    rng = np.random.default_rng(0)
    scenes = [s for s in (sample_scene(rng, min_objects=2, max_objects=2, p_relation=1.0) for _ in range(40))
              if len({o.colour for o in s.objects}) == 2][:6]
    captions = [caption(s, rng) for s in scenes]
    runs = record_runs("shapes", captions, scenes, list(range(10, 16)), 2, 7, pipe.components.tokenizer, (16, 16),
                       True, torch.device("cpu"), rest=True)
    assert len(runs) == 2 and runs.x.shape[1:] == (pipe.request("").steps, 4, 16, 16)
    r = int(runs.rows[0]) - 10
    context = pipe.components.text_encoder(pipe.components.tokenizer([captions[r]])).hidden
    with torch.no_grad():
        again = pipe.components.unet(runs.x[0, 3:4], runs.t[0, 3:4], context=context)
    assert torch.allclose(again, runs.pred[0, 3:4], atol=1e-4)
    assert torch.all(runs.t[0, 1:] < runs.t[0, :-1])  # from the noisiest state on
    image = pipe(captions[r], seed=7 + r)[0].image
    regions = object_regions(image, scenes[r])
    mine = runs.pair_masks[runs.pair_runs == 0]
    positions = word_token_positions(pipe.components.tokenizer, captions[r])
    rest = [p for i in rest_words(captions[r], object_words(scenes[r], captions[r])) for p in positions[i]]
    assert len(mine) == 4 + len(rest) > 4  # two objects, each by its noun and its colour word; the rest's words
    assert runs.pair_tokens[runs.pair_runs == 0][4:].tolist() == rest
    want = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(regions[0]).float()[None, None], (16, 16))[0, 0]
    assert torch.allclose(mine[0], want)
    drawn = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(np.stack(regions)).float()[:, None], (16, 16))
    assert torch.allclose(mine[4], 1 - drawn.sum((0, 1)))  # the rest on what the image does not draw


def _sampled(monkeypatch):
    """Every run kept, its objects where the scene puts them: a tiny model draws no objects to find."""
    from daguerre.training import sampled_grounding

    calls = []

    def regions(image, scene):
        calls.append(scene)
        return list(object_masks(scene, 32))

    monkeypatch.setattr(sampled_grounding, "object_regions", regions)
    return calls


def test_grounding_on_sampled_runs_trains_resumes_bitwise_and_records_once(tmp_path, vae_file, monkeypatch):
    """A tiny run grounding on its --init model's own runs: the runs are recorded once into the run folder (a
    resume reads them), the grounding and keep losses are logged, the keep loss starts at ~0 (the network is the
    model that made the runs), and the resumed run ends bitwise as the uninterrupted one."""
    import shutil

    from daguerre.training.sampled_grounding import RUNS_FILE

    first = _run(tmp_path, vae_file, "first", ["train.steps=2"]) / "model.safetensors"
    init = tmp_path / "init.safetensors"
    shutil.copy(first, init)
    recorded = _sampled(monkeypatch)
    on = [f"train.init_from='{init}'", "loss.grounding_weight=5.0", "loss.grounding_source='samples'",
          "loss.grounding_runs=3", "loss.grounding_batch=2", "loss.grounding_keep_weight=1.0", "train.lr=3e-3",
          "train.steps=6", "loss.grounding_words='nouns+colours'"]
    ref = _run(tmp_path, vae_file, "ref", on)
    assert len(recorded) == 3 and (ref / RUNS_FILE).is_file()
    logged = _metrics(ref)
    assert all(r["grounding_loss"] > 0 and "keep_loss" in r for r in logged)
    assert logged[0]["keep_loss"] < 1e-6 < logged[-1]["keep_loss"], [r["keep_loss"] for r in logged]
    _run(tmp_path, vae_file, "run", on, until=4)
    n = len(recorded)
    run = _run(tmp_path, vae_file, "run", on, resume=True)
    assert len(recorded) == n  # the resume read the runs it recorded
    a, b = _state(ref, 6), _state(run, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("setting", "match"), [
    (["loss.grounding_source='model'"], "loss.grounding_source: 'model' is not one of data, samples"),
    (["loss.grounding_runs=12"], "loss.grounding_runs: they set the grounding on the model's own runs"),
    (["loss.grounding_weight=1.0", "loss.grounding_source='samples'"], "name the model the run starts from"),
    (["loss.grounding_source='samples'", "train.init_from='x.safetensors'"], "set loss.grounding_weight > 0"),
    (["loss.grounding_weight=1.0", "loss.grounding_source='samples'", "train.init_from='x.safetensors'",
      "loss.grounding_batch=0"], "loss.grounding_batch: 0; give an integer from 1 to 256"),
    (["loss.grounding_weight=1.0", "loss.grounding_source='samples'", "train.init_from='x.safetensors'",
      "loss.grounding_max_timestep=500"], "every step"),
])
def test_grounding_source_keys_are_checked(setting, match):
    with pytest.raises(ValueError, match=match):
        load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", setting)


def test_a_fine_tune_with_its_init_models_encoder_frozen_keeps_it_pruned_as_it_was(tmp_path, vae_file):
    """loss.train_text_encoder = false on an --init model whose vocabulary is pruned: the exported model's text
    encoder is the --init model's, weights and kept words alike (not the full 49,408-row table)."""
    import shutil

    from daguerre.checkpoints import load_model

    first = _run(tmp_path, vae_file, "first", ["train.steps=2"]) / "model.safetensors"
    init = tmp_path / "init.safetensors"
    shutil.copy(first, init)
    tuned = _run(tmp_path, vae_file, "tuned", [f"train.init_from='{init}'", "loss.train_text_encoder=false",
                                               "train.steps=2", "train.lr=3e-3"]) / "model.safetensors"
    a, b = load_model(init), load_model(tuned)
    assert a.config.text_encoder.token_ids is not None
    assert b.config.text_encoder.token_ids == a.config.text_encoder.token_ids
    sa, sb = a.text_encoder.state_dict(), b.text_encoder.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values(),
                                                  strict=True))
    assert tuned.stat().st_size < 1.05 * init.stat().st_size
