"""bench/compression_study.py (issue 19, point 3): the study's cells and their commands, skipping what is done and
resuming what stopped, the budget kept with the folder, CPU time per task, and the table and plots assembled from
(tiny, fake) results."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compression_study as cs  # noqa: E402

BUDGET = cs.Budget(vae_steps=10, ldm_steps=20, eval_every=10, eval_n=4, sample_steps=2, codebook_size=16)


def test_cells_parse_and_their_commands_set_the_factor_and_the_regulariser():
    vq = cs.Cell.parse("fashion-vq-f1")
    assert vq == cs.Cell("fashion", "vq", 1) and vq.latent() == (4, 32, 32)
    assert vq.rate(BUDGET) == {"latent_values": 4096, "values_per_pixel_value": 4.0, "bits": 1024 * 4}
    assert cs.Cell.parse("shapes-kl-f8").rate(BUDGET)["values_per_pixel_value"] == pytest.approx(64 / (32 * 32 * 3))
    for bad in ("fashion-kl-f3", "mnist-kl-f4", "fashion-lfq-f4", "fashion-kl"):
        with pytest.raises(ValueError, match="cell"):
            cs.Cell.parse(bad)
    tasks = cs.cell_tasks(vq, BUDGET, Path("/study"))
    assert [t.name for t in tasks] == ["vae", "recon", "ldm", "export@10", "eval@10", "export@20", "eval@20"]
    vae = " ".join(tasks[0].command)
    assert "model.vae.channel_mult=[1]" in vae and "model.regularizer=vq" in vae and "model.codebook_size=16" in vae
    kl = " ".join(cs.cell_tasks(cs.Cell("shapes", "kl", 8), BUDGET, Path("/study"))[0].command)
    assert "model.vae.channel_mult=[1,2,2,4]" in kl and "regularizer" not in kl and "data.shapes.n=8000" in kl
    recon = tasks[1].command
    assert recon[recon.index("--vae") + 1] == "/study/fashion-vq-f1/vae/vae.safetensors" and "fashion" in recon
    ldm = tasks[2].command
    assert ldm[ldm.index("--vae") + 1] == "/study/fashion-vq-f1/vae/vae.safetensors" and "--resume" in ldm
    assert "train.keep_every=10" in ldm and "model.unet.attention_levels=[1]" in ldm
    assert len(cs.all_cells()) == 16 and cs.all_cells()[0].f == 8  # cheap cells first


class FakeDaguerre:
    """Stands in for the daguerre commands: writes each task's output, or fails on the named tasks."""

    def __init__(self, out: Path, fail: set[str] = frozenset()) -> None:
        self.out, self.fail, self.calls = out, set(fail), []

    def __call__(self, command: list[str], log: Path) -> tuple[int, float, float]:
        cell = next(c for c in cs.all_cells() if f"/{c.name}/" in " ".join(command))
        task = next(t for t in cs.cell_tasks(cell, BUDGET, self.out) if t.command == command)
        self.calls.append(f"{cell.name}:{task.name}")
        if task.name in self.fail:
            self.fail.discard(task.name)
            return 1, 2.0, 3.0
        task.output.parent.mkdir(parents=True, exist_ok=True)
        if task.name == "vae":
            config = {"vae": {"scale_factor": 0.5}, "provenance": {
                "holdout_metrics": {"psnr": 20.0 + cell.f, "ssim": 0.9}, "parameters": 1000, "training_seconds": 5}}
            if cell.regularizer == "vq":
                config["provenance"]["holdout_metrics"]["codes_used"] = 0.5
            save_file({"w": torch.zeros(1)}, str(task.output), {"daguerre_config": json.dumps(config)})
        elif task.name == "recon":
            task.output.write_text(json.dumps({"fd": 3.0 / cell.f, "fd_input": 0.25}))
        elif task.name.startswith("eval"):
            step = int(task.name.split("@")[1])
            task.output.write_text(json.dumps(fake_report(10.0 / step, 0.01 * step)))
        else:
            task.output.write_bytes(b"model")
        return 0, 1.0, 1.5


def fake_report(fd: float, right: float) -> dict:
    return {"distribution": {"fd": fd, "fd_floor": 0.5}, "timing": {"seconds_per_image": 0.1},
            "adherence": {"class": {"n": 4, "class": right, "class_stderr": 0.1}}}


def test_a_stopped_run_resumes_at_the_task_that_stopped_and_skips_what_is_done(tmp_path):
    cell = cs.Cell("fashion", "kl", 4)
    fake = FakeDaguerre(tmp_path, fail={"ldm"})
    assert not cs.run_cells(tmp_path, [cell], BUDGET, fake, say=lambda s: None)
    assert fake.calls == ["fashion-kl-f4:vae", "fashion-kl-f4:recon", "fashion-kl-f4:ldm"]
    timing = json.loads((tmp_path / cell.name / "timing.json").read_text())
    assert timing["vae"]["done"] and not timing["ldm"]["done"] and timing["ldm"]["cpu_s"] == 2.0
    assert json.loads((tmp_path / cell.name / "vae_metrics.json").read_text())["holdout"]["psnr"] == 24.0
    fake.calls.clear()
    assert cs.run_cells(tmp_path, [cell], BUDGET, fake, say=lambda s: None)
    assert fake.calls == [f"fashion-kl-f4:{t}" for t in ("ldm", "export@10", "eval@10", "export@20", "eval@20")]
    timing = json.loads((tmp_path / cell.name / "timing.json").read_text())
    assert timing["ldm"] == {"cpu_s": 3.0, "wall_s": 4.5, "segments": 2, "done": True}  # both segments counted
    fake.calls.clear()
    assert cs.run_cells(tmp_path, [cell], BUDGET, fake, say=lambda s: None) and fake.calls == []
    assert cs.status(tmp_path, [cell], BUDGET) == "fashion-kl-f4: 7/7 done"


