"""`daguerre eval`: how good a model is, in numbers: prompt adherence, Frechet distance, KID, Inception Score.

1. Prompts. Shapes world: `data.shapes.sample_prompts(kind, n, PROMPT_KEY + seed)` per kind ("single":
   one object; "relation": two objects in a spatial relation); Fashion-MNIST: "a photo of <noun>" for
   each class, n/10 each. Image i is generated from seed `seed + i`.
2. Adherence, judged by classifiers trained on real / rendered ground truth (`metrics.classifiers`):
   shapes: the predicted scene against the prompt (`PromptSpec.matches`): "shape_colour" = every object
   of the prompt present with the right shape and colour and no other object; "relation" = that and the
   relation true; "reversed" = the objects right and the relation turned around (A below B for "A above
   B"; the rest of the right objects stand on one line); "all" = every attribute the prompt names
   (size, position, relation, background).
   Fashion: "class" = the classifier's argmax is the prompted class.
3. Frechet distance (Heusel et al. 2017) and KID (Binkowski et al. 2018) in a feature extractor's space
   (`metrics.extractors`), generated vs real images: shapes: scenes of the same prompt distribution,
   freshly rendered from another seed (REAL_KEY + seed); fashion: the test split. The *floor* is the
   same comparison for a second real set of the generated set's size (shapes: rendered from
   FLOOR_KEY + seed; fashion: a train-split subset): what a perfect model would score at this n.
   Inception Score (Salimans et al. 2016) from the extractor's probabilities, when it has classes.
4. CLIP score (`metrics.clip_score`, Hessel et al. 2021), with a CLIP model (`daguerre eval --clip`): each
   image against its prompt, 100 * max(cos, 0); shapes: beside it the score of a rendered scene each prompt
   describes (the sanity-check scenes), what a perfect model would score.

A folder of the user's own images (`daguerre eval --data FOLDER`) is evaluated by `metrics.folder_eval`
with the generation, scores and outputs of this module.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..data.shapes import PROMPT_KINDS, ObjectSpec, PromptSpec, Relation, Scene, sample_prompts
from .extractors import DATASETS, FeatureExtractor, check_dataset
from .stats import feature_statistics, frechet_distance, inception_score, kernel_inception_distance

if TYPE_CHECKING:
    from ..components import Components
    from .classifiers import ClassifierExtractor
    from .clip_score import CLIPJudge

PROMPT_KEY = 100_000  # prompts: sample_prompts(kind, n, PROMPT_KEY + seed), apart from training seeds (0, 1, ...)
REAL_KEY = 200_000  # shapes reference images: rendered prompts of sample_prompts(kind, m, REAL_KEY + seed)
FLOOR_KEY = 300_000  # shapes floor images
FASHION_PROMPT = "a photo of {}"
FOLDER = "folder"  # EvalSettings.dataset of `daguerre eval --data FOLDER` (metrics.folder_eval)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10
IS_MIN_SPLIT = 10  # images per Inception Score split at least (fewer splits for fewer images)
GRID_MAX = 64  # images in grid.png
GRID_CELL = 64  # smaller images are scaled up (nearest) to at least this many pixels
FRAME = 2  # pixels of the right/wrong frame around each grid image
RIGHT, WRONG, UNJUDGED = (40, 200, 60), (220, 40, 40), (128, 128, 128)


@dataclass
class EvalSettings:
    """Everything `daguerre eval` varies. Sampling fields left out of `sampling` are the model's recommended
    settings (`ModelConfig.defaults`, else `GenerationRequest`'s), as `daguerre generate` uses them."""

    dataset: str  # "shapes", "fashion_mnist" or FOLDER
    kinds: tuple[str, ...] = ("single", "relation")  # shapes prompt kinds
    n: int = 100  # images per prompt kind (shapes), in total (fashion, folder)
    seed: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)  # GenerationRequest fields: steps, sampler, schedule, ...
    real: int = 1000  # reference images for FD / KID
    batch: int = 8  # images per network call (several images of one prompt)

    def check(self) -> EvalSettings:
        if self.dataset != FOLDER:
            check_dataset(self.dataset)
        if self.dataset == "shapes":
            bad = [k for k in self.kinds if k not in PROMPT_KINDS]
            if bad or not self.kinds:
                raise ValueError(f"unknown prompt kind(s) {', '.join(bad) or '(none)'}; choose from "
                                 f"{', '.join(PROMPT_KINDS)}, comma-separated")
        total = self.n * (len(self.kinds) if self.dataset == "shapes" else 1)
        if self.n < 1 or total < 2:
            raise ValueError(f"--n {self.n} is too small: Frechet distance needs at least 2 generated images")
        if self.real < 2:
            raise ValueError(f"--real {self.real} is too small: give at least 2 reference images")
        if self.batch < 1 or self.seed < 0:
            raise ValueError(f"need --batch >= 1 and --seed >= 0, got {self.batch} and {self.seed}")
        return self


