"""`daguerre eval --data FOLDER`: a model trained on a folder of the user's own images, measured against the
folder's held-out images, in a feature space that needs no download.

1. The folder as the model saw it (`folder_spec`): the size, channels, caption source and held-out split
   (data.holdout, data.seed, random or last-items split) its training provenance records (`trained_on`);
   --holdout / --data-seed override them. A folder other than the recorded one needs --holdout: "all" for
   a separate test folder the model never saw (CIFAR-10's test split), N for a moved copy. A dataset
   folder of train/ and test/ folders (`folder_data.split_layout`, CIFAR-10's) is measured on its test
   folder, the floor drawn from its train folder. A model that records no training data takes the training
   defaults (64, 0).
2. Prompts (`folder_items`), image i from seed `seed + i`: a class-conditional model gets each of the
   folder's classes (n/K each; its class names must be the folder's); a text model the class caption
   "a photo of a X" of each class (`data.folder.class_caption`), or, in a folder without classes, the
   captions of the held-out images in a seeded order; an unconditional model the empty prompt.
3. Adherence: the folder classifier's argmax against the prompted class (`daguerre classifier train
   --dataset folder`; refused when trained on another folder or for another size, channels or classes);
   for captions, the CLIP score (`--clip`, a CLIP from `daguerre train clip`), beside the score of the
   held-out images against their own captions.
4. Frechet distance and KID (`evaluate.distribution_scores`) of the generated images against up to --real
   held-out images; the floor compares n_generated images of the train split (a test folder: other images
   of it; a dataset folder: of its train folder) with the same held-out images, what a model that draws
   real images of the folder would score.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .evaluate import (
    FLOOR_KEY,
    FOLDER,
    REAL_KEY,
    EvalItem,
    EvalResult,
    EvalSettings,
    distribution_scores,
    extractor_record,
    generate,
    grid_indices,
    judge_fashion,
    sample_grid,
    summarize,
    to_batch,
)
from .folder_data import (
    DEFAULT_HOLDOUT,
    LAST_SPLIT,
    RANDOM_SPLIT,
    TEST_DIR,
    TRAIN_DIR,
    Folder,
    FolderSpec,
    names_words,
    split_indices,
    split_layout,
)

if TYPE_CHECKING:
    from ..components import Components
    from .classifiers import ClassifierExtractor
    from .clip_score import CLIPJudge
    from .extractors import FeatureExtractor

HOLDOUT_ALL = "all"
CAPTION_KEY = 400_000  # caption-folder prompts: the held-out captions in the order of rng((CAPTION_KEY, seed))


@dataclass(frozen=True)
class TrainedOn:
    """What a model's training provenance records of its data (`provenance["data"]` and the run config's)."""

    kind: str  # "folder", "shapes" or "fashion_mnist"
    root: str | None = None  # folder: the resolved training folder
    size: int | None = None
    channels: int | None = None
    captions: str = "auto"
    holdout: int = DEFAULT_HOLDOUT
    seed: int = 0
    split: str = LAST_SPLIT  # runs before the random split record none

    def describe(self) -> str:
        return f"the folder {self.root}" if self.kind == FOLDER else f"the {self.kind} dataset"


def trained_on(config: Any) -> TrainedOn | None:
    """The training data a model file records, None when it records none (imported or random models)."""
    prov = getattr(config, "provenance", None) or {}
    data = prov.get("data") if isinstance(prov.get("data"), dict) else {}
    run = (prov.get("run_config") or {}).get("data") or {}
    kind = data.get("kind") or run.get("kind")
    if not isinstance(kind, str):
        return None
    folder = run.get("folder") or {}
    return TrainedOn(
        kind=kind, root=data.get("root") or folder.get("root"), size=data.get("size") or run.get("size"),
        channels=data.get("channels") or folder.get("channels"),
        captions=data.get("captions") or folder.get("captions") or "auto",
        holdout=int(run.get("holdout", DEFAULT_HOLDOUT)), seed=int(data.get("seed", run.get("seed", 0))),
        split=RANDOM_SPLIT if data.get("split") == RANDOM_SPLIT else LAST_SPLIT,
    )


def parse_holdout(text: str | None) -> int | str | None:
    """--holdout: None (unset), HOLDOUT_ALL, or a count >= 0."""
    if text is None or text == HOLDOUT_ALL:
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"--holdout {text!r}: give a number of held-out images >= 0, or 'all' (a test folder the "
                         "model never saw)")
    return value


def same_folder(a: str | Path, b: str | Path | None) -> bool:
    return b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


@dataclass(frozen=True)
class FolderPlan:
    """What a folder evaluation reads: `spec` (its held-out images are the real ones), the `floor` spec of a
    dataset folder's train folder (None: the floor comes from `spec`'s own train split or test images), the
    model's training record, and notes for the user."""

    spec: FolderSpec
    floor: FolderSpec | None
    trained: TrainedOn | None
    notes: tuple[str, ...] = ()


