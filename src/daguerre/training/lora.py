"""`daguerre train lora`: a LoRA (Hu et al. 2022) trained on a frozen daguerre or Stable Diffusion model.

The model (`--model FILE`, `train.init_from`) is loaded whole and frozen; only the adapter trains. Each adapted
layer W (a Linear, or a Conv2d) gets y = W x + (alpha / r) up(down(x)), with `down` a layer of W's kind to r
channels (for a k x k convolution a k x k convolution: kohya's LoCon) and `up` a Linear / 1x1 convolution from
r, zero at the start, so step 0 is the model bit for bit. `[lora]` chooses the rank, alpha and layers
(`unet_layers`: "attention" = everything inside the spatial transformers, kohya's LoRA; "conv" = the ResNet
blocks and down/upsamplers, LoCon) and whether the text encoder gets one too.

`AdapterStage` is what the LoRA and the textual-inversion stage (`embedding.py`) share on `loop.run`: the
training images encoded once by the model's own autoencoder (`latents`), the epsilon / v / x0 loss of stage 2
(`objective.DiffusionObjective`, shared with `ldm`) on the frozen U-Net, the adapter as the run's only module
(checkpointed, EMA-averaged, resumed, sampled in grids: the base model never enters a checkpoint, whose meta records its
sha256 so a resume on another model is refused).

The final file RUN/<lora.output_name>.safetensors is in the kohya format (`lora_unet_<diffusers name>` /
`lora_te_<transformers name>` with `.lora_down.weight`, `.lora_up.weight`, `.alpha`, kohya's `ss_*`
metadata), which `daguerre.lora`, AUTOMATIC1111, ComfyUI and diffusers' `load_lora_weights` read.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..components import Components
from . import dist, latents
from .config import LoraConfig, RunConfig
from .log import RunLogger
from .loop import RunSummary, Setup, autocast, make_optimizer, run
from .objective import DiffusionObjective
from .samples import SAMPLES_DIR, sample_grid, save_png

logger = logging.getLogger("daguerre.train")
KOHYA_UNET, KOHYA_TEXT = "lora_unet_", "lora_te_"
ATTENTION_BLOCKS = ("SpatialTransformer",)  # [lora] unet_layers "attention"
CONV_BLOCKS = ("ResBlock", "Downsample", "Upsample")  # "conv" (kohya LoCon's ResnetBlock2D, Down/Upsample2D)
TEXT_LAYERS = ("self_attn", "mlp")  # the text encoder's adapted layers (kohya: CLIPAttention, CLIPMLP)


# --- the adapter ------------------------------------------------------------------------------------------

class LoraLayer(nn.Module):
    """down, up and the scale alpha / r of one adapted layer (kohya's LoRAModule); `up` starts at zero."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError(f"a LoRA on a grouped convolution ({base}) is not supported")
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # kohya's initialisation
        nn.init.zeros_(self.up.weight)
        self.rank, self.alpha = rank, float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * (self.alpha / self.rank)

    def delta(self) -> torch.Tensor:
        """The weight update (alpha / r) up . down, of the base layer's weight shape."""
        down, up = self.down.weight.float(), self.up.weight.float()
        if down.dim() == 4:  # (r, in, k, k), (out, r, 1, 1)
            d = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        else:
            d = up @ down
        return d * (self.alpha / self.rank)


class LoraNetwork(nn.Module):
    """The LoRA layers of a model, keyed by their kohya names; `Hooks` runs them beside the base layers."""

    def __init__(self, layers: dict[str, LoraLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)


def lora_targets(components: Components, cfg: LoraConfig) -> dict[str, tuple[str, str]]:
    """kohya name -> (part, module name) of every layer `cfg` adapts, in module order. U-Net layers are named by
    their diffusers name (`checkpoints.unet_keys`, what SD tools expect), else by the CompVis one."""
    from ..checkpoints.unet_keys import _key_table

    out: dict[str, tuple[str, str]] = {}
    kinds = {"attention": ATTENTION_BLOCKS, "conv": CONV_BLOCKS}
    wanted = tuple(b for k in cfg.unet_layers for b in kinds[k])
    diffusers_of, _ = _key_table(components.config.unet)
    for block_name, block in components.unet.named_modules():
        if type(block).__name__ not in wanted:
            continue
        for sub, m in block.named_modules():
            if isinstance(m, nn.Linear | nn.Conv2d) and sub:
                module = f"{block_name}.{sub}"
                theirs = diffusers_of.get(module + ".weight")
                name = (theirs.removesuffix(".weight") if theirs else module).replace(".", "_")
                out[KOHYA_UNET + name] = ("unet", module)
    if cfg.text_encoder:
        te = components.text_encoder
        if te is None or components.config.text_encoder.frozen:
            raise ValueError("config key lora.text_encoder: this model's text encoder is a frozen pretrained one "
                             "(or none); a LoRA adapts a CLIP-style encoder only: set it to false")
        for module, m in te.named_modules():
            if isinstance(m, nn.Linear) and any(f".{k}." in module for k in TEXT_LAYERS):
                out[KOHYA_TEXT + module.replace(".", "_")] = ("text_encoder", module)
    return out


def build_lora(components: Components, cfg: LoraConfig, targets: dict[str, tuple[str, str]]) -> LoraNetwork:
    """A fresh LoRA (up = 0) for `targets`: rank / alpha, or conv_rank / conv_alpha for k x k convolutions."""
    layers = {}
    for key, (part, module) in targets.items():
        base = getattr(components, part).get_submodule(module)
        spatial = isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1)
        rank = (cfg.conv_rank or cfg.rank) if spatial else cfg.rank
        alpha = (cfg.conv_alpha or cfg.alpha) if spatial else cfg.alpha
        layers[key] = LoraLayer(base, min(rank, *_dims(base)), alpha)
    return LoraNetwork(layers)


def _dims(base: nn.Module) -> tuple[int, int]:
    return (base.in_channels, base.out_channels) if isinstance(base, nn.Conv2d) else (base.in_features,
                                                                                       base.out_features)


class Hooks:
    """Forward hooks that add `network`'s LoRA outputs to the base layers' (the adapter stays its own module, so the
    EMA copy is run by pointing `network` at it). `remove` takes them out."""

    def __init__(self, components: Components, targets: dict[str, tuple[str, str]], network: LoraNetwork) -> None:
        self.network = network
        self._handles = []
        for key, (part, module) in targets.items():
            base = getattr(components, part).get_submodule(module)
            self._handles.append(base.register_forward_hook(self._hook(key)))

    def _hook(self, key: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + self.network.layers[key](inputs[0]).to(output.dtype)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def kohya_state_dict(network: LoraNetwork, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The kohya tensors of `network`: NAME.lora_down.weight, NAME.lora_up.weight, NAME.alpha (a 0-d tensor)."""
    out = {}
    for key, layer in network.layers.items():
        out[f"{key}.lora_down.weight"] = layer.down.weight.detach().to("cpu", dtype).contiguous()
        out[f"{key}.lora_up.weight"] = layer.up.weight.detach().to("cpu", dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(layer.alpha, dtype=dtype)
    return out


def kohya_metadata(cfg: RunConfig, components: Components, base: dict[str, str], summary: RunSummary | None,
                   n_images: int) -> dict[str, str]:
    """kohya sd-scripts' `ss_*` training metadata (strings), the keys that apply to this run."""
    lo, t = cfg.lora, cfg.train
    unet = components.config.unet
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(lo.rank), "ss_network_alpha": str(lo.alpha),
        "ss_output_name": lo.output_name, "ss_learning_rate": str(t.lr), "ss_unet_lr": str(t.lr),
        "ss_text_encoder_lr": str(t.lr) if lo.text_encoder else "0", "ss_max_train_steps": str(t.steps),
        "ss_steps": str(t.steps), "ss_batch_size_per_device": str(t.batch_size),
        "ss_gradient_accumulation_steps": str(t.grad_accum), "ss_lr_scheduler": t.decay,
        "ss_lr_warmup_steps": str(t.warmup_steps), "ss_resolution": f"({cfg.data.size}, {cfg.data.size})",
        "ss_num_train_images": str(n_images), "ss_seed": str(t.seed), "ss_min_snr_gamma": str(cfg.loss.min_snr_gamma),
        "ss_network_train_unet_only": str(not lo.text_encoder), "ss_sd_model_name": base["name"],
        "ss_sd_model_hash": base["sha256"][:10], "ss_new_sd_model_hash": base["sha256"],
        "ss_v2": str(unet.context_dim == 1024 and components.config.schedule.prediction_type == "v_prediction"),
        "ss_mixed_precision": "bf16" if t.bf16 else "no", "ss_training_comment": "daguerre train lora",
        "ss_caption_dropout_rate": str(cfg.loss.caption_dropout), "ss_noise_offset": str(cfg.loss.offset_noise),
        "ss_daguerre_unet_layers": json.dumps(list(lo.unet_layers)),
    }
    if "conv" in lo.unet_layers:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(lo.conv_rank or lo.rank),
                                              "conv_alpha": str(lo.conv_alpha or lo.alpha)})
    if summary is not None:
        meta["ss_training_seconds"] = f"{summary.seconds:.0f}"
    return meta


