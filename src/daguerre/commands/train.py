"""`daguerre train vae | ldm`: the two training stages of latent diffusion (docs/training.md).

    daguerre train vae --config shapes_vae [--out runs/shapes_vae] [--resume] [--set k=v ...]
    daguerre train ldm --config shapes_ldm --vae runs/shapes_vae/vae.safetensors [...]
    daguerre train clip --config shapes_clip [--out runs/shapes_clip]            # a contrastive image-text model
    daguerre train lora --model shapes --data hexagons/ [--set lora.rank=8 ...]  # a LoRA (docs/lora.md)
    daguerre train embedding --model shapes --data hexagons/ --set embedding.word=hexagon  # textual inversion
    daguerre train export runs/shapes_ldm [--step N] [--out model.safetensors]   # a model from a checkpoint
    daguerre train export runs/shapes_gligen --adapter --out shapes-gligen.safetensors  # its adapter file alone
    daguerre train zero-shot shapes-clip [--dataset shapes] [--n 1000]          # a CLIP's zero-shot accuracy
    daguerre train --list-configs                                                 # the shipped run configs

`--config` takes the name of a shipped config or the path of a TOML file. Stopped by Ctrl-C (SIGINT) or SIGTERM,
a run saves a checkpoint of the step it is on and prints it with the command that continues it (the same
command with --resume); exit status 130.

Under torchrun the same commands train data-parallel:
    torchrun --standalone --nproc_per_node 2 -m daguerre.training ldm ...
(`python -m daguerre.training STAGE` is `daguerre train STAGE`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from .registry import command

DEFAULT_RUNS = Path("runs")
INTERRUPTED = 130  # exit status of a run stopped by a signal (128 + SIGINT, as a shell reports Ctrl-C)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None,
                   help="run config: a shipped config's name (daguerre train --list-configs) or a TOML file; "
                   "default: built-in defaults")
    p.add_argument("--out", "-o", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--data", default=None, metavar="FOLDER",
                   help="train on this image folder: short for --set data.kind=folder --set data.folder.root=FOLDER")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=2e-4 --set data.folder.root=photos (repeatable)")
    p.add_argument("--until", type=int, default=None, metavar="STEP",
                   help="pause after step STEP: checkpoint it and stop without the final model (the learning-rate "
                   "schedule still runs to train.steps); continue later with --resume")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="fine-tune: start from this model file's weights (train.init_from); the run's [model] "
                   "config must contain the model's architecture and may add to it")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list-configs", action="store_true",
                   help="list the run configs that ship with daguerre (use one with --config NAME)")
    sub = p.add_subparsers(dest="stage", metavar="STAGE")
    vae = sub.add_parser("vae", help="stage 1: the KL autoencoder", description="Train the KL autoencoder.")
    _common(vae)
    ldm = sub.add_parser("ldm", help="stage 2: the latent diffusion U-Net (+ text encoder)",
                         description="Train the latent diffusion model on a frozen autoencoder.")
    _common(ldm)
    ldm.add_argument("--vae", required=True, help="the autoencoder: RUN/vae.safetensors of `daguerre train vae`")
    lora = sub.add_parser("lora", help="a LoRA on a frozen model (kohya format, for every SD tool)",
                          description="Train a LoRA on the U-Net's attention and convolution layers (optionally the "
                          "text encoder) of a frozen daguerre or Stable Diffusion model, on your images with "
                          "captions (docs/lora.md); writes RUN/lora.safetensors in the kohya format.")
    _common(lora)
    lora.add_argument("--model", "-m", dest="init", metavar="MODEL",
                      help="the frozen model the LoRA is for: a file or a shipped name (same as --init)")
    emb = sub.add_parser("embedding", help="a textual-inversion embedding (a new word) for a frozen model",
                         description="Train the vectors of a new word (textual inversion) on your images with "
                         "captions that use it; everything else frozen (docs/lora.md). Writes RUN/WORD.safetensors "
                         "(emb_params) and RUN/WORD.pt (AUTOMATIC1111), for --embeddings-dir.")
    _common(emb)
    emb.add_argument("--model", "-m", dest="init", metavar="MODEL",
                     help="the frozen model the embedding is for: a file or a shipped name (same as --init)")
    clip = sub.add_parser("clip", help="a CLIP model (contrastive image and text towers)",
                          description="Train a CLIP model (symmetric InfoNCE, learned temperature) on images with "
                          "captions; its zero-shot accuracy is logged at each sample step.")
    _common(clip)
    export = sub.add_parser("export", help="a model file from a stage-2 or clip checkpoint (also while the run "
                            "trains)", description="Write the model of a stage-2 (or CLIP) training checkpoint (its "
                            "EMA weights), as the end of the run would, without touching the run folder.")
    export.add_argument("run_dir", metavar="RUN",
                        help="the run folder of `daguerre train ldm` or `daguerre train clip`")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    export.add_argument("--out", "-o", default=None,
                        help="model file to write (default: RUN/model_step_NNNNNNNN.safetensors, or "
                        "RUN/clip_step_NNNNNNNN.safetensors for a CLIP run; with --adapter "
                        "RUN/adapter_step_NNNNNNNN.safetensors)")
    export.add_argument("--adapter", action="store_true",
                        help="write only what the model adds to the model the run started from (--init), naming "
                        "that model and its sha256: a GLIGEN run's adapter file (docs/layout.md)")
    zero = sub.add_parser("zero-shot", help="a CLIP model's zero-shot accuracy (shapes world, Fashion-MNIST)",
                          description="Measure a CLIP model's zero-shot accuracy: on held-out single-object shapes "
                          "scenes against every colour x shape prompt (shape, colour, both right), or on the "
                          "Fashion-MNIST test split against 'a photo of {class}' prompts (docs/training.md).")
    zero.add_argument("clip", metavar="CLIP", help="a shipped CLIP's name or a CLIP file / folder")
    zero.add_argument("--dataset", choices=["shapes", "fashion_mnist"], default=None,
                      help="what to measure (default: the data the CLIP was trained on, per its provenance; "
                      "else shapes)")
    zero.add_argument("--n", type=int, default=1000, help="held-out images (default 1000)")
    zero.add_argument("--root", default=None, help="Fashion-MNIST folder (default: the Debian path)")
    zero.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON to FILE")


def _data_overrides(args: argparse.Namespace) -> list[str]:
    """`--data FOLDER` as the two `--set` items it stands for (given first, so an explicit --set still wins)."""
    folder = getattr(args, "data", None)
    if not folder:
        return []
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--data {folder}: no such folder; give the folder of your images")
    return ["data.kind=folder", f"data.folder.root={folder}"]


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if not args.config:
        return DEFAULT_RUNS / f"{args.stage}_run"
    from ..training.config import resolve_config

    return DEFAULT_RUNS / resolve_config(args.config, args.stage).stem  # `photos32` of stage vae: runs/photos32_vae


def list_configs() -> str:
    """The shipped run configs: name, stage and what each trains (the first line of its comment)."""
    from ..training.config import config_summary, shipped_configs

    shipped = shipped_configs()
    if not shipped:
        return "no run configs are installed with this daguerre"
    folder = next(iter(shipped.values())).parent
    lines = [f"run configs shipped with daguerre (in {folder}; copy one to change it):"]
    for name, path in sorted(shipped.items()):
        stage, summary = config_summary(path)
        lines.append(f"  {name:<20} {stage:<4} {summary}")
    lines.append("use one with: daguerre train STAGE --config NAME")
    return "\n".join(lines)


def resume_command(args: argparse.Namespace, out: Path) -> str:
    """The command that continues this run: the same stage, config, folder, autoencoder, --set, --until and
    --init, plus --resume (under torchrun: the same torchrun launch)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    words = (["torchrun", "--standalone", "--nproc_per_node", str(world), "-m", "daguerre.training"] if world > 1
             else ["daguerre", "train"])
    words += [args.stage]
    if args.config:
        words += ["--config", args.config]
    if getattr(args, "data", None):
        words += ["--data", args.data]
    words += ["--out", str(out)]
    if getattr(args, "vae", None):
        words += ["--vae", args.vae]
    for item in args.overrides:
        words += ["--set", item]
    if args.until is not None:
        words += ["--until", str(args.until)]
    if args.init:
        words += ["--init", args.init]
    return shlex.join([*words, "--resume"])