def folder_spec(config: Any, data: str, holdout: int | str | None, seed: int | None, name: str) -> FolderPlan:
    """How to read `data` for model `name` (module docstring, 1)."""
    rec = trained_on(config)
    notes: list[str] = []
    size = (rec.size if rec else None) or config.sample_size
    channels = (rec.channels if rec and rec.kind == FOLDER else None) or config.vae.out_channels
    captions = rec.captions if rec and rec.kind == FOLDER else "auto"
    layout = split_layout(data)
    if layout is not None:
        if holdout not in (None, HOLDOUT_ALL):
            raise ValueError(f"--data {data} is a dataset of {TRAIN_DIR}/ and {TEST_DIR}/ folders: its test folder "
                             "is the held-out set; leave out --holdout")
        train, test = layout
        if rec is not None and not (rec.kind == FOLDER and same_folder(train, rec.root)):
            notes.append(f"model {name} was trained on {rec.describe()}, not on {train}: {test} counts as images "
                         "it never saw")
        # a test folder's captions: whatever it has (the training folder's caption source may be missing there)
        spec = FolderSpec(str(test), int(size), int(channels), None, seed or 0, RANDOM_SPLIT, "auto").check()
        return FolderPlan(spec, replace(spec, root=str(train)), rec, tuple(notes))
    if rec is None:
        notes.append(f"model {name} records no training data: the held-out split is --holdout "
                     f"{holdout if holdout is not None else DEFAULT_HOLDOUT}, --data-seed {seed or 0} (pass the "
                     "values it was trained with)")
        split, default_holdout, default_seed = RANDOM_SPLIT, DEFAULT_HOLDOUT, 0
    elif rec.kind == FOLDER and same_folder(data, rec.root):
        split, default_holdout, default_seed = rec.split, rec.holdout, rec.seed
    elif holdout is None:
        hint = (f" (or --holdout {rec.holdout} --data-seed {rec.seed} if it is a copy of that folder)"
                if rec.kind == FOLDER else "")
        raise ValueError(f"model {name} was trained on {rec.describe()}, not on --data {data}: pass --holdout all "
                         f"if {data} is a test folder the model never saw{hint}")
    else:
        split, default_holdout, default_seed = rec.split if rec.kind == FOLDER else RANDOM_SPLIT, rec.holdout, rec.seed
    held = default_holdout if holdout is None else None if holdout == HOLDOUT_ALL else int(holdout)
    spec = FolderSpec(str(data), int(size), int(channels), held, default_seed if seed is None else seed, split,
                      captions if held is not None else "auto")
    return FolderPlan(spec.check(), None, rec, tuple(notes))


# --- checks: refusals instead of meaningless numbers -----------------------------------------------

def is_class_model(config: Any) -> bool:
    from ..conditioning import ClassConditioner, conditioner_for

    return isinstance(conditioner_for(config), ClassConditioner)


def probe_request(config: Any, sampling: dict[str, Any]) -> Any:
    """The validated request of the evaluation's sampling settings (the model's defaults filled in): fails
    early on a bad setting."""
    from ..pipelines.request import GenerationRequest

    label = 0 if is_class_model(config) else None
    return GenerationRequest(**sampling, prompt="" if label == 0 else "x", class_label=label).validate(config)


def check_model(config: Any, folder: Folder, width: int, height: int, name: str) -> None:
    """The model draws images of the folder's size and, class-conditional, the folder's classes."""
    spec = folder.spec
    if (width, height) != (spec.size, spec.size):
        raise ValueError(f"model {name} draws {width}x{height} images but was trained on {spec.size}x{spec.size} "
                         f"ones of {spec.root}: its training record does not fit its network")
    if is_class_model(config):
        model_names = list(config.class_names or [])
        if folder.class_names is None:
            raise ValueError(f"model {name} is class-conditional on {names_words(model_names)}, but --data "
                             f"{spec.root} has no class sub-folders: give a folder of those classes")
        if model_names != folder.class_names:
            raise ValueError(f"model {name} draws the classes {names_words(model_names)}, --data {spec.root} has "
                             f"{names_words(folder.class_names)}: give a folder of the model's classes (one "
                             "sub-folder each, the same names)")


