"""Which layer of a daguerre model a LoRA file's layer name means: every name the formats use for it.

daguerre's U-Net has the CompVis names (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`) and its text
encoder transformers' (`text_model.encoder.layers.0.self_attn.q_proj`). A LoRA names a layer:

- kohya / AUTOMATIC1111: `lora_unet_` + the diffusers name with `.` -> `_`
  (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`), or the CompVis name so flattened
  (`lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`); `lora_te_` or `lora_te1_` + the
  transformers name flattened (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`);
- diffusers / PEFT: `unet.` + the diffusers name, `text_encoder.` + the transformers name (also without the
  prefix, and after PEFT's `base_model.model.`).

The diffusers name of a U-Net layer comes from the one key table of checkpoint import
(`checkpoints.unet_keys`), so a LoRA maps exactly as the diffusers weights of the same model do.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..components import Components

UNET, TEXT = "unet", "text_encoder"
KOHYA_UNET, KOHYA_TEXT = "lora_unet_", ("lora_te_", "lora_te1_")
PEFT_UNET, PEFT_TEXT = "unet.", "text_encoder."
PEFT_WRAPPER = "base_model.model."
TEXT_MODEL = "text_model."


@dataclass(frozen=True)
class Target:
    """A layer a LoRA adapts: the part (`unet` or `text_encoder`) and the module's name inside it."""

    part: str
    module: str


def _layers(model: nn.Module) -> list[str]:
    """The names of the layers of `model` a LoRA may adapt: its Linear and Conv2d modules."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def target_table(components: Components) -> dict[str, Target]:
    """Every name a LoRA file may give a layer of `components` (module docstring) -> that layer. A flattened
    name two layers share (none in Stable Diffusion) is left out, so it fails as unknown rather than guess."""
    from ..checkpoints.unet_keys import _key_table

    table: dict[str, Target] = {}
    clashes: set[str] = set()

    def add(name: str, target: Target) -> None:
        if table.get(name, target) != target:
            clashes.add(name)
        table[name] = target

    diffusers_of, _ = _key_table(components.config.unet)
    for module in _layers(components.unet):
        target = Target(UNET, module)
        theirs = diffusers_of.get(module + ".weight")
        add(KOHYA_UNET + module.replace(".", "_"), target)
        if theirs is not None:
            theirs = theirs.removesuffix(".weight")
            add(KOHYA_UNET + theirs.replace(".", "_"), target)
            add(PEFT_UNET + theirs, target)
            add(theirs, target)
    if components.text_encoder is not None and not components.config.text_encoder.frozen:
        for module in _layers(components.text_encoder):
            target = Target(TEXT, module)
            # transformers >= 5 names the same layers without `text_model.`: files written with it say so too
            for name in (module, module.removeprefix(TEXT_MODEL)):
                for prefix in KOHYA_TEXT:
                    add(prefix + name.replace(".", "_"), target)
                add(PEFT_TEXT + name, target)
                add(name, target)
    for name in clashes:
        del table[name]
    return table


def resolve(table: dict[str, Target], layer: str) -> Target | None:
    """The layer a LoRA file's layer name means, or None."""
    return table.get(layer) or table.get(layer.removeprefix(PEFT_WRAPPER))
