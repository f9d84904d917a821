"""A1111 prompt syntax: emphasis parsing against a table of AUTOMATIC1111's results, 75-token chunking
with the comma backtrack and BREAK, and weighted encoding against the plain text encoder.

The expected runs are what AUTOMATIC1111's `prompt_parser.parse_prompt_attention` returns (its own
doctest examples are the first rows), with runs of empty text left out (A1111 keeps some, e.g. around
a lone BREAK; they hold no tokens).
"""

from __future__ import annotations

import pytest
import torch

from daguerre.config import TextEncoderConfig
from daguerre.models.text_encoder import CLIPTextEncoder
from daguerre.models.tokenizer import CLIPTokenizer
from daguerre.pipelines.prompts import (
    CHUNK_TOKENS,
    COMMA_BACKTRACK,
    encode_weighted,
    parse_emphasis,
    tokenize_chunks,
)

R = 1.1  # (text)
S = 1 / 1.1  # [text]

EMPHASIS_TABLE = [
    # A1111's doctest examples
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.3 * R * R), (" ", R), ("on", 1.0), (" a ", R), ("hill", 0.5 * R),
        (", sun, ", R), ("sky", R ** 4), (".", R),
    ]),
    # nesting multiplies
    ("((a))", [("a", R * R)]),
    ("[[a]]", [("a", S * S)]),
    ("(a [b])", [("a ", R), ("b", 1.0)]),
    ("((a:1.5) b)", [("a", 1.5 * R), (" b", R)]),
    # explicit weights
    ("(a:1.5)", [("a", 1.5)]),
    ("(a:0.5) b", [("a", 0.5), (" b", 1.0)]),
    ("x (a:-0.5) y", [("x ", 1.0), ("a", -0.5), (" y", 1.0)]),
    ("(a:+1.25)", [("a", 1.25)]),
    ("(a: 1.5 )", [("a", 1.5)]),  # A1111's pattern allows spaces around the number
    ("(a:.5)", [("a", 0.5)]),
    # unclosed brackets apply to the end
    ("a (b [c", [("a ", 1.0), ("b ", R), ("c", R * S)]),
    ("[a", [("a", S)]),
    # unmatched closing brackets are text
    ("a) b]", [("a) b]", 1.0)]),
    ("a ((b)) c)", [("a ", 1.0), ("b", R * R), (" c)", 1.0)]),
    # escapes
    ("\\(a\\)", [("(a)", 1.0)]),
    ("(\\(a\\))", [("(a)", R)]),
    ("\\[a\\] \\\\ b", [("[a] \\ b", 1.0)]),
    # colons that are not weights
    ("(a: b)", [("a: b", R)]),
    ("a:1.5)", [("a:1.5)", 1.0)]),  # no open round bracket: the ')' is text too
    ("[a:1.5]", [("a:1.5", S)]),  # weights only close round brackets
    ("(a:1.5", [("a:1.5", R)]),
    ("style: oil, time: 5:30", [("style: oil, time: 5:30", 1.0)]),
    ("(a:b:1.2)", [("a:b", 1.2)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("BREAK", -1.0)]),
    ("aBREAK b, BREAKfast", [("aBREAK b, BREAKfast", 1.0)]),  # only the whole word
    ("(a)BREAK(b)", [("a", R), ("BREAK", -1.0), ("b", R)]),
    # empty
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
]


def _runs(runs: list) -> list[tuple[str, float]]:
    return [(t, w) for t, w in runs if t != ""] or [("", 1.0)]


@pytest.mark.parametrize("prompt,expected", EMPHASIS_TABLE, ids=[p or "<empty>" for p, _ in EMPHASIS_TABLE])
def test_parse_emphasis_matches_a1111(prompt, expected):
    got = _runs(parse_emphasis(prompt))
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_lone_backslash_is_dropped_as_in_a1111():
    assert _runs(parse_emphasis("a \\ b")) == [("a  b", 1.0)]


def test_malformed_weight_is_text_not_an_error():
    assert _runs(parse_emphasis("(a:1.2.3)")) == [("a:1.2.3", pytest.approx(R))]  # A1111 raises here


# --- chunking ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def text_encoder() -> CLIPTextEncoder:
    torch.manual_seed(0)
    return CLIPTextEncoder(TextEncoderConfig(width=32, layers=2, heads=2, mlp_dim=64)).eval()


def _body(chunk, tok) -> list[int]:
    """The prompt tokens of a chunk: between the start token and the first end token."""
    assert chunk.ids[0] == tok.bos_token_id and len(chunk.ids) == CHUNK_TOKENS + 2 == len(chunk.weights)
    return chunk.ids[1:chunk.ids.index(tok.eos_token_id)]


@pytest.mark.parametrize("prompt", ["", "a cat", "a photograph of an astronaut riding a horse, 4k, detailed",
                                    "tokens " * 75])
def test_plain_prompt_tokenizes_like_the_tokenizer(tok, prompt):
    chunks = tokenize_chunks(tok, prompt)
    assert len(chunks) == 1
    assert chunks[0].ids == tok([prompt])[0].tolist()
    assert chunks[0].weights == [1.0] * (CHUNK_TOKENS + 2)


