"""The model file of a stage-2 run: written at the end of training, or by `daguerre train export RUN` from any
checkpoint, from the checkpoint alone (no data, no caches) while the run goes on.

A fine-tuning run that left its base model's weights as they are (a GLIGEN adapter, docs/layout.md) can also be
written as an adapter file on that base (`write_adapter`, `daguerre train export RUN --adapter`; the end of a
GLIGEN run writes RUN/adapter.safetensors beside RUN/model.safetensors).

A training checkpoint holds everything the model file is made of: the EMA weights, the run config, the
autoencoder's path and hash, the class names and the tokens of the training captions (which the jointly
trained text encoder's vocabulary is pruned to). `write_model` turns EMA components and a `ModelRecord`
(provenance) into the file; the end of training and `export_checkpoint` both call it, so checkpoint N exports
as the model a run of N steps would have written. A checkpoint of an earlier release lacks the class names
and caption tokens: its export reads them from the run's data (never from the latent cache). The run folder
is only read, so a run that is still training is not disturbed.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints.vae_file import load_vae
from ..components import Components
from ..config import ModelConfig
from ..fileio import atomic_path
from ..models.text_encoder import CLIPTextEncoder, prune_vocabulary
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNetModel
from . import state, text_cache
from .config import RunConfig, derive_model_config, to_jsonable
from .data import checkpoint_split, describe_data, load_items, load_train_data
from .ema import EMA
from .loop import RESUME_OBJECTS, check_writable

logger = logging.getLogger("daguerre.train")
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"  # a GLIGEN run's adapter file, beside its MODEL_FILE
SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ModelRecord:
    """What a stage-2 model file records about its run besides the weights (its provenance), and the tokens of
    the training captions (None: no jointly trained text encoder, nothing to prune)."""

    steps: int
    seconds: float
    world: int
    global_batch: int
    parameters: dict[str, int]
    vae_file: Path
    vae_sha256: str
    vae_provenance: dict[str, Any]
    data: dict[str, Any]
    init: dict[str, Any] | None
    history: list[dict[str, Any]]
    caption_tokens: list[int] | None
    # when the model was finished: one time for every file written from this record (a GLIGEN run's whole model
    # and its adapter carry the same config)
    finished: str = dataclasses.field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))


def caption_tokens(tokenizer: CLIPTokenizer, captions: list[str]) -> list[int]:
    """The token ids of `captions` and of the empty prompt, sorted: what a pruned vocabulary keeps."""
    keep: set[int] = set()
    for text in set(captions) | {""}:
        keep.update(tokenizer.encode(text))
    return sorted(keep)


def with_vocabulary(components: Components, keep: list[int]) -> Components:
    """`components` with its text encoder pruned to the token ids `keep` (`prune_vocabulary`)."""
    text_encoder = prune_vocabulary(components.text_encoder, keep)
    config = dataclasses.replace(components.config, text_encoder=text_encoder.config)
    return dataclasses.replace(components, config=config, text_encoder=text_encoder)


def model_components(components: Components, cfg: RunConfig, record: ModelRecord) -> Components:
    """The (EMA) `components` of a stage-2 run as its model file holds them: the vocabulary pruned to the training
    captions' tokens (`train.prune_vocabulary`; a GLIGEN model's frozen encoder, or a fine-tune's that kept its
    --init model's encoder frozen, to that model's words, as its was, or not at all), the sample grids' settings
    as the recommended ones, provenance."""
    t = cfg.train
    frozen_init = not cfg.loss.train_text_encoder and record.init is not None  # the --init model's encoder, as it is
    if components.config.unet.gligen is not None or frozen_init:  # pruned as the --init model's was (or not at all)
        base_words = (record.init or {}).get("token_ids")
        if base_words is not None:
            components = with_vocabulary(components, [int(i) for i in base_words])
    elif t.prune_vocabulary and record.caption_tokens is not None:
        known = (record.init or {}).get("token_ids") or ()  # the words of an --init model stay known
        components = with_vocabulary(components, sorted({*record.caption_tokens, *(int(i) for i in known)}))
        logger.info("text encoder vocabulary pruned to the %d tokens of the training captions",
                    len(components.config.text_encoder.token_ids))
    model_cfg = components.config
    sample = cfg.sample  # the settings of the sample grids are the model's recommended ones
    model_cfg.defaults = {"steps": sample.steps, "sampler": sample.sampler, "schedule": sample.schedule,
                          "cfg_scale": sample.cfg_scale}
    model_cfg.provenance = {
        "stage": "ldm", "steps": record.steps, "training_seconds": round(record.seconds, 1),
        "images_seen": record.steps * record.global_batch, "world_size": record.world,
        "parameters": record.parameters,
        "weights": "ema" if t.ema_decay > 0 else "raw", "vae_file": record.vae_file.name,
        "vae_sha256": record.vae_sha256,
        "vae_provenance": {k: v for k, v in record.vae_provenance.items() if k != "run_config"},
        "data": record.data, "run_config": to_jsonable(cfg.to_dict()),
        "finished": record.finished,
    }
    if record.init is not None:  # fine-tuned from another model (train.init_from)
        model_cfg.provenance["init"] = record.init
    if record.history:  # training phases: config keys changed at a resume (loop.PHASE_CHANGES)
        model_cfg.provenance["config_history"] = record.history
    return components


def write_model(components: Components, cfg: RunConfig, record: ModelRecord, path: Path) -> Path:
    """Write the model file of a stage-2 run: `model_components`, whole."""
    from ..checkpoints import save_model

    save_model(model_components(components, cfg, record), path, dtype=SAVE_DTYPES[cfg.train.save_dtype])
    logger.info("wrote %s", path)
    return path


def base_model_file(cfg: RunConfig, record: ModelRecord) -> Path:
    """The file a fine-tuning run started from (`train.init_from`, or the base `train.init_base` continued an
    adapter on, as its sha256 recorded at step 0), else the shipped model of that sha256; ValueError when neither
    is at hand."""
    from ..checkpoints.shipped import shipped_models
    from ..weights.io import file_hash

    init = record.init or {}
    if not cfg.train.init_from or not init.get("sha256"):
        raise ValueError("only a model fine-tuned from another (train.init_from, --init) can be written as an adapter "
                         "on it: this run started from scratch")
    want = init["sha256"]
    given = Path(cfg.train.init_from).expanduser()
    candidates = [given] if given.is_file() else []
    if cfg.train.init_base:  # an adapter continued on another base (train.init_base): that base, a file or a name
        named = shipped_models().get(cfg.train.init_base, Path(cfg.train.init_base).expanduser())
        candidates = ([named] if named.is_file() else []) + candidates
    candidates += [p for _, p in sorted(shipped_models().items())]
    found = next((p for p in candidates if file_hash(p) == want), None)
    if found is None:
        raise ValueError(f"the run's base model {cfg.train.init_from} (sha256 {want}) is "
                         f"{'another file now' if given.is_file() else 'gone'} and no shipped model has that sha256: "
                         "put the file the run started from back at that path to write its adapter")
    return found


def write_adapter(components: Components, cfg: RunConfig, record: ModelRecord, path: Path) -> Path:
    """Write the adapter file of a stage-2 run on its base model (`checkpoints.adapter`: what the model adds to the
    file it was fine-tuned from, naming that file's model and sha256): a GLIGEN run's grounding net and gated
    layers. ValueError when the run changed the base's weights (any run but a GLIGEN one)."""
    from ..checkpoints.adapter import base_name_of, save_adapter

    base = base_model_file(cfg, record)
    n = save_adapter(model_components(components, cfg, record), path, base, base_name_of(base),
                     dtype=SAVE_DTYPES[cfg.train.save_dtype])
    logger.info("wrote %s: %d adapter tensors on the base model %s", path, n, base)
    return path


def networks(model_cfg: ModelConfig, frozen: tuple | None,
             seed: int) -> tuple[UNetModel, CLIPTextEncoder | None, Any]:
    """The U-Net, the trainable text encoder (None for a frozen one, `frozen` = (encoder, tokenizer), or none)
    and the tokenizer of a stage-2 model, initialised from `seed` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNetModel(model_cfg.unet)
        te = CLIPTextEncoder(model_cfg.text_encoder) if model_cfg.text_encoder is not None and not frozen else None
    tokenizer = frozen[1] if frozen else None
    if te is not None:
        tokenizer = CLIPTokenizer(max_length=model_cfg.text_encoder.max_length,
                                  pad_token_id=model_cfg.text_encoder.pad_token_id)
    return unet, te, tokenizer


def find_checkpoint(run: Path, step: int | None) -> tuple[Path, dict]:
    """(folder, meta) of checkpoint `step` of `run` (the newest that reads when None, damaged newer ones
    named in a warning); FileNotFoundError listing the others, ValueError naming a damaged file."""
    found = state.list_checkpoints(run)
    if not found:
        raise FileNotFoundError(f"{run} has no training checkpoints ({run / state.CHECKPOINT_DIR} is empty or missing)")
    if step is None:
        folder, meta, skipped = state.newest_intact_checkpoint(run, RESUME_OBJECTS)
        for bad, why in skipped:
            logger.warning("skipped the damaged checkpoint %s: %s", bad, why)
        if folder is None:
            raise ValueError(f"{run}: no checkpoint reads ({'; '.join(why for _, why in skipped)})")
        return folder, meta
    for s, folder in found:
        if s == step:
            return folder, state.check_checkpoint(folder, RESUME_OBJECTS)
    steps = ", ".join(str(s) for s, _ in found)
    raise FileNotFoundError(f"{run} has no checkpoint of step {step}; it has steps {steps}")


def export_checkpoint(run: str | Path, step: int | None = None, out: str | Path | None = None, *,
                      adapter: bool = False) -> Path:
    """Write the model of stage-2 checkpoint `step` (default: the newest) of `run` to `out`
    (default: RUN/model_step_NNNNNNNN.safetensors), or with `adapter` its adapter file on the model the run started
    from (`write_adapter`; default RUN/adapter_step_NNNNNNNN.safetensors); returns its path."""
    run = Path(run)
    folder, meta = find_checkpoint(run, step)
    stored = meta["run_config"]
    if stored.get("stage") == "vae":
        raise ValueError(f"{folder} is an autoencoder checkpoint; export makes models of stage-2 (ldm) runs. An "
                         f"autoencoder run writes {run / 'vae.safetensors'} when it ends: to end it at step "
                         f"{meta['step']}, resume it with `daguerre train vae ... --out {run} --resume "
                         f"--set train.steps={meta['step']}`")
    if stored.get("stage") != "ldm":
        raise ValueError(f"{folder} is a {stored.get('stage')!r} checkpoint; export makes models of stage-2 (ldm) runs")
    step = int(meta["step"])
    try:
        cfg = RunConfig.from_dict(stored)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{folder / state.META_FILE}: its run_config is not valid: {e}") from None
    cfg.train.steps = step  # the config a run of `step` steps would have recorded
    cfg.train.progress = False
    cfg.data.cache_dir = str(Path(cfg.data.cache_dir) if cfg.data.cache_dir else run / "latents")
    kind = "adapter" if adapter else "model"
    out = Path(out) if out is not None else run / f"{kind}_step_{step:08d}.safetensors"
    check_writable(out.parent)  # a read-only destination is one line now, not after the export's work
    components, record = checkpoint_model(folder, meta, cfg)
    with tempfile.TemporaryDirectory(prefix="daguerre-export-") as tmp:
        made = (write_adapter if adapter else write_model)(components, cfg, record, Path(tmp) / MODEL_FILE)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as target:
            shutil.copyfile(made, target)
    return out


def checkpoint_model(folder: Path, meta: dict[str, Any], cfg: RunConfig) -> tuple[Components, ModelRecord]:
    """The EMA components of stage-2 checkpoint `folder` and their `ModelRecord`, built from the checkpoint,
    its run config `cfg` and the run's autoencoder file (the data only for a checkpoint of an earlier release)."""
    from ..weights.io import file_hash

    if not isinstance(meta.get("vae_file"), str):
        raise ValueError(f"{folder / state.META_FILE}: no vae_file (the autoencoder the run trained on)")
    vae_file = Path(meta["vae_file"])
    if not vae_file.is_file():
        raise FileNotFoundError(f"the run's autoencoder {vae_file} is missing: the export needs the file it trained on")
    vae_sha = file_hash(vae_file)
    if meta.get("vae_sha256") != vae_sha:
        raise ValueError(f"cannot export {folder}: the run's autoencoder {vae_file} is not the file it trained on "
                         "(its sha256 differs); put the run's own autoencoder back at that path")
    vae, vae_cfg = load_vae(vae_file)
    trained_te = "text_encoder" in meta["ema_updates"]  # a jointly trained text encoder has an EMA
    data = None
    if "class_names" not in meta or (trained_te and "caption_token_ids" not in meta):
        logger.info("%s was written by an earlier release: reading the run's data for its class names and captions",
                    folder)
        data = load_train_data(cfg.data, checkpoint_split(meta))
    class_names = meta["class_names"] if data is None else data.class_names
    run_model = copy.deepcopy(cfg)
    run_model.model.vae = copy.deepcopy(vae_cfg.vae)  # the autoencoder is the trained one, scale included
    model_cfg = derive_model_config(run_model, vae_cfg.vae.in_channels, class_names)
    frozen = text_cache.load_frozen_text_encoder(model_cfg, torch.device("cpu"))  # MiniLM: (encoder, tokenizer)
    tensors, _ = state.load_checkpoint(folder)
    unet, te, tokenizer = networks(model_cfg, frozen, cfg.train.seed)
    modules: dict[str, nn.Module] = {"unet": unet, **({"text_encoder": te} if te is not None else {})}
    try:
        for name, module in modules.items():
            state.load_module_tensors(module, tensors, f"model.{name}.")
            if name in meta["ema_updates"]:  # the final model holds the EMA weights
                ema = EMA(module, 0.0)
                ema.load_tensors(tensors, f"ema.{name}.", int(meta["ema_updates"][name]))
                ema.copy_to(module)
            module.eval().requires_grad_(False)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot export {folder}: its weights do not fit its run config "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    tokens = None
    if trained_te:
        tokens = (meta["caption_token_ids"] if data is None else
                  caption_tokens(tokenizer, [str(it.get("caption", "")) for it in load_items(data, data.train_pool)]))
    components = Components(config=model_cfg, unet=unet, vae=vae, text_encoder=te if te is not None else
                            frozen and frozen[0], tokenizer=tokenizer)
    world = int(meta["world"])
    record = ModelRecord(
        steps=int(meta["step"]), seconds=float(meta.get("seconds", 0.0)), world=world,
        global_batch=cfg.train.batch_size * world * cfg.train.grad_accum,
        parameters={"unet": sum(p.numel() for p in unet.parameters()),
                    "text_encoder": sum(p.numel() for p in te.parameters()) if te is not None else 0},
        vae_file=vae_file, vae_sha256=vae_sha, vae_provenance=vae_cfg.provenance,
        data=describe_data(cfg.data, checkpoint_split(meta)),
        init=meta.get("init"), history=list(meta.get("config_history", [])), caption_tokens=tokens)
    return components, record
