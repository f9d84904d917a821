"""Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture") as a feature extractor for FID/KID/IS.

daguerre ships no Inception weights and downloads nothing: the user supplies a file in one of the two
layouts in use, both with the module names of torchvision's `Inception3` (so loading is a key copy):

- torchvision's ImageNet classifier `inception_v3_google-*.pth` (1000 classes, with `AuxLogits.*`, which
  are ignored here: they only matter in training);
- pytorch-fid's port of the TensorFlow graph `inception-2015-12-05` used by the reference FID code
  (Heusel et al. 2017), `pt_inception-2015-12-05-*.pth` (1008 classes). Its blocks differ slightly
  (pytorch-fid's FIDInceptionA/C/E_1/E_2): the average pools of the pool branches ignore the zero padding
  (TensorFlow's "SAME" average pooling, `count_include_pad=False`), and the last block (Mixed_7c) max-pools.

The variant is read from `fc.weight`: 1008 rows means the FID network. Both networks expect their first
convolution to see RGB in [-1, 1]: pytorch-fid maps its [0, 1] input with `2x - 1`; torchvision's
`transform_input` turns an ImageNet-normalised input ((x01 - mean) / std) back into `(x01 - 0.5) / 0.5`,
the same [-1, 1] range the TensorFlow-trained weights were ported with. daguerre's images are already in
[-1, 1], so `InceptionExtractor` feeds them unchanged (after resizing to 299x299, bilinear, as pytorch-fid).
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InceptionV3", "InceptionExtractor", "load_inception", "FEATURE_DIM", "INPUT_SIZE"]

FEATURE_DIM = 2048  # pool3: the global average pool after Mixed_7c, the FID feature space
INPUT_SIZE = 299  # both networks were trained / ported at 299x299
BN_EPS = 0.001  # the TensorFlow BatchNorm epsilon of the ported weights
TORCHVISION_CLASSES = 1000  # ImageNet-1k
FID_CLASSES = 1008  # the 2015 TensorFlow graph: 1000 ImageNet classes, a background class and 7 unused outputs
DEFAULT_BATCH = 16  # images per forward pass; about 40 MB of activations per image at 299x299 in float32

# Pool branch of the Inception blocks: torchvision averages with the zero padding counted; the TensorFlow
# FID graph averages over the valid pixels only, and its last block max-pools (pytorch-fid FIDInceptionE_2).
POOL_AVG = "avg"
POOL_AVG_VALID = "avg_valid"
POOL_MAX = "max"

AUX_PREFIX = "AuxLogits."  # the training-only auxiliary classifier of torchvision's file: ignored
OPTIONAL_SUFFIX = ".num_batches_tracked"  # BatchNorm bookkeeping, absent from older files: never needed in eval


def _pool3x3(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The 3x3 stride-1 'same' pooling of a block's pool branch."""
    if mode == POOL_MAX:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=mode == POOL_AVG)


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 0.001), ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int], **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    """35x35 block (Fig. 5 of the paper): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, cin: int, pool_features: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, 35, 35) -> (B, 224 + pool_features, 35, 35)
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_pool3x3(x, self.pool))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: stride-2 3x3, stride-2 double 3x3, stride-2 max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 288, 35, 35) -> (B, 768, 17, 17)
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block (Fig. 6): 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, cin: int, c7: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 768, 17, 17) -> (B, 768, 17, 17)
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_pool3x3(x, self.pool))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: stride-2 3x3, 1x7/7x1 then stride-2 3x3, stride-2 max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 768, 17, 17) -> (B, 1280, 8, 8)
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block (Fig. 7): expanded filter banks, 3x3 split into parallel 1x3 and 3x1."""

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, 8, 8) -> (B, 2048, 8, 8)
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        bp = self.branch_pool(_pool3x3(x, self.pool))
        return torch.cat([b1, b3, bd, bp], 1)