def test_200_tokens_make_3_chunks_breaking_after_a_near_comma(tok):
    cat, dog, comma = tok.encode("cat")[0], tok.encode("dog")[0], tok.encode(",")[0]
    prompt = " ".join(["cat"] * 65) + ", " + " ".join(["dog"] * 134)
    assert len(tok.encode(prompt)) == 200
    chunks = tokenize_chunks(tok, prompt)
    assert len(chunks) == 3
    # the comma is 10 tokens before the 75-token boundary: the chunk ends after it
    assert _body(chunks[0], tok) == [cat] * 65 + [comma]
    assert _body(chunks[1], tok) == [dog] * 75
    assert _body(chunks[2], tok) == [dog] * 59
    for c in chunks:  # <start> tokens <end> then padding, as the plain tokenizer lays out one window
        n = len(_body(c, tok))
        assert c.ids[n + 1] == tok.eos_token_id and c.ids[n + 2:] == [tok.pad_token_id] * (CHUNK_TOKENS - n)


@pytest.mark.parametrize("comma_at,breaks", [(CHUNK_TOKENS - COMMA_BACKTRACK, True),
                                             (CHUNK_TOKENS - COMMA_BACKTRACK - 1, False)])
def test_comma_backtrack_limit(tok, comma_at, breaks):
    prompt = " ".join(["cat"] * comma_at) + ", " + " ".join(["dog"] * 100)
    first = _body(tokenize_chunks(tok, prompt)[0], tok)
    assert len(first) == (comma_at + 1 if breaks else CHUNK_TOKENS)


def test_long_prompt_without_commas_cuts_at_75(tok):
    chunks = tokenize_chunks(tok, "cat " * 160)
    assert [len(_body(c, tok)) for c in chunks] == [75, 75, 10]


def test_break_starts_a_new_chunk(tok):
    chunks = tokenize_chunks(tok, "a red cat BREAK a (blue:1.4) dog")
    assert len(chunks) == 2
    assert _body(chunks[0], tok) == tok.encode("a red cat")
    assert _body(chunks[1], tok) == tok.encode("a blue dog")
    assert chunks[1].weights[1:4] == pytest.approx([1.0, 1.4, 1.0])


def test_weights_land_on_their_tokens(tok):
    chunk = tokenize_chunks(tok, "a (red:1.5) [cat], (photorealistic:1.3)")[0]
    ids = tok.encode("a red cat, photorealistic")
    assert _body(chunk, tok) == ids
    n = len(ids)
    expected = [1.0, 1.5, S, 1.0] + [1.3] * (n - 4)  # "photorealistic" is two tokens, both weighted
    assert chunk.weights[1:n + 1] == pytest.approx(expected)
    assert chunk.weights[0] == 1.0 and chunk.weights[n + 1:] == [1.0] * (CHUNK_TOKENS + 1 - n)


# --- weighted encoding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("skip", [0, 1])
def test_encode_weighted_with_unit_weights_is_plain_encoding(tok, text_encoder, skip):
    prompts = ["a photograph of a cat", ""]
    with torch.no_grad():
        got = encode_weighted(text_encoder, tok, prompts, skip_layers=skip)
        plain = text_encoder(tok(prompts), skip_layers=skip, output_pooled=False).hidden
    assert got.shape == (2, 77, 32)
    torch.testing.assert_close(got, plain, atol=0, rtol=0)


def test_encode_weighted_scales_tokens_and_keeps_the_mean(tok):
    """A1111: z * w per token, then z * (mean before / mean after) per chunk."""
    torch.manual_seed(0)
    text_encoder = CLIPTextEncoder(TextEncoderConfig(width=32, layers=2, heads=2, mlp_dim=64)).eval()
    with torch.no_grad():  # a final LayerNorm with a bias, as trained ones have: the mean is well away from 0
        text_encoder.text_model.final_layer_norm.bias.uniform_(0.2, 0.6)
        got = encode_weighted(text_encoder, tok, ["a (red:1.5) [cat]"], skip_layers=0)[0]
        plain = text_encoder(tok(["a red cat"]), skip_layers=0, output_pooled=False).hidden[0]  # same token ids
    w = torch.ones(77)
    w[2], w[3] = 1.5, S
    weighted = plain * w[:, None]
    expected = weighted * (plain.mean() / weighted.mean())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain)


def test_encode_weighted_long_prompts_concatenate_chunks(tok, text_encoder):
    long = " ".join(["cat"] * 65) + ", " + " ".join(["dog"] * 134)
    with torch.no_grad():
        got = encode_weighted(text_encoder, tok, [long, "a dog"], skip_layers=0)
        chunks = tokenize_chunks(tok, long)
        ids = torch.tensor([c.ids for c in chunks])
        per_chunk = text_encoder(ids, skip_layers=0, output_pooled=False).hidden  # (3, 77, d)
        short = text_encoder(tok(["a dog", "", ""]), skip_layers=0, output_pooled=False).hidden
    assert got.shape == (2, 3 * 77, 32)
    torch.testing.assert_close(got[0], per_chunk.reshape(-1, 32), atol=1e-6, rtol=0)
    # a shorter prompt is padded with chunks of the empty prompt
    torch.testing.assert_close(got[1], short.reshape(-1, 32), atol=1e-6, rtol=0)