# --- the stages --------------------------------------------------------------------------------------------

def open_base(spec: str, device: torch.device) -> tuple[Components, dict[str, str]]:
    """The frozen model an adapter trains on (float32, every part loaded), and {"path", "name", "sha256"}."""
    from ..registry import open_model, shipped_models
    from ..weights.io import file_hash

    path = shipped_models().get(spec, Path(spec).expanduser())
    if not path.is_file():
        raise FileNotFoundError(f"--model {spec}: no such model file (a daguerre or Stable Diffusion .safetensors / "
                                ".ckpt, or a shipped name)")
    components, _ = open_model(str(path), device=device, dtype=torch.float32)
    from ..conditioning import TextConditioner, conditioner_for

    # a plain text-to-image model (its captions are the only condition; layout models read more)
    if type(conditioner_for(components.config)) is not TextConditioner or components.text_encoder is None:
        raise ValueError(f"--model {spec}: a {components.config.conditioning!r}-conditioned model; LoRAs and "
                         "embeddings are trained on a text-to-image model")
    for part in (components.unet, components.text_encoder, components.vae):
        part.eval().requires_grad_(False)
    return components, {"path": str(path.resolve()), "name": path.stem, "sha256": file_hash(path)}


class AdapterStage:
    """What the LoRA and embedding stages share (module docstring); subclasses make `adapter` (`make_adapter`),
    the contexts of a batch's captions (`contexts`) and the file (`export`)."""

    name = "adapter"
    output = "adapter.safetensors"

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def prepare(self, env: dist.DistEnv) -> None:
        """The frozen model (a missing file fails before the run folder is made)."""
        if not self.cfg.train.init_from:
            raise ValueError(f"`daguerre train {self.name}` trains on a frozen model: name it with --model MODEL "
                             "(a daguerre or Stable Diffusion file, or a shipped name such as shapes)")
        self.components, self.base = open_base(self.cfg.train.init_from, env.device)

    def build(self, setup: Setup) -> None:
        cfg, env, data = self.cfg, setup.env, setup.data
        comps = self.components
        self.out, self.device = setup.out, env.device
        if data.channels != comps.config.vae.in_channels:
            raise ValueError(f"the model {self.base['path']} makes {comps.config.vae.in_channels}-channel images but "
                             f"the data has {data.channels} channels")
        cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else setup.out / "latents"
        self.lat = latents.build_or_load(comps.vae, self.base["sha256"], data, cfg.data.flip, cache_root, env)
        self.adapter = self.make_adapter()
        self.adapter.to(env.device).train()
        self.modules = {self.name: self.adapter}
        self.ema_targets = self.evaluated = (self.name,)
        self.optimizers = {self.name: make_optimizer(self.adapter.parameters(), cfg.train)}
        self.peak_lr: dict[str, float] = {}
        self.pool = np.arange(len(self.lat))
        self.objective = DiffusionObjective(comps.config, cfg.loss)

    def make_adapter(self) -> nn.Module:
        raise NotImplementedError

    def contexts(self, captions: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def resumed(self, meta: dict[str, Any]) -> None:
        if meta.get("base_sha256") != self.base["sha256"]:
            raise ValueError(f"cannot resume {self.out}: it trained on another model than {self.base['path']} "
                             f"(sha256 {str(meta.get('base_sha256'))[:12]}...); resume with the run's own --model")

    def describe(self, env: dist.DistEnv) -> str:
        t = self.cfg.train
        n = sum(p.numel() for p in self.adapter.parameters())
        return (f"{self.name}: {n / 1e3:.1f} k trainable parameters on the frozen model {self.base['path']}; "
                f"{len(self.lat)} cached latents {tuple(self.lat.mean.shape[2:])}; global batch "
                f"{t.batch_size * env.world * t.grad_accum}")

    def begin(self, sampler: dist.StreamSampler, start: int) -> None:
        self.sampler = sampler

    def step(self, step: int, micro: int, sync: bool) -> dict[str, float]:
        t, lc, lat, device = self.cfg.train, self.cfg.loss, self.lat, self.device
        positions, idx = self.sampler.indices(step, micro)
        gens = [dist.sample_generator(t.seed, self.name, int(p)) for p in positions]
        b = self.objective.draw(gens, lat, idx, device)
        dropped = (b.drop < lc.caption_dropout).tolist()
        captions = ["" if d else lat.captions[i] for i, d in zip(idx.tolist(), dropped, strict=True)]
        with autocast(device, t.bf16):
            context = self.contexts(captions)
            pred = self.components.unet(b.x_t, b.t.float().to(device), context=context)
        loss = self.objective.loss(pred, b)
        (loss / t.grad_accum).backward()
        return {"loss": float(loss.detach())}

    def sample(self, step: int, models: dict[str, nn.Module], runlog: RunLogger, *, grid: bool,
               evaluate: bool) -> None:
        """A grid of the `[sample]` prompts with the EMA adapter, at the training images' size (data.size)."""
        if not grid:
            return
        config = self.components.config
        native, config.sample_size = config.sample_size, self.cfg.data.size
        try:
            with self.applied(models[self.name]):
                image = sample_grid(self.components, self.cfg.sample)
        finally:
            config.sample_size = native
        save_png(image, self.out / SAMPLES_DIR / f"step_{step:08d}.png")

    def applied(self, adapter: nn.Module):
        raise NotImplementedError

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"base_sha256": self.base["sha256"], "base_file": self.base["path"]}


