"""LoRA files as weight deltas: the kohya / AUTOMATIC1111, diffusers / PEFT and LyCORIS formats (docs/lora.md).

A LoRA file holds, per adapted layer, a few small tensors under that layer's name; `read_lora` groups them
by layer (`LoraLayer`) and `LoraLayer.delta(shape)` rebuilds the layer's weight difference Delta W, in float32,
by the formula of its kind (each checked in tests/test_lora_formulas.py):

- LoRA (Hu et al. 2021; kohya `lora_down` / `lora_up`, PEFT `lora_A` / `lora_B`): Delta W = up @ down, a
  convolution's kernel taken from `down` (LoCon: `down` (r, in, k, k), `up` (out, r, 1, 1)); with LyCORIS'
  `lora_mid` (r, r, k, k), the Tucker form einsum('m n k l, i m, n j -> i j k l', mid, up, down);
- LoHa (Hyeon-Woo et al. 2022, FedPara): Delta W = (w1_a @ w1_b) * (w2_a @ w2_b), elementwise; with `hada_t1` /
  `hada_t2`, each factor is einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a);
- LoKr (Yeh et al. 2024, LyCORIS): Delta W = kron(w1, w2) reshaped to the layer, each of w1, w2 stored whole or
  as a product `_a @ _b` (w2 also as the Tucker form with `lokr_t2`);
- LyCORIS "full": Delta W = `diff`.

The scale is alpha / rank when the file stores `alpha` (rank: `down`'s, `w1_b`'s or a LoKr factor's first
dimension), else 1, as AUTOMATIC1111 computes it; the caller multiplies by the user's weight.
Nothing here trusts the file: every tensor's shape must fit the layer it names and its rank be at most the
layer's smaller dimension, so no file can make daguerre allocate more than the layer itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
# suffix of a tensor's key (after the layer's name) -> (the role it plays, the format it belongs to)
SUFFIXES: dict[str, str] = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",  # kohya, LoCon
    "lora_A.weight": "down", "lora_B.weight": "up",  # PEFT (diffusers >= 0.24)
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",  # diffusers < 0.24, text
    "lora.down.weight": "down", "lora.up.weight": "up",  # diffusers LoRACompatibleLinear / Conv
    "alpha": "alpha",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t2": "lokr_t2",
    "diff": "diff",
}
# suffixes of adapter kinds daguerre does not apply: named in the error, never skipped
UNSUPPORTED: dict[str, str] = {
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "oft_blocks": "OFT", "oft_diag": "OFT",
    "oft_R.weight": "OFT", "diff_b": "LyCORIS full bias", "on_input": "IA3", "a1.weight": "GLoRA",
    "b1.weight": "GLoRA", "w_norm": "LyCORIS norm", "b_norm": "LyCORIS norm", "bias_indices": "LyCORIS bias",
}
# the older diffusers attention-processor names -> the layer they adapt (`processor.to_q_lora.down.weight`)
PROCESSOR_NAMES = {f".processor.{p}_lora.": f".{q}.lora." for p, q in
                   (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0"))}
MAX_LAYERS = 10_000  # SD 1.5's U-Net + text encoder have ~800 layers a LoRA can adapt
MAX_FILE_BYTES = 4 * 1024**3  # the largest LoRA / LyCORIS files in use are ~2 GB (full-rank LoCon of SDXL)


@dataclass
class LoraLayer:
    """The tensors a LoRA file holds for one layer (roles as in `SUFFIXES`), and the name it stores them under."""

    key: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        t = self.tensors
        if "diff" in t:
            return "full"
        if any(k.startswith("hada_") for k in t):
            return "loha"
        if any(k.startswith("lokr_") for k in t):
            return "lokr"
        return "lora"

    def _need(self, *roles: str) -> list[torch.Tensor]:
        missing = [r for r in roles if r not in self.tensors]
        if missing:
            raise ValueError(f"LoRA layer {self.key}: no {', '.join(missing)} tensor ({self.kind} needs "
                             f"{', '.join(roles)}); the file is incomplete")
        return [self.tensors[r].float() for r in roles]

    def scale(self, rank: int | None) -> float:
        """alpha / rank (AUTOMATIC1111's `calc_scale`), 1 without an alpha or a rank."""
        alpha = self.tensors.get("alpha")
        if alpha is None or rank is None:
            return 1.0
        if alpha.numel() != 1 or not math.isfinite(value := float(alpha.float().reshape(()))):
            raise ValueError(f"LoRA layer {self.key}: alpha must be one finite number, got shape {tuple(alpha.shape)}")
        return value / rank

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """Delta W of this layer, float32, in `shape` (the layer's weight: (out, in) or (out, in, k, k)), scaled
        by alpha / rank; a ValueError names the layer when the tensors do not fit `shape` (module docstring)."""
        kind = self.kind
        if kind == "full":
            (w,) = self._need("diff")
            return self._fit(w, shape, None)
        if kind == "loha":
            return self._loha(shape)
        if kind == "lokr":
            return self._lokr(shape)
        up, down = self._need("up", "down")
        rank = down.shape[0]
        self._check_rank(rank, shape)
        inner = down[0].numel() if "mid" not in self.tensors else down[0].numel() * math.prod(
            self.tensors["mid"].shape[2:])
        self._check_size(up.shape[0], inner, shape)
        if "mid" in self.tensors:  # LoCon's Tucker form: the kernel lives in `mid`
            (mid,) = self._need("mid")
            if mid.shape[:2] != (rank, rank) or up.reshape(up.shape[0], -1).shape[1] != rank:
                raise ValueError(f"LoRA layer {self.key}: lora_mid {tuple(mid.shape)} does not fit rank {rank}")
            w = torch.einsum("m n k l, i m, n j -> i j k l", mid, up.reshape(up.shape[0], -1),
                             down.reshape(rank, -1))
        else:
            if up.reshape(up.shape[0], -1).shape[1] != rank:
                raise ValueError(f"LoRA layer {self.key}: up {tuple(up.shape)} and down {tuple(down.shape)} "
                                 "have different ranks")
            w = up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)
            if down.dim() == 4:
                w = w.reshape(up.shape[0], *down.shape[1:])
        return self._fit(w, shape, rank)

    def _loha(self, shape: torch.Size) -> torch.Tensor:
        w1a, w1b, w2a, w2b = self._need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        rank = w1b.shape[0]
        self._check_rank(max(rank, w2b.shape[0]), shape)
        factors = []
        for wa, wb, t in ((w1a, w1b, "hada_t1"), (w2a, w2b, "hada_t2")):
            if t in self.tensors:  # Tucker: w_a (r, out), w_b (r, in), t (r, r, k, k)
                (core,) = self._need(t)
                self._check_size(wa.shape[-1], wb.shape[-1] * math.prod(core.shape[2:]), shape)
                if core.dim() != 4 or core.shape[:2] != (wa.shape[0], wb.shape[0]):
                    raise ValueError(f"LoRA layer {self.key}: {t} {tuple(core.shape)} does not fit its factors")
                factors.append(torch.einsum("i j k l, j r, i p -> p r k l", core, wb.flatten(1), wa.flatten(1)))
            else:
                self._check_size(wa.shape[0], wb[0].numel(), shape)
                if wa.dim() != 2 or wa.shape[1] != wb.shape[0]:
                    raise ValueError(f"LoRA layer {self.key}: LoHa factors {tuple(wa.shape)} @ {tuple(wb.shape)} "
                                     "do not multiply")
                factors.append(wa @ wb.flatten(1))
        if factors[0].numel() != factors[1].numel():
            raise ValueError(f"LoRA layer {self.key}: the two LoHa products differ in size")
        w = factors[0].reshape(factors[1].shape) * factors[1]
        return self._fit(w, shape, rank)

    def _lokr(self, shape: torch.Size) -> torch.Tensor:
        t, rank = self.tensors, None
        sizes = []  # each factor's (rows, columns), from the shapes alone: checked before any product
        for w, a, b in (("lokr_w1", "lokr_w1_a", "lokr_w1_b"), ("lokr_w2", "lokr_w2_a", "lokr_w2_b")):
            if w in t:
                sizes.append((t[w].shape[0], t[w][0].numel()))
            elif a in t and b in t:
                core = t.get("lokr_t2") if w == "lokr_w2" else None
                rows = t[a].shape[-1] if core is not None else t[a].shape[0]
                cols = t[b].shape[-1] * math.prod(core.shape[2:]) if core is not None else t[b][0].numel()
                sizes.append((rows, cols))
            else:
                self._need(a, b)
        self._check_size(sizes[0][0] * sizes[1][0], sizes[0][1] * sizes[1][1], shape)
        if "lokr_w1" in t:
            (w1,) = self._need("lokr_w1")
        else:
            w1a, w1b = self._need("lokr_w1_a", "lokr_w1_b")
            rank = w1b.shape[0]
            w1 = w1a @ w1b
        if "lokr_w2" in t:
            (w2,) = self._need("lokr_w2")
        else:
            w2a, w2b = self._need("lokr_w2_a", "lokr_w2_b")
            rank = w2b.shape[0]
            if "lokr_t2" in t:  # Tucker: w2_a (r, out), w2_b (r, in), t2 (r, r, k, k)
                (core,) = self._need("lokr_t2")
                if core.dim() != 4 or core.shape[:2] != (w2a.shape[0], w2b.shape[0]):
                    raise ValueError(f"LoRA layer {self.key}: lokr_t2 {tuple(core.shape)} does not fit its factors")
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", core, w2b.flatten(1), w2a.flatten(1))
            else:
                w2 = w2a @ w2b.flatten(1)
                if len(shape) == 4 and w2b.dim() == 4:
                    w2 = w2.reshape(w2a.shape[0], *w2b.shape[1:])
        if rank is not None:
            self._check_rank(rank, shape)
        if w1.dim() != 2 or w1.numel() * w2.numel() != math.prod(shape):
            raise ValueError(f"LoRA layer {self.key}: kron({tuple(w1.shape)}, {tuple(w2.shape)}) does not make the "
                             f"layer's weight {tuple(shape)}")
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return self._fit(torch.kron(w1.contiguous(), w2.contiguous()), shape, rank)

    def _check_size(self, rows: int, columns: int, shape: torch.Size) -> None:
        """The delta the tensors make is (rows, columns): it must be the layer's (out, in * k * k)."""
        if (rows, columns) != (shape[0], math.prod(shape[1:])):
            raise ValueError(f"LoRA layer {self.key}: its tensors make a ({rows}, {columns}) delta, which does not "
                             f"fit the layer's weight {tuple(shape)}: a LoRA of another model")

    def _check_rank(self, rank: int, shape: torch.Size) -> None:
        limit = min(shape[0], math.prod(shape[1:]))
        if not 1 <= rank <= limit:
            raise ValueError(f"LoRA layer {self.key}: rank {rank} for a layer of shape {tuple(shape)} (at most "
                             f"{limit}): not a LoRA of this model")

    def _fit(self, w: torch.Tensor, shape: torch.Size, rank: int | None) -> torch.Tensor:
        """`w` scaled, in `shape`: a (out, in) delta of a 1x1 convolution (SD 1's proj_in) and back reshape."""
        if tuple(w.shape) != tuple(shape):
            if w.numel() != math.prod(shape) or w.shape[0] != shape[0] or (w.dim() == 4 and len(shape) == 4):
                raise ValueError(f"LoRA layer {self.key}: its delta {tuple(w.shape)} does not fit the layer's weight "
                                 f"{tuple(shape)}: a LoRA of another model")
            w = w.reshape(shape)
        return w * self.scale(rank)


