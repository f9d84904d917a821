"""daguerre.conditioning: one conditioner per model, chosen once (issue 14). No conditioning kind is compared
as a string literal outside the conditioner and the config modules (read with `ast`), and each conditioner
class gives the pair, the null condition and the training batch's condition the pipelines and stage 2 use."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from daguerre.components import build_components
from daguerre.conditioning import (
    CONCATS,
    CONDITIONERS,
    ClassConditioner,
    InpaintConcat,
    LowresConcat,
    NoConcat,
    TextConditioner,
    Unconditional,
    conditioner_for,
    latent_mask,
)
from daguerre.config import ConcatKind, Conditioning, ModelConfig, TextEncoderKind, minilm_text_encoder, preset

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "daguerre"
# Where a kind may be named as a string: the conditioner and the config modules that declare and check it.
ALLOWED = {"conditioning.py", "config.py", "training/config.py"}
# attribute (or variable) name -> the kind names it holds (the config's Literals)
KINDS = {"conditioning": set(typing.get_args(Conditioning)), "concat": set(typing.get_args(ConcatKind)) | {None},
         "kind": set(typing.get_args(TextEncoderKind)) | set(typing.get_args(ConcatKind))}  # not "class": an
# evaluation item's kind (metrics/) is named so too
DEVICE = torch.device("cpu")


def _subject(node: ast.expr) -> str | None:
    """`x.conditioning` / `conditioning` -> "conditioning" (likewise concat, kind); None for anything else."""
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
    return name if name in KINDS else None


def _literals(node: ast.expr) -> list[object] | None:
    """The constant(s) a comparison tests against: "text", None, or the items of ("inpaint", "lowres")."""
    if isinstance(node, ast.Constant):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(isinstance(e, ast.Constant) for e in node.elts):
        return [e.value for e in node.elts]
    return None


def kind_comparisons(source: str) -> list[int]:
    """Line numbers of comparisons of a conditioning / concat / text-encoder kind against its literal names."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for a, b in zip(operands, operands[1:], strict=False):
            for subject, other in ((a, b), (b, a)):
                name, values = _subject(subject), _literals(other)
                if name and values and any(v in KINDS[name] for v in values):
                    lines.append(node.lineno)
    return sorted(set(lines))


def test_the_detector_finds_kind_comparisons():
    src = ('a = cfg.conditioning == "text"\nb = "lowres" != m.concat\nc = te.kind in ("clip", "x")\n'
           'd = cfg.concat is None\ne = conditioning == "class"\nf = item.kind == "class"\ng = cfg.name == "text"\n')
    assert kind_comparisons(src) == [1, 2, 3, 4, 5]  # f: an evaluation item's kind; g: not a kind attribute


def test_no_conditioning_kind_is_compared_as_a_string_outside_the_conditioner_and_config():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED:
            continue
        found += [f"{rel}:{line}" for line in kind_comparisons(path.read_text())]
    assert found == [], "compare kinds in daguerre.conditioning (a method of the conditioner), not here: " + \
        ", ".join(found)


def test_every_declared_kind_has_exactly_one_class():
    assert set(CONDITIONERS) == set(typing.get_args(Conditioning))
    assert set(CONCATS) == set(typing.get_args(ConcatKind)) | {None}
    for kind, cls in {**CONDITIONERS, **CONCATS}.items():
        assert cls.kind == kind


def _config(conditioning: str, concat: str | None = None, **unet) -> ModelConfig:
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, conditioning=conditioning, concat=concat,
                              unet=dataclasses.replace(cfg.unet, **unet))
    if conditioning != "text":
        cfg.text_encoder = None
    return cfg


def test_conditioner_for_chooses_by_config_and_refuses_unknown_kinds():
    assert type(conditioner_for(_config("text"))) is TextConditioner
    assert type(conditioner_for(_config("class", num_classes=4))) is ClassConditioner
    assert type(conditioner_for(_config("none"))) is Unconditional
    assert type(conditioner_for(_config("none")).concat) is NoConcat
    assert type(conditioner_for(_config("text", "inpaint")).concat) is InpaintConcat
    assert type(conditioner_for(_config("text", "lowres")).concat) is LowresConcat
    with pytest.raises(ValueError, match="unknown conditioning 'txt'.*text, class, none"):
        conditioner_for(_config("txt"))
    with pytest.raises(ValueError, match="unknown concat kind 'depth'.*inpaint, lowres"):
        conditioner_for(_config("text", "depth"))


