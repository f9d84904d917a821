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

Everything after `--` goes to `daguerre eval` as it is. A checkpoint already in the output JSON is not measured
again (the file is rewritten atomically after each one), so an interrupted measurement continues where it stopped.
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
            _daguerre("train", "export", str(run), "--step", str(step), "--out", str(model))
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


def prompt_grid(model: str, prompts: list[str], seeds: int, png: str, scale: int = 2, **fields) -> None:
    """One row per prompt (written at its left), one column per seed (1..seeds), upscaled `scale` x (nearest)."""
    from PIL import Image, ImageDraw, ImageFont

    import daguerre

    pipe = daguerre.load(model)
    rows = [[g.image for g in pipe(p, seed=1, n=seeds, **fields)] for p in prompts]
    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    font = ImageFont.load_default(size=13)
    label_w, pad = int(max(font.getlength(p) for p in prompts)) + 10, 2
    out = Image.new("RGB", (label_w + seeds * (w + pad), len(prompts) * (h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for r, (prompt, images) in enumerate(zip(prompts, rows, strict=True)):
        y = r * (h + pad)
        draw.text((4, y + h // 2 - 7), prompt, fill=(0, 0, 0), font=font)
        for c, im in enumerate(images):
            out.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (label_w + c * (w + pad), y))
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    out.save(png)
    print(f"wrote {png}")


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
    args = p.parse_args(argv)
    if args.action == "measure":
        measure(args, eval_args)
    elif args.action == "plot":
        plot(args.files, args.png)
    else:
        fields = {} if args.cfg is None else {"cfg_scale": args.cfg}
        prompt_grid(args.model, args.prompts, args.seeds, args.png, **fields)


if __name__ == "__main__":
    main()
