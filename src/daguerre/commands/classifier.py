"""`daguerre classifier train|test`: the classifiers `daguerre eval` judges and measures with.

    daguerre classifier train --dataset shapes --out shapes.safetensors [--steps N --batch-size B --seed S --threads T]
    daguerre classifier train --dataset folder --data my-photos --out my-photos.safetensors
    daguerre classifier train --dataset folder --data cifar10/train --test-data cifar10/test --out cifar.safetensors
    daguerre classifier test shapes.safetensors

`train` learns from real Fashion-MNIST images, freshly rendered shapes-world scenes or the train split of a
folder of the user's own images with class sub-folders (never from model outputs), tests on held-out data
and writes the file atomically; `test` prints the accuracy per head on held-out data (the Fashion-MNIST test
split; shapes rendered from a test stream; a folder's held-out split or test folder, read again). See
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .registry import command


def _add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a classifier on real / rendered images",
                       description="train an evaluation classifier on real / rendered images")
    t.add_argument("--dataset", required=True, choices=["shapes", "fashion_mnist", "folder"],
                   help="what it classifies: a built-in dataset, or the classes of a --data folder")
    t.add_argument("--out", "-o", required=True, help="output .safetensors file")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 1500 shapes, 2000 fashion, "
                   "20 passes over a folder's training images)")
    t.add_argument("--batch-size", type=int, default=None, help="images per step (default: 64 shapes, 128 fashion "
                   "and folders)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3 AdamW; folders 0.1 SGD)")
    f = t.add_argument_group("folder (--dataset folder)")
    f.add_argument("--data", default=None, metavar="FOLDER", help="the image folder, one sub-folder per class")
    f.add_argument("--test-data", default=None, metavar="FOLDER",
                   help="a separate test folder of the same classes (default: the held-out split of --data)")
    f.add_argument("--holdout", type=int, default=None, help="images of --data held out as the model's training "
                   "holds them out (its data.holdout; default 64, or 0 with --test-data)")
    f.add_argument("--data-seed", type=int, default=0, help="the seed of the held-out split (the model's data.seed; "
                   "default 0)")
    f.add_argument("--size", type=int, default=None, help="input size in pixels, the model's data.size (default: "
                   "the first image's shorter side)")
    f.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="3 (RGB) or 1 (grayscale) (default: the first image's)")
    f.add_argument("--width", type=int, default=32, help="channels of the first stage (default 32)")
    f.add_argument("--no-flip", dest="flip", action="store_false",
                   help="no horizontal flips in training (for classes a mirror image changes)")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and rendered scenes")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--root", default=None, help="Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist)")
    t.add_argument("--test-n", type=int, default=2000, help="shapes: rendered scenes of the final test (default 2000)")
    t.add_argument("--device", default="cpu", help="torch device (default cpu)")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file (default: an error)")
    e = sub.add_parser("test", help="print a classifier's accuracy per head on held-out data",
                       description="print a classifier's accuracy per head on held-out data")
    e.add_argument("file", help="classifier .safetensors file")
    e.add_argument("--n", type=int, default=2000, help="shapes: rendered test scenes (default 2000)")
    e.add_argument("--seed", type=int, default=0, help="shapes: seed of the test scenes (default 0)")
    e.add_argument("--root", default=None, help="Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist)")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _check_out(out: Path, overwrite: bool) -> None:
    """Before training: an existing --out is kept unless --overwrite, and its folder must take new files."""
    from .outputs import check_folder

    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name a .safetensors file")
    if os.path.lexists(out) and not overwrite:
        raise ValueError(f"--out {out} exists: name another file, or pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: folder {out.parent} does not exist")
    check_folder(out.parent)


def _threads(n: int | None) -> None:
    import torch

    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


@command("classifier", "train or test the evaluation classifiers (docs/evaluation.md)", _add_arguments)
def run(args: argparse.Namespace) -> int:
    import sys

    from ..metrics.train_classifier import (
        FolderTraining,
        TrainSettings,
        folder_test_data,
        format_accuracy,
        held_out_accuracy,
        labelled_accuracy,
        train_classifier,
    )

    _threads(args.threads)
    if args.action == "train":
        _check_out(Path(args.out), args.overwrite)
        folder = FolderTraining(args.data, args.test_data, args.holdout, args.data_seed, args.size, args.channels,
                                args.width, args.flip) if args.data is not None else None
        settings = TrainSettings(args.dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 seed=args.seed, root=args.root, test_n=args.test_n, folder=folder)

        def log(line: str) -> None:
            print(f"daguerre classifier: {line}", file=sys.stderr, flush=True)

        train_classifier(settings, args.out, device=args.device, progress=args.progress, log=log)
        print(args.out)
        return 0
    from ..metrics.classifiers import count_parameters, load_classifier

    model, info = load_classifier(args.file, args.device)
    if info.config.kind == "folder":
        record = info.training["data"]
        accuracy = {"class": labelled_accuracy(model, *folder_test_data(record))}
        test = record["test"]
        where = (f"test folder {test['root']}" if test["which"] == "all"
                 else f"held-out split of {record['root']}") + f" ({test['images']} images)"
    else:
        accuracy = held_out_accuracy(model, info.config.kind, root=args.root, n=args.n, seed=args.seed)
        where = "Fashion-MNIST test split" if info.config.kind == "fashion_mnist" else f"{args.n} rendered test scenes"
    print(f"{args.file}: {info.config.kind} classifier, {count_parameters(model):,} parameters, trained "
          f"{info.training.get('steps', '?')} steps in {info.training.get('seconds', '?')} s"
          + (f" ({info.training['cpu_seconds']} CPU s)" if "cpu_seconds" in info.training else ""))
    print(f"accuracy on the {where}: {format_accuracy(accuracy)}")
    for head, value in accuracy.items():
        print(f"  {head:<11} {100 * value:6.2f}%")
    return 0