def check_classifier(clf: ClassifierExtractor, folder: Folder, rec: TrainedOn | None, flag: str) -> list[str]:
    """Refuse a classifier that cannot judge this folder's images (another kind, size, channels, classes or
    folder); return warnings (it trained on some of the held-out images measured here)."""
    c, spec, where = clf.config, folder.spec, clf.path or clf.name
    train_hint = f"train one with `{classifier_command(spec)}`"
    if c.kind != FOLDER:
        raise ValueError(f"{flag} {where} is the {c.kind} classifier, not one of a folder's classes: {train_hint}")
    if (c.image_size, c.in_channels) != (spec.size, spec.channels):
        raise ValueError(f"{flag} {where} reads {_format(c.image_size, c.in_channels)} images, the model draws "
                         f"{_format(spec.size, spec.channels)}: {train_hint}")
    if folder.class_names is None:
        raise ValueError(f"--data {spec.root} has no class sub-folders for {flag} {where} to judge: evaluate a "
                         "folder of captions with --clip (a CLIP from `daguerre train clip`)")
    if list(c.classes) != folder.class_names:
        raise ValueError(f"{flag} {where} knows the classes {names_words(c.classes)}, --data {spec.root} has "
                         f"{names_words(folder.class_names)}: {train_hint}")
    data = clf.info.training.get("data") or {}
    test = data.get("test") or {}
    prints = {data.get("fingerprint"), test.get("fingerprint") if test.get("which") == HOLDOUT_ALL else None}
    model_folder = rec is not None and rec.kind == FOLDER and same_folder(rec.root or "", data.get("root"))
    if folder.fingerprint not in prints and not model_folder:
        raise ValueError(f"{flag} {where} was trained on the folder {data.get('root')}, not on --data {spec.root} "
                         f"or the model's training folder: {train_hint}")
    if folder.fingerprint != data.get("fingerprint"):
        return []
    trained, _ = split_indices(len(folder), data.get("holdout", DEFAULT_HOLDOUT), data.get("seed", 0),
                               data.get("split", RANDOM_SPLIT))
    seen = len(np.intersect1d(trained, folder.held))
    if not seen:
        return []
    return [f"{flag} {where} was trained on {seen} of the {len(folder.held)} held-out images measured here (its "
            f"held-out split: {data.get('holdout')} images, seed {data.get('seed')}); its features and verdicts "
            f"favour them: train it with the model's held-out split, `{classifier_command(spec)}`"]


def classifier_command(spec: FolderSpec) -> str:
    """The `daguerre classifier train` command of a judge for `spec`: its size and channels and, for a
    held-out split, the model's `--holdout` and `--data-seed`, so that it never trains on the images eval
    measures (the default --holdout, 64, is not the photos recipes' 500)."""
    split = "" if spec.holdout is None else f" --holdout {spec.holdout} --data-seed {spec.seed}"
    return (f"daguerre classifier train --dataset folder --data {spec.root}{split} --size {spec.size} "
            f"--channels {spec.channels} --out FILE")


def _format(size: int, channels: int) -> str:
    return f"{size}x{size} {'RGB' if channels == 3 else 'grayscale'}"


# --- prompts and real images -----------------------------------------------------------------------

