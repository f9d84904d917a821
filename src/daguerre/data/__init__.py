"""Datasets for training and evaluation: the shapes world, Fashion-MNIST, folders of your own images.

Every dataset returns dicts with `image` (C, H, W) float in [-1, 1] and `caption` (str; "" means
unconditional), plus `label` (int) where there are classes and `scene` for the shapes world. Batch
them with `collate`. Nothing here downloads anything: see docs/data.md.
"""

from .fashion_mnist import CLASS_NAMES, FashionMNIST, read_idx
from .folder import ImageFolder
from .shapes import (
    EvalPrompt,
    ObjectSpec,
    PromptSpec,
    Relation,
    Scene,
    ShapeObject,
    ShapesDataset,
    caption,
    parse_caption,
    render,
    sample_prompts,
    sample_scene,
)
from .transforms import ImageTransform, collate, to_tensor

__all__ = [
    "CLASS_NAMES", "EvalPrompt", "FashionMNIST", "ImageFolder", "ImageTransform", "ObjectSpec", "PromptSpec",
    "Relation", "Scene", "ShapeObject", "ShapesDataset", "caption", "collate", "parse_caption", "read_idx",
    "render", "sample_prompts", "sample_scene", "to_tensor",
]
