"""CLIPTokenizer against transformers' CLIP tokenizer built offline from the same vocabulary (tests/clip_oracle.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from importlib import resources

import pytest
import torch

from clip_oracle import BOS, EOS, clip_clean, hf_clip_tokenizer, oracle_batch, oracle_ids, write_clip_vocab
from daguerre.models.tokenizer import CLIPTokenizer, bytes_to_unicode

VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # assets/clip_bpe/PROVENANCE.md

LONG = ", ".join(["a highly detailed matte painting of a castle on a cliff at sunset"] * 12)
CORPUS = [
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT, riding a horse!!! (masterpiece:1.2), [bad hands]",
    "don't you'll I'm we've they're she'd it's O'Neil's 'quoted' rock'n'roll",
    "SHE'S HERE, WE'LL GO; 's 't 're 've 'm 'll 'd",
    "café naïve résumé Ångström São Paulo Dvořák Łódź straße İstanbul",
    "ΟΔΟΣ Σοφίας, Москва, Ελληνικά, עברית, العربية, हिन्दी",
    "東京の夜景、高精細 和風 漢字 한국어 텍스트",
    "1girl 2boys 1024x768 3.14159 $100 50% 2nd #1 ٣٤ ①② ²",
    "emoji 😀🎉👍🏽 👩‍🚀 ❤️ ★☆ → ← ™ ©",
    "fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;x&#39; &amp;amp; &nbsp;space &#x263A;",
    "  many   spaces\tand\ttabs\n\nnew lines \r\n and\u00a0no-break\u3000ideographic  ",
    "symbols: @#$%^&*()_+-=[]{}|;:,.<>/?`~ \\ \" '' ... --- !!!???",
    "word<|endoftext|>after <|startoftext|> inside",
    "e\u0301 a\u0308 decomposed accents ﬁ ligature ＡＢＣ full-width",
    "x\x1cy control separators \x07 bell \x00 null",
    "",
    "   ",
    LONG,
]


def test_vendored_vocabulary_is_the_provenance_file():
    gz = resources.files("daguerre") / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
    assert hashlib.sha256(gz.read_bytes()).hexdigest() == VOCAB_SHA256


def test_vocabulary_and_special_ids_match_reference():
    tok, ref = CLIPTokenizer(), hf_clip_tokenizer()
    assert tok.vocab == ref.get_vocab()
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49408, 49406, 49407, 49407)
    assert (ref.bos_token_id, ref.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    chars = bytes_to_unicode()
    assert sorted(chars) == list(range(256)) and len(set(chars.values())) == 256
    # The oracle is built here too, so pin the vocabulary order to published facts: "!" is id 0 (SD 2's pad
    # token) and openai/clip-vit-large-patch14 encodes "a photo of a cat" as below.
    assert tok.vocab["!"] == 0
    assert tok("a photo of a cat", max_length=8)[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_reference(text):
    assert CLIPTokenizer().encode(text) == oracle_ids(text)


def test_random_strings_match_reference():
    """Random mixes of every character class the pre-tokenisation pattern distinguishes."""
    pool = ("abcXYZ" "ÀÉÎõüßΣσςΟΔİı" "東京日本語한" "😀🎉👍🏽\u200d♀️" "0123456789٣①²" "!?.,;:'\"-()[]<>/&#;"
            " \t\n\u00a0\u3000\x1c\x85\u2028" "ﬁＡ" "e\u0301a\u0308")
    rng = random.Random(0)
    tok = CLIPTokenizer()
    for _ in range(1500):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 24)))
        if rng.random() < 0.2:
            text += rng.choice([" &amp;amp; ", "<|endoftext|>", " I'LL 'S ", "&lt;", "'re's"])
        assert tok.encode(text) == oracle_ids(text), repr(text)


def test_batch_matches_reference_padding_and_truncation():
    tok = CLIPTokenizer()
    ids = tok(CORPUS)
    assert ids.dtype == torch.long and ids.shape == (len(CORPUS), 77)
    assert ids.tolist() == oracle_batch(CORPUS)
    assert ids[-1, -1] == tok.eos_token_id  # the long prompt keeps its end token last
    assert tok("", max_length=5).tolist() == [[49406, 49407, 49407, 49407, 49407]]
    assert tok(["a cat", "a dog"], max_length=8).tolist() == oracle_batch(["a cat", "a dog"], max_length=8)


def test_sd2_padding_with_exclamation_mark():
    tok = CLIPTokenizer(pad_token_id=0)
    assert tok.pad_token == "!" and tok.pad_token_id == 0
    prompts = ["a cat", LONG, ""]
    assert tok(prompts).tolist() == oracle_batch(prompts, pad_token="!")


def test_truncation_warns_with_dropped_text(caplog):
    tok = CLIPTokenizer()
    prompt = " ".join(["cat"] * 75 + ["zebra", "unicorn"])
    with caplog.at_level(logging.WARNING, logger="daguerre"):
        ids = tok(prompt)
    assert ids[0, 76] == tok.eos_token_id and ids[0, 75] == tok.encode("cat")[0]
    assert "zebra unicorn" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="daguerre"):
        tok(" ".join(["cat"] * 75))  # exactly fits: no warning
    assert caplog.text == ""


def test_no_truncation_pads_to_longest():
    tok = CLIPTokenizer()
    ids = tok([LONG, "a cat"], truncate=False)
    n = len(tok.encode(LONG)) + 2
    assert n > 77 and ids.shape == (2, n)
    assert ids[0].tolist() == [tok.bos_token_id, *tok.encode(LONG), tok.eos_token_id]
    assert ids[1, 4:].eq(tok.pad_token_id).all()


def test_decode():
    tok = CLIPTokenizer()
    assert tok.decode(tok.encode("A Photo of  an astronaut, riding!")) == "a photo of an astronaut , riding !"
    assert tok.decode(tok.encode("café 東京 😀 &amp;")) == "café 東京 😀 &"
    assert tok.decode(tok("a cat")[0]) == "a cat"
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.encode(tok.decode(ids)) == ids or "<|" in text or "'" in text, repr(text)
    with pytest.raises(ValueError, match="49408"):
        tok.decode([49408])


def test_save_dir_and_from_dir_round_trip(tmp_path):
    from transformers import CLIPTokenizer as HFTokenizer

    for pad_id in (49407, 0):
        tok = CLIPTokenizer(pad_token_id=pad_id)
        folder = tmp_path / str(pad_id)
        tok.save_dir(folder)
        back = CLIPTokenizer.from_dir(folder)
        assert (back.vocab, back.merges, back.max_length) == (tok.vocab, tok.merges, tok.max_length)
        assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (49406, 49407, pad_id)
        assert torch.equal(back(CORPUS), tok(CORPUS))
        ref = HFTokenizer.from_pretrained(str(folder))  # transformers reads what we wrote
        assert ref.pad_token_id == pad_id
        # transformers treats a "!" pad token as a special token inside prompts too ("!!!" -> 0 0 0), which
        # OpenCLIP, SD 2's training tokenizer, does not: compare on prompts without "!" in that case.
        texts = [t for t in CORPUS if pad_id != 0 or "!" not in t]
        expected = ref([clip_clean(t) for t in texts], padding="max_length", max_length=77, truncation=True)
        assert tok(texts).tolist() == expected["input_ids"]


def test_from_dir_reads_transformers_folders(tmp_path):
    """A bare vocab.json + merges.txt folder, and a diffusers SD 2 folder whose pad token is "!"."""
    write_clip_vocab(tmp_path)
    tok = CLIPTokenizer.from_dir(tmp_path)
    assert tok.vocab == CLIPTokenizer().vocab and tok.pad_token_id == 49407 and tok.max_length == 77
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": BOS, "lstrip": False}, "eos_token": EOS, "unk_token": EOS, "pad_token": "!"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"}))
    tok = CLIPTokenizer.from_dir(tmp_path)
    assert tok.pad_token_id == 0 and tok.bos_token_id == 49406
    assert tok(["a cat"]).tolist() == oracle_batch(["a cat"], pad_token="!")


def test_from_dir_reads_tokenizer_json_only(tmp_path):
    hf_clip_tokenizer().save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    tok = CLIPTokenizer.from_dir(tmp_path)
    assert tok.vocab == CLIPTokenizer().vocab and tok.merges == CLIPTokenizer().merges
    assert tok(CORPUS).tolist() == oracle_batch(CORPUS)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CLIPTokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.gz"):
        CLIPTokenizer(tmp_path / "missing.gz")
    with pytest.raises(ValueError, match="pad_token_id 50000"):
        CLIPTokenizer(pad_token_id=50000)
    with pytest.raises(ValueError, match="max_length 1"):
        CLIPTokenizer()("a cat", max_length=1)


def test_long_and_repetitive_words_match_reference():
    """The heap-ordered merges (O(L log L)) give the classic loop's result on the words where order matters most:
    long runs of one letter (overlapping pairs), repeats of common pairs, and long random words."""
    rng = random.Random(1)
    tok = CLIPTokenizer()
    words = ["a" * 301, "ab" * 150, "aaab" * 60, "lalalalalal" * 20, "the" * 100, "1" * 257, "!!" * 99,
             "".join(rng.choice("etaoinshrdlucmfw") for _ in range(600)), "🎉" * 40 + "x"]
    for word in words:
        assert tok.encode(word) == oracle_ids(word), word[:40]
