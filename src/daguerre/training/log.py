"""What a run tells its user: a tqdm bar (loss, images/s, ETA), `metrics.jsonl`, optional TensorBoard.

Without the bar (`train.progress = false`: a log file, a batch job) every logged step is also a line of the
log (stderr and RUN/train.log): `step 20/100: loss 0.1234, grad_norm 0.5, lr 0.0001, 41.2 images/s, ETA 0:00:39`.
Only rank 0 logs. `metrics.jsonl` holds one JSON object per logged step (`{"step": .., "loss": ..,
"lr": .., "images_per_s": .., ...}`); on `--resume` the lines of steps after the checkpoint (written
by the interrupted run) are dropped first, so the file always describes one consistent run.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text
from ..untrusted import parse_json

METRICS_FILE = "metrics.jsonl"
logger = logging.getLogger("daguerre.train")


def setup_logging(run_dir: Path, is_main: bool) -> None:
    """Log INFO messages of rank 0 to stderr and to RUN/train.log; other ranks log warnings only."""
    root = logging.getLogger("daguerre")
    if getattr(setup_logging, "_done", None) == (str(run_dir), is_main):
        return
    for h in list(root.handlers):
        if getattr(h, "_daguerre_train", False):
            root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if is_main:
        handlers.append(_RunLogFile(run_dir / "train.log", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        h._daguerre_train = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    setup_logging._done = (str(run_dir), is_main)  # type: ignore[attr-defined]


class _RunLogFile(logging.FileHandler):
    """RUN/train.log. A failed write (disk full) is said once in one line, and the log goes on to the
    terminal only, instead of logging's traceback at every message."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        logging.getLogger("daguerre").removeHandler(self)
        sys.stderr.write(f"daguerre: cannot write {self.baseFilename} "
                         f"({getattr(error, 'strerror', None) or error}): logging to the terminal only\n")


def teardown_logging() -> None:
    """Remove (and close) the handlers `setup_logging` added."""
    root = logging.getLogger("daguerre")
    for h in list(root.handlers):
        if getattr(h, "_daguerre_train", False):
            root.removeHandler(h)
            h.close()
    setup_logging._done = None  # type: ignore[attr-defined]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only the metrics lines of steps <= `step` (before resuming from checkpoint `step`)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = parse_json(line, str(path))
        except ValueError:
            continue  # a line cut short by the kill
        if isinstance(row, dict) and isinstance(row.get("step", 0), (int, float)) and row.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class RunLogger:
    """Progress bar + metrics file + TensorBoard of one run (a no-op object on ranks other than 0)."""

    def __init__(
        self, run_dir: Path, *, enabled: bool, start: int, total: int, images_per_step: int,
        progress: bool = True, tensorboard: bool = False,
    ) -> None:
        self.enabled, self.total, self.images_per_step = enabled, total, images_per_step
        self.bar = None
        self.tb = None
        self._t0, self._s0 = time.perf_counter(), start
        self._sums: dict[str, float] = {}
        self._count = 0
        if not enabled:
            return
        self.path = run_dir / METRICS_FILE
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, smoothing=0.1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("train.tensorboard is on but tensorboard is not installed: metrics.jsonl only")
            else:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def eta(self, step: int) -> float | None:
        """Seconds until step `total` at this session's pace so far (None before a step is done)."""
        dt = time.perf_counter() - self._t0
        return (self.total - step) * dt / (step - self._s0) if step > self._s0 and dt > 0 else None

    def images_per_second(self, step: int) -> float:
        dt = time.perf_counter() - self._t0
        return (step - self._s0) * self.images_per_step / dt if dt > 0 else 0.0

    def add(self, values: dict[str, float]) -> None:
        """Accumulate one step's scalars (on every rank) for the next logged interval mean."""
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._count += 1

    def take_means(self) -> dict[str, float]:
        """The mean of each accumulated scalar since the last call, sorted by name; resets the sums."""
        out = {k: self._sums[k] / max(1, self._count) for k in sorted(self._sums)}
        self._sums, self._count = {}, 0
        return out

    def step(self, step: int, loss: float) -> None:
        """Advance the bar to `step` (steps done) with the latest loss."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4g}", img_s=f"{self.images_per_second(step):.1f}", refresh=False)

    def log(self, step: int, metrics: dict[str, Any], *, echo: bool = False) -> None:
        """Append `metrics` of `step` to metrics.jsonl (and TensorBoard); with `echo` and no progress bar, also
        write them as a line of the log."""
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        if echo and self.bar is None:
            logger.info(progress_line(step, self.total, row, self.eta(step)))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def progress_line(step: int, total: int, row: dict[str, Any], eta: float | None) -> str:
    """One logged step as a line: `step 20/100: loss 0.1234, lr 0.0001, 41.2 images/s, ETA 0:00:39`."""
    keys = sorted((k for k, v in row.items() if k not in ("step", "time", "images_per_s")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)), key=lambda k: k != "loss")
    parts = [f"{k} {row[k]:.4g}" for k in keys]  # the loss first
    if "images_per_s" in row:
        parts.append(f"{row['images_per_s']:.1f} images/s")
    if eta is not None:
        parts.append(f"ETA {datetime.timedelta(seconds=round(eta))}")
    return f"step {step}/{total}: " + ", ".join(parts)


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return float(f"{v:.6g}")
    return v
