"""Small CNN classifiers trained on real / rendered ground truth: the judges and feature spaces of `daguerre eval`.

The networks share one plain VGG-style trunk (Simonyan & Zisserman 2015: stacks of 3x3 conv + BatchNorm
(Ioffe & Szegedy 2015) + ReLU, 2x2 max-pooling between stages) that ends at a small feature map (8x8 for
the shipped two):

- `FashionClassifier`: 32x32 grayscale -> 10 Fashion-MNIST classes. Its global-average-pooled last
  feature map (128-d) is the feature space for Frechet distance / KID; its softmax gives the Inception
  Score and class adherence.
- `ShapesClassifier`: 64x64 RGB -> per cell of the shapes world's 3x3 grid (`data.shapes.GRID`): empty or
  one of `SHAPES`, its colour (`COLOURS`) and size (`SIZES`); and the background. Cell features are
  read off the 8x8 map at the cell centres (bilinear `grid_sample`), so one shared head judges every
  cell. `predict_scenes` turns the predictions into `Scene`s that `PromptSpec.matches` can judge.
- A folder classifier (`folder_config`): the `FashionClassifier` network for the classes of a folder of the
  user's own images, RGB or grayscale at the folder's size, pooled down to 4-7 pixels
  (`daguerre classifier train --dataset folder`).

A classifier file is safetensors (weights in float16, < 1 MB) whose metadata holds the JSON of its
`ClassifierConfig` and of how it was trained and how accurate it is (`read_metadata`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.shapes import BACKGROUNDS, COLOURS, GRID, REGIONS, SHAPES, SIZES, Scene, ShapeObject

FORMAT = "daguerre-classifier"
FORMAT_VERSION = "1"
KINDS = ("fashion_mnist", "shapes", "folder")
SINGLE_LABEL = ("fashion_mnist", "folder")  # one class per image: softmax, Inception Score, class adherence
EMPTY = "empty"  # the "no object" class of a shapes-world cell (index 0 of the shape head)
CELL_BOX = 0.1  # half-size of a predicted object's box around its cell centre (< half the 0.3 cell pitch)
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights, as PIL's convert("L")
INFERENCE_BATCH = 256  # images per forward pass in features() / probabilities()
BN_EPS = 1e-5


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of a classifier: input format and the (channels, convs) of each trunk stage."""

    kind: str  # "fashion_mnist", "shapes" or "folder"
    in_channels: int = 1
    image_size: int = 32
    stages: tuple[tuple[int, int], ...] = ((32, 1), (64, 2), (128, 2))  # (channels, 3x3 convs); 2x pool between
    classes: tuple[str, ...] = ()  # fashion, folder: class names; shapes: (EMPTY, *SHAPES)
    colours: tuple[str, ...] = ()  # shapes only
    sizes: tuple[str, ...] = ()  # shapes only
    backgrounds: tuple[str, ...] = ()  # shapes only
    cell_hidden: int = 64  # shapes: width of the per-cell head

    @property
    def feature_dim(self) -> int:
        return self.stages[-1][0]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClassifierConfig:
        d = json.loads(text)
        d["stages"] = tuple(tuple(s) for s in d["stages"])
        for key in ("classes", "colours", "sizes", "backgrounds"):
            d[key] = tuple(d.get(key, ()))
        return cls(**d)


def fashion_config() -> ClassifierConfig:
    """32x32 grayscale, three stages at 32, 16 and 8 pixels: ~280 K parameters."""
    from ..data.fashion_mnist import CLASS_NAMES

    return ClassifierConfig(kind="fashion_mnist", in_channels=1, image_size=32, classes=tuple(CLASS_NAMES))


def shapes_config() -> ClassifierConfig:
    """64x64 RGB, four stages at 64, 32, 16 and 8 pixels (receptive field 54 px): ~320 K parameters."""
    return ClassifierConfig(
        kind="shapes", in_channels=3, image_size=64, stages=((16, 1), (48, 1), (96, 1), (128, 2)),
        classes=(EMPTY, *SHAPES), colours=tuple(COLOURS), sizes=SIZES, backgrounds=BACKGROUNDS,
    )


def folder_config(classes: list[str] | tuple[str, ...], channels: int, size: int, width: int = 32) -> ClassifierConfig:
    """A folder's classes at `size` pixels: stages of `width`, 2 `width`, ... (at most 8 `width`) channels,
    halving the map while it stays >= 4 pixels (32 px: 32, 16, 8, 4), one conv per stage but two in the last
    two; at width 32 and 32 px RGB, ~1.1 M parameters."""
    if len(classes) < 2 or channels not in (1, 3) or size < 4 or width < 1:
        raise ValueError(f"a folder classifier needs >= 2 classes, 1 or 3 channels, a size >= 4 and a width >= 1; "
                         f"got {len(classes)} classes, {channels} channels, size {size}, width {width}")
    pools = 0
    while size // 2 ** (pools + 1) >= 4:
        pools += 1
    n = pools + 1
    stages = tuple((min(width * 2**k, 8 * width), 2 if k >= n - 2 and n > 1 else 1) for k in range(n))
    return ClassifierConfig(kind="folder", in_channels=channels, image_size=size, stages=stages,
                            classes=tuple(classes))