class InceptionV3(nn.Module):
    """Inception-v3 up to the classifier, eval only; `fid=True` builds the TensorFlow FID graph's variant.

    Module names are torchvision's `Inception3` (without `AuxLogits`), so both weight files load by
    key copy. `pool3(x)` gives the 2048-d features, `forward(x)` the class logits; `x` is (B, 3, H, W) RGB
    in [-1, 1], normally 299x299 (the network is convolutional; 75x75 is the smallest input it accepts).
    """

    def __init__(self, fid: bool = False, num_classes: int | None = None) -> None:
        super().__init__()
        self.fid = fid
        self.num_classes = num_classes or (FID_CLASSES if fid else TORCHVISION_CLASSES)
        avg = POOL_AVG_VALID if fid else POOL_AVG
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32, pool=avg)
        self.Mixed_5c = InceptionA(256, pool_features=64, pool=avg)
        self.Mixed_5d = InceptionA(288, pool_features=64, pool=avg)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128, pool=avg)
        self.Mixed_6c = InceptionC(768, c7=160, pool=avg)
        self.Mixed_6d = InceptionC(768, c7=160, pool=avg)
        self.Mixed_6e = InceptionC(768, c7=192, pool=avg)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool=avg)
        self.Mixed_7c = InceptionE(2048, pool=POOL_MAX if fid else POOL_AVG)
        self.fc = nn.Linear(FEATURE_DIM, self.num_classes)
        self.eval()

    def train(self, mode: bool = True) -> InceptionV3:
        if mode:
            raise ValueError("InceptionV3 is an evaluation network only (BatchNorm uses its stored statistics)")
        return super().train(False)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 299, 299) in [-1, 1] -> (B, 2048)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048)

    def logits(self, features: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """Class logits from pool3 features; `bias=False` is the bias-free product of the reference IS code."""
        return F.linear(features, self.fc.weight, self.fc.bias if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 299, 299) -> (B, num_classes)
        return self.logits(self.pool3(x))

    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, torch.Tensor], fid: bool | None = None, dtype: torch.dtype = torch.float32
    ) -> InceptionV3:
        """Build the network for a torchvision or pytorch-fid state dict and load it strictly.

        The variant comes from `fc.weight` (1008 rows: the FID network) unless `fid` says otherwise.
        `AuxLogits.*` and `*.num_batches_tracked` entries are ignored; any other missing, unexpected or
        mis-shaped key is a ValueError naming it. Floating-point weights are converted to `dtype`.
        """
        fc = state_dict.get("fc.weight")
        if fc is None:
            raise ValueError(
                "not an Inception-v3 state dict: it has no `fc.weight`; expected torchvision's "
                "inception_v3_google-*.pth or pytorch-fid's pt_inception-2015-12-05-*.pth"
            )
        if fc.ndim != 2 or fc.shape[1] != FEATURE_DIM:
            raise ValueError(f"fc.weight has shape {tuple(fc.shape)}; an Inception-v3 classifier has (classes, 2048)")
        num_classes = int(fc.shape[0])
        if fid is None:
            fid = num_classes == FID_CLASSES
        with torch.device("meta"):  # no random initialisation: every tensor comes from the file
            model = cls(fid=fid, num_classes=num_classes)
        expected = model.state_dict()
        given = {k: v for k, v in state_dict.items() if not k.startswith(AUX_PREFIX)}
        missing = [k for k in expected if k not in given and not k.endswith(OPTIONAL_SUFFIX)]
        unexpected = [k for k in given if k not in expected]
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                raise ValueError(
                    f"Inception-v3 weights: {label} key(s) {shown}; expected the complete state dict of "
                    "torchvision's inception_v3 or pytorch-fid's FID Inception, with their key names"
                )
        for k, ref in expected.items():
            if k in given and tuple(given[k].shape) != tuple(ref.shape):
                raise ValueError(
                    f"Inception-v3 weights: {k} has shape {tuple(given[k].shape)}, expected {tuple(ref.shape)}"
                )
        tensors = {}
        for k, ref in expected.items():
            t = given.get(k)
            if t is None:  # an absent num_batches_tracked: its value is never used in eval
                t = torch.zeros((), dtype=ref.dtype)
            tensors[k] = t.to(dtype) if t.is_floating_point() else t
        model.load_state_dict(tensors, strict=True, assign=True)
        return model.requires_grad_(False).eval()


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor (N, C, H, W) in [-1, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be (N, C, H, W) with C = 1 (grayscale) or 3 (RGB), got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}; convert with x/127.5-1")