def _request(**kw):
    return SimpleNamespace(**{"prompt": "a", "negative_prompt": "b", "cfg_scale": 7.0, "class_index": None, **kw})


def test_text_conditioner_pair_null_and_batch():
    c = conditioner_for(_config("text"))
    seen = []

    def encode(prompts):
        seen.append(list(prompts))
        return torch.arange(len(prompts), dtype=torch.float32).view(-1, 1, 1)

    cond, uncond = c.pair(_request(), DEVICE, encode)
    assert seen[-1] == ["a", "b"] and cond["context"].item() == 0 and uncond["context"].item() == 1
    cond, uncond = c.pair(_request(cfg_scale=1.0), DEVICE, encode)
    assert seen[-1] == ["a"] and uncond is None  # no guidance: the prompt alone
    assert c.null(DEVICE, encode)["context"].shape == (1, 1, 1) and seen[-1] == [""]
    with pytest.raises(ValueError, match="text encoder"):
        c.pair(_request(), DEVICE)
    data = SimpleNamespace(captions=["zero", "one", "two"])
    got = c.batch(torch.tensor([2, 0]), torch.tensor([False, True]), data, DEVICE,
                  lambda caps, device: {"captions": caps})
    assert got == {"captions": ["two", ""]}  # a dropped caption is the empty prompt
    assert c.takes_prompt and c.guided(7.0) and not c.guided(1.0)
    assert c.sample_cells(["p", "q"], [], 3) == [{"prompt": "p", "class_label": None},
                                                 {"prompt": "q", "class_label": None}]
    assert c.class_index(None) is None
    with pytest.raises(ValueError, match="not class-conditional"):
        c.class_index(1)
    with pytest.raises(ValueError, match="clip skip 99"):
        c.check_clip_skip(99)


def test_class_conditioner_pair_null_and_batch():
    cfg = _config("class", num_classes=4)
    cfg.class_names = ["a", "b", "c", "none"]
    c = conditioner_for(cfg)
    cond, uncond = c.pair(_request(class_index=2), DEVICE)
    assert cond["y"].tolist() == [2] and uncond["y"].tolist() == [3]  # the last class is the null label
    assert c.pair(_request(class_index=2, cfg_scale=1.0), DEVICE)[1] is None
    assert c.null(DEVICE)["y"].tolist() == [3]
    data = SimpleNamespace(labels=torch.tensor([0, 1, 2, 1]))
    y = c.batch(torch.tensor([1, 2, 3]), torch.tensor([False, True, False]), data, DEVICE)["y"]
    assert y.tolist() == [1, 3, 1] and data.labels.tolist() == [0, 1, 2, 1]  # the labels are not changed
    assert c.class_index("B") == 1 and c.class_index(0) == 0
    with pytest.raises(ValueError, match="give a class label"):
        c.class_index(None)
    with pytest.raises(ValueError, match="out of range"):
        c.class_index(4)
    assert c.sample_cells([], [], 2) == [{"prompt": "", "class_label": i} for i in range(4)]
    assert c.item_request("caption", 2) == {"prompt": "", "class_label": 2} and not c.takes_prompt


def test_unconditional_has_no_condition_and_no_guidance():
    c = conditioner_for(_config("none"))
    assert c.pair(_request(), DEVICE) == ({}, None) and c.null(DEVICE) == {}
    assert c.batch(torch.tensor([0]), torch.tensor([True]), None, DEVICE) == {}
    assert not c.guided(7.0) and c.guidance_scale(7.0) == 1.0
    assert c.sample_cells(["p"], [1], 2) == [{"prompt": "", "class_label": None}] * 2