def _interrupted(args: argparse.Namespace, out: Path, e: KeyboardInterrupt) -> int:
    """Say where a stopped run is (the checkpoint of the stop, or the newest one) and how to continue it."""
    from ..training import state
    from ..training.loop import TrainingInterrupted

    if os.environ.get("RANK", "0") != "0":  # under torchrun the first process speaks for all
        return INTERRUPTED
    if isinstance(e, TrainingInterrupted):
        where = f"stopped by {e.signal_name} after step {e.step}: saved the checkpoint {e.checkpoint}"
    else:
        found = state.list_checkpoints(out)
        where = ("interrupted: its newest checkpoint is step {} ({}); the steps since are lost".format(*found[-1])
                 if found else "interrupted before its first checkpoint")
    print(f"daguerre train {args.stage}: {where}\ncontinue with: {resume_command(args, out)}", file=sys.stderr)
    return INTERRUPTED


@contextlib.contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """Turn an error of the file system under a run (disk full, read-only, no permission) into one line
    naming the file or `folder`; what was already written stays (every file is written atomically)."""
    try:
        yield
    except OSError as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            raise
        where = e.filename or folder
        full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        hint = "free some space, then continue with --resume" if full else "choose another --out or fix its permissions"
        raise ValueError(f"cannot write {where} ({e.strerror or e}) in {folder}: {hint}; "
                         "files already written are kept") from None


