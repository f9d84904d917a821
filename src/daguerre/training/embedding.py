"""`daguerre train embedding`: textual inversion (Gal et al. 2022) on a frozen daguerre or Stable Diffusion model.

A new word (`embedding.word`) gets `embedding.vectors` token vectors of the text encoder's width, started from
the token embeddings of `embedding.init_word` (cycled); everything else stays frozen. In the training captions
the word becomes ids past the vocabulary (`lora.embeddings.EmbeddingTokenizer`), whose vectors the text encoder
reads from `CLIPTextEmbeddings.extra`: the trained parameter itself, so the loss reaches it, and exactly the
mechanism `--embeddings-dir` uses at generation time. The run is `lora.AdapterStage`'s (cached latents, the
stage-2 loss, EMA, resume, grids drawn with the EMA vectors loaded from a file as a user would).

The final file RUN/<word>.safetensors holds `emb_params` (n, width), with the word, step and model in its
metadata; RUN/a1111/<word>.pt is the same vectors in AUTOMATIC1111's `.pt` form (`string_to_param`, plain
tensors and dicts only). Put either in an embeddings folder: the word calls it in prompts.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from .config import RunConfig
from .loop import RunSummary, run
from .lora import AdapterStage, _save_dtype, quiet
from .samples import SAMPLES_DIR

logger = logging.getLogger("daguerre.train")
A1111_DIR = "a1111"


class WordVectors(nn.Module):
    """The trained vectors (n, width) of one word."""

    def __init__(self, vectors: torch.Tensor) -> None:
        super().__init__()
        self.vectors = nn.Parameter(vectors.clone())


def init_vectors(components, word: str, n: int) -> torch.Tensor:
    """(n, width): the token embeddings of `word` (its tokens cycled to n rows); a word the model's vocabulary
    lacks starts at zero, which the log says."""
    te = components.text_encoder
    emb = te.text_model.embeddings
    ids = torch.tensor(components.tokenizer.encode(word), dtype=torch.long)
    if len(ids) == 0:
        raise ValueError(f"config key embedding.init_word: {word!r} has no tokens; give a word")
    rows = ids if emb.row_of is None else emb.row_of[ids]
    table = emb.token_embedding.weight.detach().float()
    vectors = table[rows[torch.arange(n) % len(rows)]]
    if not bool(vectors.abs().sum(-1).gt(0).all()):
        logger.warning("the model's vocabulary lacks (part of) the init word %r: those vectors start at zero", word)
    return vectors


class EmbeddingStage(AdapterStage):
    """`daguerre train embedding` on `loop.run` (module docstring)."""

    name = "embedding"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        if not cfg.embedding.word:
            raise ValueError("config key embedding.word: name the new word the captions use, e.g. "
                             "--set embedding.word=hexagon")
        self.word = cfg.embedding.word
        self.output = f"{self.word}.safetensors"

    def make_adapter(self) -> WordVectors:
        from ..lora.embeddings import EmbeddingTokenizer

        e, comps = self.cfg.embedding, self.components
        if comps.config.text_encoder.frozen:
            raise ValueError(f"model {comps.config.name!r} has a frozen pretrained text encoder without a CLIP token "
                             "table; textual inversion needs a CLIP-style one")
        pattern = re.compile(r"(?<!\w)" + re.escape(self.word) + r"(?!\w)", re.IGNORECASE)
        if not any(pattern.search(c) for c in self.lat.captions):
            raise ValueError(f"config key embedding.word: {self.word!r} is in none of the training captions; write it "
                             "in the captions of the images it stands for")
        start = comps.config.text_encoder.vocab_size
        self.tokenizer = EmbeddingTokenizer(comps.tokenizer, {self.word.lower(): list(range(start, start + e.vectors))})
        return WordVectors(init_vectors(comps, e.init_word, e.vectors))

    def contexts(self, captions: list[str]) -> torch.Tensor:
        from ..pipelines.prompts import encode_weighted

        te = self.components.text_encoder
        vectors = self.adapter.vectors
        te.text_model.embeddings.extra = vectors.view(vectors.shape)  # a view (no parameter of the encoder's): the
        # loss reaches the vectors through it
        return quiet(lambda: encode_weighted(te, self.tokenizer, captions, skip_layers=te.config.skip_layers))

    def applied(self, adapter: nn.Module):
        from ..lora.apply import attach

        folder = self.out / SAMPLES_DIR / "embedding"
        folder.mkdir(parents=True, exist_ok=True)
        write_embedding(adapter.vectors, folder / f"{self.word}.safetensors", {"word": self.word})
        stage = self

        class Loaded:
            def __enter__(self) -> None:
                attach(stage.components, embeddings_dir=folder)

            def __exit__(self, *exc: object) -> None:
                stage.components.adapters = None
                stage.components.text_encoder.text_model.embeddings.extra = None

        return Loaded()

    def export(self, path: Path, models: dict[str, nn.Module], summary: RunSummary) -> None:
        vectors = models[self.name].vectors.detach().to("cpu", _save_dtype(self.cfg))
        meta = {"word": self.word, "step": str(self.cfg.train.steps), "init_word": self.cfg.embedding.init_word,
                "sd_checkpoint": self.base["sha256"][:10], "sd_checkpoint_name": self.base["name"]}
        write_embedding(vectors, path, meta)
        write_a1111(vectors.float(), path.parent / A1111_DIR / f"{self.word}.pt", self.word, self.cfg.train.steps,
                    self.base)


def write_embedding(vectors: torch.Tensor, path: Path, metadata: dict[str, str]) -> Path:
    """{"emb_params": (n, width)} as safetensors."""
    from ..fileio import atomic_save_safetensors

    atomic_save_safetensors({"emb_params": vectors.detach().cpu().contiguous()}, path, metadata)
    return path


def write_a1111(vectors: torch.Tensor, path: Path, word: str, step: int, base: dict[str, str]) -> Path:
    """AUTOMATIC1111's `.pt` embedding: plain dicts, strings, ints and one tensor (loadable with weights_only)."""
    from ..fileio import atomic_path

    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.detach().cpu().contiguous()},
            "name": word, "step": int(step), "sd_checkpoint": base["sha256"][:10], "sd_checkpoint_name": base["name"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def train_embedding(cfg: RunConfig, out: str | Path, *, resume: bool = False, until: int | None = None) -> Path:
    """Train the word of `cfg.embedding` on its frozen `train.init_from` model; returns RUN/<word>.safetensors."""
    return run(EmbeddingStage(cfg), cfg, out, resume=resume, until=until)