CONFIGS = {"fashion_mnist": fashion_config, "shapes": shapes_config}  # the shipped classifiers' networks


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.ReLU(inplace=True)


class Trunk(nn.Module):
    """Stages of 3x3 conv blocks with 2x2 max-pooling between them: (B, C, H, W) -> (B, C', H/2^(S-1), ...)."""

    def __init__(self, in_channels: int, stages: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for k, (cout, convs) in enumerate(stages):
            if k:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs):
                layers.append(ConvBlock(cin, cout))
                cin = cout
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class FashionClassifier(nn.Module):
    """Trunk -> global average pool (the features) -> linear -> class logits."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = Trunk(config.in_channels, config.stages)
        self.head = nn.Linear(config.feature_dim, len(config.classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, K)


class ShapesClassifier(nn.Module):
    """Trunk -> features at the 9 cell centres -> shared per-cell head; pooled features -> background."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        d = config.feature_dim
        self.trunk = Trunk(config.in_channels, config.stages)
        n_out = len(config.classes) + len(config.colours) + len(config.sizes)
        self.cell_head = nn.Sequential(nn.Conv2d(d, config.cell_hidden, 1), nn.ReLU(inplace=True),
                                       nn.Conv2d(config.cell_hidden, n_out, 1))
        self.background_head = nn.Linear(d, len(config.backgrounds))
        g = torch.tensor([2 * c - 1 for c in GRID], dtype=torch.float32)  # image fractions -> grid_sample's [-1, 1]
        ys, xs = torch.meshgrid(g, g, indexing="ij")
        self.register_buffer("cell_grid", torch.stack([xs, ys], dim=-1)[None], persistent=False)  # (1, 3, 3, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"shape": (B, 9, 1 + shapes), "colour": (B, 9, colours), "size": (B, 9, 2), "background": (B, 2),
        "features": (B, D)} with cells in row-major order (`REGIONS`)."""
        fmap = self.trunk(x)  # (B, D, 8, 8)
        b = fmap.shape[0]
        grid = self.cell_grid.to(fmap.dtype).expand(b, -1, -1, -1)
        cells = F.grid_sample(fmap, grid, mode="bilinear", align_corners=False)  # (B, D, 3, 3)
        out = self.cell_head(cells).flatten(2).transpose(1, 2)  # (B, 9, n_out)
        ns, nc = len(self.config.classes), len(self.config.colours)
        pooled = fmap.mean(dim=(2, 3))  # (B, D)
        return {"shape": out[..., :ns], "colour": out[..., ns:ns + nc], "size": out[..., ns + nc:],
                "background": self.background_head(pooled), "features": pooled}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))


def build_classifier(config: ClassifierConfig) -> nn.Module:
    if config.kind not in KINDS:
        raise ValueError(f"unknown classifier kind {config.kind!r}; daguerre has {', '.join(KINDS)}")
    return FashionClassifier(config) if config.kind in SINGLE_LABEL else ShapesClassifier(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- files -----------------------------------------------------------------------------------------

@dataclass
class ClassifierFile:
    """What a classifier file says about itself besides its weights."""

    config: ClassifierConfig
    training: dict[str, Any] = field(default_factory=dict)  # data, seed, steps, time, command
    accuracy: dict[str, float] = field(default_factory=dict)  # per head, on held-out data


def save_classifier(model: nn.Module, path: str | Path, training: dict[str, Any], accuracy: dict[str, float]) -> None:
    """Write the weights (float16) and the metadata header atomically."""
    from ..fileio import atomic_save_safetensors

    config: ClassifierConfig = model.config
    tensors = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": config.kind,
                "config": config.to_json(), "training": json.dumps(training, sort_keys=True),
                "accuracy": json.dumps(accuracy, sort_keys=True)}
    atomic_save_safetensors(tensors, path, metadata=metadata, dtype=torch.float16)


def read_metadata(path: str | Path) -> ClassifierFile:
    """The config, training record and accuracy of a classifier file (ValueError if it is not one)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier file {path}; train one with `daguerre classifier train`")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a daguerre classifier (no '{FORMAT}' metadata); make one with "
                         "`daguerre classifier train`")
    try:
        return ClassifierFile(ClassifierConfig.from_json(meta["config"]), json.loads(meta.get("training", "{}")),
                              json.loads(meta.get("accuracy", "{}")))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt classifier metadata ({e})") from None


def load_classifier(path: str | Path, device: torch.device | str | None = None) -> tuple[nn.Module, ClassifierFile]:
    """The network (float32, eval mode, on `device`) and its metadata; every weight must be present."""
    from safetensors.torch import load_file

    info = read_metadata(path)
    model = build_classifier(info.config)
    tensors = load_file(str(path), device="cpu")
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    return model.to(device).eval(), info