def split_key(key: str) -> tuple[str, str]:
    """(layer name, role) of a tensor key of a LoRA file; a ValueError names a key of an unsupported kind
    (DoRA, OFT, IA3, ...) or one that is not a LoRA tensor at all."""
    for old, new in PROCESSOR_NAMES.items():
        key = key.replace(old, new)
    for suffix, kind in UNSUPPORTED.items():
        if key.endswith("." + suffix):
            raise ValueError(f"{key}: a {kind} tensor; daguerre applies LoRA, LoCon, LoHa and LoKr (docs/lora.md)")
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], SUFFIXES[suffix]
    raise ValueError(f"{key}: not a LoRA tensor (expected a name ending in .lora_down.weight, .lora_up.weight, "
                     ".alpha, .lora_A.weight, .hada_w1_a, .lokr_w1, ...)")


def group_layers(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, LoraLayer]:
    """The tensors of a LoRA state dict grouped by layer (`split_key`); every key must be a LoRA tensor."""
    layers: dict[str, LoraLayer] = {}
    bad = []
    for key, value in sd.items():
        try:
            name, role = split_key(key)
        except ValueError as e:
            bad.append(str(e))
            continue
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or role == "alpha"):
            bad.append(f"{key}: not a floating-point tensor")
            continue
        layer = layers.setdefault(name, LoraLayer(name))
        if role in layer.tensors:
            bad.append(f"{key}: a second {role} tensor for layer {name}")
            continue
        layer.tensors[role] = value
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValueError(f"{source}: {len(bad)} tensor(s) daguerre cannot apply: {'; '.join(bad[:3])}{more}")
    if not layers:
        raise ValueError(f"{source}: holds no LoRA tensors")
    if len(layers) > MAX_LAYERS:
        raise ValueError(f"{source}: {len(layers)} layers, more than any model has ({MAX_LAYERS})")
    return layers


@dataclass
class LoraFile:
    """A LoRA read from disk: its name (the file's stem, how prompts name it), path, layers and metadata."""

    name: str
    path: Path | None
    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)


def read_lora(path: str | os.PathLike) -> LoraFile:
    """A LoRA file: safetensors, or a torch pickle read with `weights.io.safe_torch_load` (never executed).
    Every tensor must be a LoRA tensor (`split_key`); whether it fits a model is checked when it is applied."""
    from ..untrusted import regular_file
    from ..weights.io import read_state_dict

    path = regular_file(path, "LoRA file")
    if path.suffix.lower() not in LORA_EXTENSIONS:
        raise ValueError(f"{path}: a LoRA file is {', '.join(LORA_EXTENSIONS)}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size / 1024**3:.1f} GB is larger than any LoRA "
                         f"({MAX_FILE_BYTES // 1024**3} GB)")
    sd, metadata = read_state_dict(path)
    return LoraFile(name=path.stem, path=path, layers=group_layers(sd, str(path)), metadata=dict(metadata))
