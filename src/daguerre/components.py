"""`Components`: the loaded networks of one model, what pipelines run on (shared/DESIGN.md), and the one
`build_components` that makes them: fresh from a config, or strictly from state dicts (`weights.strict`).

A one-shot run holds each network only while it needs it (stable-diffusion.cpp's `free_params_immediately`):
`Components.release(part)` frees a part's weights (its tensors go to the meta device, the C heap is trimmed,
and calling it raises `ReleasedError`), `Components.acquire(part)` reads a released part again from the
model's file (`ModelSource`, set by `registry.open_model(..., release_after_use=True)`), and the pipelines
acquire each part before they use it and, when `release_after_use` is set, release it after
(`Components.done_with`). The parts (`PARTS`): the text encoder, the U-Net, the VAE's encoder and its decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import ModelConfig
from .memory import mapped_allocations, trim

if TYPE_CHECKING:  # imported for annotations only: keep `import daguerre` light
    import torch
    from torch import nn

    from .models.autoencoder import AutoencoderKL
    from .models.bert import BertTextEncoder
    from .models.text_encoder import CLIPTextEncoder
    from .models.tokenizer import CLIPTokenizer
    from .models.unet import UNetModel
    from .models.wordpiece import WordPieceTokenizer

    StateDicts = tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None]


@dataclass
class Components:
    """A latent diffusion model in memory: its config, the three networks and the tokenizer.

    `text_encoder` and `tokenizer` are None for class-conditional and unconditional models; a model whose
    `config.text_encoder.kind` is "minilm" holds the frozen BERT all-MiniLM-L6-v2 and its WordPiece tokenizer.
    """

    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder | BertTextEncoder | None = None
    tokenizer: CLIPTokenizer | WordPieceTokenizer | None = None
    source: ModelSource | None = None  # where released parts are read again from (None: nowhere)
    release_after_use: bool = False  # the pipelines release each part when they are done with it
    # the LoRAs merged into the weights and the LoRA / embeddings folders (daguerre.lora.apply.Adapters), or None
    adapters: Any = None

    @property
    def device(self) -> torch.device:
        """The device the networks run on: the U-Net's, or while it is released the one it is read to."""
        device = next(self.unet.parameters()).device
        return self.source.device if device.type == "meta" and self.source is not None else device

    def modules_of(self, part: str) -> list[nn.Module]:
        """The modules that hold `part`'s weights (none for the text encoder of a model without one)."""
        check_parts([part])
        if part == "unet":
            return [self.unet]
        if part == "text_encoder":
            return [] if self.text_encoder is None else [self.text_encoder]
        vae = self.vae
        return [vae.encoder, vae.quant_conv] if part == "vae_encoder" else [vae.decoder, vae.post_quant_conv]

    def resident(self, part: str) -> bool:
        """Whether `part`'s weights are in memory (not released)."""
        return not any(t.is_meta for m in self.modules_of(part) for t in _tensors(m))

    def release(self, *parts: str) -> None:
        """Free the weights of `parts` (their tensors go to the meta device; module docstring) and give the
        freed memory back to the system; calling a released network raises `ReleasedError` until `acquire`."""
        for part in check_parts(parts):
            for module in self.modules_of(part):
                if any(not t.is_meta for t in _tensors(module)):
                    module.to("meta")
                if getattr(module, _RELEASED_HOOK, None) is None:
                    setattr(module, _RELEASED_HOOK, module.register_forward_pre_hook(_Refuse(self, part)))
        if self.adapters is not None:  # the merged LoRAs' originals of these parts go too
            self.adapters.released(check_parts(parts))
        trim()

    def acquire(self, *parts: str) -> None:
        """Make sure `parts` hold their weights: released ones are read again from `source` (one partial load,
        `registry.open_model`), into the same module objects. A `ReleasedError` when there is no source; a
        ValueError when the file no longer holds the model these components were opened from."""
        missing = [p for p in PARTS if p in check_parts(parts) and not self.resident(p)]
        if not missing:
            return
        if self.source is None:
            raise ReleasedError(f"the {_titles(missing)} of model {self.config.name!r} {_was(missing)} released, "
                                "and these components have no file to read it from: open the model again "
                                "(daguerre.load / registry.open_model)")
        with mapped_allocations():  # the weights outside the heap, a read's temporaries leave no holes in it
            fresh = self.source.read(frozenset(missing), self.source.dtype)
        if fresh.config != self.config:
            raise ValueError(f"{self.source.name} no longer holds the model it held when it was opened (its config "
                             f"differs): reading its {_titles(missing)} again would mix two models; open it again")
        for part in missing:
            for mine, theirs in zip(self.modules_of(part), fresh.modules_of(part), strict=True):
                _take_tensors(mine, theirs, part)
                handle = getattr(mine, _RELEASED_HOOK, None)
                if handle is not None:
                    handle.remove()
                    setattr(mine, _RELEASED_HOOK, None)
        del fresh
        if self.adapters is not None:  # the weights read again are the file's: merge the current LoRAs again
            self.adapters.acquired(self, frozenset(missing))
        trim()

    def done_with(self, *parts: str) -> None:
        """A pipeline no longer needs `parts` in this run: released when `release_after_use` is set."""
        if self.release_after_use:
            self.release(*parts)


