"""CLIP score (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning"):
how well images agree with their texts, by a CLIP model.

    score(image, text) = 100 * max(cos(E_I(image), E_T(text)), 0)

averaged over the (image, its text) pairs, with E_I and E_T CLIP's projected image and text embeddings
(`models.clip.CLIPModel.encode_image` after `preprocess`, `encode_text` of the text's 77-token window).
Hessel et al. weight the cosine by 2.5; the text-to-image literature and torchmetrics'
`CLIPScore` use 100, as here. torchmetrics clamps the *mean* cosine at 0 rather than each pair's: the
two agree whenever no pair has a negative cosine, the usual case. The number depends on the CLIP model
(its size, its training data): only scores by the same CLIP file compare (the report names it by sha256).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..models.clip import CLIPModel
    from ..models.tokenizer import CLIPTokenizer

CLIP_SCORE_WEIGHT = 100.0  # w of Hessel et al.'s w * max(cos, 0); torchmetrics' and the T2I papers' choice
DEFAULT_BATCH = 16


def pair_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N,) scores of N (image, text) embedding pairs: 100 * max(cos, 0), in float32."""
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(f"need (N, D) image and text embeddings of one shape, got {tuple(image_embeds.shape)} "
                         f"and {tuple(text_embeds.shape)}")
    cos = (F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(-1)
    return CLIP_SCORE_WEIGHT * cos.clamp(min=0)


def clip_tokenizer(model: CLIPModel) -> CLIPTokenizer:
    """The BPE tokenizer of a CLIP model's text tower (its window and padding)."""
    from ..models.tokenizer import CLIPTokenizer

    cfg = model.clip_config.text_encoder
    return CLIPTokenizer(max_length=cfg.max_length, pad_token_id=cfg.pad_token_id)


@torch.no_grad()
def clip_scores(model: CLIPModel, images: torch.Tensor, texts: Sequence[str], *,
                tokenizer: CLIPTokenizer | None = None, batch: int = DEFAULT_BATCH) -> torch.Tensor:
    """(N,) CLIP score of each image (N, C, H, W) in [-1, 1] against its text, `batch` pairs at a time.
    Texts longer than the window are cut (a warning quotes the rest), as CLIP's own tokenizer does."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts: one text per image")
    if batch < 1:
        raise ValueError(f"batch {batch}: give at least 1")
    tokenizer = tokenizer or clip_tokenizer(model)
    device = model.logit_scale.device
    out = []
    for i in range(0, len(texts), batch):
        pixels = model.preprocess(images[i: i + batch].to(device=device, dtype=torch.float32))
        ids = tokenizer(list(texts[i: i + batch])).to(device)
        out.append(pair_scores(model.encode_image(pixels), model.encode_text(ids)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def summarize_scores(scores: torch.Tensor) -> dict[str, Any]:
    """{"mean", "std", "stderr", "n"} of per-pair scores (std with Bessel's correction; 0 for one pair)."""
    n = len(scores)
    if n == 0:
        raise ValueError("no scores to summarize")
    s = scores.double()
    std = s.std().item() if n > 1 else 0.0
    return {"mean": s.mean().item(), "std": std, "stderr": std / math.sqrt(n), "n": n}


class CLIPJudge:
    """A CLIP model that scores an evaluation, with what the report says of it: the spec the user gave,
    the file and its sha256 (None for a folder)."""

    def __init__(self, model: CLIPModel, spec: str, file: str | None = None, sha256: str | None = None):
        self.model, self.spec, self.file, self.sha256 = model, spec, file, sha256
        self.tokenizer = clip_tokenizer(model)

    def scores(self, images: torch.Tensor, texts: Sequence[str], batch: int = DEFAULT_BATCH) -> torch.Tensor:
        return clip_scores(self.model, images, texts, tokenizer=self.tokenizer, batch=batch)

    def report(self, images: torch.Tensor, texts: Sequence[str], kinds: Sequence[str],
               reference: torch.Tensor | None = None, batch: int = DEFAULT_BATCH) -> dict[str, Any]:
        """{"clip": who judged, "all" and each kind: summary of the generated images' scores, and of the
        `reference` images' (real images of the same texts: what a perfect model would score) when given;
        "per_image": the scores}."""
        scores = self.scores(images, texts, batch)
        ref = self.scores(reference, texts, batch) if reference is not None else None
        out: dict[str, Any] = {"clip": {"spec": self.spec, "name": self.model.clip_config.name, "file": self.file,
                                        "sha256": self.sha256},
                               "weight": CLIP_SCORE_WEIGHT}
        for kind in ("all", *dict.fromkeys(kinds)):
            keep = torch.tensor([kind == "all" or k == kind for k in kinds])
            entry = summarize_scores(scores[keep])
            if ref is not None:
                entry["reference"] = summarize_scores(ref[keep])
            out[kind] = entry
        out["per_image"] = [round(s, 4) for s in scores.tolist()]
        return out