@dataclass
class EvalItem:
    """One image to generate and judge."""

    kind: str  # "single", "relation" (shapes), "class" (fashion, folder), "caption" or "unconditional" (folder)
    prompt: str
    seed: int
    spec: PromptSpec | None = None  # shapes
    scene: Scene | None = None  # shapes: a scene that satisfies the prompt (the sanity check renders it)
    label: int | None = None  # fashion, folder: the class the image should show
    class_label: int | None = None  # a class-conditional model's label (request field `class_label`)


def eval_items(settings: EvalSettings) -> list[EvalItem]:
    """The prompts of an evaluation, with their seeds."""
    items: list[EvalItem] = []
    if settings.dataset == "shapes":
        for kind in settings.kinds:
            for p in sample_prompts(kind, settings.n, PROMPT_KEY + settings.seed):
                items.append(EvalItem(kind, p.text, settings.seed + len(items), spec=p.spec, scene=p.scene))
    else:
        from ..data.fashion_mnist import CAPTION_NOUNS

        k = len(CAPTION_NOUNS)
        for label, noun in enumerate(CAPTION_NOUNS):
            for _ in range(settings.n // k + (label < settings.n % k)):
                items.append(EvalItem("class", FASHION_PROMPT.format(noun), settings.seed + len(items), label=label))
    return items


# --- generation ------------------------------------------------------------------------------------

def generate(components: Components, items: Sequence[EvalItem], settings: EvalSettings, *,
             model_hash: str | None = None, on_image: Callable[[int], None] | None = None) -> list[Image.Image]:
    """One image per item: consecutive items with the same prompt and class label are one request (seeds seed,
    seed+1, ...)."""
    from ..pipelines.request import GenerationRequest
    from ..pipelines.txt2img import txt2img

    images: list[Image.Image] = []
    i = 0
    while i < len(items):
        j = i + 1
        while (j < len(items) and (items[j].prompt, items[j].class_label) == (items[i].prompt, items[i].class_label)
               and items[j].seed == items[j - 1].seed + 1):
            j += 1
        request = GenerationRequest(**settings.sampling, prompt=items[i].prompt, class_label=items[i].class_label,
                                    seed=items[i].seed, n=j - i, batch_size=settings.batch
                                    ).validate(components.config)
        for result in txt2img(components, request, model_hash=model_hash):
            images.append(result.image)
            if on_image is not None:
                on_image(1)
        i = j
    return images


def to_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, C, H, W) float32 in [-1, 1]."""
    from ..data.transforms import to_tensor

    return torch.stack([to_tensor(im) for im in images])


# --- adherence -------------------------------------------------------------------------------------

def _shape_colour(spec: PromptSpec, relation: bool) -> PromptSpec:
    return PromptSpec(tuple(ObjectSpec(o.shape, o.colour) for o in spec.objects), spec.relation if relation else None)


def judge_shapes(predicted: Sequence[Scene], items: Sequence[EvalItem]) -> list[dict[str, bool]]:
    """Per image: "shape_colour", "relation" (relation prompts only) and "all" (see the module docstring)."""
    out = []
    for scene, item in zip(predicted, items, strict=True):
        verdict = {"shape_colour": _shape_colour(item.spec, False).matches(scene)}
        if item.spec.relation is not None:
            verdict["relation"] = _shape_colour(item.spec, True).matches(scene)
            rel = item.spec.relation
            turned = Relation(rel.object, rel.relation, rel.subject)  # the same objects, the other way round
            verdict["reversed"] = _shape_colour(dataclasses.replace(item.spec, relation=turned), True).matches(scene)
        verdict["all"] = item.spec.matches(scene)
        out.append(verdict)
    return out


def judge_fashion(probs: torch.Tensor, items: Sequence[EvalItem]) -> list[dict[str, bool]]:
    pred = probs.argmax(-1).tolist()
    return [{"class": p == item.label} for p, item in zip(pred, items, strict=True)]


def judge(classifier: ClassifierExtractor, images: torch.Tensor, items: Sequence[EvalItem]
          ) -> tuple[list[dict[str, bool]], list[str]]:
    """(verdicts, what the classifier sees in each image, in words)."""
    if classifier.kind == "shapes":
        scenes = classifier.predict_scenes(images)
        return judge_shapes(scenes, items), [describe_scene(s) for s in scenes]
    probs = classifier.probabilities(images)
    names = classifier.config.classes
    return judge_fashion(probs, items), [names[k] for k in probs.argmax(-1).tolist()]


def describe_scene(scene: Scene) -> str:
    objs = "; ".join(f"{o.size} {o.colour} {o.shape} ({o.region})" for o in scene.objects) or "nothing"
    return f"{objs} on {scene.background}"


def summarize(verdicts: Sequence[dict[str, bool]], items: Sequence[EvalItem],
              class_names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per prompt kind: n and, per criterion, the fraction right and its binomial standard error."""
    out: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(item.kind for item in items):
        vs = [v for v, item in zip(verdicts, items, strict=True) if item.kind == kind]
        entry: dict[str, Any] = {"n": len(vs)}
        for key in vs[0]:
            p = sum(v[key] for v in vs) / len(vs)
            entry[key] = p
            entry[f"{key}_stderr"] = math.sqrt(p * (1 - p) / len(vs))
        if kind == "class" and class_names is not None:
            per = {}
            for label, name in enumerate(class_names):
                hits = [v["class"] for v, item in zip(verdicts, items, strict=True) if item.label == label]
                if hits:
                    per[name] = sum(hits) / len(hits)
            entry["per_class"] = per
        out[kind] = entry
    return out


