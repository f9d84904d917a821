"""Quality against training time: the measurements behind docs/training.md, "What to expect".

For each kept checkpoint of a stage-2 run (`train.keep_every`), export its EMA model (`daguerre train export`),
measure it with `daguerre eval` (adherence, Frechet distance against its real-vs-real floor, KID), and record
where it stands in training: images seen and training time. Time is given two ways: the run's own wall-clock
seconds up to the checkpoint (its state.json `seconds`: every session's time, sampling, evaluation and
checkpointing included, the time between sessions not; inflated when other jobs shared the machine), and
CPU-hours at a stated quiet one-thread speed (`--quiet-images-per-s`, from bench/train_throughput.py), which is
what a user's idle machine would take. Then `--plot` draws every
recorded curve into one PNG (matplotlib, a test extra).

    python bench/expectations.py measure runs/photos32_ldm --label "CIFAR-10 photos32" --quiet-images-per-s 45 \\
        --vae-minutes 35 --out bench/results/expect_photos32.json -- --data data/cifar10/test --holdout all \\
        --classifier cifar.safetensors --n 500
    python bench/expectations.py plot bench/results/expect_*.json --png docs/images/expectations.png
    python bench/expectations.py grid step3000.safetensors --prompts "a photo of a cat" ... --png grid.png
    python bench/expectations.py progress runs/photos32_ldm bench/results/expect_photos32.json \
        --prompts "a photo of an airplane" ... --seed 1 --png docs/images/expectations-photos32-grid.png

Everything after `--` goes to `daguerre eval` as it is. A checkpoint already in the output JSON is not measured
again (the file is rewritten atomically after each one), so an interrupted measurement continues where it stopped.
`progress` draws the same prompts with the same seed from every measured checkpoint still kept, one row per point
labelled with its step and CPU-hours, so that rows differ only by training time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kept_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[-1]) for p in (run / "checkpoints").glob("step_*") if p.is_dir())


def training_seconds(run: Path) -> dict[int, float]:
    """Kept step -> the run's own wall-clock seconds up to that checkpoint, as its state.json records them (the
    training loop's clock: resumes continue it, the time between sessions is not in it), where it does."""
    from daguerre.training.state import read_meta

    seconds = {}
    for folder in (run / "checkpoints").glob("step_*"):
        meta = read_meta(folder) if folder.is_dir() else {}
        if isinstance(meta.get("seconds"), (int, float)):
            seconds[meta["step"]] = float(meta["seconds"])
    return seconds


def _wall(data: dict, seconds: dict[int, float]) -> None:
    """Every point's wall-clock seconds from its checkpoint's clock, where the checkpoint is still there."""
    for p in data["points"]:
        if p["step"] in seconds:
            p["wall_s"] = round(seconds[p["step"]], 1)


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _daguerre(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    subprocess.run([sys.executable, "-m", "daguerre", *args], check=True, env=env)


def export(run: Path, step: int, out: Path) -> None:
    """A kept checkpoint's EMA model as a model file (`daguerre train export`)."""
    _daguerre("train", "export", str(run), "--step", str(step), "--out", str(out))


def summary(report: dict) -> dict:
    """The numbers the table and plot use, from a `daguerre eval` report.json."""
    d = report["distribution"]
    out = {"fd": d["fd"], "fd_floor": d["fd_floor"], "kid": d["kid"]["mean"], "kid_floor": d["kid_floor"]["mean"]}
    adherence = report.get("adherence") or {}
    if "class" in adherence:
        out["adherence"] = adherence["class"]["class"]
        out["adherence_stderr"] = adherence["class"]["class_stderr"]
    elif adherence:
        kind = next(iter(adherence))
        entry = adherence[kind]
        key = "all" if "all" in entry else next(k for k in entry if k not in ("n",) and not k.endswith("_stderr"))
        out["adherence"], out["adherence_stderr"] = entry[key], entry[f"{key}_stderr"]
    return out


def _hours(data: dict) -> None:
    """CPU-hours of both stages at the stated quiet speeds, for every point."""
    for p in data["points"]:
        p["cpu_hours_quiet"] = round(p["images"] / data["quiet_images_per_s"] / 3600 + data["vae_minutes"] / 60, 3)


def measure(args: argparse.Namespace, eval_args: list[str]) -> None:
    run, out = Path(args.run), Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"label": args.label, "run": str(run), "points": []}
    data.update(label=args.label, quiet_images_per_s=args.quiet_images_per_s, vae_minutes=args.vae_minutes,
                eval_args=eval_args)
    config = json.loads((run / "config.json").read_text())
    batch = int(config["train"]["batch_size"]) * int(config["train"].get("grad_accum", 1))
    seconds = training_seconds(run)
    done = {p["step"] for p in data["points"]}
    wanted = [s for s in kept_steps(run) if s not in done and (not args.steps or s in args.steps)]
    _hours(data)  # a corrected quiet speed or autoencoder time applies to the points already measured too
    _wall(data, seconds)  # as does the checkpoints' clock (the points measured before summed logged speeds)
    _write(out, data)
    for step in wanted:
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "model.safetensors"
            export(run, step, model)
            _daguerre("eval", "--model", str(model), "--out", str(Path(tmp) / "eval"), "--no-progress", *eval_args)
            report = json.loads((Path(tmp) / "eval" / "report.json").read_text())
        images = step * batch
        point = {"step": step, "images": images, **summary(report)}
        data["points"] = sorted([*data["points"], point], key=lambda p: p["step"])
        _hours(data)
        _wall(data, seconds)
        _write(out, data)
        print(json.dumps(point))


