"""`daguerre info MODEL`: what a checkpoint file or diffusers folder holds, without loading the weights, and
how a run of it would compute on this machine (`--device`, `--dtype`: precision, attention form, threads)."""

from __future__ import annotations

import argparse
import json

from ..precision import AUTO, CLI_CHOICES, QUANTIZE_CHOICES
from .registry import command

GIB = 1024**3
MIB = 1024**2
PARAM_UNITS = ((1e9, "B"), (1e6, "M"), (1e3, "k"))


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .safetensors / .ckpt file or a diffusers folder (or a CLIP model: "
                   "a CLIP file, transformers CLIP folder, OpenCLIP / OpenAI checkpoint)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None,
                   help="override the prediction type (SD v2 files cannot state it)")
    p.add_argument("--ema", action="store_true", help="describe the model with its EMA U-Net (full checkpoints)")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 (faster on large files)")
    p.add_argument("--device", default="cpu", help="the device a run would use (default: cpu)")
    p.add_argument("--dtype", default=AUTO, choices=CLI_CHOICES,
                   help="the --dtype a run would use (default auto: decided for this machine and model)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                   help="the --quantize a run would use (int8: the U-Net's and text encoder's layer weights in int8)")
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="the checkpoint's CompVis inference YAML, for a file whose head widths its weights cannot "
                   "tell (default: MODEL.yaml beside it, if any)")
    p.add_argument("--base", metavar="MODEL", default=None,
                   help="an adapter file's base model: a file or a shipped name (default: the shipped model the "
                   "adapter names; docs/layout.md)")


def human_size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB" if n >= MIB else f"{n} bytes"


def human_count(n: int) -> str:
    for scale, unit in PARAM_UNITS:
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def format_classes(config: dict) -> str:
    """A class-conditional model's classes, "10: 0 airplane, 1 automobile, ..." (what `--class` takes)."""
    names = config.get("class_names")
    if names:
        return f"{len(names)}: " + ", ".join(f"{k} {name}" for k, name in enumerate(names))
    count = (config.get("unet", {}).get("num_classes") or 1) - 1  # the last label is the null class
    return f"{count}, unnamed (give --class an index 0..{count - 1})"


def schedule_summary(schedule: dict) -> dict:
    """What `daguerre info` says of a model's noise schedule (a `ScheduleConfig` as a dict): its betas, whether
    it has zero terminal SNR (abar_T = 0, taken as 2^-24) and the sigmas it spans, {sigma_min, sigma_max}."""
    from ..config import ScheduleConfig
    from ..diffusion.schedules import model_sigmas

    sigmas = model_sigmas(ScheduleConfig(**schedule))
    return {"beta_schedule": schedule["beta_schedule"], "beta_start": schedule["beta_start"],
            "beta_end": schedule["beta_end"], "num_train_timesteps": schedule["num_train_timesteps"],
            "zero_terminal_snr": schedule["zero_terminal_snr"], "sigma_min": float(sigmas[0]),
            "sigma_max": float(sigmas[-1])}


def format_schedule(s: dict) -> str:
    """The schedule line: "scaled_linear 0.00085..0.012 betas, 1000 timesteps, sigma 0.02917..14.61; terminal SNR
    not zero", or on a zero-terminal-SNR model what that means for Karras and Exponential (docs/samplers.md)."""
    betas = s["beta_schedule"] + ("" if s["beta_schedule"] == "cosine" else f" {s['beta_start']:g}..{s['beta_end']:g}")
    text = f"{betas} betas, {s['num_train_timesteps']} timesteps, sigma {s['sigma_min']:.4g}..{s['sigma_max']:.4g}; "
    if s["zero_terminal_snr"]:
        return text + ("zero terminal SNR (abar_T = 0, taken as 2^-24): Karras and Exponential need more steps "
                       "(docs/samplers.md)")
    return text + "terminal SNR not zero"


