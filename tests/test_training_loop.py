"""`training.loop.run` drives any `Stage`: a toy stage (a linear regression, not an image model) trains through
the one loop, which steps its optimizer over accumulated gradients, keeps its EMA, draws its sample grids on
schedule, checkpoints it under the stage's module names and resumes it bit for bit (issue 14, "stages and one
loop"). The two real stages are held to the previous release's results by tests/test_golden.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from daguerre.training import dist
from daguerre.training.config import load_run_config
from daguerre.training.loop import RunSummary, Setup, make_optimizer, run

SETS = ["train.progress=false", "train.sample_every=3", "train.eval_every=0", "train.checkpoint_every=2",
        "train.log_every=1", "train.steps=6", "train.batch_size=2", "train.grad_accum=2", "train.lr=0.05",
        "train.warmup_steps=0", "train.ema_decay=0.5", "data.n=8", "data.holdout=2"]
W_TRUE = torch.tensor([[1.0, -2.0, 0.5]])


class ToyStage:
    """y = w x + b fitted to y = W_TRUE x, one sample's x drawn from its own generator."""

    output = "toy.safetensors"
    ema_targets = evaluated = ("line",)

    def __init__(self, cfg) -> None:
        self.cfg, self.grids, self.prepared = cfg, [], False

    def prepare(self, env) -> None:
        self.prepared = True

    def build(self, setup: Setup) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            self.line = nn.Linear(3, 1)
        self.modules = {"line": self.line}
        self.optimizers = {"line": make_optimizer(self.line.parameters(), self.cfg.train)}
        self.peak_lr = {}
        self.pool = setup.data.train_pool

    def resumed(self, meta) -> None:
        assert meta["toy"] == "checkpoint meta"

    def describe(self, env) -> str:
        return "toy stage"

    def begin(self, sampler: dist.StreamSampler, start: int) -> None:
        self.sampler = sampler

    def step(self, step: int, micro: int, sync: bool) -> dict[str, float]:
        positions, _ = self.sampler.indices(step, micro)
        x = torch.stack([torch.randn(3, generator=dist.sample_generator(0, "toy", int(p))) for p in positions])
        loss = ((self.line(x) - x @ W_TRUE.T) ** 2).mean()
        (loss / self.cfg.train.grad_accum).backward()
        return {"loss": float(loss.detach())}

    def sample(self, step, models, runlog, *, grid, evaluate) -> None:
        self.grids.append((step, grid, float(models["line"].weight.sum())))

    def checkpoint_meta(self) -> dict:
        return {"toy": "checkpoint meta"}

    def export(self, path: Path, models, summary: RunSummary) -> None:
        save_file({k: v.contiguous() for k, v in models["line"].state_dict().items()}, str(path))


def test_one_loop_trains_checkpoints_and_resumes_any_stage(tmp_path):
    cfg = load_run_config(None, "vae", SETS)
    whole = ToyStage(cfg)
    path = run(whole, cfg, tmp_path / "whole")
    assert whole.prepared and path == tmp_path / "whole" / "toy.safetensors"
    assert [(s, g) for s, g, _ in whole.grids] == [(3, True), (6, True)]  # train.sample_every = 3
    state = load_file(str(tmp_path / "whole" / "checkpoints" / "step_00000006" / "state.safetensors"))
    assert {"model.line.weight", "ema.line.weight", "optim.line.0.exp_avg"} <= set(state)
    final = load_file(str(path))  # the EMA weights, not the raw ones
    assert torch.equal(final["weight"], state["ema.line.weight"])
    assert not torch.equal(final["weight"], state["model.line.weight"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        start = nn.Linear(3, 1)
    before = (start.weight - W_TRUE).abs().sum()
    assert (state["model.line.weight"] - W_TRUE).abs().sum() < before  # the optimizer stepped towards W_TRUE

    paused = ToyStage(cfg)
    assert run(paused, cfg, tmp_path / "paused", until=4).name == "step_00000004"
    resumed = ToyStage(cfg)
    run(resumed, cfg, tmp_path / "paused", resume=True)
    again = load_file(str(tmp_path / "paused" / "checkpoints" / "step_00000006" / "state.safetensors"))
    for key in ("model.line.weight", "model.line.bias", "ema.line.weight", "optim.line.0.exp_avg_sq"):
        assert torch.equal(again[key], state[key]), key
