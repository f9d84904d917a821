"""`daguerre train vae | ldm`: the two training stages of latent diffusion (docs/training.md).

    daguerre train vae --config configs/shapes_vae.toml [--out runs/shapes_vae] [--resume] [--set k=v ...]
    daguerre train ldm --config configs/shapes_ldm.toml --vae runs/shapes_vae/vae.safetensors [...]

Under torchrun the same commands train data-parallel:
    torchrun --standalone --nproc_per_node 2 -m daguerre.training ldm ...
(`python -m daguerre.training STAGE` is `daguerre train STAGE`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import command

DEFAULT_RUNS = Path("runs")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="run config TOML (see configs/); default: built-in defaults")
    p.add_argument("--out", "-o", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=2e-4 --set data.root=photos (repeatable)")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="stage", metavar="STAGE")
    vae = sub.add_parser("vae", help="stage 1: the KL autoencoder", description="Train the KL autoencoder.")
    _common(vae)
    ldm = sub.add_parser("ldm", help="stage 2: the latent diffusion U-Net (+ text encoder)",
                         description="Train the latent diffusion model on a frozen autoencoder.")
    _common(ldm)
    ldm.add_argument("--vae", required=True, help="the autoencoder: RUN/vae.safetensors of `daguerre train vae`")


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    name = Path(args.config).stem if args.config else f"{args.stage}_run"
    return DEFAULT_RUNS / name


@command("train", "train the autoencoder (vae) or the diffusion model (ldm)", _add_arguments)
def run(args: argparse.Namespace) -> int:
    if not getattr(args, "stage", None):
        raise ValueError("choose a stage: `daguerre train vae ...` or `daguerre train ldm ...`")
    from ..training.config import load_run_config

    cfg = load_run_config(args.config, args.stage, args.overrides)
    out = _out_dir(args)
    if args.stage == "vae":
        from ..training.vae import train_vae

        path = train_vae(cfg, out, resume=args.resume)
    else:
        from ..training.ldm import train_ldm

        path = train_ldm(cfg, out, vae_path=args.vae, resume=args.resume)
    print(path)
    return 0