class _Swap:
    """Run `hooks` with `network` (an EMA copy) for the length of a `with`."""

    def __init__(self, hooks: Hooks, network: LoraNetwork) -> None:
        self.hooks, self.network = hooks, network

    def __enter__(self) -> None:
        self.saved, self.hooks.network = self.hooks.network, self.network

    def __exit__(self, *exc: object) -> None:
        self.hooks.network = self.saved


class LoraStage(AdapterStage):
    """`daguerre train lora` on `loop.run` (module docstring)."""

    name = "lora"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.output = f"{cfg.lora.output_name}.safetensors"

    def make_adapter(self) -> LoraNetwork:
        comps, lo = self.components, self.cfg.lora
        self.targets = lora_targets(comps, lo)
        if not self.targets:
            raise ValueError(f"config key lora.unet_layers: {lo.unet_layers} names no layer of model "
                             f"{comps.config.name!r}")
        network = build_lora(comps, lo, self.targets)
        self.hooks = Hooks(comps, self.targets, network)
        if lo.text_encoder:
            self.tokenize = None
        else:  # a frozen text encoder: each caption's context once
            self._cache: dict[str, torch.Tensor] = {}
            self._encode_frozen(sorted(set(self.lat.captions) | {""}))
        return network

    def _encode_frozen(self, captions: list[str]) -> None:
        from ..pipelines.common import encode_prompts

        with torch.no_grad():
            z = encode_prompts(self.components, captions)
        self._cache.update({c: z[i] for i, c in enumerate(captions)})

    def contexts(self, captions: list[str]) -> torch.Tensor:
        from ..pipelines.common import encode_prompts

        if self.cfg.lora.text_encoder:
            return quiet(encode_prompts, self.components, captions)
        missing = sorted(set(captions) - set(self._cache))
        if missing:
            self._encode_frozen(missing)
        return torch.stack([self._cache[c] for c in captions]).to(self.device)

    def applied(self, adapter: nn.Module) -> _Swap:
        return _Swap(self.hooks, adapter)

    def export(self, path: Path, models: dict[str, nn.Module], summary: RunSummary) -> None:
        write_lora(models[self.name], path, kohya_metadata(self.cfg, self.components, self.base, summary,
                                                           len(self.lat)), _save_dtype(self.cfg))


def _save_dtype(cfg: RunConfig) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.train.save_dtype]


def quiet(fn, *args):
    """`fn(*args)` without the prompt encoder's unknown-word warnings (said once when the run starts)."""
    prompts_logger = logging.getLogger("daguerre")  # (pipelines.prompts logs as "daguerre")
    level = prompts_logger.level
    prompts_logger.setLevel(logging.ERROR)
    try:
        return fn(*args)
    finally:
        prompts_logger.setLevel(level)


def write_lora(network: LoraNetwork, path: Path, metadata: dict[str, str], dtype: torch.dtype) -> Path:
    """The kohya safetensors file of `network`."""
    from ..fileio import atomic_save_safetensors

    atomic_save_safetensors(kohya_state_dict(network, dtype), path, metadata)
    return path


def train_lora(cfg: RunConfig, out: str | Path, *, resume: bool = False, until: int | None = None) -> Path:
    """Train the LoRA `cfg` describes on its frozen `train.init_from` model; returns RUN/<output_name>.safetensors."""
    return run(LoraStage(cfg), cfg, out, resume=resume, until=until)