def test_inpaint_concat_builds_mask_and_masked_latent():
    cfg = _config("text", "inpaint", in_channels=9)
    concat = conditioner_for(cfg).concat
    pixels = torch.rand(1, 3, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 0.7  # binarised at 0.5: the top half is repainted
    seen = []

    def encode(x):
        seen.append(x)
        return x[:, :, ::2, ::2] + 0  # a stand-in "VAE" with factor 2

    cfg.vae = dataclasses.replace(cfg.vae, channel_mult=(1, 1))  # factor 2
    out = concat.mask_input(cfg, pixels, mask, encode)["concat"]
    assert out.shape == (1, 4, 4, 4)
    assert torch.equal(out[:, :1], latent_mask((mask >= 0.5).float(), 2))
    assert torch.equal(seen[0][..., :4, :], torch.zeros(1, 3, 4, 8))  # the repainted area is mid-gray
    assert torch.equal(seen[0][..., 4:, :], pixels[..., 4:, :])
    whole = concat.unmasked_input(cfg, 8, 8, DEVICE, encode)["concat"]
    assert torch.equal(whole[:, :1], torch.ones(1, 1, 4, 4)) and not whole[:, 1:].any()
    assert not concat.starts_from_noise("upscale") and concat.starts_from_noise("txt2img")
    with pytest.raises(ValueError, match="expected 9"):
        concat.check_task(dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, in_channels=4)), "inpaint")


def test_lowres_concat_checks_tasks_and_noise_levels():
    cfg = _config("text", "lowres", in_channels=7, num_classes=350)
    concat = conditioner_for(cfg).concat
    concat.check_task(cfg, "upscale")
    with pytest.raises(ValueError, match="super-resolution model"):
        concat.check_task(cfg, "img2img")
    with pytest.raises(ValueError, match="class-conditional super-resolution"):
        concat.check_task(dataclasses.replace(cfg, conditioning="class"), "upscale")
    concat.check_noise_level(cfg, 349)
    with pytest.raises(ValueError, match=r"\[0, 349\]"):
        concat.check_noise_level(cfg, 350)
    assert concat.starts_from_noise("upscale")
    assert LowresConcat.noise_scales(0) is None
    a, s = LowresConcat.noise_scales(100)
    assert 0 < a < 1 and a * a + s * s == pytest.approx(1.0)
    image = torch.rand(1, 3, 4, 4) * 2 - 1
    assert LowresConcat.build(cfg, image, 8 * cfg.vae.downsample_factor, 8 * cfg.vae.downsample_factor).shape == \
        (1, 3, 8, 8)
    assert NoConcat().mask_input(cfg, image, image[:, :1], lambda x: x) == {}


def test_a_frozen_text_encoder_is_a_property_of_its_kind():
    assert not preset("tiny").text_encoder.frozen and minilm_text_encoder().frozen


def test_the_pipelines_pair_is_the_conditioner_pair():
    from daguerre.pipelines.common import conditioning
    from daguerre.pipelines.request import GenerationRequest

    comps = build_components(preset("tiny"), seed=0)
    req = GenerationRequest(prompt="a red square", negative_prompt="blue", steps=2, cfg_scale=5.0).validate(
        comps.config)
    cond, uncond = conditioning(comps, req, DEVICE)
    assert cond["context"].shape[0] == 1 and uncond["context"].shape == cond["context"].shape
    assert not torch.equal(cond["context"], uncond["context"])


@pytest.mark.parametrize("key,value,valid", [("conditioning", "txt", "'text', 'class', 'none'"),
                                             ("concat", "depth", "'inpaint', 'lowres'")])
def test_a_stored_config_with_an_unknown_kind_is_refused(key, value, valid):
    d = preset("tiny").to_dict()
    d[key] = value
    with pytest.raises(ValueError, match=f"config key {key}: '{value}' is not of type .*{valid}"):
        ModelConfig.from_dict(d)
    d = preset("tiny").to_dict()
    d["text_encoder"]["kind"] = "bert"
    with pytest.raises(ValueError, match="text_encoder.kind: 'bert'"):
        ModelConfig.from_dict(d)
