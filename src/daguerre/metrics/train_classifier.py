"""Training and testing the evaluation classifiers, on real / rendered ground truth only.

- Fashion-MNIST: the train split (28x28 padded to 32x32, as `data.fashion_mnist`), with modest
  augmentation (shifts of up to 2 pixels, horizontal flips); tested on the test split.
- Shapes world: every step renders a fresh batch of scenes (`data.shapes.sample_scene`, 1-3 objects,
  half of the multi-object scenes in a relation) from a Generator seeded (TRAIN_KEY, seed, step), and
  augments them a little so that the judge is robust to generated images: sub-pixel shifts of up to
  2 pixels, a slight Gaussian blur on half of them, small per-channel gain / offset and pixel noise.
  Tested on scenes rendered from another key (TEST_KEY), never seen in training.
- A folder of the user's own images with class sub-folders (`metrics.folder_data`): the train split of the
  held-out split its models are trained with (or the whole folder, with a separate test folder), read
  into memory once at the model's size; integer shifts of up to size/8 pixels (reflected border) and
  horizontal flips (`FolderTraining.flip`); tested on the held-out images (or the test folder). SGD with
  Nesterov momentum (Sutskever et al. 2013) and label smoothing 0.1 (Szegedy et al. 2016).

Never trained on model outputs. AdamW (Loshchilov & Hutter 2019; folders: SGD) with a linear warm-up and
cosine decay (Loshchilov & Hutter 2017); cross-entropy on every head (colour and size only in occupied cells).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shapes import Scene, render, sample_scene
from .classifiers import (
    CONFIGS,
    build_classifier,
    count_parameters,
    folder_config,
    save_classifier,
    scene_targets,
)
from .folder_data import DEFAULT_HOLDOUT, Folder, FolderSpec, first_image_format, names_words, split_layout

logger = logging.getLogger("daguerre.classifier")

TRAIN_KEY = 0x5EED1  # shapes training scenes: Generator((TRAIN_KEY, seed, step))
TEST_KEY = 0x7E57  # shapes test scenes: Generator((TEST_KEY, seed, i))
FASHION_PAD = 2  # 28 -> 32, as data.fashion_mnist
MAX_SHIFT = 2.0  # pixels, both datasets
BLUR_P = 0.5  # shapes: fraction of images blurred
BLUR_SIGMA = (0.3, 1.0)  # pixels
BLUR_RADIUS = 3
NOISE_STD = 0.05  # shapes: max std of added Gaussian pixel noise (in [-1, 1] units)
GAIN = 0.04  # shapes: per-channel gain 1 +- GAIN and offset +- GAIN
WARMUP_FRACTION = 0.05
EVAL_BATCH = 500
FOLDER_EPOCHS = 20  # default length of a folder classifier's training, in passes over its train split
FOLDER_SHIFT = 8  # folder images: shifts of up to size / FOLDER_SHIFT pixels
FOLDER_LR = 0.1  # SGD, at batch 128
FOLDER_MOMENTUM = 0.9
LABEL_SMOOTHING = 0.1  # folders
MAX_FOLDER_SIZE = 256  # a classifier input larger than this needs --size


@dataclass(frozen=True)
class FolderTraining:
    """Which images a folder classifier learns from and is tested on (`--data`, `--test-data`, ...)."""

    root: str  # the folder, with one sub-folder per class (or a dataset folder of train/ and test/ folders)
    test_root: str | None = None  # a separate test folder (the same classes); None: the held-out split
    holdout: int | None = None  # images held out of --data; None: DEFAULT_HOLDOUT, or 0 with a test folder
    data_seed: int = 0  # data.seed of the held-out split
    size: int | None = None  # input size; None: the first image's shorter side
    channels: int | None = None  # 1 or 3; None: the first image's (grayscale modes: 1)
    width: int = 32  # channels of the first stage (folder_config)
    flip: bool = True  # random horizontal flips

    def spec(self) -> FolderSpec:
        """The training folder's FolderSpec, defaults filled in."""
        size, channels = self.size, self.channels
        if size is None or channels is None:
            first_size, first_channels = first_image_format(self.root)
            if size is None and first_size > MAX_FOLDER_SIZE:
                raise ValueError(f"the images of {self.root} are {first_size} pixels: pass --size, the size your "
                                 "model was trained at (data.size)")
            size, channels = size or first_size, channels or first_channels
        holdout = self.holdout if self.holdout is not None else (0 if self.test_root else DEFAULT_HOLDOUT)
        return FolderSpec(self.root, size, channels, holdout, self.data_seed).check()