def folder_items(config: Any, folder: Folder, n: int, seed: int) -> list[EvalItem]:
    """The prompts of an evaluation against `folder`, with their seeds (module docstring, 2)."""
    from ..conditioning import conditioner_for
    from ..data.folder import class_caption

    items: list[EvalItem] = []
    names = folder.class_names
    if is_class_model(config) or (conditioner_for(config).takes_prompt and names):
        k = len(names)
        for label, name in enumerate(names):
            for _ in range(n // k + (label < n % k)):
                if is_class_model(config):
                    items.append(EvalItem("class", "", seed + len(items), label=label, class_label=label))
                else:
                    items.append(EvalItem("class", class_caption(name), seed + len(items), label=label))
        return items
    captions = [folder.captions[i] for i in folder.held]
    if conditioner_for(config).takes_prompt and any(captions):
        order = np.random.default_rng((CAPTION_KEY, seed)).permutation(len(captions))
        texts = [captions[order[i % len(order)]] for i in range(n)]
        return [EvalItem("caption", text, seed + i) for i, text in enumerate(texts)]
    return [EvalItem("unconditional", "", seed + i) for i in range(n)]


@dataclass
class ReferenceSets:
    """The real images FD / KID compare with: `real` (held-out) and `floor` (as many as were generated)."""

    real: torch.Tensor
    floor: torch.Tensor
    real_index: np.ndarray  # folder indices of `real`
    description: dict[str, str] = field(default_factory=dict)


def reference_indices(folder: Folder, n_generated: int, real: int, seed: int, floor_folder: Folder | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(real indices, floor indices): up to `real` held-out images drawn with (REAL_KEY, seed); the floor
    `n_generated` train-split images drawn with (FLOOR_KEY, seed) (of `floor_folder` when given), or, in a
    test folder, held-out images other than the real ones."""
    held = np.random.default_rng((REAL_KEY, seed)).permutation(folder.held)
    where = folder.spec.root
    if floor_folder is not None:
        pool = np.random.default_rng((FLOOR_KEY, seed)).permutation(len(floor_folder))
        if len(pool) < n_generated or len(held) < 2:
            raise ValueError(f"--n {n_generated}: the floor needs as many images of {floor_folder.spec.root} (it has "
                             f"{len(pool)}) and the real set at least 2 of {where} (it has {len(held)}); lower --n")
        return np.sort(held[:real]), np.sort(pool[:n_generated])
    if folder.spec.holdout is None:
        floor, rest = held[:n_generated], held[n_generated:]
        if len(floor) < n_generated or len(rest) < 2:
            raise ValueError(f"--data {where} has {len(held)} images: the floor needs --n {n_generated} of them and "
                             "the real set at least 2 others; lower --n")
        return np.sort(rest[:real]), np.sort(floor)
    if len(held) < 2:
        raise ValueError(f"--data {where} holds out {len(held)} image(s) (data.holdout): Frechet distance needs at "
                         "least 2; evaluate on a separate test folder with --holdout all")
    train = np.random.default_rng((FLOOR_KEY, seed)).permutation(folder.train)
    if len(train) < n_generated:
        raise ValueError(f"--n {n_generated}: the floor needs as many real images of the train split, and --data "
                         f"{where} has {len(train)}; lower --n")
    return np.sort(held[:real]), np.sort(train[:n_generated])


def reference_sets(folder: Folder, n_generated: int, real: int, seed: int, floor_folder: Folder | None = None
                   ) -> ReferenceSets:
    real_idx, floor_idx = reference_indices(folder, n_generated, real, seed, floor_folder)
    real_x, real_kept = folder.images(real_idx)
    floor_x, _ = (floor_folder or folder).images(floor_idx)
    if len(real_x) < 2 or len(floor_x) < 2:
        raise ValueError(f"too few readable images in {folder.spec.root} for Frechet distance")
    test = folder.spec.holdout is None
    if floor_folder is not None:
        floor_words = (f"{len(floor_x)} images of the train folder {floor_folder.spec.root}, drawn with "
                       "(FLOOR_KEY, seed)")
    elif test:
        floor_words = f"{len(floor_x)} other images of the test folder"
    else:
        floor_words = f"{len(floor_x)} images of the train split, drawn with (FLOOR_KEY, seed)"
    description = {
        "real_images": f"{len(real_x)} {'images of the test folder' if test else 'held-out images'}, drawn with "
                       f"(REAL_KEY, seed)",
        "floor_images": floor_words,
    }
    return ReferenceSets(real_x, floor_x, real_kept, description)


# --- the whole evaluation --------------------------------------------------------------------------

@dataclass
class FolderJudges:
    """Who judges a folder evaluation: the classifier (class adherence, or None), the feature extractor, the
    CLIP (a CLIP score; a string: why there is none; None)."""

    classifier: ClassifierExtractor | None
    extractor: FeatureExtractor
    clip: CLIPJudge | str | None = None
    warnings: list[str] = field(default_factory=list)


def evaluate_folder(components: Components, settings: EvalSettings, folder: Folder, judges: FolderJudges, *,
                    trained: TrainedOn | None = None, floor_folder: Folder | None = None,
                    model_info: dict[str, Any] | None = None,
                    progress: Callable[[int], None] | None = None) -> EvalResult:
    """Generate, judge and measure against `folder` (module docstring); the report has the keys of
    `evaluate.evaluate`'s, with "data" (the folder, its split, the model's training record)."""
    from ..pipelines.request import FEWER_CALLS_FIELDS

    settings = replace(settings, dataset=FOLDER).check()
    request = probe_request(components.config, settings.sampling)
    name = (model_info or {}).get("spec", components.config.name)
    check_model(components.config, folder, request.width, request.height, name)
    items = folder_items(components.config, folder, settings.n, settings.seed)
    refs = reference_sets(folder, len(items), settings.real, settings.seed, floor_folder)  # fails before the work
    t0 = time.perf_counter()
    images = generate(components, items, settings, model_hash=(model_info or {}).get("hash"), on_image=progress)
    gen_seconds = time.perf_counter() - t0
    batch = to_batch(images)
    clf = judges.classifier
    if clf is not None and items[0].kind == "class":
        probs = clf.probabilities(batch)
        verdicts = judge_fashion(probs, items)
        seen = [folder.class_names[k] for k in probs.argmax(-1).tolist()]
        adherence = summarize(verdicts, items, folder.class_names)
    else:
        verdicts, seen = [{} for _ in items], [""] * len(items)
        adherence = {"skipped": _no_adherence(items[0].kind, clf)}
    dist = distribution_scores(judges.extractor, batch, refs.real, refs.floor, settings.seed)
    clip_report = _clip_report(judges.clip, batch, items, folder, refs, settings.batch)
    indices = grid_indices(items)
    grid = sample_grid(images, verdicts, items, indices)
    data = {**folder.describe(), "trained_on": trained.__dict__ if trained else None, **refs.description,
            **({"floor_folder": floor_folder.describe()} if floor_folder is not None else {})}
    classifier = None
    if clf is not None:
        classifier = {"name": clf.name, "sha256": clf.sha256, "accuracy": clf.info.accuracy,
                      "file": str(clf.path) if clf.path else None}
        if folder.labels is not None:  # the judge on the real images measured here: is it sound on them?
            pred = clf.probabilities(refs.real).argmax(-1).numpy()
            classifier["accuracy_on_real"] = float((pred == folder.labels[refs.real_index]).mean())
    report = {
        "dataset": FOLDER,
        "data": data,
        "model": model_info or {},
        "settings": {
            "kinds": list(dict.fromkeys(item.kind for item in items)), "n": settings.n, "seed": settings.seed,
            "steps": request.steps, "sampler": request.sampler, "schedule": request.schedule,
            "cfg_scale": request.cfg_scale, "width": request.width, "height": request.height,
            "batch": settings.batch, "real": settings.real,
            "fewer_calls": {f: getattr(request, f) for f in FEWER_CALLS_FIELDS},
            **refs.description,
        },
        "classifier": classifier,
        "extractor": extractor_record(judges.extractor),
        "adherence": adherence,
        "distribution": dist,
        **({"clip_score": clip_report} if clip_report is not None else {}),
        "warnings": judges.warnings,
        "timing": {"images": len(images), "generation_seconds": round(gen_seconds, 3),
                   "seconds_per_image": gen_seconds / len(images)},
        "grid": indices,
        "samples": [{"kind": it.kind, "prompt": it.prompt, "seed": it.seed,
                     **({"class_name": folder.class_names[it.label]} if it.label is not None else {}), **v,
                     **({"seen": s} if s else {})}
                    for it, v, s in zip(items, verdicts, seen, strict=True)],
    }
    return EvalResult(report, images, grid)


def _no_adherence(kind: str, classifier: ClassifierExtractor | None) -> str:
    if kind == "class":
        return ("no classifier of the folder's classes: pass --classifier FILE (`daguerre classifier train "
                "--dataset folder --data FOLDER --out FILE`)")
    if kind == "caption":
        return "a folder of captions: its adherence is the CLIP score (--clip)"
    return "an unconditional model (or a folder without classes or captions) has no prompts to adhere to"


def _clip_report(clip: CLIPJudge | str | None, images: torch.Tensor, items: list[EvalItem], folder: Folder,
                 refs: ReferenceSets, batch: int) -> dict[str, Any] | None:
    """The CLIP score of the images against their prompts, with the held-out images' score against their own
    captions as each entry's "reference"."""
    if clip is None or isinstance(clip, str):
        return None if clip is None else {"skipped": clip}
    out = clip.report(images, [item.prompt for item in items], [item.kind for item in items], batch=batch)
    from ..data.folder import class_caption
    from .clip_score import summarize_scores

    if items[0].kind == "class":  # the prompts are class captions: so are the real images'
        texts = [class_caption(folder.class_names[k]) for k in folder.labels[refs.real_index]]
    else:
        texts = [folder.captions[i] for i in refs.real_index]
    reference = summarize_scores(clip.scores(refs.real, texts, batch))
    for entry in out.values():
        if isinstance(entry, dict) and "mean" in entry:
            entry["reference"] = reference
    out["reference_images"] = "held-out images against their own captions"
    return out
