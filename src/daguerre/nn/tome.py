"""Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023; ToMe, Bolya et al. 2023).

Bipartite soft matching on the tokens of an h x w feature map: one destination token per `stride` x `stride`
cell (its top-left token; ToMe for SD picks it at random), every other token a source. Each source is
matched to its most similar destination (cosine similarity of the features), and the `ratio` * N sources
with the best matches are averaged into their destinations. The network then runs on the N - r tokens
left (`merge`), and `unmerge` gives each merged source its destination's output: in SD, self-attention
of the highest-resolution blocks runs on fewer tokens, at a quality cost that grows with `ratio`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Merge:
    """A merge plan for tokens (B, N, C): `merge(x)` -> (B, N - r, C), `unmerge(y)` -> (B, N, C)."""

    src_idx: torch.Tensor  # (Ns,) positions of the source tokens
    dst_idx: torch.Tensor  # (Nd,) positions of the destination tokens
    kept: torch.Tensor  # (B, Ns - r) indices (into the sources) of the sources kept as they are
    merged: torch.Tensor  # (B, r) indices of the sources merged away
    into: torch.Tensor  # (B, r) the destination (index into the destinations) each is merged into

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        src, dst = x[:, self.src_idx], x[:, self.dst_idx]  # (B, Ns, C), (B, Nd, C)
        kept = src.gather(1, _expand(self.kept, c))
        moved = src.gather(1, _expand(self.merged, c))
        dst = dst.scatter_reduce(1, _expand(self.into, c), moved, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)  # (B, Ns - r + Nd, C)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, c = y.shape
        n_kept = self.kept.shape[1]
        kept, dst = y[:, :n_kept], y[:, n_kept:]  # (B, Ns - r, C), (B, Nd, C)
        out = y.new_empty(b, len(self.src_idx) + len(self.dst_idx), c)
        out[:, self.dst_idx] = dst
        out.scatter_(1, _expand(self.src_idx[self.kept], c), kept)
        out.scatter_(1, _expand(self.src_idx[self.merged], c), dst.gather(1, _expand(self.into, c)))
        return out


def _expand(idx: torch.Tensor, c: int) -> torch.Tensor:
    return idx.unsqueeze(-1).expand(*idx.shape, c)


def bipartite_merge(x: torch.Tensor, h: int, w: int, ratio: float, stride: int = 2) -> Merge:
    """The merge plan of tokens x (B, h*w, C) at `ratio` (the fraction of all tokens merged away, at most the
    sources: 1 - 1/stride^2) by bipartite soft matching (module docstring)."""
    b, n, _ = x.shape
    if n != h * w:
        raise ValueError(f"token merging: {n} tokens are not a {h}x{w} map")
    grid = torch.arange(n, device=x.device).view(h, w)
    is_dst = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    is_dst[::stride, ::stride] = True
    src_idx, dst_idx = grid[~is_dst], grid[is_dst]
    r = min(int(n * ratio), len(src_idx))
    metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    scores = metric[:, src_idx] @ metric[:, dst_idx].transpose(1, 2)  # (B, Ns, Nd) cosine similarities
    best, into = scores.max(dim=-1)  # (B, Ns)
    order = best.argsort(dim=-1, descending=True)  # the best-matched sources first
    merged, kept = order[:, :r], order[:, r:]
    return Merge(src_idx, dst_idx, kept, merged, into.gather(1, merged))