@dataclass
class TrainSettings:
    """How to train one classifier (`daguerre classifier train` flags)."""

    dataset: str  # "shapes", "fashion_mnist" or "folder"
    steps: int | None = None  # None: DEFAULTS[dataset]
    batch_size: int | None = None
    lr: float | None = None  # None: 2e-3 (AdamW), folders FOLDER_LR (SGD)
    weight_decay: float = 5e-4
    seed: int = 0
    root: str | None = None  # Fashion-MNIST folder (default: data.fashion_mnist.DEFAULT_ROOT)
    test_n: int = 2000  # shapes: rendered scenes for the final test
    folder: FolderTraining | None = None  # dataset "folder"

    def resolved(self) -> TrainSettings:
        if self.dataset not in DEFAULTS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DEFAULTS)}")
        if (self.dataset == "folder") != (self.folder is not None):
            raise ValueError("--data FOLDER goes with --dataset folder, and --dataset folder needs --data FOLDER")
        steps, batch = DEFAULTS[self.dataset]
        s = replace(self, steps=steps if self.steps is None else self.steps,
                    batch_size=batch if self.batch_size is None else self.batch_size,
                    lr=(FOLDER_LR if self.dataset == "folder" else 2e-3) if self.lr is None else self.lr)
        if (s.steps is not None and s.steps < 1) or s.batch_size < 1 or s.seed < 0 or not s.lr > 0:
            raise ValueError(f"need steps >= 1, batch size >= 1, seed >= 0 and lr > 0; got steps={s.steps}, "
                             f"batch size={s.batch_size}, seed={s.seed}, lr={s.lr}")
        return s


# (steps, batch size); a folder's steps: FOLDER_EPOCHS passes over its train split
DEFAULTS = {"fashion_mnist": (2000, 128), "shapes": (1500, 64), "folder": (None, 128)}


# --- data ------------------------------------------------------------------------------------------