# The parts of a model, in the order a text-to-image run uses them (`Components.release` / `acquire`).
PARTS = ("text_encoder", "vae_encoder", "unet", "vae_decoder")
PART_TITLES = {"text_encoder": "text encoder", "unet": "U-Net", "vae_encoder": "VAE encoder",
               "vae_decoder": "VAE decoder"}
_RELEASED_HOOK = "_daguerre_released"  # a released module's forward pre-hook handle


class ReleasedError(RuntimeError):
    """A released network was called, or a released part has no file to be read again from."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's released parts are read again from: `read(parts, dtype)` returns components of the same
    model whose `parts` hold their weights in `dtype` (the other networks may be on the meta device); `name`
    (the file or folder), `device` and `dtype` (the compute dtype) as the model is used."""

    name: str
    device: torch.device
    dtype: torch.dtype
    read: Callable[[frozenset[str], torch.dtype], Components]


def check_parts(parts: Iterable[str]) -> frozenset[str]:
    """`parts` as a frozenset, each one of `PARTS` (a ValueError names any other)."""
    parts = frozenset(parts)
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise ValueError(f"unknown model part(s) {', '.join(unknown)}: the parts are {', '.join(PARTS)}")
    return parts


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _titles(parts: Iterable[str]) -> str:
    return " and ".join(PART_TITLES[p] for p in parts)


def _was(parts: list[str]) -> str:
    return "was" if len(parts) == 1 else "were"


class _Refuse:
    """The forward pre-hook of a released module: a clear error instead of a computation on meta tensors."""

    def __init__(self, components: Components, part: str):
        self.name, self.part = components.config.name, part

    def __call__(self, module: nn.Module, args: tuple) -> None:
        raise ReleasedError(f"the {PART_TITLES[self.part]} of model {self.name!r} was released (a one-shot run, "
                            f"release_after_use, frees each network after use): call components.acquire("
                            f"{self.part!r}) to read it again first")


def _take_tensors(mine: nn.Module, theirs: nn.Module, part: str) -> None:
    """Move every parameter and buffer of `theirs` into the same place in `mine` (the same network built again)."""
    mods, their_mods = dict(mine.named_modules()), dict(theirs.named_modules())
    same = mods.keys() == their_mods.keys() and all(
        type(m) is type(their_mods[k]) and m._parameters.keys() == their_mods[k]._parameters.keys()
        and m._buffers.keys() == their_mods[k]._buffers.keys() for k, m in mods.items())
    if not same:
        raise ReleasedError(f"the {PART_TITLES[part]} read again is not built like the released one")
    for k, m in mods.items():
        m._parameters.update(their_mods[k]._parameters)
        m._buffers.update(their_mods[k]._buffers)


