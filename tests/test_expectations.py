"""bench/expectations.py: each measured checkpoint's wall-clock seconds are the run's own clock at that checkpoint
(its state.json `seconds`), not a sum of the logged session-average speeds (which a resume's gap or a slow start
would skew); points measured before take it too, and a checkpoint without a clock gives no wall_s."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from daguerre.training.state import STATE_FORMAT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import expectations  # noqa: E402

BATCH = 8


def _run(tmp_path: Path) -> Path:
    """A stage-2 run of two sessions: steps 100 and 200 in the first (the second with a slow interval, which the
    session-average speed logged at 200 blurs), a resume from 200 after a day's pause, step 300 in the second."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"batch_size": BATCH}}))
    clock = {100: 10.0, 200: 40.0, 300: 50.0}  # training seconds: 10 s, 30 s, then 10 s after the resume
    logged = [(100, 1000.0, 100 * BATCH / 10.0), (200, 1030.0, 200 * BATCH / 40.0),
              (300, 1030.0 + 86400 + 10, 100 * BATCH / 10.0)]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time": t, "loss": 0.1, "images_per_s": r})
                                               + "\n" for s, t, r in logged))
    for step in (100, 200, 300, 400):
        folder = run / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        meta = {"format": STATE_FORMAT, "step": step, **({"seconds": clock[step]} if step in clock else {})}
        (folder / "state.json").write_text(json.dumps(meta))  # step 400: a checkpoint that kept no clock
    return run


def _fake_daguerre(*args: str) -> None:
    """`daguerre train export` and `daguerre eval` stood in for: eval writes a report of fixed numbers."""
    if args[0] == "eval":
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True)
        report = {"distribution": {"fd": 2.0, "fd_floor": 1.0, "kid": {"mean": 0.1}, "kid_floor": {"mean": 0.01}},
                  "adherence": {"class": {"class": 0.5, "class_stderr": 0.05}}}
        (out / "report.json").write_text(json.dumps(report))


def test_wall_seconds_are_the_checkpoints_clock_for_new_and_earlier_points(tmp_path, monkeypatch):
    run, out = _run(tmp_path), tmp_path / "points.json"
    assert expectations.training_seconds(run) == {100: 10.0, 200: 40.0, 300: 50.0}
    earlier = {"step": 100, "images": 100 * BATCH, "wall_s": 999.0, "fd": 2.0}  # measured by the old rule
    out.write_text(json.dumps({"label": "x", "run": str(run), "points": [earlier]}))
    monkeypatch.setattr(expectations, "_daguerre", _fake_daguerre)
    args = argparse.Namespace(run=str(run), out=str(out), label="x", quiet_images_per_s=10.0, vae_minutes=0.0,
                              steps=None)
    expectations.measure(args, [])
    points = {p["step"]: p for p in json.loads(out.read_text())["points"]}
    assert sorted(points) == [100, 200, 300, 400]
    assert {s: p.get("wall_s") for s, p in points.items()} == {100: 10.0, 200: 40.0, 300: 50.0, 400: None}
    assert points[300]["cpu_hours_quiet"] == pytest.approx(300 * BATCH / 10.0 / 3600, abs=1e-3)


def test_a_damaged_checkpoint_state_is_named(tmp_path):
    run = _run(tmp_path)
    (run / "checkpoints" / "step_00000200" / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="step_00000200"):
        expectations.training_seconds(run)