class InceptionExtractor:
    """The evaluation's feature-extractor interface over user-supplied Inception-v3 weights.

    `features(images)` -> (N, 2048) float32 pool3 features; `probabilities(images)` -> (N, 1000 or 1008)
    softmax. Images are (N, C, H, W) floats in [-1, 1] with C = 1 (repeated to RGB) or 3; values are
    clamped to [-1, 1] (the range a saved image can hold) and resized to 299x299 bilinearly
    (`align_corners=False`, no antialiasing: pytorch-fid's resize). Work is done `batch_size` images at a
    time on the weights' device; results come back on the images' device.

    Probabilities: torchvision's classifier uses its logits (with bias) over the 1000 ImageNet classes; the
    FID network follows the reference Inception Score code (Salimans et al. 2016, which multiplies pool3
    by the `softmax/logits` weights only; torch-fidelity's `logits_unbiased`) over all 1008 outputs,
    background and unused classes included, so IS values are comparable with those tools.
    """

    def __init__(self, model: InceptionV3, sha256: str, batch_size: int = DEFAULT_BATCH, path: str = "") -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.sha256 = sha256
        self.path = path
        self.batch_size = int(batch_size)
        self.name = "inception-v3-fid" if model.fid else "inception-v3"
        self.num_classes = model.num_classes
        self._last: tuple[weakref.ref, int, torch.Tensor] | None = None  # (images, their version, pool3)

    @property
    def device(self) -> torch.device:
        return self.model.fc.weight.device

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 1|3, H, W) in [-1, 1] -> (n, 3, 299, 299) network input on the weights' device and dtype."""
        x = images.to(device=self.device, dtype=self.model.fc.weight.dtype).clamp(-1.0, 1.0)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)

    def _pool3(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        last = self._last
        if last is not None and last[0]() is images and last[1] == images._version:
            return last[2]  # features() then probabilities() of the same, unchanged tensor: run the network once
        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                out.append(self.model.pool3(self._prepare(images[start : start + self.batch_size])).float())
        pool = torch.cat(out) if out else torch.zeros(0, FEATURE_DIM, device=self.device)
        if not torch.isfinite(pool).all():
            raise ValueError(
                "Inception-v3 produced non-finite features: are the weights (or the images) corrupt? "
                f"check the weights file {self.path or '(in memory)'}"
            )
        self._last = (weakref.ref(images), images._version, pool)
        return pool

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, 2048) float32 pool3 features, on the images' device."""
        return self._pool3(images).to(images.device)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, num_classes) float32 class probabilities (see the class docstring)."""
        pool = self._pool3(images)
        with torch.no_grad():
            logits = self.model.logits(pool.to(self.model.fc.weight.dtype), bias=not self.model.fid)
        return torch.softmax(logits.float(), dim=1).to(images.device)


def load_inception(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    fid: bool | None = None,
    batch_size: int = DEFAULT_BATCH,
    dtype: torch.dtype = torch.float32,
) -> InceptionExtractor:
    """An `InceptionExtractor` over the Inception-v3 weights in `path` (.pth read with weights_only, or .safetensors).

    `device` defaults to where the weights were read (the CPU); `fid` overrides the variant detected from
    `fc.weight`; the network runs in `dtype` (float32 by default, as FID is sensitive to precision).
    """
    from daguerre.weights.io import file_hash, read_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"no Inception-v3 weights file at {path}: download torchvision's inception_v3_google-*.pth or "
            "pytorch-fid's pt_inception-2015-12-05-*.pth (docs/inception.md) and pass its path"
        )
    state_dict, _ = read_state_dict(path)
    try:
        model = InceptionV3.from_state_dict(state_dict, fid=fid, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    del state_dict
    if device is not None:
        model = model.to(device)
    return InceptionExtractor(model, sha256=file_hash(path), batch_size=batch_size, path=str(path))