def test_the_budget_stays_with_its_folder(tmp_path):
    first = cs.budget_for(tmp_path, {"ldm_steps": 40, "eval_every": 20})
    assert cs.budget_for(tmp_path, {}) == first == cs.budget_for(tmp_path, {"ldm_steps": 40})
    with pytest.raises(ValueError, match="ldm_steps: given 60, saved 40"):
        cs.budget_for(tmp_path, {"ldm_steps": 60})
    with pytest.raises(ValueError, match="eval_every 30 must divide ldm_steps 40"):
        cs.budget_for(tmp_path / "other", {"ldm_steps": 40, "eval_every": 30})


def test_the_report_assembles_the_measured_cells_into_a_table_and_plots(tmp_path):
    cells = [cs.Cell("fashion", "kl", 4), cs.Cell("fashion", "vq", 4), cs.Cell("fashion", "kl", 8),
             cs.Cell("shapes", "kl", 1)]
    fake = FakeDaguerre(tmp_path, fail={"eval@20"})  # fashion-kl-f4 stops before its last evaluation
    cs.run_cells(tmp_path, cells[:1], BUDGET, fake, say=lambda s: None)
    cs.run_cells(tmp_path, cells[1:3], BUDGET, fake, say=lambda s: None)
    rows = cs.report(tmp_path, cells, BUDGET, tmp_path / "png")
    by = {r["cell"]: r for r in rows}
    assert [e["step"] for e in by["fashion-kl-f4"]["evals"]] == [10]
    assert by["fashion-vq-f4"]["evals"][1] == {"step": 20, "fd": 0.5, "fd_floor": 0.5, "adherence": 0.2,
                                               "seconds_per_image": 0.1, "ldm_cpu_s": 1.0}
    assert by["fashion-vq-f4"]["evals"][0]["ldm_cpu_s"] == 0.5  # the LDM's CPU time in proportion to the step
    assert by["shapes-kl-f1"]["psnr"] is None and by["shapes-kl-f1"]["evals"] == []
    text = (tmp_path / "results.md").read_text()
    assert ("| fashion-vq-f4 | 4x8x8 | 0.25 | 24.00 | 0.9000 | 50.0% | 0.75 (0.25) | 0.0 | 20 | 0.50 (0.50) | 20% | "
            "0.0 | 0.100 |") in text
    assert ("| fashion-kl-f4 | 4x8x8 | 0.25 | 24.00 | 0.9000 | - | 0.75 (0.25) | 0.0 | 10 | 1.00 (0.50) | 10% | 0.0 | "
            "0.100 |") in text
    assert "| shapes-kl-f1 | 4x32x32 | 1.33 | - | - | - | - | - | - | - | - | - | - |" in text
    # record keeps what the report reads, and the report of the record is the same
    kept = tmp_path / "kept"
    files = cs.record(tmp_path, cells, BUDGET, kept)
    assert kept / "budget.json" in files and all(f.suffix == ".json" for f in files)
    assert not any(f.is_relative_to(kept / "shapes-kl-f1") for f in files)  # nothing measured, nothing kept
    assert cs.collect(kept, cells, BUDGET) == cs.collect(tmp_path, cells, BUDGET)
    cs.record(tmp_path / "gone", cells, BUDGET, kept)  # the study's folder lost: what was recorded stays
    assert cs.collect(kept, cells, BUDGET) == cs.collect(tmp_path, cells, BUDGET)
    assert json.loads((tmp_path / "results.json").read_text())["budget"]["ldm_steps"] == 20
    for name in ("rate_distortion.png", "quality_vs_steps.png", "quality_vs_cpu.png"):
        assert (tmp_path / "png" / name).stat().st_size > 1000


def test_a_command_is_timed_by_its_cpu_and_sigterm_reaches_it(tmp_path):
    burn = [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"]
    status, cpu, wall = cs.run_command(burn, tmp_path / "burn.log")
    assert status == 0 and cpu >= 0.25 and wall >= cpu * 0.5 and "$ " in (tmp_path / "burn.log").read_text()
    trap = [sys.executable, "-c", "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: (print('checkpoint saved', flush=True), sys.exit(130)))\n"
            "print('ready', flush=True)\ntime.sleep(60)"]
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=cs.run_command(trap, tmp_path / "trap.log")))
    worker.start()
    deadline, log = time.monotonic() + 30, tmp_path / "trap.log"
    while not (log.exists() and "ready" in log.read_text().splitlines()):  # the child has its handler
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        cs._forward_sigterm(15, None)
        worker.join(30)
    finally:
        cs._stopping.clear()
    assert result["out"][0] == 130 and "checkpoint saved" in (tmp_path / "trap.log").read_text()


def test_step_times_build_each_cells_networks_from_the_studys_configs():
    times = cs.step_seconds(cs.Cell("fashion", "vq", 8), BUDGET, repeats=1)
    assert set(times) == {"vae_step_s", "unet_step_s"} and all(0 < v < 60 for v in times.values())
