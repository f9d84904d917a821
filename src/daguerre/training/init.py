"""Start a run from a trained model's weights (`train.init_from`, `daguerre train ... --init MODEL`).

Fine-tuning: the run's networks begin as the model's instead of at random, with a fresh optimizer and
the run's own learning-rate schedule from step 0. Tensors are matched by name and must agree in
shape. The run may *grow* the model: a tensor of the run that the model lacks (say, the blocks of an
attention level added with `model.unet.attention_levels`) keeps its fresh initialisation, and since
every residual branch of daguerre's U-Net ends in a zero-initialised layer (LDM's `zero_module`), an
added spatial transformer starts as the identity: the grown network computes what the model did. A
tensor of the model that the run lacks is an error (the run would silently drop what it learned). The
U-Net's first convolution may grow its input channels (`GROWABLE_INPUT`: a semantic map or an inpainting
mask concatenated to the latent): the model's channels are copied and the new ones start at zero, so the
grown network too computes what the model did until it learns to read them (as SD inpainting began from SD).
The model's own file may serve as the run's `--vae`: its latents are those the model was trained on.

A GLIGEN adapter file (docs/layout.md, "Shipping an adapter") is loaded over its base, as everywhere, and the run
continues that adapter: its base (the shipped model the file names, checked by sha256) is recorded as the
model the run started from, so the run's own adapter file names the same base.

A jointly trained text encoder whose vocabulary was pruned at export (`train.prune_vocabulary`) gets
its kept rows back at their token ids; the other rows keep the run's initialisation. The run's own
pruning at the end keeps those ids as well as its captions' tokens, so fine-tuning on captions that
lack a word the model knew does not make it forget the word.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import load_model
from ..checkpoints.vae_file import load_vae
from ..weights.io import file_hash
from ..weights.strict import few

logger = logging.getLogger("daguerre.train")
GROWABLE_INPUT = "input_blocks.0.0.weight"  # the U-Net's conv_in: (out, in, 3, 3), `in` may grow


def check_init_source(path: str | Path | None) -> None:
    """Fail fast, before any slow set-up, when `--init` names nothing."""
    if path and not Path(path).exists():
        raise FileNotFoundError(f"--init {path}: no such model file or folder (give a daguerre / SD model file, a "
                                "VAE file or a diffusers folder)")


def copy_matching(module: nn.Module, source: dict[str, torch.Tensor], what: str, origin: Path) -> list[str]:
    """Copy the tensors of `source` into `module` by name; return (and log) the names of `module`'s tensors
    that `source` lacks (left as they are). Raises ValueError for a tensor `module` lacks or a shape mismatch."""
    target = module.state_dict()
    extra = sorted(set(source) - set(target))
    if extra:
        raise ValueError(f"--init {origin}: its {what} has {len(extra)} tensors this run's {what} lacks "
                         f"({few(extra)}); the run's [model] config must contain the model's architecture "
                         "(it may add to it, e.g. attention levels)")
    source = dict(source)
    grow = source.get(GROWABLE_INPUT)
    want = target.get(GROWABLE_INPUT)
    if grow is not None and want is not None and grow.dim() == 4 and grow.shape[0] == want.shape[0] \
            and grow.shape[2:] == want.shape[2:] and grow.shape[1] < want.shape[1]:
        grown = torch.zeros_like(want)  # the new input channels start at zero: the model's output is unchanged
        grown[:, :grow.shape[1]] = grow.to(want.dtype)
        source[GROWABLE_INPUT] = grown
        logger.info("--init: the %s's input grows from %d to %d channels (the new ones start at zero)", what,
                    grow.shape[1], want.shape[1])
    bad = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in sorted(source.items())
           if v.shape != target[k].shape]
    if bad:
        raise ValueError(f"--init {origin}: {len(bad)} {what} tensors differ in shape from this run's (model vs "
                         f"run: {few(bad)}); set the run's [model] config to the model's")
    with torch.no_grad():
        for k, v in source.items():
            target[k].copy_(v)  # state_dict() tensors share storage with the parameters and buffers
    new = sorted(set(target) - set(source))
    if new:
        logger.info("--init: %d %s tensors are new in this run and start fresh (%s)", len(new), what, few(new))
    return new


def _text_encoder_state(text_encoder: nn.Module, own: nn.Module) -> dict[str, torch.Tensor]:
    """The model's text-encoder tensors, a pruned token table scattered back to full-vocabulary rows over
    the run's own initial rows."""
    state = dict(text_encoder.state_dict())
    ids = text_encoder.config.token_ids
    if ids is None:
        return state
    key = "text_model.embeddings.token_embedding.weight"
    table = own.state_dict()[key].detach().clone()
    vocab = table.shape[0]
    if max(ids) >= vocab:
        raise ValueError(f"the model's text encoder uses token id {max(ids)}, beyond this run's vocabulary of "
                         f"{vocab}; set model.text_encoder.vocab_size to the model's")
    table[list(ids)] = state[key][: len(ids)].to(table.dtype)
    state[key] = table
    return state


