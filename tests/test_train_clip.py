"""`daguerre train clip` (training/clip.py): the symmetric InfoNCE loss with identical captions as positives, the
augmented views, a tiny run on the shapes world that learns, resumes bit for bit and exports a CLIP file
(vocabulary pruned, outputs kept), and the config errors of the stage, each naming its key."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from daguerre.checkpoints.clip_file import load_clip
from daguerre.cli import main
from daguerre.config import CLIPConfig
from daguerre.metrics.zero_shot import HELDOUT_SEED, clip_tokenizer
from daguerre.models.clip import MAX_LOGIT_SCALE
from daguerre.training.clip import (
    CLIP_FILE,
    augment,
    build_clip,
    contrastive_loss,
    hard_negatives,
    positive_targets,
    prune_clip,
    train_clip,
    window_ids,
)
from daguerre.training.config import CLIPLossConfig, load_run_config

SETS = ["train.progress=false", "data.size=32", "data.shapes.n=96", "data.holdout=0", "train.batch_size=16",
        "train.steps=6", "train.checkpoint_every=2", "train.log_every=1", "train.sample_every=3",
        "train.eval_every=0", "train.lr=3e-3", "train.warmup_steps=0", "train.ema_decay=0.9",
        "sample.zero_shot_images=16", "loss.crop_p=0.5", "loss.blur_p=0.5", "loss.noise_p=0.5",
        'loss.swap_words=[["circle", "square", "star"]]']
CAPTIONS = ["a red circle", "a blue square", "a red circle", "a green star"]


def test_symmetric_infonce_is_clip_loss_for_distinct_captions():
    """With distinct captions the targets are one-hot and the loss is CLIP's: the mean of the cross-entropies
    over the rows (image -> text) and the columns (text -> image)."""
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)) * 3
    targets = positive_targets(["a", "b", "c", "d", "e"])
    assert torch.equal(targets, torch.eye(5))
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(contrastive_loss(logits, targets), expected, atol=1e-6)


def test_identical_captions_are_positives():
    """Equal captions in a batch are positives of each other: the targets of "a red circle" split evenly over
    both of its copies. Because a deterministic text tower gives equal captions equal embeddings, this loss
    equals CLIP's one-hot loss in value and gradient (the tied logits make the two the same); what the soft
    targets change is the meaning of the batch accuracy (a tie between equal captions is right) and the
    loss floor they state (the targets' entropy, reached by a perfect model with no gradient left)."""
    targets = positive_targets(CAPTIONS)
    assert torch.allclose(targets[0], torch.tensor([0.5, 0.0, 0.5, 0.0]))
    assert torch.allclose(targets[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(targets.sum(1), torch.ones(4)) and torch.equal(targets, targets.T)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(4, 8, generator=gen).requires_grad_(True)
    words = torch.randn(3, 8, generator=gen).requires_grad_(True)  # a text tower: one output per distinct caption

    def loss_and_grads(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        text = words[[0, 1, 0, 2]]  # the same caption, the same embedding
        loss = contrastive_loss(5 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T, t)
        return (loss.detach(), *torch.autograd.grad(loss, (image, words)))

    soft, hard = loss_and_grads(targets), loss_and_grads(torch.eye(4))
    for a, b in zip(soft, hard, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # a perfect model: the loss at its floor (the targets' entropy), no gradient
    emb = torch.eye(4)[[0, 1, 0, 3]]
    image = emb.clone().requires_grad_(True)
    soft = contrastive_loss(100 * F.normalize(image, dim=-1) @ emb.T, targets)
    entropy = -(targets * targets.clamp_min(1e-12).log()).sum(1).mean()
    assert abs(float(soft.detach()) - float(entropy)) < 1e-4
    assert torch.autograd.grad(soft, image)[0].abs().max() < 1e-4


def test_hard_negatives_swap_one_word_of_a_group():
    """NegCLIP's hard negatives: per caption and word group, the caption with one group word swapped for another;
    they join the image -> text rows only, where the image must rank its caption above them."""
    groups = [["circle", "square", "star"], ["red", "blue", "green"]]
    captions = ["a red circle above a blue square", "a large star", "a small cyan ring"]

    def gens():
        return [torch.Generator().manual_seed(s) for s in (1, 2, 3)]

    negatives = hard_negatives(captions, groups, gens())
    assert negatives == hard_negatives(captions, groups, gens())  # drawn from each caption's generator
    assert len(negatives) == 3  # two groups in the first caption, one in the second, none in the third
    for neg, own in zip(negatives, [captions[0], captions[0], captions[1]], strict=True):
        changed = [(a, b) for a, b in zip(own.split(), neg.split(), strict=True) if a != b]
        assert len(changed) == 1 and any({*changed[0]} <= set(g) for g in groups)
    texts = captions + negatives
    targets = positive_targets(captions, texts)
    assert targets.shape == (3, 6) and torch.equal(targets[:, 3:], torch.zeros(3, 3))
    # the square part is the loss without negatives; a negative the image prefers raises the loss
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    square = contrastive_loss(logits[:, :3], positive_targets(captions))
    assert contrastive_loss(logits, targets) > square
    assert torch.allclose(contrastive_loss(logits.clone().index_fill_(1, torch.arange(3, 6), -1e4), targets), square)
    with pytest.raises(ValueError, match="config key loss.swap_words: group 0"):
        load_run_config(None, "clip", ['loss.swap_words=[["circle"]]'])


def test_augment_is_per_sample_deterministic_and_leaves_the_input():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    before = x.clone()
    lc = CLIPLossConfig(crop_p=1.0, blur_p=1.0, noise_p=1.0)

    def gens():
        return [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)]

    a, b = augment(x, gens(), lc), augment(x, gens(), lc)
    assert torch.equal(a, b) and torch.equal(x, before) and a.shape == x.shape
    assert a.min() >= -1 and a.max() <= 1 and not torch.equal(a, x)
    assert torch.equal(augment(x, gens(), CLIPLossConfig()), x)  # probabilities 0: the image as it is
    smooth = augment(x, gens(), CLIPLossConfig(blur_p=1.0, blur_sigma=2.0))  # a blur lowers the pixel variance
    assert smooth.var() < x.var()


def test_cut_window_is_exact_for_the_causal_tower():
    cfg = load_run_config(None, "clip").model
    model = build_clip(cfg, 0).eval()
    tok = clip_tokenizer(cfg)
    captions = ["a red circle", "a large blue square at the top left on a white background"]
    ids = window_ids(tok, captions, cfg.text_encoder.eos_token_id)
    assert ids.shape[1] < cfg.text_encoder.max_length
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids), model.encode_text(tok(captions)), atol=1e-5)


def test_pruned_vocabulary_keeps_the_outputs_of_kept_words():
    cfg = load_run_config(None, "clip").model
    model = build_clip(cfg, 0).eval()
    tok = clip_tokenizer(cfg)
    ids = tok(["a red circle", "a blue square"])
    pruned = prune_clip(model, sorted(set(ids.flatten().tolist())))
    assert len(pruned.clip_config.text_encoder.token_ids) < 10
    with torch.no_grad():
        assert torch.allclose(pruned.encode_text(ids), model.encode_text(ids), atol=1e-6)
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        assert torch.equal(pruned.encode_image(pruned.preprocess(x)), model.encode_image(model.preprocess(x)))


def test_training_lowers_the_loss_resumes_bit_for_bit_and_exports(tmp_path, capsys):
    cfg = load_run_config(None, "clip", SETS)
    whole = train_clip(cfg, tmp_path / "whole")
    assert whole == tmp_path / "whole" / CLIP_FILE
    state = load_file(str(tmp_path / "whole" / "checkpoints" / "step_00000006" / "state.safetensors"))

    paused = tmp_path / "paused"
    assert train_clip(cfg, paused, until=4).name == "step_00000004"
    train_clip(cfg, paused, resume=True)
    again = load_file(str(paused / "checkpoints" / "step_00000006" / "state.safetensors"))
    assert set(again) == set(state)
    for key in state:
        if key.startswith(("model.", "ema.", "optim.")):
            assert torch.equal(again[key], state[key]), key

    # the exported file: EMA weights, pruned vocabulary, temperature within the clamp, provenance with zero-shot
    model = load_clip(whole)
    c = model.clip_config
    assert isinstance(c, CLIPConfig) and c.text_encoder.token_ids is not None and len(c.text_encoder.token_ids) < 100
    assert float(model.logit_scale) <= MAX_LOGIT_SCALE + 1e-3
    assert c.provenance["stage"] == "clip" and c.provenance["steps"] == 6
    assert set(c.provenance["zero_shot"]) >= {"shape_accuracy", "colour_accuracy", "both_accuracy"}
    # `daguerre train export` of checkpoint 6 writes the model the run ended with
    out = tmp_path / "exported.safetensors"
    assert main(["train", "export", str(tmp_path / "whole"), "--step", "6", "--out", str(out)]) == 0
    exported, final = load_file(str(out)), load_file(str(whole))
    assert set(exported) == set(final) and all(torch.equal(exported[k], final[k]) for k in final)


def test_a_few_steps_fit_a_batch():
    """Forty steps on 16 captioned shapes images bring the contrastive loss on them well down from log 16."""
    cfg = load_run_config(None, "clip", ["data.size=32"])
    from daguerre.data.shapes import ShapesDataset

    data = ShapesDataset(16, seed=3, size=32)
    items = [data[i] for i in range(16)]
    x = torch.stack([it["image"] for it in items])
    captions = [it["caption"] for it in items]
    model = build_clip(cfg.model, 0).train()
    tok = clip_tokenizer(cfg.model)
    ids = window_ids(tok, captions, cfg.model.text_encoder.eos_token_id)
    targets = positive_targets(captions)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        return contrastive_loss(model.forward_logits(model.preprocess(x), ids), targets)

    first = float(loss().detach())
    for _ in range(40):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert first > 2.0 and float(loss().detach()) < first / 2


@pytest.mark.parametrize(("sets", "match"), [
    (["loss.crop_min=0"], "config key loss.crop_min"),
    (["loss.blur_p=1.5"], "config key loss.blur_p"),
    (["loss.noise_std=-1"], "config key loss.noise_std"),
    (["model.text_encoder.causal=false"], "config key model.text_encoder.causal"),
    (["model.vision.patch_size=7"], "config key model.vision.image_size"),
    (["model.vision.widht=8"], "model.vision.widht; did you mean 'width'"),
    (["sample.zero_shot_images=-1"], "config key sample.zero_shot_images"),
])
def test_config_errors_name_the_key(sets, match):
    with pytest.raises(ValueError, match=match):
        load_run_config(None, "clip", sets)


def test_run_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="config key data.seed"):
        train_clip(load_run_config(None, "clip", SETS + [f"data.seed={HELDOUT_SEED}"]), tmp_path / "a")
    with pytest.raises(ValueError, match="config key train.init_from"):
        train_clip(load_run_config(None, "clip", SETS + ["train.init_from=x.safetensors"]), tmp_path / "b")
    with pytest.raises(ValueError, match=r"config key model.image_mean: .*1-channel"):
        from daguerre.training.config import derive_clip_config

        derive_clip_config(load_run_config(None, "clip", SETS), 1)
    with pytest.raises(ValueError, match="for stage 'clip', but `daguerre train ldm` ran"):
        load_run_config("shapes_clip", "ldm")


def test_the_cli_trains_a_clip(tmp_path):
    out = tmp_path / "run"
    sets = [x for s in SETS + ["train.steps=2", "sample.zero_shot_images=0"] for x in ("--set", s)]
    assert main(["train", "clip", "--out", str(out), *sets]) == 0
    assert load_clip(out / CLIP_FILE).clip_config.provenance["steps"] == 2