def format_info(info: dict) -> str:
    """The human-readable form of `daguerre.checkpoints.summary.describe`'s result."""
    from ..checkpoints.vae_file import regularizer_text

    u, v, t, p = info["unet"], info["vae"], info["text_encoder"], info["parameters"]
    lines = [
        f"model:           {info['path']}",
        f"format:          {info['format']}",
        *([f"base model:      {info['base']['name']} ({info['base']['file']}, sha256 {info['base']['sha256']})"]
          if info.get("base") else []),
        f"variant:         {info['variant']}",
        f"preset:          {info['preset'] or 'none (custom architecture)'}",
        f"prediction type: {info['prediction_type']} (from {info['prediction_type_from']})",
        f"schedule:        {format_schedule(schedule_summary(info['config']['schedule']))}",
        f"native size:     {info['sample_size']} px" + (f", concat {info['concat']}" if info["concat"] else ""),
        f"U-Net:           {u['levels']} levels, channels {u['channels']}, {u['res_blocks']} res blocks/level, "
        f"attention at levels {u['attention_levels']}, heads {u['heads']}, depth {u['transformer_depth']}, "
        f"context {u['context_dim']}, in/out channels {u['in_channels']}/{u['out_channels']}"
        + (", linear proj" if u["linear_proj"] else "") + (", upcast attention" if u["upcast_attention"] else ""),
        f"VAE:             factor {v['downsample_factor']}, {v['latent_channels']} latent channels, "
        f"channels {v['channels']}, scale factor {v['scale_factor']}"
        + (f", shift {v['shift_factor']}" if v["shift_factor"] else "") + f"; regulariser {regularizer_text(v)}",
    ]
    if t is not None and t.get("frozen_pretrained"):
        lines.append(
            f"text encoder:    {t['frozen_pretrained']}, not stored in this file; BERT width {t['width']}, "
            f"{t['layers']} layers, {t['heads']} heads, {t['max_length']}-token window"
        )
    elif t is not None:
        lines.append(
            f"text encoder:    width {t['width']}, {t['layers']} layers, {t['heads']} heads, skip {t['skip_layers']} "
            f"({'penultimate' if t['skip_layers'] == 1 else 'last' if t['skip_layers'] == 0 else 'earlier'} layer), "
            f"{t['activation']}, pad id {t['pad_token_id']}"
            + (f", projection {t['projection_dim']}" if t["projection_dim"] else "")
            + ("" if t.get("causal", True) else ", bidirectional (not causal)")
        )
    else:
        lines.append("text encoder:    none")
    if info["config"].get("conditioning") == "class":  # what `generate --class NAME_OR_INDEX` takes
        lines.append(f"classes:         {format_classes(info['config'])}")
    layout = (info["config"].get("unet") or {}).get("layout")
    if layout:  # what `generate --layout / --box` takes (docs/layout.md)
        lines.append(f"layout:          up to {layout['max_objects']} objects of up to {layout['phrase_words']} words, "
                     f"corners on a {layout['grid']}x{layout['grid']} grid; words: {' '.join(layout['vocabulary'])}")
    gligen = (info["config"].get("unet") or {}).get("gligen")
    if gligen:  # route 2 of docs/layout.md: the same --layout / --box, read by an adapter on a frozen model
        attend = {"objects": ", image to objects only", "boxes": ", each position to the objects whose box covers it"}
        levels = gligen.get("extra_levels") or ()
        extra = f" and after each ResNet block of level {', '.join(map(str, levels))}" if levels else ""
        pool = list(gligen.get("phrase_pool") or ["eot"])
        phrase = "phrase" if pool == ["eot"] else f"phrase as its {' + '.join(pool)} states"
        lines.append(f"layout:          GLIGEN adapter, up to {gligen['max_objects']} objects ({phrase} + box each), "
                     f"gated self-attention in every transformer block{extra}"
                     f"{' (visual tokens with their positions)' if gligen.get('visual_positions') else ''}"
                     f"{attend.get(gligen.get('attend'), '')}"
                     f"{' (values by place in the box)' if gligen.get('shape_freqs') else ''}"
                     "; --layout-steps sets how long it acts")
    if info["config"].get("semantic_labels"):  # what `generate --semantic MAP.png` takes: the palette
        from ..data.layout import palette_legend

        lines.append(f"map labels:      {palette_legend(info['config']['semantic_labels'])}")
    lines.append(
        f"parameters:      U-Net {human_count(p['unet'])}, VAE {human_count(p['vae'])}, "
        f"text encoder {human_count(p['text_encoder'])}, total {human_count(p['total'])} ({p['total']:,})"
    )
    dtypes = ", ".join(f"{k} x{n}" for k, n in sorted(info["stored_dtypes"].items(), key=lambda kv: -kv[1]))
    lines.append(f"stored dtypes:   {dtypes}")
    config = info["config"]
    if config.get("defaults"):
        from ..pipelines.request import DEFAULT_SETTINGS

        order = [k for k in DEFAULT_SETTINGS if k in config["defaults"]]
        order += sorted(set(config["defaults"]) - set(order))
        lines.append("recommends:      " + ", ".join(f"{k} {config['defaults'][k]}" for k in order))
    prov = config.get("provenance") or {}
    if prov.get("stage") == "ldm":
        lines.append(f"trained:         {prov.get('steps')} steps, {prov.get('images_seen', 0):,} images, "
                     f"{prov.get('training_seconds', 0) / 3600:.2f} h on {prov.get('world_size', 1)} process(es)")
    if prov.get("init"):  # fine-tuned from another model (--init, docs/training.md)
        init = prov["init"]
        new = sum(init.get("new_tensors", {}).values())
        lines.append(f"initialised:     from {init['file']} (sha256 {init['sha256'][:16]})"
                     + (f", {new} new tensors" if new else ""))
    for change in prov.get("config_history") or []:  # training phases (docs/training.md)
        lines.append(f"phase:           from step {change['step']}: {change['key']} "
                     f"{change['from']!r} -> {change['to']!r}")
    extras = []
    if info["has_ema"]:
        extras.append("has a separate EMA U-Net (model_ema.*; load with --ema)")
    if info["ignored_keys"]:
        extras.append(f"{info['ignored_keys']} ignored keys (schedule buffers etc., see docs/formats.md)")
    if extras:
        lines.append(f"notes:           {'; '.join(extras)}")
    lines.append(f"size:            {human_size(info['file_size'])}")
    if info.get("run"):
        from ..precision import format_run

        lines.append(f"a run here:      {format_run(info['run'])}")
    if info["sha256"]:
        lines.append(f"sha256:          {info['sha256']}")
        lines.append(f"model hash:      {info['short_hash']} (AUTOMATIC1111)")
    return "\n".join(lines)