def _zero_shot(args: argparse.Namespace) -> dict:
    """{dataset: results} of `daguerre train zero-shot`, printed as one line per number."""
    from ..metrics.zero_shot import zero_shot
    from ..registry import open_clip

    if args.n < 1:
        raise ValueError(f"--n {args.n}: give at least 1 image")
    model = open_clip(args.clip)
    kind = args.dataset or model.clip_config.provenance.get("data", {}).get("kind", "shapes")
    if kind not in ("shapes", "fashion_mnist"):
        raise ValueError(f"{args.clip} was trained on {kind!r} data; choose --dataset shapes or fashion_mnist")
    if model.clip_config.latent_space is not None:  # noise-aware: the shapes world at each noise level
        from ..training.noisy_clip import noisy_zero_shot

        result = {kind: noisy_zero_shot(model, kind, args.n)}
    else:
        result = {kind: zero_shot(model, kind, args.n, root=args.root)}
    for k, v in result[kind].items():
        print(f"{kind} {k}: {v:.4f}" if isinstance(v, float) else f"{kind} {k}: {v}")
    return result


def _export(args: argparse.Namespace) -> Path:
    """The model file of a checkpoint: a stage-2 model, or the CLIP file of a clip run."""
    from ..training.export import export_checkpoint, find_checkpoint

    run_dir = Path(args.run_dir)
    folder, meta = find_checkpoint(run_dir, args.step)
    if meta["run_config"].get("stage") != "clip":
        return export_checkpoint(run_dir, args.step, args.out, adapter=args.adapter)
    if args.adapter:
        raise ValueError(f"{run_dir} is a CLIP run: --adapter writes a fine-tuned diffusion model's adapter file")
    from ..training.clip import export_clip_checkpoint

    out = Path(args.out) if args.out else run_dir / f"clip_step_{int(meta['step']):08d}.safetensors"
    return export_clip_checkpoint(folder, meta, out)


@command("train", "train the autoencoder (vae), the diffusion model (ldm) or a CLIP model (clip); export a "
         "checkpoint", _add_arguments)
def run(args: argparse.Namespace) -> int:
    if args.list_configs:
        print(list_configs())
        return 0
    if not getattr(args, "stage", None):
        raise ValueError("choose a stage: `daguerre train vae ...`, `daguerre train ldm ...` or "
                         "`daguerre train clip ...` (`daguerre train --list-configs` lists the shipped configs)")
    if args.stage == "zero-shot":
        result = _zero_shot(args)
        if args.json:
            import json

            from ..fileio import atomic_write_text

            atomic_write_text(Path(args.json), json.dumps(result, indent=1))
        return 0
    if args.stage == "export":
        with _writing(Path(args.out).parent if args.out else Path(args.run_dir)):
            print(_export(args))
        return 0
    from ..training.config import load_run_config

    if args.stage in ("lora", "embedding") and args.init:  # a shipped model's name stands for its file
        from ..registry import shipped_models

        args.init = str(shipped_models().get(args.init, args.init))
    overrides = _data_overrides(args) + list(args.overrides) + ([f"train.init_from={args.init}"] if args.init else [])
    cfg = load_run_config(args.config, args.stage, overrides)
    out = _out_dir(args)
    try:
        with _writing(out):
            if args.stage == "vae":
                from ..training.vae import train_vae

                path = train_vae(cfg, out, resume=args.resume, until=args.until)
            elif args.stage == "lora":
                from ..training.lora import train_lora

                path = train_lora(cfg, out, resume=args.resume, until=args.until)
            elif args.stage == "embedding":
                from ..training.embedding import train_embedding

                path = train_embedding(cfg, out, resume=args.resume, until=args.until)
            elif args.stage == "clip":
                from ..training.clip import train_clip

                path = train_clip(cfg, out, resume=args.resume, until=args.until)
            else:
                from ..training.ldm import train_ldm

                path = train_ldm(cfg, out, vae_path=args.vae, resume=args.resume, until=args.until)
    except KeyboardInterrupt as e:  # SIGINT / SIGTERM (training.loop.StopSignals)
        return _interrupted(args, out, e)
    print(path)
    return 0