# --- reference images ------------------------------------------------------------------------------

def shapes_reference(kinds: Sequence[str], n: int, key: int) -> torch.Tensor:
    """About `n` rendered images of the evaluation prompts' distribution (n split evenly over the kinds)."""
    from .train_classifier import render_scenes

    per = [n // len(kinds) + (i < n % len(kinds)) for i in range(len(kinds))]
    scenes = [p.scene for kind, m in zip(kinds, per, strict=True) if m for p in sample_prompts(kind, m, key)]
    return render_scenes(scenes)


def fashion_reference(split: str, n: int, seed: int, root: str | None = None) -> torch.Tensor:
    """`n` images of a Fashion-MNIST split, a random subset drawn with `seed` (all of them if n >= the split)."""
    from .train_classifier import fashion_tensors, to_unit_range

    x, _ = fashion_tensors(root, split)
    idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:n])
    return to_unit_range(x[torch.from_numpy(idx)])


def real_sets(settings: EvalSettings, n_generated: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference images, floor images of the generated set's size)."""
    if settings.dataset == "shapes":
        return (shapes_reference(settings.kinds, settings.real, REAL_KEY + settings.seed),
                shapes_reference(settings.kinds, n_generated, FLOOR_KEY + settings.seed))
    return (fashion_reference("test", settings.real, settings.seed),
            fashion_reference("train", n_generated, settings.seed))


def distribution_scores(extractor: FeatureExtractor, generated: torch.Tensor, real: torch.Tensor,
                        floor: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """FD and KID of generated vs real and of floor vs real in `extractor`'s space; IS if it has classes."""
    f_gen, f_real, f_floor = (extractor.features(x).double().cpu().numpy() for x in (generated, real, floor))
    stats_real = feature_statistics(f_real)

    def fd(f: np.ndarray) -> float:
        return frechet_distance(*feature_statistics(f), *stats_real)

    def kid(f: np.ndarray) -> dict[str, float]:
        mean, std = kernel_inception_distance(f, f_real, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=seed)
        return {"mean": mean, "std": std}

    out: dict[str, Any] = {
        "n_generated": len(f_gen), "n_real": len(f_real), "n_floor": len(f_floor), "feature_dim": f_gen.shape[1],
        "fd": fd(f_gen), "fd_floor": fd(f_floor), "kid": kid(f_gen), "kid_floor": kid(f_floor),
    }
    probs = extractor.probabilities(generated)
    if probs is not None:
        def score(p: torch.Tensor) -> dict[str, float]:
            # the splits must each be a sample of the whole set: generated images come grouped by prompt
            # (class), and a split of one class has IS 1; shuffle with a fixed permutation first
            p = p.double().cpu().numpy()[np.random.default_rng(0).permutation(len(p))]
            splits = max(1, min(IS_SPLITS, len(p) // IS_MIN_SPLIT))  # a split of one image always scores 1
            mean, std = inception_score(p, splits=splits)
            return {"mean": mean, "std": std, "splits": splits}

        out["is"] = score(probs)
        out["is_real"] = score(extractor.probabilities(real))
    return out


# --- outputs ---------------------------------------------------------------------------------------

def main_criterion(kind: str) -> str | None:
    """The verdict the grid frames show: the issue's target metric of each kind (None: no verdict)."""
    return {"single": "shape_colour", "relation": "relation", "class": "class"}.get(kind)


def _groups(items: Sequence[EvalItem]) -> dict[Any, list[int]]:
    """Item indices by prompt kind (shapes) or class (fashion), in order."""
    groups: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.label if item.kind == "class" else item.kind, []).append(i)
    return groups


def grid_indices(items: Sequence[EvalItem], limit: int = GRID_MAX) -> list[int]:
    """Up to `limit` images: the first ones of each prompt kind (fashion: of each class), in equal shares."""
    groups = _groups(items)
    per = max(1, limit // max(1, len(groups)))
    return sorted(i for idx in groups.values() for i in idx[:per])[:limit]


def sample_grid(images: Sequence[Image.Image], verdicts: Sequence[dict[str, bool]], items: Sequence[EvalItem],
                indices: Sequence[int]) -> Image.Image:
    """The images at `indices` in a grid, each framed green (right by its kind's main criterion) or red (grey:
    not judged); classes: one row per class when every class has as many images."""
    from ..pipelines.images import make_grid

    framed = []
    for i in indices:
        im = images[i].convert("RGB")
        scale = max(1, math.ceil(GRID_CELL / max(im.size)))
        if scale > 1:
            im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
        ok = verdicts[i].get(main_criterion(items[i].kind) or "")
        frame = UNJUDGED if ok is None else RIGHT if ok else WRONG
        canvas = Image.new("RGB", (im.width + 2 * FRAME, im.height + 2 * FRAME), frame)
        canvas.paste(im, (FRAME, FRAME))
        framed.append(canvas)
    shown = _groups([items[i] for i in indices])
    counts = {len(v) for v in shown.values()}
    cols = counts.pop() if items and items[0].kind == "class" and len(counts) == 1 else None
    return make_grid(framed, cols=cols)


def format_table(report: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    m, s = report["model"], report["settings"]
    data = report.get("data")
    where = (f"folder {data['root']} ({_held_out_words(data)})" if report["dataset"] == FOLDER
             else f"dataset {report['dataset']}")
    lines = [
        f"model {m['spec']} ({m['name']}, sha256 {(m['sha256'] or 'none')[:16]}), {where}, seed {s['seed']}",
        f"sampling: {s['steps']} steps, {s['sampler']}, schedule {s['schedule']}, CFG {s['cfg_scale']:g}, "
        f"{s['width']}x{s['height']}; {report['timing']['seconds_per_image']:.3f} s/image",
        *([f"fewer network calls: {', '.join(f'{k} {v:g}' for k, v in s['fewer_calls'].items())}"]
          if _fewer_calls_on(s.get("fewer_calls", {})) else []),
    ]
    judge = report.get("classifier")
    if judge:
        on_real = (f", {100 * judge['accuracy_on_real']:.1f}% on the real images here"
                   if judge.get("accuracy_on_real") is not None else "")
        lines.append(f"adherence judged by {judge['name']} (sha256 {judge['sha256'][:16]}{_accuracy_words(judge)}"
                     f"{on_real})")
    skipped = report["adherence"].get("skipped")
    if skipped:
        lines.append(f"adherence: not measured ({skipped})")
    elif report["adherence"]:
        cols = ["shape_colour", "relation", "all"] if report["dataset"] == "shapes" else ["class"]
        lines.append(f"  {'prompts':<10}{'n':>6}" + "".join(f"{c:>16}" for c in cols))
        for kind, entry in report["adherence"].items():
            cells = "".join(f"{_pct(entry, c):>16}" for c in cols)
            lines.append(f"  {kind:<10}{entry['n']:>6}{cells}")
    rel = report["adherence"].get("relation")
    if rel is not None and "reversed" in rel:  # where the relation goes wrong
        right, turned, both = (round(rel[k] * rel["n"]) for k in ("relation", "reversed", "shape_colour"))
        lines.append(f"  of the {both} relation images with both objects right: {right} the right way round, "
                     f"{turned} reversed, {both - right - turned} on one line")
    d = report["distribution"]
    e = report["extractor"]
    lines.append(f"features: {e['name']} (sha256 {e['sha256'][:16]}, {d['feature_dim']}-d{_accuracy_words(e)}); "
                 f"generated {d['n_generated']} vs real {d['n_real']}; floor = {d['n_floor']} real vs real")
    lines.append(f"  Frechet distance  {d['fd']:12.4f}   floor {d['fd_floor']:.4f}")
    lines.append(f"  KID               {d['kid']['mean']:12.6f} +- {d['kid']['std']:.6f}   floor "
                 f"{d['kid_floor']['mean']:.6f} +- {d['kid_floor']['std']:.6f}")
    if "is" in d:
        lines.append(f"  Inception Score   {d['is']['mean']:12.4f} +- {d['is']['std']:.4f}   real "
                     f"{d['is_real']['mean']:.4f}")
    lines.extend(_clip_lines(report.get("clip_score")))
    return "\n".join(lines)


def _held_out_words(data: dict[str, Any]) -> str:
    if data["holdout"] == "all":
        return f"all {data['images']} images held out: a test folder"
    return f"{data['holdout']} of {data['images']} images held out, {data['split']} split, seed {data['seed']}"


def _accuracy_words(who: dict[str, Any]) -> str:
    """", held-out accuracy class 91.2%" for a judge or extractor that is a classifier with a recorded accuracy."""
    acc = who.get("accuracy")
    if not acc:
        return ""
    shown = {"class": acc["class"]} if "class" in acc else {"scene": acc["scene"]} if "scene" in acc else acc
    return ", held-out accuracy " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shown.items())


def _clip_lines(cs: dict[str, Any] | None) -> list[str]:
    """The CLIP score lines of the table: per prompt kind, the mean +- its standard error, and the reference
    (shapes: rendered scenes; folder: held-out images) where there is one; or why there is no score."""
    if not cs:
        return []
    if "skipped" in cs:
        return [f"CLIP score: skipped ({cs['skipped']})"]
    c = cs["clip"]
    label = "real images" if "reference_images" in cs else "rendered scenes"
    lines = [f"CLIP score (100 x max(cos, 0)) by {c['spec']} (sha256 {(c['sha256'] or 'none')[:16]})"]
    for kind, entry in cs.items():
        if isinstance(entry, dict) and "mean" in entry:
            ref = entry.get("reference")
            lines.append(f"  {kind:<10}{entry['n']:>6}{entry['mean']:12.2f} +- {entry['stderr']:.2f}"
                         + (f"   {label} {ref['mean']:.2f}" if ref else ""))
    return lines


def _fewer_calls_on(settings: dict[str, Any]) -> bool:
    return bool(settings) and (settings["cfg_min_sigma"] > 0 or settings["cfg_cutoff_sigma"] > 0
                               or settings["deepcache_interval"] > 1 or settings.get("tome_ratio", 0) > 0)


def _pct(entry: dict[str, Any], key: str) -> str:
    if key not in entry:
        return "-"
    return f"{100 * entry[key]:.1f}% +-{100 * entry[f'{key}_stderr']:.1f}"


# --- the whole evaluation --------------------------------------------------------------------------

@dataclass
class EvalResult:
    report: dict[str, Any]
    images: list[Image.Image]
    grid: Image.Image


def evaluate(components: Components, settings: EvalSettings, classifier: ClassifierExtractor,
             extractor: FeatureExtractor, *, model_info: dict[str, Any] | None = None,
             progress: Callable[[int], None] | None = None, clip: CLIPJudge | str | None = None) -> EvalResult:
    """Generate, judge and measure (module docstring); `model_info` goes into the report as "model"; `clip`
    scores the images against their prompts (a string: why there is no CLIP score, for the report)."""
    from ..pipelines.request import CLIP_GUIDANCE_FIELDS, FEWER_CALLS_FIELDS, GenerationRequest

    settings.check()
    if classifier.kind != settings.dataset:
        raise ValueError(f"the {classifier.kind} classifier cannot judge {settings.dataset} images")
    request = GenerationRequest(**settings.sampling, prompt="x").validate(components.config)  # fails early
    items = eval_items(settings)
    real, floor = real_sets(settings, len(items))  # before the work: missing data fails here (one per item)
    t0 = time.perf_counter()
    images = generate(components, items, settings, model_hash=(model_info or {}).get("hash"), on_image=progress)
    gen_seconds = time.perf_counter() - t0
    batch = to_batch(images)
    verdicts, seen = judge(classifier, batch, items)
    dist = distribution_scores(extractor, batch, real, floor, settings.seed)
    clip_report = _clip_score(clip, batch, items, settings)
    indices = grid_indices(items)
    grid = sample_grid(images, verdicts, items, indices)
    report = {
        "dataset": settings.dataset,
        "model": model_info or {},
        "settings": {
            "kinds": list(settings.kinds) if settings.dataset == "shapes" else ["class"], "n": settings.n,
            "seed": settings.seed, "prompt_seed": PROMPT_KEY + settings.seed if settings.dataset == "shapes" else None,
            "steps": request.steps, "sampler": request.sampler, "schedule": request.schedule,
            "cfg_scale": request.cfg_scale, "width": request.width, "height": request.height,
            "batch": settings.batch, "real": settings.real,
            # fewer network calls (issue 15): the settings the requests ran with (`fast` filled in)
            "fewer_calls": {name: getattr(request, name) for name in FEWER_CALLS_FIELDS},
            # CLIP guidance (docs/clip.md): none, or its scale, CLIP and cutouts (a CLIP score by the guiding CLIP
            # is not an independent judge)
            "clip_guidance": ({name: getattr(request, name) for name in CLIP_GUIDANCE_FIELDS}
                              if request.clip_guidance else None),
            "real_images": ("rendered sample_prompts(kind, m, REAL_KEY + seed)" if settings.dataset == "shapes"
                            else "Fashion-MNIST test split, random subset"),
            "floor_images": ("rendered sample_prompts(kind, m, FLOOR_KEY + seed)" if settings.dataset == "shapes"
                             else "Fashion-MNIST train split, random subset"),
        },
        "classifier": {"name": classifier.name, "sha256": classifier.sha256, "accuracy": classifier.info.accuracy},
        "extractor": extractor_record(extractor),
        "adherence": summarize(verdicts, items, classifier.config.classes if classifier.kind != "shapes" else None),
        "distribution": dist,
        **({"clip_score": clip_report} if clip_report is not None else {}),
        "timing": {"images": len(images), "generation_seconds": round(gen_seconds, 3),
                   "seconds_per_image": gen_seconds / len(images)},
        "grid": indices,
        "samples": [{"kind": it.kind, "prompt": it.prompt, "seed": it.seed, **v, "seen": s}
                    for it, v, s in zip(items, verdicts, seen, strict=True)],
    }
    return EvalResult(report, images, grid)


def extractor_record(extractor: FeatureExtractor) -> dict[str, Any]:
    """What the report says of a feature extractor: name, sha256 and, for a classifier, its held-out accuracy."""
    info = getattr(extractor, "info", None)
    return {"name": extractor.name, "sha256": extractor.sha256,
            **({"accuracy": info.accuracy} if info is not None else {})}


def _clip_score(clip: CLIPJudge | str | None, images: torch.Tensor, items: Sequence[EvalItem],
                settings: EvalSettings) -> dict[str, Any] | None:
    """The report's "clip_score": the judge's scores by prompt kind (shapes: with the rendered scenes of the
    prompts as the reference), {"skipped": why} when `clip` is a reason, None without a CLIP."""
    if clip is None or isinstance(clip, str):
        return None if clip is None else {"skipped": clip}
    reference = None
    if settings.dataset == "shapes":
        from .train_classifier import render_scenes

        reference = render_scenes([item.scene for item in items])
    return clip.report(images, [item.prompt for item in items], [item.kind for item in items], reference,
                       batch=settings.batch)


def dataset_of(config: Any) -> str | None:
    """The dataset a model was trained on, from its provenance (`data.kind`, or the run config's), if known."""
    prov = getattr(config, "provenance", None) or {}
    for data in (prov.get("data"), (prov.get("run_config") or {}).get("data")):
        if isinstance(data, dict) and data.get("kind") in DATASETS:
            return data["kind"]
    return None