def init_ldm(path: str | Path, unet: nn.Module, text_encoder: nn.Module | None, vae_sha256: str,
             base: str | None = None) -> dict:
    """Load the U-Net (and jointly trained text encoder) of the model at `path` into the run's fresh
    networks; returns the provenance record {"file", "sha256", "new_tensors"}. `base` (`train.init_base`): with
    an adapter file at `path`, the model to continue it on in place of the one it was trained on."""
    from ..checkpoints.adapter import find_base, is_adapter
    from ..weights.io import read_shapes

    path = Path(path)
    meta = read_shapes(path)[1] if path.is_file() else {}
    if base is not None and not is_adapter(meta):
        raise ValueError(f"train.init_base {base!r}: --init {path} is no adapter file, it has no base to replace")
    rebase = base is not None
    base = find_base(path, meta, base, rebase=rebase) if is_adapter(meta) else None  # the run's base
    if rebase:
        logger.warning("--init %s: continuing the adapter on %s, not on the model it was trained on", path, base)
    comps = load_model(path, base=base, rebase=rebase)  # float32 on the CPU (an adapter over its base)
    provenance = comps.config.provenance or {}
    own_vae = file_hash(path) == vae_sha256 if path.is_file() else False  # --vae is this very model file
    if provenance.get("vae_sha256") not in (None, vae_sha256) and not own_vae:
        raise ValueError(f"--init {path} was trained on the autoencoder {provenance['vae_sha256'][:16]} (a "
                         f"{provenance.get('vae_file', 'VAE')} file), not on this run's --vae: its latents "
                         "would mean something else; pass that autoencoder as --vae")
    if "vae_sha256" not in provenance and not own_vae:
        logger.warning("--init %s does not record its autoencoder: make sure --vae is the one it was trained on",
                       path)
    new = {"unet": copy_matching(unet, comps.unet.state_dict(), "U-Net", path)}
    token_ids = None  # the words the model knew: the run's pruned vocabulary keeps them
    if text_encoder is not None:
        te = comps.text_encoder
        if te is None or not hasattr(te, "text_model") or type(te) is not type(text_encoder):
            raise ValueError(f"--init {path}: the model has no CLIP-style text encoder to start this run's "
                             "jointly trained one from; start the text encoder fresh without --init, or set "
                             "[model] conditioning and text_encoder to the model's")
        if te.config.causal != text_encoder.config.causal:
            logger.warning("--init %s: the model's text encoder was trained %s, this run's is %s", path,
                           *("causal" if c else "bidirectional" for c in (te.config.causal,
                                                                         text_encoder.config.causal)))
        new["text_encoder"] = copy_matching(text_encoder, _text_encoder_state(te, text_encoder), "text encoder",
                                            path)
        if te.config.token_ids is not None:
            token_ids = [int(i) for i in te.config.token_ids]
    elif comps.text_encoder is not None and hasattr(comps.text_encoder, "text_model"):
        logger.warning("--init %s: the model's own text encoder is not used (this run has none to train)", path)
    logger.info("initialised from %s (%s)", path, comps.config.name)
    record = {"file": path.name, "sha256": file_hash(path), "new_tensors": {k: len(v) for k, v in new.items()},
              "token_ids": token_ids}
    if base is not None:  # the model the run fine-tunes is the adapter's base; the adapter is where it starts
        record.update(file=base.name, sha256=file_hash(base), adapter={"file": path.name, "sha256": record["sha256"]})
        logger.info("--init %s is an adapter on %s: the run continues it on that base", path, base)
    return record


def init_vae(path: str | Path, vae: nn.Module) -> dict:
    """Load the autoencoder of the model or VAE file at `path` into the run's fresh one."""
    path = Path(path)
    source, _ = load_vae(path)
    new = copy_matching(vae, source.state_dict(), "autoencoder", path)
    logger.info("initialised the autoencoder from %s", path)
    return {"file": path.name, "sha256": file_hash(path), "new_tensors": {"vae": len(new)}}
