"""Zero-shot accuracy of a CLIP model (Radford et al. 2021, Sec. 3.1.2): each image is labelled with the prompt
whose text embedding has the largest cosine with the image's embedding, among a fixed prompt set.

- Shapes world: held-out single-object scenes (`ShapesDataset` items (HELDOUT_SEED, i), a stream no training
  run draws: training items are (data.seed, i) and the CLIP stage refuses data.seed = HELDOUT_SEED), against
  the prompts of every colour x shape in the world's own grammar ("a red circle", "an orange star", ...).
  Reported: the shape right, the colour right, and both.
- Fashion-MNIST: the test split against "a photo of {noun}" for each class noun of the captions; the class right.
- Any images with captions (a folder's held-out part): image -> text retrieval among their own captions, right
  when the best caption equals the image's own (identical captions count as the same text).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import CLIPConfig
from ..models.clip import CLIPModel
from ..models.tokenizer import CLIPTokenizer

HELDOUT_SEED = 1_000_003  # the shapes world's zero-shot scenes: items (HELDOUT_SEED, i)
BATCH = 128  # images per forward pass
FASHION_TEMPLATE = "a photo of {}"  # one of the Fashion-MNIST caption templates
ZERO_SHOT_KINDS = ("shapes", "fashion_mnist")


def clip_tokenizer(cfg: CLIPConfig) -> CLIPTokenizer:
    """The tokenizer of a CLIP model's text tower (its window length and pad id)."""
    return CLIPTokenizer(max_length=cfg.text_encoder.max_length, pad_token_id=cfg.text_encoder.pad_token_id)


def shape_colour_prompts() -> list[tuple[str, str, str]]:
    """(shape, colour, prompt) for every colour x shape of the shapes world: "a red circle", "an orange star"."""
    from ..data.shapes import COLOURS, SHAPES

    return [(shape, colour, f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}")
            for shape in SHAPES for colour in COLOURS]


@torch.no_grad()
def text_embeddings(model: CLIPModel, tokenizer: CLIPTokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Unit-length text embeddings (N, D), float32."""
    device = model.visual_projection.weight.device
    out = [model.encode_text(tokenizer(list(texts[i:i + BATCH])).to(device)).float()
           for i in range(0, len(texts), BATCH)]
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def image_embeddings(model: CLIPModel, images: torch.Tensor) -> torch.Tensor:
    """Unit-length image embeddings (N, D), float32, of images (N, C, H, W) in [-1, 1] (CLIP's preprocessing)."""
    device = model.visual_projection.weight.device
    out = [model.encode_image(model.preprocess(chunk.to(device))).float() for chunk in images.split(BATCH)]
    return F.normalize(torch.cat(out), dim=-1)


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"zero-shot evaluation needs at least 1 image, got {n}")


def shapes_zero_shot(model: CLIPModel, tokenizer: CLIPTokenizer, n: int = 500, *, size: int | None = None,
                     seed: int = HELDOUT_SEED) -> dict[str, float]:
    """Shape, colour and both right (fractions) on `n` held-out single-object scenes rendered at `size`
    pixels (default: the model's input size), by argmax over `shape_colour_prompts`."""
    from ..data.shapes import ShapesDataset

    _check_n(n)
    prompts = shape_colour_prompts()
    texts = text_embeddings(model, tokenizer, [p for _, _, p in prompts])
    data = ShapesDataset(n, seed=seed, size=size or model.image_size, min_objects=1, max_objects=1)
    items = [data[i] for i in range(n)]
    images = torch.stack([it["image"] for it in items])
    best = (image_embeddings(model, images) @ texts.T).argmax(1).tolist()
    shape_ok = colour_ok = both_ok = 0
    for it, k in zip(items, best, strict=True):
        obj = it["scene"].objects[0]
        shape, colour = prompts[k][0] == obj.shape, prompts[k][1] == obj.colour
        shape_ok, colour_ok, both_ok = shape_ok + shape, colour_ok + colour, both_ok + (shape and colour)
    return {"shape_accuracy": shape_ok / n, "colour_accuracy": colour_ok / n, "both_accuracy": both_ok / n,
            "images": n, "prompts": len(prompts)}


def fashion_zero_shot(model: CLIPModel, tokenizer: CLIPTokenizer, n: int = 1000, *, root: str | Path | None = None,
                      split: str = "test") -> dict[str, float]:
    """Class accuracy on the first `n` images of a Fashion-MNIST split, by argmax over "a photo of {noun}"."""
    from ..data.fashion_mnist import CAPTION_NOUNS, DEFAULT_ROOT, FashionMNIST

    _check_n(n)
    data = FashionMNIST(root or DEFAULT_ROOT, split=split, size=model.image_size, captions=False)
    n = min(n, len(data))
    texts = text_embeddings(model, tokenizer, [FASHION_TEMPLATE.format(noun) for noun in CAPTION_NOUNS])
    items = [data[i] for i in range(n)]
    images = torch.stack([it["image"] for it in items])
    best = (image_embeddings(model, images) @ texts.T).argmax(1)
    labels = torch.tensor([int(it["label"]) for it in items])
    return {"class_accuracy": float((best == labels).float().mean()), "images": n, "prompts": len(CAPTION_NOUNS)}


def retrieval_accuracy(model: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor,
                       captions: Sequence[str]) -> dict[str, float]:
    """Image -> text top-1 among the images' own captions: right when the best caption's text equals the
    image's own (so identical captions are one answer)."""
    _check_n(len(captions))
    sims = image_embeddings(model, images) @ text_embeddings(model, tokenizer, captions).T
    best = sims.argmax(1).tolist()
    right = sum(captions[k] == captions[i] for i, k in enumerate(best))
    return {"retrieval_accuracy": right / len(captions), "images": len(captions)}


def zero_shot(model: CLIPModel, kind: str, n: int, *, root: str | Path | None = None,
              size: int | None = None) -> dict[str, float]:
    """The zero-shot evaluation of `kind` ("shapes" or "fashion_mnist") on `n` held-out images."""
    tokenizer = clip_tokenizer(model.clip_config)
    if kind == "shapes":
        return shapes_zero_shot(model, tokenizer, n, size=size)
    if kind == "fashion_mnist":
        return fashion_zero_shot(model, tokenizer, n, root=root)
    raise ValueError(f"zero-shot evaluation of {kind!r}: choose one of {', '.join(ZERO_SHOT_KINDS)}")