def fashion_tensors(root: str | Path | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole Fashion-MNIST split: images (N, 1, 32, 32) uint8 (padded with the background), labels (N,)."""
    from ..data.fashion_mnist import BACKGROUND, DEFAULT_ROOT, load_split

    images, labels = load_split(root or DEFAULT_ROOT, split)
    pad = (FASHION_PAD, FASHION_PAD)
    padded = np.pad(images, ((0, 0), pad, pad), constant_values=BACKGROUND)
    return torch.from_numpy(padded)[:, None].contiguous(), torch.from_numpy(labels.astype(np.int64))


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], as data.transforms.to_tensor."""
    return x.float() / 127.5 - 1


def render_scenes(scenes: list[Scene], size: int = 64) -> torch.Tensor:
    """(N, 3, size, size) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(render(s, size)) for s in scenes])  # (N, H, W, 3) uint8
    return to_unit_range(torch.from_numpy(arr).permute(0, 3, 1, 2))


def shapes_scenes(key: int, seed: int, start: int, n: int) -> list[Scene]:
    """Scenes i = start..start+n-1 of stream (key, seed): item i from Generator((key, seed, i))."""
    return [sample_scene(np.random.default_rng((key, seed, i))) for i in range(start, start + n)]


# --- augmentation ----------------------------------------------------------------------------------

def shift(x: torch.Tensor, gen: torch.Generator, max_shift: float, integer: bool, padding: str) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels in x and y (bilinear; `padding` as grid_sample)."""
    b, _, h, w = x.shape
    t = (torch.rand(b, 2, generator=gen) * 2 - 1) * max_shift
    if integer:
        t = t.round()
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = 2 * t[:, 0] / w, 2 * t[:, 1] / h
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur image i of (B, C, H, W) with its own sigma[i] (pixels; 0 = unchanged), separable, border-replicated."""
    b, c, h, w = x.shape
    k = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x).clamp_min(1e-3)[:, None]
    kern = torch.exp(-0.5 * (k[None] / s) ** 2)
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    y = F.pad(x.reshape(1, b * c, h, w), (BLUR_RADIUS,) * 4, mode="replicate")
    y = F.conv2d(y, kern[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kern[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment_shapes(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    x = shift(x, gen, MAX_SHIFT, integer=False, padding="border")
    lo, hi = BLUR_SIGMA
    sigma = (lo + (hi - lo) * torch.rand(b, generator=gen)) * (torch.rand(b, generator=gen) < BLUR_P)
    x = gaussian_blur(x, sigma)
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1) * GAIN
    offset = (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1) * GAIN
    noise = torch.randn(x.shape, generator=gen) * (torch.rand(b, 1, 1, 1, generator=gen) * NOISE_STD)
    return (x * gain.to(x) + offset.to(x) + noise.to(x)).clamp(-1, 1)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment_fashion(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    x = shift(x, gen, MAX_SHIFT, integer=True, padding="border")  # the 2-pixel frame is background
    return random_flip(x, gen)


def augment_folder(x: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Integer shifts of up to size / FOLDER_SHIFT pixels (the border reflected), then maybe flips."""
    x = shift(x, gen, max(1, x.shape[-1] // FOLDER_SHIFT), integer=True, padding="reflection")
    return random_flip(x, gen) if flip else x


# --- a folder's images -----------------------------------------------------------------------------

@dataclass
class FolderData:
    """A folder classifier's training and test images (uint8) and labels, and what the file records of them."""

    classes: list[str]
    spec: FolderSpec
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    description: dict[str, Any]


def _labelled(folder: Folder, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x, kept = folder.load(indices)
    return x, torch.from_numpy(folder.labels[kept])


def open_folders(f: FolderTraining) -> tuple[FolderTraining, Folder, Folder]:
    """(`f` with a dataset folder's train/ and test/ filled in, the training folder, the test folder: the
    training folder itself when the test images are its held-out split), checked: classes, images to test."""
    layout = split_layout(f.root) if f.test_root is None else None
    if layout is not None:
        f = replace(f, root=str(layout[0]), test_root=str(layout[1]))
    spec = f.spec()
    folder = Folder(spec)
    if folder.class_names is None:
        raise ValueError(f"{f.root} has no class sub-folders (every image in one of at least 2): a classifier "
                         "needs classes; for a folder of captions, train a CLIP (`daguerre train clip`) and pass "
                         "it to `daguerre eval --clip`")
    test = folder
    if f.test_root:
        test = Folder(replace(spec, root=f.test_root, holdout=None))
        if test.class_names != folder.class_names:
            raise ValueError(f"--test-data {f.test_root} has the classes {names_words(test.class_names)}, --data "
                             f"{f.root} has {names_words(folder.class_names)}: give a test folder of the same classes")
    if len(folder.train) == 0 or len(test.held) == 0:
        raise ValueError(f"{len(folder.train)} training and {len(test.held)} test images: give a --holdout between "
                         f"1 and half of the {len(folder)} images of {f.root}, or a --test-data folder")
    return f, folder, test


def load_folder_data(f: FolderTraining) -> FolderData:
    """Read a folder classifier's images: the train split of `f.root` and the held-out split (or all of
    `f.test_root`, whose classes must be the same; a dataset folder of train/ and test/: those two)."""
    f, folder, test = open_folders(f)
    description = {**folder.describe(), "train_images": len(folder.train), "flip": f.flip,
                   "test": {**test.describe(), "which": "all" if f.test_root else "held-out split",
                            "images": len(test.held)}}
    return FolderData(list(folder.class_names), folder.spec, _labelled(folder, folder.train),
                      _labelled(test, test.held), description)


# --- training --------------------------------------------------------------------------------------

def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, int(WARMUP_FRACTION * steps))
    if step < warm:
        return lr * (step + 1) / warm
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def shapes_loss(out: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(out["background"], tgt["background"])
    for head in ("shape", "colour", "size"):
        loss = loss + F.cross_entropy(out[head].flatten(0, 1), tgt[head].flatten(), ignore_index=-100)
    return loss


def train_classifier(settings: TrainSettings, out: str | Path, *, device: torch.device | str | None = None,
                     progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Train a classifier as `settings` say, test it on held-out data, save it to `out`; return its accuracy."""
    from tqdm import tqdm

    s = settings.resolved()
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: folder {out.parent} does not exist")
    say = log or logger.info
    folder, load_seconds = None, 0.0
    if s.dataset == "folder":
        t0 = time.perf_counter()
        folder = load_folder_data(s.folder)
        load_seconds = time.perf_counter() - t0
        config = folder_config(folder.classes, folder.spec.channels, folder.spec.size, s.folder.width)
        train_x, train_y = folder.train
        if s.steps is None:
            s = replace(s, steps=max(1, math.ceil(FOLDER_EPOCHS * len(train_y) / s.batch_size)))
        say(f"read {len(train_y)} training and {len(folder.test[1])} test images of {len(folder.classes)} classes "
            f"at {folder.spec.size} px in {load_seconds:.0f} s")
    else:
        config = CONFIGS[s.dataset]()
    torch.manual_seed(s.seed)
    model = build_classifier(config).to(device, memory_format=torch.channels_last)  # faster convs on CPU
    dev = next(model.parameters()).device
    if folder is not None:
        opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=FOLDER_MOMENTUM, nesterov=True,
                              weight_decay=s.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    gen = torch.Generator().manual_seed(s.seed)
    if s.dataset == "fashion_mnist":
        train_x, train_y = fashion_tensors(s.root, "train")
    if s.dataset != "shapes":
        perm, pos = torch.randperm(len(train_y), generator=gen), 0
    say(f"training a {s.dataset} classifier ({count_parameters(model):,} parameters) for {s.steps} steps of "
        f"{s.batch_size} images, seed {s.seed}")
    start, cpu_start, running = time.perf_counter(), time.process_time(), None
    model.train()
    with tqdm(total=s.steps, unit="step", desc="classifier", disable=not progress, dynamic_ncols=True) as bar:
        for step in range(s.steps):
            if s.dataset != "shapes":
                if pos + s.batch_size > len(perm):
                    perm, pos = torch.randperm(len(train_y), generator=gen), 0
                idx = perm[pos:pos + s.batch_size]
                pos += s.batch_size
                x = to_unit_range(train_x[idx])
                x = augment_fashion(x, gen) if folder is None else augment_folder(x, gen, s.folder.flip)
                logits = model(x.to(dev, memory_format=torch.channels_last))
                loss = F.cross_entropy(logits, train_y[idx].to(dev),
                                       label_smoothing=LABEL_SMOOTHING if folder is not None else 0.0)
            else:
                scenes = shapes_scenes(TRAIN_KEY, s.seed, step * s.batch_size, s.batch_size)
                x = augment_shapes(render_scenes(scenes, config.image_size), gen)
                tgt = {k: v.to(dev) for k, v in scene_targets(scenes, config).items()}
                loss = shapes_loss(model(x.to(dev, memory_format=torch.channels_last)), tgt)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, s.steps, s.lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            if (step + 1) % max(1, s.steps // 10) == 0 or step + 1 == s.steps:
                say(f"step {step + 1}/{s.steps} loss {running:.4f} "
                    f"({(step + 1) * s.batch_size / (time.perf_counter() - start):.0f} images/s)")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model.eval()
    with torch.no_grad():  # test the weights as the file will hold them (float16)
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half())
    if folder is not None:
        accuracy = {"class": labelled_accuracy(model, *folder.test)}
    else:
        accuracy = held_out_accuracy(model, s.dataset, root=s.root, n=s.test_n, seed=s.seed)
    training = {
        "data": folder.description if folder is not None else _data_description(s), "steps": s.steps,
        "batch_size": s.batch_size, "lr": s.lr, "weight_decay": s.weight_decay, "seed": s.seed,
        "optimizer": "AdamW" if folder is None else f"SGD, Nesterov momentum {FOLDER_MOMENTUM}",
        "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1), "threads": torch.get_num_threads(),
        "parameters": count_parameters(model),
        "augmentation": _augmentation(s), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if folder is not None:
        training.update(load_seconds=round(load_seconds, 1), label_smoothing=LABEL_SMOOTHING)
    save_classifier(model, out, training, accuracy)
    say(f"wrote {out} after {seconds:.0f} s: " + format_accuracy(accuracy))
    return accuracy


def _data_description(s: TrainSettings) -> dict[str, Any]:
    if s.dataset == "fashion_mnist":
        from ..data.fashion_mnist import DEFAULT_ROOT

        return {"kind": "fashion_mnist", "split": "train", "root": str(s.root or DEFAULT_ROOT), "size": 32}
    return {"kind": "shapes", "rendered": "sample_scene(Generator((TRAIN_KEY, seed, i)))", "train_key": TRAIN_KEY,
            "images": s.steps * s.batch_size, "size": 64}


def _augmentation(s: TrainSettings) -> str:
    if s.dataset == "fashion_mnist":
        return f"integer shifts <= {MAX_SHIFT:g} px, horizontal flips"
    if s.dataset == "folder":
        return (f"integer shifts <= size/{FOLDER_SHIFT} px (reflected border)"
                + (", horizontal flips" if s.folder.flip else ""))
    return (f"shifts <= {MAX_SHIFT:g} px, Gaussian blur sigma {BLUR_SIGMA} on {BLUR_P:.0%}, "
            f"channel gain/offset +-{GAIN}, pixel noise std <= {NOISE_STD}")


# --- testing ---------------------------------------------------------------------------------------

@torch.no_grad()
def labelled_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of uint8 images `x` whose argmax class is their label `y`."""
    dev = next(model.parameters()).device
    model.eval()
    correct = 0
    for i in range(0, len(y), EVAL_BATCH):
        logits = model(to_unit_range(x[i:i + EVAL_BATCH]).to(dev))
        correct += int((logits.argmax(-1).cpu() == y[i:i + EVAL_BATCH]).sum())
    return correct / max(1, len(y))


def folder_test_data(record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images and labels a folder classifier's training record (`training["data"]`) names, read again;
    ValueError when a folder's images changed since (another fingerprint)."""
    test = record["test"]
    f = FolderTraining(record["root"], test["root"] if test["which"] == "all" else None, holdout=record["holdout"],
                       data_seed=record["seed"], size=record["size"], channels=record["channels"])
    _, folder, test_folder = open_folders(f)
    for which, rec, now in (("training", record, folder), ("test", test, test_folder)):
        if now.fingerprint != rec["fingerprint"]:
            raise ValueError(f"the images of the {which} folder {rec['root']} changed since the classifier was "
                             "trained (another fingerprint): its recorded accuracy no longer applies")
    return _labelled(test_folder, test_folder.held)


@torch.no_grad()
def held_out_accuracy(model: torch.nn.Module, dataset: str, *, root: str | Path | None = None, n: int = 2000,
                      seed: int = 0) -> dict[str, float]:
    """Accuracy per head on held-out data: the Fashion-MNIST test split (`n` ignored), or `n` shapes-world
    scenes rendered from Generator((TEST_KEY, seed, i))."""
    dev = next(model.parameters()).device
    model.eval()
    if dataset == "fashion_mnist":
        return {"class": labelled_accuracy(model, *fashion_tensors(root, "test"))}
    if n < 1:
        raise ValueError(f"need at least one test scene, got n={n}")
    config = model.config
    totals: dict[str, float] = {}
    for i in range(0, n, EVAL_BATCH):
        scenes = shapes_scenes(TEST_KEY, seed, i, min(EVAL_BATCH, n - i))
        out = model(render_scenes(scenes, config.image_size).to(dev))
        for k, v in shapes_hits(out, scene_targets(scenes, config)).items():
            totals[k] = totals.get(k, 0.0) + v
    return {k: totals[k] / totals[f"{k}_n"] for k in SHAPES_HEADS}


SHAPES_HEADS = ("cell", "shape", "colour", "size", "background", "scene")


def shapes_hits(out: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]) -> dict[str, float]:
    """Counts of right answers ("cell": empty-or-shape over all cells; "shape", "colour", "size" over occupied
    cells; "background"; "scene": every cell and the background right) and their denominators (`*_n`)."""
    pred = {k: out[k].argmax(-1).cpu() for k in ("shape", "colour", "size", "background")}
    occupied = tgt["shape"] > 0
    cell_ok = pred["shape"] == tgt["shape"]
    colour_ok = pred["colour"] == tgt["colour"]
    size_ok = pred["size"] == tgt["size"]
    bg_ok = pred["background"] == tgt["background"]
    all_ok = (cell_ok & (~occupied | (colour_ok & size_ok))).all(1) & bg_ok
    n_occ = int(occupied.sum())
    return {
        "cell": float(cell_ok.sum()), "cell_n": float(cell_ok.numel()),
        "shape": float((cell_ok & occupied).sum()), "shape_n": float(n_occ),
        "colour": float((colour_ok & occupied).sum()), "colour_n": float(n_occ),
        "size": float((size_ok & occupied).sum()), "size_n": float(n_occ),
        "background": float(bg_ok.sum()), "background_n": float(bg_ok.numel()),
        "scene": float(all_ok.sum()), "scene_n": float(all_ok.numel()),
    }


def format_accuracy(accuracy: dict[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.2f}%" for k, v in accuracy.items())