def run_here(args: argparse.Namespace, unet_parameters: int) -> dict:
    """How `daguerre generate` would run this model with these --device, --dtype and --quantize flags on this
    machine (`precision.run_settings`: precision, attention form, convolution layout, threads; the weights)."""
    import torch

    from ..precision import resolve_dtype, run_settings

    device = torch.device(args.device)
    settings = run_settings(resolve_dtype(args.dtype, device, unet_parameters), device, unet_parameters)
    return {**settings, "weights": args.quantize}


@command("info", "describe a checkpoint: variant, architecture, parameters, dtypes, hashes", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..checkpoints.clip_file import describe_clip, format_clip_info, is_clip
    from ..checkpoints.summary import describe
    from ..checkpoints.vae_file import describe_vae, format_vae_info, is_autoencoder
    from ..registry import shipped_clips, shipped_models

    path = shipped_models().get(args.model) or shipped_clips().get(args.model) or args.model  # a name or a path
    if args.config is not None:
        from ..checkpoints.detect import check_original_config

        check_original_config(path, args.config)  # before any work; describe reads it
    if is_autoencoder(path):  # a first stage alone (VAE file, CompVis first stage, diffusers VAE/VQModel folder)
        info = describe_vae(path)
        print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_vae_info(info, human_count))
        return 0
    if is_clip(path):  # a CLIP model (issue 16): its towers, not a diffusion model's networks
        info = describe_clip(path, hashes=not args.no_hash)
        print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_clip_info(info, human_count,
                                                                                            human_size))
        return 0
    info = describe(path, prediction_type=args.prediction_type, use_ema=args.ema, hashes=not args.no_hash,
                    original_config=args.config, base=args.base)
    info["run"] = run_here(args, info["parameters"]["unet"])
    if args.json:  # format_info derives the schedule line from the config itself
        info["schedule"] = schedule_summary(info["config"]["schedule"])
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(format_info(info))
    return 0
