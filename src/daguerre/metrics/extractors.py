"""The feature-extractor interface of `daguerre eval`, and `load_extractor` to pick one by name.

Frechet distance and KID compare two sets of images in the feature space of a frozen network; the
Inception Score needs its class probabilities. Anything with the `FeatureExtractor` shape will do:
daguerre's own classifiers (`metrics.classifiers`, shipped in `daguerre/assets/classifiers/`) or
Inception-v3 from weights the user supplies (`metrics.inception`, docs/inception.md), or the image tower of
a CLIP (`CLIPImageExtractor`: a CLIP trained on a folder's captions with `daguerre train clip`). Its `sha256`
is printed with every score, so scores from different feature spaces are never mixed up.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from .classifiers import ClassifierExtractor
    from .clip_score import CLIPJudge

DATASETS = ("shapes", "fashion_mnist")
CLASSIFIER_FILES = {"shapes": "shapes.safetensors", "fashion_mnist": "fashion.safetensors"}
DEFAULT = "default"
INCEPTION_PREFIX = "inception:"


@runtime_checkable
class FeatureExtractor(Protocol):
    """A frozen network that maps images to features (and maybe class probabilities)."""

    name: str  # e.g. "fashion-classifier", "shapes-classifier", "inception-v3"
    sha256: str  # of the weights file; printed with every score

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float in [-1, 1] -> (N, D) float32."""
        ...

    def probabilities(self, images: torch.Tensor) -> torch.Tensor | None:
        """(N, K) class probabilities, or None if the network has no meaningful classes."""
        ...


def check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return dataset


def default_classifier_path(dataset: str) -> Path:
    """Where the shipped classifier of `dataset` lives (the file may be missing in a source checkout)."""
    return Path(str(resources.files("daguerre") / "assets" / "classifiers" / CLASSIFIER_FILES[check_dataset(dataset)]))


def load_classifier_extractor(spec: str, dataset: str, device: torch.device | str | None = None
                              ) -> ClassifierExtractor:
    """A daguerre classifier for `dataset`: "default" (the shipped one) or a path to a classifier file."""

    check_dataset(dataset)
    path = default_classifier_path(dataset) if spec == DEFAULT else Path(spec).expanduser()
    if not path.is_file() and spec == DEFAULT:
        raise FileNotFoundError(
            f"the shipped {dataset} classifier {path} is missing; train it with `daguerre classifier train "
            f"--dataset {dataset} --out {path}` (docs/evaluation.md) or pass a classifier file"
        )
    extractor = load_classifier_file(path, device)
    if extractor.kind != dataset:
        raise ValueError(f"classifier {path} was trained on {extractor.kind}, not {dataset}: "
                         f"give a {dataset} classifier")
    return extractor


def load_classifier_file(path: str | Path, device: torch.device | str | None = None) -> ClassifierExtractor:
    """The classifier file at `path` (any kind) as an extractor."""
    from ..weights.io import file_hash
    from .classifiers import ClassifierExtractor, load_classifier

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no classifier file {str(path)!r}; give a path made by `daguerre classifier "
                                f"train`, '{DEFAULT}', or '{INCEPTION_PREFIX}PATH'")
    model, info = load_classifier(path, device)
    return ClassifierExtractor(model, info, file_hash(path), path)


def load_inception_extractor(spec: str, device: torch.device | str | None = None) -> FeatureExtractor:
    """Inception-v3 from the weights file of an "inception:PATH" spec (docs/inception.md)."""
    path = spec[len(INCEPTION_PREFIX):]
    if not path:
        raise ValueError(f"--extractor {spec!r} names no file; write inception:PATH/TO/WEIGHTS")
    if not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"no Inception-v3 weights file {path!r} (from --extractor {spec!r}); "
                                "see docs/inception.md for where to get one")
    try:
        from .inception import load_inception
    except ImportError as e:
        raise ValueError(f"this daguerre cannot read Inception-v3 weights ({e})") from None
    return load_inception(str(Path(path).expanduser()), device=device)


class CLIPImageExtractor:
    """The image tower of a CLIP as a `FeatureExtractor`: its projected image embeddings (`encode_image` after
    its own `preprocess`), no class probabilities."""

    def __init__(self, judge: CLIPJudge, batch: int = 64) -> None:
        self.model, self.batch = judge.model, batch
        self.name = f"clip-image ({judge.spec})"
        self.sha256 = judge.sha256 or "none"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        device = self.model.logit_scale.device
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch):
                x = images[i:i + self.batch].to(device=device, dtype=torch.float32)
                out.append(self.model.encode_image(self.model.preprocess(x)).float().cpu())
        return torch.cat(out)

    def probabilities(self, images: torch.Tensor) -> None:
        return None


def load_extractor(spec: str, dataset: str, device: torch.device | str | None = None) -> FeatureExtractor:
    """The feature extractor `spec` names: "default" (the shipped classifier of `dataset`), a classifier
    file, or "inception:PATH" (Inception-v3 weights the user supplies; docs/inception.md)."""
    check_dataset(dataset)
    if spec.startswith(INCEPTION_PREFIX):
        return load_inception_extractor(spec, device)
    return load_classifier_extractor(spec, dataset, device)