def build_components(
    config: ModelConfig,
    weights: StateDicts | None = None,
    *,
    seed: int = 0,
    tokenizer=None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prefixes: tuple[str, str, str] = ("", "", ""),
) -> Components:
    """The networks of `config`: with `weights` = (U-Net, autoencoder, text encoder) daguerre-named state dicts
    (text in transformers layout; what `state_dicts` returns), each network loaded strictly (`instantiate`:
    every key and shape checked, errors name keys with `prefixes`); without, freshly initialised from `seed`
    (training starts here; tests use it). Floating tensors become `dtype` (default float32) on `device`.

    A frozen pretrained text encoder (kind "minilm") is always loaded from its package: its weights are never
    stored, and the returned config records their sha256. `tokenizer` replaces the default CLIP tokenizer.
    """
    import dataclasses

    import torch

    from .models.autoencoder import AutoencoderKL
    from .models.text_encoder import CLIPTextEncoder
    from .models.tokenizer import CLIPTokenizer
    from .models.unet import UNetModel
    from .quantize import int8_loading_active
    from .weights.strict import instantiate

    tcfg = config.text_encoder
    frozen = tcfg is not None and tcfg.frozen  # a frozen pretrained encoder: weights from its package
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNetModel(config.unet)
            vae = AutoencoderKL(config.vae)
            text_encoder = CLIPTextEncoder(tcfg) if tcfg is not None and not frozen else None
        for module in (unet, vae, text_encoder):
            if module is not None:
                module.to(device=device or "cpu", dtype=dtype or torch.float32).eval()
    else:
        unet_sd, vae_sd, text_sd = weights
        int8 = int8_loading_active()  # inside quantize.int8_loading: the U-Net and text encoder are built int8
        unet = instantiate(lambda: UNetModel(config.unet), unet_sd, "U-Net", device=device, dtype=dtype,
                           prefix=prefixes[0], quantize=int8)
        vae = instantiate(lambda: AutoencoderKL(config.vae), vae_sd, "autoencoder", device=device, dtype=dtype,
                          prefix=prefixes[1])
        text_encoder = None
        if frozen and text_sd:
            raise ValueError(f"the checkpoint holds {len(text_sd)} text-encoder tensors, but its config uses the "
                             f"frozen pretrained {tcfg.kind!r} text encoder, whose weights are never stored")
        if tcfg is None and text_sd:
            raise ValueError(f"the config has no text encoder but the checkpoint holds {len(text_sd)} text-encoder "
                             "tensors")
        if tcfg is not None and not frozen:
            if text_sd is None:
                raise ValueError("the config has a text encoder but the checkpoint holds no text-encoder weights")
            text_encoder = instantiate(lambda: CLIPTextEncoder(tcfg), text_sd, "text encoder", device=device,
                                       dtype=dtype, prefix=prefixes[2], quantize=int8)
    if frozen:
        from .models.bert import load_minilm, minilm_tokenizer

        text_encoder = load_minilm(tcfg, device=device, dtype=dtype)
        tokenizer = minilm_tokenizer(tcfg.max_length)
        config = dataclasses.replace(config, text_encoder=text_encoder.config)  # with the weights' sha256
    elif tcfg is not None:
        if tokenizer is None:
            tokenizer = CLIPTokenizer(max_length=tcfg.max_length, pad_token_id=tcfg.pad_token_id)
    else:
        tokenizer = None
    return Components(config=config, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def state_dicts(components: Components, dtype: torch.dtype | None = None) -> tuple[dict, dict, dict | None]:
    """(U-Net, autoencoder, text encoder) state dicts (detached, on their device), floating ones in `dtype` if given;
    the inverse of `build_components(config, weights)`.

    Without `dtype` the tensors are the networks' own (no copy): the writers convert them one at a time.
    """

    def grab(model) -> dict | None:
        if model is None:
            return None
        out = {}
        for k, v in model.state_dict().items():
            v = v.detach()
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        return out

    return grab(components.unet), grab(components.vae), grab(components.text_encoder)
