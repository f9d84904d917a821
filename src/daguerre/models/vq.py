"""Vector quantisation, the regulariser of LDM's VQ first stages (van den Oord et al. 2017, "Neural Discrete
Representation Learning"; Esser et al. 2021, VQGAN; Rombach et al. 2022, Sec. 3.1).

Each latent vector z (one per cell of the (B, D, h, w) latent) is replaced by its nearest codebook entry
e_k, k = argmin_j ||z - e_j||. The gradient skips the non-differentiable lookup (straight-through:
z_q = z + sg[e_k - z]); the codebook learns from ||sg[z] - e_k||^2 and the encoder is held near its codes
by the commitment term beta ||z - sg[e_k]||^2 (VQ-VAE eq. 3). Options of training (`CodebookState`):
exponential-moving-average codebook updates instead of the codebook loss (VQ-VAE App. A.1; Razavi et al.
2019), and the restart of codes left unused for a number of steps at encoder outputs of the batch
(Dhariwal et al. 2020, Jukebox). As in LDM, the diffusion model works on the pre-quantisation latents and
the quantiser is the first layer of the decoder (`AutoencoderKL.decode`). Parameter names follow CompVis /
taming-transformers (`quantize.embedding.weight`, (n_embed, embed_dim)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOOKUP_ROWS = 4096  # latent vectors per distance computation: bounds the (rows, codebook_size) matrix
EMA_EPS = 1e-5  # Laplace smoothing of the EMA cluster sizes (Sonnet / taming `EmbeddingEMA`)


@dataclass
class Quantized:
    """The quantiser's output: z_q (B, D, h, w) with straight-through gradients to z, the two loss terms
    (float32 scalars, means over elements) and the chosen code of each cell (B, h, w)."""

    z_q: torch.Tensor
    codebook_loss: torch.Tensor  # ||sg[z] - e||^2: moves the codes towards the encoder outputs
    commitment_loss: torch.Tensor  # ||z - sg[e]||^2: keeps the encoder near its codes (weighted by beta)
    indices: torch.Tensor


class VectorQuantizer(nn.Module):
    """A codebook of `codebook_size` vectors of `dim` channels (`embedding.weight`, CompVis / taming
    `VectorQuantizer2` names), initialised uniform in [-1/K, 1/K] as taming does."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """The index of the nearest code of each cell of z (B, D, h, w) -> (B, h, w), distances in float32
        (torch.cdist, as diffusers' `VectorQuantizer`), LOOKUP_ROWS cells at a time."""
        b, d, h, w = z.shape
        if d != self.dim:
            raise ValueError(f"latents of {d} channels for a codebook of {self.dim}-channel vectors")
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # (B*h*w, D)
        codes = self.embedding.weight.float()  # (K, D)
        idx = [torch.cdist(rows, codes).argmin(dim=1) for rows in flat.split(LOOKUP_ROWS)]
        return torch.cat(idx).reshape(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> their vectors (B, D, h, w), in the codebook's dtype."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> Quantized:
        indices = self.nearest(z)
        q = self.lookup(indices).to(z.dtype)  # (B, D, h, w)
        codebook = F.mse_loss(q.float(), z.detach().float())
        commitment = F.mse_loss(z.float(), q.detach().float())
        return Quantized(z + (q - z).detach(), codebook, commitment, indices)


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(fraction of the codebook used, perplexity) of a batch's codes: perplexity = exp(H(p)), p the
    frequency of each code; it is 1 when every cell takes one code and K when all K are used equally."""
    counts = torch.bincount(indices.flatten(), minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).sum()) / codebook_size, math.exp(float(entropy))


class CodebookState(nn.Module):
    """The training state of the codebook options (buffers, checkpointed with the run): EMA cluster sizes
    and sums (`ema_decay` > 0) and the step each code was last chosen (`restart_after` > 0)."""

    def __init__(self, quantizer: VectorQuantizer, ema_decay: float, restart_after: int):
        super().__init__()
        self.ema_decay, self.restart_after = ema_decay, restart_after
        k = quantizer.codebook_size
        # cluster sizes start at one with the codes as their sums, so an unused code keeps its vector
        self.register_buffer("cluster_size", torch.ones(k))
        self.register_buffer("embed_sum", quantizer.embedding.weight.detach().float().clone())
        self.register_buffer("last_used", torch.zeros(k, dtype=torch.long))
        if ema_decay > 0:
            quantizer.embedding.weight.requires_grad_(False)  # the codes move by the EMA, not by gradients

    @torch.no_grad()
    def update_(self, quantizer: VectorQuantizer, z: torch.Tensor, indices: torch.Tensor, step: int,
                generator: torch.Generator, reduce=None) -> int:
        """After a step on encoder outputs z (B, D, h, w) that chose `indices`: the EMA update of the codes,
        then the restart of dead codes; returns how many codes restarted. `reduce(t)` averages a tensor over
        processes (data-parallel training), so every process makes the same update."""
        reduce = reduce or (lambda t: t)
        k = quantizer.codebook_size
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, quantizer.dim).float()  # (N, D)
        onehot = F.one_hot(indices.flatten(), k).float()  # (N, K)
        counts, sums = reduce(onehot.sum(0)), reduce(onehot.t() @ flat)  # (K,), (K, D)
        self.last_used[counts > 0] = step
        weight = quantizer.embedding.weight
        if self.ema_decay > 0:  # VQ-VAE App. A.1: N_k, m_k as moving averages, e_k = m_k / N_k (smoothed)
            self.cluster_size.lerp_(counts, 1.0 - self.ema_decay)
            self.embed_sum.lerp_(sums, 1.0 - self.ema_decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + EMA_EPS) / (n + k * EMA_EPS) * n
            weight.copy_((self.embed_sum / smoothed[:, None]).to(weight.dtype))
        if self.restart_after <= 0:
            return 0
        dead = (step - self.last_used >= self.restart_after).nonzero().flatten()
        if len(dead) == 0:
            return 0
        pick = torch.randint(len(flat), (len(dead),), generator=generator)
        fresh = reduce(flat[pick.to(flat.device)])  # (dead, D): the same vectors on every process
        weight[dead] = fresh.to(weight.dtype)
        self.embed_sum[dead], self.cluster_size[dead] = fresh, 1.0
        self.last_used[dead] = step
        return len(dead)


class PointLatent:
    """The encoding of a VQ autoencoder: the pre-quantisation latent itself, a point, with the interface of
    the KL posterior (mean = mode = sample, std 0, KL 0), so that every caller of `encode` takes either."""

    def __init__(self, h: torch.Tensor):
        self.mean = h  # (B, D, h, w)
        self.std = torch.zeros_like(h)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: object = None) -> torch.Tensor:
        return self.mean.new_zeros(self.mean.shape[0])