# --- inputs ----------------------------------------------------------------------------------------

def prepare(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] -> (N, channels, size, size) float32: RGB <-> gray (BT.601 luma /
    repetition), then a bilinear resize (antialiased when shrinking) if the size differs."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 3 and channels == 1:
        w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * w).sum(dim=1, keepdim=True)
    elif x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > size or x.shape[-2] > size)
    return x.contiguous()


# --- the extractor interface (daguerre.metrics.extractors.FeatureExtractor) ------------------------

class ClassifierExtractor:
    """A loaded classifier as a `FeatureExtractor`: `features` (pooled penultimate layer), `probabilities`
    (fashion, folder: class softmax; shapes: None, see docs/evaluation.md), and the shapes world's
    `predict_scenes`."""

    def __init__(self, model: nn.Module, info: ClassifierFile, sha256: str, path: str | Path | None = None) -> None:
        self.model, self.info, self.sha256, self.path = model, info, sha256, path
        self.config: ClassifierConfig = info.config
        self.kind = self.config.kind
        self.name = {"fashion_mnist": "fashion-classifier", "shapes": "shapes-classifier"}.get(self.kind,
                                                                                               "folder-classifier")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _map(self, images: torch.Tensor, fn) -> list:
        out = []
        for start in range(0, images.shape[0], INFERENCE_BATCH):
            x = prepare(images[start:start + INFERENCE_BATCH].to(self.device), self.config.in_channels,
                        self.config.image_size)
            out.append(fn(x))
        return out

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, D) float32 pooled features."""
        return torch.cat(self._map(images, lambda x: self.model.features(x).float()))

    def probabilities(self, images: torch.Tensor) -> torch.Tensor | None:
        """Fashion, folder: (N, K) class probabilities; shapes: None (no single class per image)."""
        if self.kind not in SINGLE_LABEL:
            return None
        return torch.cat(self._map(images, lambda x: self.model(x).float().softmax(-1)))

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Shapes: argmax per head, {"shape": (N, 9), "colour": (N, 9), "size": (N, 9), "background": (N,)}."""
        if self.kind != "shapes":
            raise ValueError(f"predict() is for the shapes classifier; this one is {self.kind}")
        parts = self._map(images, lambda x: {k: v.argmax(-1) for k, v in self.model(x).items() if k != "features"})
        return {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]} if parts else {}

    def predict_scenes(self, images: torch.Tensor) -> list[Scene]:
        """The scene each image shows, as the classifier sees it (see `scenes_from_predictions`)."""
        return scenes_from_predictions(self.predict(images), self.config)


def scenes_from_predictions(pred: dict[str, torch.Tensor], config: ClassifierConfig) -> list[Scene]:
    """Per-cell predictions -> `Scene`s: one object per non-empty cell, placed at the cell centre with a box
    of half-size `CELL_BOX`. The boxes of two different rows (columns) never overlap and those of one
    row (column) always do, so `relation_holds` (and `PromptSpec.matches`) reduce to the cells' order."""
    scenes = []
    for i in range(pred["shape"].shape[0]):
        objects = []
        for cell in range(len(REGIONS)):
            k = int(pred["shape"][i, cell])
            if k == 0:
                continue
            x, y = GRID[cell % 3], GRID[cell // 3]
            colour, size = config.colours[int(pred["colour"][i, cell])], config.sizes[int(pred["size"][i, cell])]
            box = (x - CELL_BOX, y - CELL_BOX, x + CELL_BOX, y + CELL_BOX)
            objects.append(ShapeObject(config.classes[k], colour, size, REGIONS[cell], (x, y), box))
        scenes.append(Scene(tuple(objects), config.backgrounds[int(pred["background"][i])]))
    return scenes


def scene_targets(scenes: list[Scene], config: ClassifierConfig) -> dict[str, torch.Tensor]:
    """Ground-truth labels of rendered scenes: {"shape": (N, 9) (0 = empty), "colour", "size" (N, 9),
    -100 (ignored by cross_entropy) in empty cells, "background": (N,)}."""
    n = len(scenes)
    shape = torch.zeros(n, len(REGIONS), dtype=torch.long)
    colour = torch.full((n, len(REGIONS)), -100, dtype=torch.long)
    size = torch.full((n, len(REGIONS)), -100, dtype=torch.long)
    background = torch.zeros(n, dtype=torch.long)
    for i, scene in enumerate(scenes):
        background[i] = config.backgrounds.index(scene.background)
        for obj in scene.objects:
            cell = REGIONS.index(obj.region)
            shape[i, cell] = config.classes.index(obj.shape)
            colour[i, cell] = config.colours.index(obj.colour)
            size[i, cell] = config.sizes.index(obj.size)
    return {"shape": shape, "colour": colour, "size": size, "background": background}
