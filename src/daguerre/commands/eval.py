"""`daguerre eval --model MODEL`: prompt adherence, Frechet distance, KID, Inception Score and CLIP score of a model.

    daguerre eval --model shapes --n 100 --out eval/shapes
    daguerre eval --model fashion --n 500 --extractor inception:pt_inception-2015-12-05.pth
    daguerre eval --model shapes --n 200 --fast --dtype bf16 --out eval/shapes-fast
    daguerre eval --model my-sd.safetensors --dataset shapes --clip openai-clip-vit-b-32/
    daguerre eval --model runs/photos/model.safetensors --data photos --classifier photos-classifier.safetensors
    daguerre eval --model cifar.safetensors --data cifar10/test --holdout all --classifier cifar.safetensors
    daguerre eval --model runs/captions/model.safetensors --data captioned --clip captioned-clip.safetensors

It takes the settings of fewer network calls (`--fast`, `--cfg-cutoff`, `--deepcache`, ...) as `daguerre
generate` does, so their quality cost is measured on the same seeds as the exact path.

Writes DIR/report.json (every number, the seeds, the sampler settings, the model's and the feature
extractor's sha256, every prompt with its verdict) and DIR/grid.png, and prints a table. See
docs/evaluation.md for what each number means.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .generate import add_model_arguments, checked_config, set_threads
from .registry import command
from .request_args import CLIP_GUIDANCE, FEWER_CALLS, LAYOUT_STEPS, add_request_arguments, request_fields


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--dataset", choices=["shapes", "fashion_mnist"], default=None,
                   help="what the model draws (default: from the model's training provenance)")
    p.add_argument("--data", default=None, metavar="FOLDER",
                   help="a folder of your own images to measure against (default for a model trained on a folder: "
                   "that folder); its held-out images are the real ones (docs/evaluation.md)")
    p.add_argument("--holdout", default=None, metavar="N|all",
                   help="--data: images held out of training (default: the model's data.holdout); 'all' for a test "
                   "folder the model never saw")
    p.add_argument("--data-seed", type=int, default=None,
                   help="--data: the seed of the held-out split (default: the model's data.seed)")
    p.add_argument("--prompts", default=None, help="shapes prompt kinds, comma-separated (default single,relation)")
    p.add_argument("--n", type=int, default=100, help="images per prompt kind (shapes) / in total, n/10 per class "
                   "(fashion); default 100")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, the reference sets and image i "
                   "(seed + i); default 0")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's recommended "
                   "settings, as daguerre generate uses them)")
    p.add_argument("--sampler", default=None, help="sampler (default: the model's, as daguerre generate)")
    p.add_argument("--schedule", default=None, help="schedule type (default: the model's, as daguerre generate)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's, "
                   "as daguerre generate)")
    add_request_arguments(p, "txt2img", only=FEWER_CALLS + CLIP_GUIDANCE + LAYOUT_STEPS)  # --cfg-cutoff, ...
    p.add_argument("--extractor", default="default", help="feature space of FD / KID / IS: 'default' (the dataset's "
                   "shipped classifier; --data: the --classifier, else the --clip's image tower), a classifier "
                   "file, 'clip' (the --clip's image tower) or inception:PATH (docs/inception.md)")
    p.add_argument("--classifier", default="default", help="adherence judge: 'default' (shipped; --data: none) or a "
                   "classifier file (`daguerre classifier train`)")
    p.add_argument("--clip", default=None, metavar="CLIP",
                   help="CLIP model of the CLIP score: a shipped CLIP's name or a path (daguerre CLIP file, "
                   "transformers folder, OpenCLIP / OpenAI checkpoint), and with --clip-guidance the guiding CLIP; "
                   "default: the CLIP shipped for a shipped model, if any")
    p.add_argument("--real", type=int, default=1000, help="real reference images for FD / KID (default 1000)")
    p.add_argument("--batch", type=int, default=8, help="images per network call (default 8)")
    p.add_argument("--out", "-o", default="outputs/eval", help="output folder (default outputs/eval)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report.json and grid.png of an earlier run in --out (default: an error)")
    p.add_argument("--map-scale", type=int, default=1, metavar="K",
                   help="semantic-synthesis models: draw the held-out maps at K times the training size (default 1; "
                   "docs/layout.md)")
    p.add_argument("--map-tiles", type=int, default=1, metavar="K",
                   help="semantic-synthesis models: draw canvases of K x K held-out scenes side by side, each at the "
                   "training size (LDM's larger maps: a wider view, the objects at their size; --n canvases; "
                   "default 1; docs/layout.md)")
    p.add_argument("--layout-prompt", choices=("background", "caption", "none"), default="caption",
                   help="layout models: the prompt beside each held-out layout: the scene's caption (the default: "
                   "how a layout is given, with its text), its background alone ('on a white background'), or none")


@command("eval", "measure a model: prompt adherence, Frechet distance, KID, Inception Score", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..metrics.evaluate import EvalSettings, dataset_of, evaluate, format_table

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out}: a file of that name exists; name a folder")
    _check_out(out, args.overwrite)
    from ..metrics.layout import check_map_size

    check_map_size(args.map_scale, args.map_tiles)  # before any model work
    kinds = tuple(k.strip() for k in args.prompts.split(",") if k.strip()) if args.prompts else ("single", "relation")
    _check_prompts(args.prompts, args.dataset)
    sampling = {k: v for k, v in (("steps", args.steps), ("sampler", args.sampler), ("schedule", args.schedule),
                                  ("cfg_scale", args.cfg)) if v is not None}
    sampling.update(request_fields(args, "txt2img", only=FEWER_CALLS + CLIP_GUIDANCE + LAYOUT_STEPS))
    if sampling.get("clip_guidance") and args.clip is not None:
        sampling["clip_model"] = args.clip
    _check_data_flags(args)
    if args.dataset is not None:  # check the cheap things before loading anything
        EvalSettings(args.dataset, kinds, args.n, args.seed, sampling, args.real, args.batch).check()
    if args.clip is not None:
        from ..registry import clip_path

        clip_path(args.clip)  # exists, before the model is loaded

    from ..metrics.extractors import load_classifier_extractor, load_extractor
    from ..registry import default_model_name, open_model

    spec = args.model or default_model_name()
    yaml = checked_config(args.config, spec)  # --config: the checkpoint's CompVis YAML
    comps, short_hash = open_model(spec, device=args.device, dtype=args.dtype,  # read straight into it
                                   quantize=args.quantize, compile=args.compile, original_config=yaml,
                                   base=args.base)
    set_threads(args, comps)
    from ..conditioning import conditioner_for

    conditioner = conditioner_for(comps.config)
    if conditioner.concat.takes_map or conditioner.takes_layout:  # issue 18: boxes and maps, judged by colour
        return _run_spatial(args, spec, comps, short_hash, sampling, out)
    data = _folder_of(args, spec, comps.config)
    if data is not None:
        return _run_folder(args, data, spec, comps, short_hash, sampling, out)
    dataset = args.dataset or dataset_of(comps.config)
    if dataset is None:
        raise ValueError(f"model {spec!r} does not say which dataset it was trained on; pass --dataset shapes, "
                         "--dataset fashion_mnist or --data FOLDER")
    _check_prompts(args.prompts, dataset)
    settings = EvalSettings(dataset, kinds, args.n, args.seed, sampling, args.real, args.batch).check()
    if args.verbose:
        from ..precision import describe_run

        print(f"daguerre eval: {describe_run(comps.unet)}", file=sys.stderr, flush=True)
    device = next(comps.unet.parameters()).device
    if args.extractor == "clip":
        raise ValueError("--extractor clip is for --data FOLDER (a CLIP trained on its captions); the shapes and "
                         "Fashion-MNIST scores use the shipped classifiers")
    classifier = load_classifier_extractor(args.classifier, dataset, device)
    extractor = classifier if args.extractor == args.classifier else load_extractor(args.extractor, dataset, device)
    model_info = _model_info(args, spec, comps, short_hash)

    clip = _clip_judge(_scoring_clip(args.clip, bool(sampling.get("clip_guidance"))), spec, comps, device)
    if isinstance(clip, str):
        print(f"daguerre eval: no CLIP score: {clip}", file=sys.stderr)

    from tqdm import tqdm

    total = len(settings.kinds) * settings.n if dataset == "shapes" else settings.n
    with tqdm(total=total, unit="img", desc="eval", disable=not args.progress, dynamic_ncols=True) as bar:
        result = evaluate(comps, settings, classifier, extractor, model_info=model_info, progress=bar.update,
                          clip=clip)
    _write(out, result, args.overwrite)
    print(format_table(result.report))
    print(f"wrote {out / 'report.json'} and {out / 'grid.png'}", file=sys.stderr)
    return 0


def _run_spatial(args: argparse.Namespace, spec: str, comps, short_hash: str | None, sampling: dict,
                 out: Path) -> int:
    """`daguerre eval` of a layout or semantic-synthesis model (metrics.layout): held-out scenes of its shapes
    world drawn from their layouts or maps, the objects found by colour."""
    from tqdm import tqdm

    from ..metrics.layout import evaluate_spatial, format_spatial

    if args.data is not None or args.dataset is not None or args.prompts:
        raise ValueError(f"model {spec!r} draws from layouts or maps: it is measured on the held-out scenes of its "
                         "shapes world; leave out --data, --dataset and --prompts")
    with tqdm(total=args.n, unit="img", desc="eval", disable=not args.progress, dynamic_ncols=True) as bar:
        result = evaluate_spatial(comps, args.n, args.seed, sampling, scale=args.map_scale,
                                  tiles=args.map_tiles, prompt=args.layout_prompt, progress=bar.update)
    result.report["model"] = _model_info(args, spec, comps, short_hash)
    _write(out, result, args.overwrite)
    print(format_spatial(result.report))
    print(f"wrote {out / 'report.json'} and {out / 'grid.png'}", file=sys.stderr)
    return 0


def _scoring_clip(clip_spec: str | None, guided: bool) -> str | None:
    """The --clip that scores: `clip_spec`, or None (the model's own) when it names a noise-aware CLIP, which
    only guides (it reads noisy latents, not images); without --clip-guidance such a CLIP is refused."""
    from ..checkpoints.clip_file import reads_latents
    from ..registry import clip_path

    if clip_spec is None or not reads_latents(clip_path(clip_spec)):
        return clip_spec
    if not guided:
        raise ValueError(f"--clip {clip_spec} is a noise-aware CLIP: it guides (--clip-guidance) but cannot score "
                         "images; name a CLIP that reads pixels")
    return None


def _model_info(args: argparse.Namespace, spec: str, comps, short_hash: str | None) -> dict:
    """The report's "model": what was evaluated and how it ran."""
    from ..precision import dtype_of, short_name
    from ..registry import model_file

    return {"spec": spec, "name": comps.config.name, "hash": short_hash, **model_file(spec),
            "dtype": short_name(dtype_of(comps.unet)), "quantize": args.quantize or "none",
            "compile": args.compile, "device": str(next(comps.unet.parameters()).device)}


def _check_data_flags(args: argparse.Namespace) -> None:
    """Before any model work: --data goes without --dataset and --prompts, --holdout / --data-seed with --data."""
    from ..metrics.folder_eval import parse_holdout

    if args.data is None:
        if args.holdout is not None or args.data_seed is not None:
            raise ValueError("--holdout and --data-seed choose the held-out images of --data FOLDER; pass --data")
        return
    if args.dataset is not None or args.prompts:
        raise ValueError(f"--data {args.data} measures the model against a folder of images: leave out "
                         f"{'--dataset' if args.dataset is not None else '--prompts'} (a built-in dataset's)")
    if not Path(args.data).expanduser().is_dir():
        raise FileNotFoundError(f"--data {args.data}: no such folder")
    parse_holdout(args.holdout)
    if args.data_seed is not None and args.data_seed < 0:
        raise ValueError(f"--data-seed {args.data_seed}: give a seed >= 0")


def _folder_of(args: argparse.Namespace, spec: str, config) -> str | None:
    """The folder to measure against: --data, else the folder the model was trained on; a --dataset other than
    the model's training data is refused (its scores would mean nothing)."""
    from ..metrics.folder_eval import FOLDER, trained_on

    if args.data is not None:
        return args.data
    rec = trained_on(config)
    if rec is None or (args.dataset is not None and rec.kind == args.dataset):
        return None
    if rec.kind == FOLDER:
        if args.dataset is not None or not (rec.root and Path(rec.root).is_dir()):
            why = f"not on {args.dataset}" if args.dataset is not None else "which is not on this machine"
            raise ValueError(f"model {spec!r} was trained on the folder {rec.root}, {why}: evaluate it with "
                             "--data FOLDER (that folder, or a test folder of the same images with --holdout all)")
        print(f"daguerre eval: measuring against the model's training folder {rec.root} (its held-out images)",
              file=sys.stderr)
        return rec.root
    if args.dataset is not None:
        raise ValueError(f"model {spec!r} was trained on {rec.describe()}, not on {args.dataset}: its scores "
                         f"against {args.dataset} would mean nothing; leave out --dataset")
    return None


def _run_folder(args: argparse.Namespace, data: str, spec: str, comps, short_hash: str | None, sampling: dict,
                out: Path) -> int:
    """`daguerre eval --data FOLDER` (metrics.folder_eval)."""
    from ..metrics.evaluate import FOLDER, EvalSettings, format_table
    from ..metrics.folder_data import Folder, names_words
    from ..metrics.folder_eval import check_model, evaluate_folder, folder_spec, parse_holdout, probe_request

    settings = EvalSettings(FOLDER, (), args.n, args.seed, sampling, args.real, args.batch).check()
    plan = folder_spec(comps.config, data, parse_holdout(args.holdout), args.data_seed, spec)
    folder = Folder(plan.spec)
    floor = Folder(plan.floor) if plan.floor is not None else None
    if floor is not None and floor.class_names != folder.class_names:
        raise ValueError(f"the classes of {floor.root} ({names_words(floor.class_names)}) are not those of "
                         f"{folder.root} ({names_words(folder.class_names)}): give train and test folders of the "
                         "same classes")
    request = probe_request(comps.config, sampling)
    check_model(comps.config, folder, request.width, request.height, spec)
    judges = _folder_judges(args, folder, plan.trained, spec, comps, bool(sampling.get("clip_guidance")))
    for line in [*plan.notes, *judges.warnings]:
        print(f"daguerre eval: warning: {line}", file=sys.stderr)
    from tqdm import tqdm

    with tqdm(total=settings.n, unit="img", desc="eval", disable=not args.progress, dynamic_ncols=True) as bar:
        result = evaluate_folder(comps, settings, folder, judges, trained=plan.trained, floor_folder=floor,
                                 model_info=_model_info(args, spec, comps, short_hash), progress=bar.update)
    result.report["warnings"] = [*plan.notes, *judges.warnings]
    _write(out, result, args.overwrite)
    print(format_table(result.report))
    print(f"wrote {out / 'report.json'} and {out / 'grid.png'}", file=sys.stderr)
    return 0


def _folder_judges(args: argparse.Namespace, folder, trained, spec: str, comps, guided: bool):
    """The classifier (--classifier), feature extractor (--extractor) and CLIP (--clip) of a folder evaluation,
    each checked against the folder; a refusal when nothing gives a feature space."""
    from ..metrics.extractors import (
        DEFAULT,
        INCEPTION_PREFIX,
        CLIPImageExtractor,
        load_classifier_file,
        load_inception_extractor,
    )
    from ..metrics.folder_eval import FolderJudges, check_classifier

    device = next(comps.unet.parameters()).device
    warnings: list[str] = []
    classifier = None
    if args.classifier != DEFAULT:
        classifier = load_classifier_file(args.classifier, device)
        warnings += check_classifier(classifier, folder, trained, "--classifier")
    clip = _clip_judge(_scoring_clip(args.clip, guided), spec, comps, device)
    judge = clip if clip is not None and not isinstance(clip, str) else None
    where = folder.spec.root
    if args.extractor in (DEFAULT, args.classifier):
        extractor = classifier or (CLIPImageExtractor(judge) if judge is not None else None)
        if extractor is None:
            raise ValueError(f"no feature space for --data {where}: pass --classifier FILE (`daguerre classifier "
                             f"train --dataset folder --data {where} --out FILE`, a folder of classes), --clip FILE "
                             "(`daguerre train clip`, a folder of captions) or --extractor inception:PATH")
    elif args.extractor == "clip":
        if judge is None:
            raise ValueError("--extractor clip measures in the image tower of the --clip CLIP: pass --clip FILE")
        extractor = CLIPImageExtractor(judge)
    elif args.extractor.startswith(INCEPTION_PREFIX):
        extractor = load_inception_extractor(args.extractor, device)
    else:
        extractor = load_classifier_file(args.extractor, device)
        warnings += check_classifier(extractor, folder, trained, "--extractor")
    return FolderJudges(classifier, extractor, clip, warnings)


def _clip_judge(clip_spec: str | None, spec: str, comps, device):
    """The CLIP that scores the images (`--clip`, else the CLIP shipped for a shipped model), None when the
    model has none, or a string saying why the score is skipped (its shipped CLIP not installed)."""
    from ..conditioning import conditioner_for
    from ..metrics.clip_score import CLIPJudge
    from ..registry import clip_for_model, clip_path, open_clip, shipped_clips
    from ..weights.io import file_hash

    text = conditioner_for(comps.config).takes_prompt
    if clip_spec is None:
        clip_spec = clip_for_model(spec)
        if clip_spec is None or not text:
            return None
        if clip_spec not in shipped_clips():
            return f"{spec}'s CLIP, {clip_spec}, is not installed; pass --clip FILE"
    elif not text:
        raise ValueError(f"--clip scores images against their prompts, but model {spec!r} is "
                         f"{comps.config.conditioning}-conditioned: it has no prompts")
    path = clip_path(clip_spec)
    model = open_clip(clip_spec, device=device)
    return CLIPJudge(model, clip_spec, str(path), file_hash(path) if path.is_file() else None)


def _check_prompts(prompts: str | None, dataset: str | None) -> None:
    if prompts and dataset == "fashion_mnist":
        raise ValueError("--prompts chooses shapes-world prompt kinds; Fashion-MNIST prompts are one per class")


OUTPUT_FILES = ("report.json", "grid.png")


def _check_out(out: Path, overwrite: bool) -> None:
    """Before any model work: the files of an earlier run are kept unless --overwrite, and the folder (or
    the one it will be made in) must take new files."""
    from .outputs import check_folder

    if not overwrite:
        for name in OUTPUT_FILES:
            if os.path.lexists(out / name):
                raise ValueError(f"--out {out} already holds {name} (an earlier run): name another folder, or "
                                 "pass --overwrite to replace it")
    check_folder(out)


def _write(out: Path, result, overwrite: bool) -> None:
    """report.json, then grid.png; each atomic, and without --overwrite never replacing a file that appeared
    since the check."""
    import json

    from ..fileio import atomic_write_text
    from ..pngmeta import save_png
    from .outputs import make_folder

    make_folder(out)
    try:
        atomic_write_text(out / "report.json", json.dumps(result.report, indent=1, default=_jsonable) + "\n",
                          replace=overwrite)
        save_png(result.grid, out / "grid.png", replace=overwrite)
    except FileExistsError as e:
        raise ValueError(f"{e.filename} appeared during the evaluation and was kept; pass --overwrite to "
                         "replace it") from None


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"cannot write {type(x).__name__} to JSON")
