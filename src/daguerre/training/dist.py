"""Data-parallel training under `torchrun`: process group, device, deterministic sharding of the data stream.

One code path serves one process and many: without the torchrun environment (`WORLD_SIZE` unset or
1) nothing is initialised and the collectives below are no-ops. With it, the backend is NCCL on CUDA
and gloo on the CPU; each process takes the device `cuda:LOCAL_RANK` when CUDA is available, else the
CPU. The data stream is one infinite sequence of positions p = 0, 1, 2, ...; position p is image
`perm_e[p mod N]` of the epoch e = p div N, with `perm_e` a permutation drawn from (seed, e). The
optimizer step s consumes the global batch of positions [s G, (s + 1) G), G = batch x world x accum,
so the images of a step do not depend on how they are split over processes, and resuming at step s
needs nothing but s (a deterministic distributed sampler, as in DiT's training loop).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist

COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)  # a rank may wait this long (latent caching on rank 0's share)
SEED_BYTES = 8  # per-sample generator seeds are 63-bit
SEED_MASK = (1 << 63) - 1


@dataclass
class DistEnv:
    """This process's place in the job: rank, world size, local rank and device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun job if there is one (env:// rendezvous) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "auto" and torch.cuda.is_available()
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"config key train.device: {device!r} is not 'auto', 'cpu' or 'cuda'")
    if device.startswith("cuda"):
        use_cuda = True
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not torch_dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        torch_dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average `t` over the processes, in place (identity without a process group)."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        t.div_(torch_dist.get_world_size())
    return t


def all_gather_objects(obj: object) -> list[object]:
    """Every process's `obj` (in rank order); [obj] without a process group."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return [obj]
    out: list[object] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every process."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def maybe_no_sync(model: torch.nn.Module, skip_sync: bool):
    """`model.no_sync()` for a DDP model on gradient-accumulation micro-steps, else a null context."""
    if skip_sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a hash of `parts` (independent streams for every (seed, purpose, position))."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=SEED_BYTES).digest()
    return int.from_bytes(digest, "little") & SEED_MASK


def sample_generator(seed: int, purpose: str, position: int) -> torch.Generator:
    """The CPU generator of one draw of the data stream: noise, timestep, dropout and flip of one sample."""
    return torch.Generator("cpu").manual_seed(mix_seed(seed, purpose, position))


class StreamSampler:
    """Dataset indices for (step, micro-step, rank) of a data-parallel run (module docstring).

    `indices(step, micro)` -> (positions, indices) of this rank's micro-batch: the positions identify
    each draw (per-sample randomness is seeded by them), the indices pick images from `pool`.
    """

    def __init__(self, pool: np.ndarray, seed: int, batch: int, world: int, rank: int, accum: int) -> None:
        if len(pool) == 0:
            raise ValueError("no training images: the dataset is empty (or data.holdout takes all of it)")
        self.pool = np.asarray(pool, dtype=np.int64)
        self.seed, self.batch, self.world, self.rank, self.accum = seed, batch, world, rank, accum
        self._perms: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.batch * self.world * self.accum

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng((self.seed, epoch))
            self._perms[epoch] = self.pool[rng.permutation(len(self.pool))]
        return self._perms[epoch]

    def positions(self, step: int, micro: int) -> np.ndarray:
        start = step * self.global_batch + (micro * self.world + self.rank) * self.batch
        return np.arange(start, start + self.batch, dtype=np.int64)

    def indices(self, step: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
        pos = self.positions(step, micro)
        n = len(self.pool)
        idx = np.array([self._perm(int(p // n))[p % n] for p in pos], dtype=np.int64)
        return pos, idx

    def state(self, step: int) -> dict[str, int]:
        """Where the stream stands before `step` (for the JSON of a checkpoint; `step` alone restores it)."""
        p = step * self.global_batch
        return {"position": int(p), "epoch": int(p // len(self.pool)), "seed": self.seed}

    def iter_steps(self, start: int, stop: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        for step in range(start, stop):
            for micro in range(self.accum):
                yield (step, micro, *self.indices(step, micro))