def plot(files: list[str], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_f) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    for f in files:
        data = json.loads(Path(f).read_text())
        pts = data["points"]
        hours = [p["cpu_hours_quiet"] for p in pts]
        if all("adherence" in p for p in pts):
            ax_a.errorbar(hours, [100 * p["adherence"] for p in pts],
                          yerr=[100 * p["adherence_stderr"] for p in pts], marker="o", capsize=2, label=data["label"])
        with_fd = [p for p in pts if p.get("fd") is not None]  # transcribed curves may lack it
        if with_fd:
            ax_f.plot([p["cpu_hours_quiet"] for p in with_fd], [p["fd"] / max(p["fd_floor"], 1e-9) for p in with_fd],
                      marker="o", label=data["label"])
    ax_a.set(xlabel="CPU-hours (one core, quiet; both stages)", ylabel="adherence (%)", ylim=(0, 100),
             title="prompt / class adherence")
    ax_f.set(xlabel="CPU-hours (one core, quiet; both stages)", ylabel="FD / real-vs-real floor", yscale="log",
             title="Frechet distance over its floor")
    for ax in (ax_a, ax_f):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    print(f"wrote {png}")


GRID_PAD = 2  # pixels between the cells of a grid


def _wrap(text: str, font, width: int) -> str:
    """`text` broken at spaces into lines of at most `width` pixels (a longer word keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def labelled_grid(rows: list[list], row_labels: list[str], png: str, scale: int = 2,
                  column_labels: list[str] | None = None) -> None:
    """Images in rows, each row's label (lines allowed) at its left, each column's (wrapped) above it; every image
    upscaled `scale` x (nearest) and cells GRID_PAD apart."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    font = ImageFont.load_default(size=13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(probe.multiline_textbbox((0, 0), t, font=font)[2] for t in row_labels) + 10
    head_font = ImageFont.load_default(size=11)
    heads = [_wrap(t, head_font, w - 4) for t in column_labels or []]
    head_h = max((probe.multiline_textbbox((0, 0), t, font=head_font)[3] for t in heads), default=-4) + 4
    columns = max(len(r) for r in rows)
    out = Image.new("RGB", (label_w + columns * (w + GRID_PAD), head_h + len(rows) * (h + GRID_PAD)), "white")
    draw = ImageDraw.Draw(out)
    for c, head in enumerate(heads):
        draw.multiline_text((label_w + c * (w + GRID_PAD) + w // 2, 0), head, fill="black", font=head_font,
                            anchor="ma", align="center")
    for r, (label, images) in enumerate(zip(row_labels, rows, strict=True)):
        y = head_h + r * (h + GRID_PAD)
        draw.multiline_text((4, y + h // 2), label, fill="black", font=font, anchor="lm")
        for c, im in enumerate(images):
            out.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (label_w + c * (w + GRID_PAD), y))
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    out.save(png, optimize=True)
    print(f"wrote {png}")


def prompt_grid(model: str, prompts: list[str], seeds: int, png: str, scale: int = 2, **fields) -> None:
    """One row per prompt (written at its left), one column per seed (1..seeds), upscaled `scale` x (nearest)."""
    import daguerre

    pipe = daguerre.load(model)
    labelled_grid([[g.image for g in pipe(p, seed=1, n=seeds, **fields)] for p in prompts], prompts, png, scale)


def progress(run: Path, points_file: Path, prompts: list[str], seed: int, png: str, scale: int = 2,
             **fields) -> list[int]:
    """One row per measured point whose checkpoint `run` still keeps: its export's image of every prompt (a
    column each) at the same `seed`, labelled with the step, the CPU-hours and the adherence of the points file.
    Points whose checkpoint is gone are named and skipped; returns the steps drawn."""
    import daguerre

    points = json.loads(points_file.read_text())["points"]
    kept = set(kept_steps(run))
    drawn = [p for p in points if p["step"] in kept]
    if missing := [p["step"] for p in points if p["step"] not in kept]:
        print(f"no kept checkpoint in {run / 'checkpoints'} for steps {missing}: no row for them")
    if not drawn:
        raise ValueError(f"none of the steps of {points_file} ({[p['step'] for p in points]}) has a kept "
                         f"checkpoint in {run / 'checkpoints'} (it keeps {sorted(kept)}): give the run these "
                         "points were measured on")
    rows, labels = [], []
    for p in drawn:
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "model.safetensors"
            export(run, p["step"], model)
            pipe = daguerre.load(str(model))
            rows.append([pipe(prompt, seed=seed, n=1, **fields)[0].image for prompt in prompts])
        label = f"step {p['step']:,}\n{p['cpu_hours_quiet']:.2f} CPU-h"
        if "adherence" in p:
            label += f"\n{100 * p['adherence']:.1f}% adherence"
        labels.append(label)
    labelled_grid(rows, labels, png, scale, column_labels=prompts)
    return [p["step"] for p in drawn]


def main() -> None:
    argv = sys.argv[1:]
    eval_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    m = sub.add_parser("measure", help="measure every kept checkpoint of a stage-2 run")
    m.add_argument("run")
    m.add_argument("--label", required=True, help="the curve's name in the plot and table")
    m.add_argument("--out", required=True, help="JSON file of the points (extended, never re-measured)")
    m.add_argument("--quiet-images-per-s", type=float, required=True,
                   help="stage 2's one-thread training speed on a quiet machine (bench/train_throughput.py)")
    m.add_argument("--vae-minutes", type=float, default=0.0, help="stage 1's CPU-minutes, added to every point")
    m.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="only these checkpoint steps (comma-separated); default every kept one")
    pl = sub.add_parser("plot", help="draw the recorded curves")
    pl.add_argument("files", nargs="+")
    pl.add_argument("--png", required=True)
    g = sub.add_parser("grid", help="a labelled grid of a model's images: one row per prompt, one column per seed")
    g.add_argument("model")
    g.add_argument("--prompts", nargs="+", required=True)
    g.add_argument("--seeds", type=int, default=8)
    g.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    g.add_argument("--png", required=True)
    pr = sub.add_parser("progress", help="the same prompts and seed from every measured checkpoint still kept: one "
                        "row per point, labelled with its step and CPU-hours")
    pr.add_argument("run", help="the stage-2 run the points were measured on")
    pr.add_argument("points", help="its points JSON (from `measure`)")
    pr.add_argument("--prompts", nargs="+", required=True, help="one column each")
    pr.add_argument("--seed", type=int, default=1, help="the one seed of every image")
    pr.add_argument("--scale", type=int, default=2, help="upscaling of each image (nearest)")
    pr.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    pr.add_argument("--png", required=True)
    args = p.parse_args(argv)
    if args.action == "measure":
        measure(args, eval_args)
    elif args.action == "plot":
        plot(args.files, args.png)
    else:
        fields = {} if args.cfg is None else {"cfg_scale": args.cfg}
        if args.action == "progress":
            progress(Path(args.run), Path(args.points), args.prompts, args.seed, args.png, args.scale, **fields)
        else:
            prompt_grid(args.model, args.prompts, args.seeds, args.png, **fields)


if __name__ == "__main__":
    main()
