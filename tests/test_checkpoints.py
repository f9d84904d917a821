"""Checkpoint I/O through files at tiny sizes: round trips, dtypes, EMA, pickles, detection and every refusal."""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from daguerre.checkpoints import file_hash, load_model, read_state_dict, save_diffusers, save_model, short_hash
from daguerre.checkpoints.detect import (
    V_HEURISTIC_KEY,
    V_HEURISTIC_STD,
    detect_checkpoint,
    ema_key,
    infer_unet_config,
    prediction_from_yaml,
)
from daguerre.checkpoints.single_file import single_file_state_dict
from daguerre.cli import main
from daguerre.components import Components
from daguerre.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, preset
from daguerre.fileio import atomic_dir, atomic_path, atomic_save_safetensors, atomic_write_bytes
from daguerre.models.autoencoder import AutoencoderKL
from daguerre.models.text_encoder import CLIPTextEncoder
from daguerre.models.tokenizer import CLIPTokenizer
from daguerre.models.unet import UNetModel

SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "log_one_minus_alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "logvar")


def small_config(openclip: bool = False) -> ModelConfig:
    """The smallest config whose every field can be read back from shapes (SD conventions: 8 heads or
    64-wide heads, 32 norm groups, 64-wide CLIP heads), SD v1-like or (openclip) SD v2-like."""
    unet = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), context_dim=64,
                      num_heads=None if openclip else 8, head_dim=64 if openclip else None, use_linear_proj=openclip)
    text = TextEncoderConfig(width=64, layers=2, heads=1, mlp_dim=128)
    if openclip:
        text.activation, text.skip_layers, text.pad_token_id, text.projection_dim = "gelu", 1, 0, 64
    return ModelConfig(name="custom", unet=unet, vae=VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1),
                       text_encoder=text, sample_size=512)


def random_components(cfg: ModelConfig, seed: int = 0) -> Components:
    """Components of `cfg` with every parameter random (no zero-initialised layer), float32."""
    torch.manual_seed(seed)
    tok = CLIPTokenizer(pad_token_id=cfg.text_encoder.pad_token_id)
    comps = Components(cfg, UNetModel(cfg.unet).eval(), AutoencoderKL(cfg.vae).eval(),
                       CLIPTextEncoder(cfg.text_encoder).eval(), tok)
    with torch.no_grad():
        for part in (comps.unet, comps.vae, comps.text_encoder):
            for p in part.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return comps


def assert_same_weights(a: Components, b: Components, dtype: torch.dtype | None = None) -> None:
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        for k, v in sa.items():
            v = v.to(dtype) if dtype is not None else v
            assert torch.equal(v.to(sb[k].dtype), sb[k]), f"{part}.{k}"


OUT_TOL = 1e-5  # identical weights: outputs differ at most by kernel rounding (alignment), relative to their scale


def assert_same_outputs(a: Components, b: Components, pooled: bool = True) -> None:
    """U-Net, VAE and text encoder outputs agree (the pooled text output only if `pooled`)."""
    n = 5 if pooled else 4
    for x, y in zip(outputs(a)[:n], outputs(b)[:n], strict=True):
        assert (x - y).abs().max() <= OUT_TOL * y.abs().max(), (x - y).abs().max()


def outputs(c: Components) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    u, v = c.config.unet, c.config.vae
    x = torch.randn(1, u.in_channels, 8, 8, generator=gen)
    ids = c.tokenizer(["a red cube"])
    with torch.no_grad():
        hidden, pooled = c.text_encoder(ids)
        eps = c.unet(x, 500, hidden)
        img = torch.rand(1, v.in_channels, 16, 16, generator=gen) * 2 - 1
        posterior = c.vae.encode(img)
        return eps, posterior.mean, c.vae.decode(posterior.mean), hidden, pooled


@pytest.fixture(scope="module")
def tiny() -> Components:
    return random_components(preset("tiny"))


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model(tiny, path)
    return path


# --- daguerre checkpoints ------------------------------------------------------------------------------

def test_daguerre_round_trip_is_exact(tiny, tiny_file):
    loaded = load_model(tiny_file)
    assert loaded.config == tiny.config
    assert_same_weights(tiny, loaded)
    assert_same_outputs(tiny, loaded)
    with safe_open(str(tiny_file), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "daguerre" and ModelConfig.from_json(meta["daguerre_config"]) == tiny.config
        assert any(k.startswith("model.diffusion_model.") for k in f.keys())  # noqa: SIM118
        assert any(k.startswith("first_stage_model.") for k in f.keys())  # noqa: SIM118
        assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in f.keys())  # noqa: SIM118


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_as_float32_or_as_stored(tiny, tmp_path, dtype):
    path = tmp_path / "half.safetensors"
    save_model(tiny, path, dtype=dtype)
    sd, _ = read_state_dict(path)
    assert {v.dtype for v in sd.values()} == {dtype}
    loaded = load_model(path)  # default: float32
    assert next(loaded.unet.parameters()).dtype == torch.float32
    assert_same_weights(tiny, loaded, dtype=dtype)
    as_stored = load_model(path, dtype=dtype)
    assert {p.dtype for p in as_stored.unet.parameters()} == {dtype}


def test_openclip_text_encoder_round_trips_in_sd2_layout(tmp_path):
    comps = random_components(small_config(openclip=True))
    path = tmp_path / "v2.safetensors"
    save_model(comps, path)
    keys = read_state_dict(path)[0].keys()
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "cond_stage_model.model.text_projection" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    loaded = load_model(path)
    assert loaded.config == comps.config
    assert_same_weights(comps, loaded)
    assert_same_outputs(comps, loaded)


# --- Stable Diffusion single files (no daguerre metadata): detection ---------------------------------

def sd_state_dict(comps: Components, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a CompVis-trained SD file holds: the model, schedule buffers, position_ids, plus `extra`."""
    sd = single_file_state_dict(comps)
    for name in SCHEDULE_BUFFERS:
        sd[name] = torch.rand(1000)
    if comps.config.text_encoder.activation == "quick_gelu":
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    sd.update(extra)
    return sd


@pytest.mark.parametrize("openclip", [False, True])
def test_sd_single_file_detected_from_shapes(tmp_path, openclip):
    comps = random_components(small_config(openclip))
    path = tmp_path / "sd.safetensors"
    save_file(sd_state_dict(comps), str(path))
    loaded = load_model(path)
    for field in ("unet", "vae", "text_encoder", "schedule", "concat", "sample_size"):
        assert getattr(loaded.config, field) == getattr(comps.config, field), field
    assert loaded.config.provenance["imported_from"] == "sd.safetensors"
    assert_same_outputs(comps, loaded)


def test_full_checkpoint_with_ema(tmp_path):
    comps = random_components(small_config())
    ema = {ema_key(k): torch.randn_like(v) for k, v in comps.unet.state_dict().items()}
    path = tmp_path / "full.safetensors"
    save_file(sd_state_dict(comps, **ema, **{"model_ema.decay": torch.tensor(0.9999),
                                             "model_ema.num_updates": torch.tensor(10)}), str(path))
    plain = load_model(path)
    assert_same_weights(comps, plain)
    with_ema = load_model(path, use_ema=True)
    for k, v in with_ema.unet.state_dict().items():
        assert torch.equal(v, ema[ema_key(k)]), k
    assert torch.equal(with_ema.vae.encoder.conv_in.weight, comps.vae.encoder.conv_in.weight)
    # an EMA-only file (no model_ema.*) cannot honour use_ema: say so
    emaonly = tmp_path / "emaonly.safetensors"
    save_file(sd_state_dict(comps), str(emaonly))
    with pytest.raises(ValueError, match="no separate EMA weights"):
        load_model(emaonly, use_ema=True)
    # an EMA set that does not cover the U-Net is an error, not a partial load
    del ema[ema_key("out.2.weight")]
    save_file(sd_state_dict(comps, **ema), str(path))
    with pytest.raises(ValueError, match="without an EMA copy.*out.2.weight"):
        load_model(path, use_ema=True)


def test_inpainting_unet_is_detected(tmp_path):
    cfg = small_config()
    cfg.unet.in_channels, cfg.concat = 9, "inpaint"
    comps = random_components(cfg)
    path = tmp_path / "inpaint.safetensors"
    save_file(sd_state_dict(comps), str(path))
    loaded = load_model(path)
    assert loaded.config.concat == "inpaint" and loaded.config.unet.in_channels == 9


def test_unet_config_read_from_sd15_shapes():
    """Detection works on shapes alone: the SD 1.5 U-Net built on the meta device reads back as the preset."""
    with torch.device("meta"):
        sd = UNetModel(preset("sd15").unet).state_dict()
    assert infer_unet_config(sd) == preset("sd15").unet


@pytest.mark.parametrize("std,expected", [(2 * V_HEURISTIC_STD, "v_prediction"), (V_HEURISTIC_STD / 2, "epsilon")])
def test_sd2_prediction_type_heuristic_yaml_and_argument(tmp_path, std, expected):
    """SD 2 eps vs v: the argument wins, then a same-stem YAML, then the norm1.bias std heuristic."""
    cfg = preset("sd21")
    with torch.device("meta"):
        comps = Components(cfg, UNetModel(cfg.unet), AutoencoderKL(cfg.vae), CLIPTextEncoder(cfg.text_encoder))
        shapes = single_file_state_dict(comps)
    key = "model.diffusion_model." + V_HEURISTIC_KEY
    bias = torch.randn(shapes[key].shape, generator=torch.Generator().manual_seed(0)) * std

    def value_of(k: str) -> torch.Tensor:
        assert k == key
        return bias

    path = tmp_path / "v2.safetensors"
    det = detect_checkpoint(shapes, {}, path=path, value_of=value_of)
    assert det.config.schedule.prediction_type == expected and det.prediction_source.startswith("heuristic")
    assert det.preset == ("sd21" if expected == "v_prediction" else "sd21-base")
    other = "epsilon" if expected == "v_prediction" else "v_prediction"
    assert detect_checkpoint(shapes, {}, path=path, prediction_type=other).config.schedule.prediction_type == other
    value = "eps" if other == "epsilon" else "v"
    path.with_suffix(".yaml").write_text(f'model:\n  params:\n    parameterization: "{value}"\n')
    det = detect_checkpoint(shapes, {}, path=path, value_of=value_of)
    assert det.config.schedule.prediction_type == other and det.prediction_source.startswith("yaml")
    assert prediction_from_yaml(tmp_path / "none.safetensors") is None


# --- pickles -------------------------------------------------------------------------------------------

def test_ckpt_plain_and_wrapped_state_dicts_load(tmp_path):
    comps = random_components(small_config())
    sd = sd_state_dict(comps)
    torch.save(sd, tmp_path / "plain.ckpt")
    torch.save({"state_dict": sd, "global_step": 470000, "epoch": 6}, tmp_path / "wrapped.pt")
    for name in ("plain.ckpt", "wrapped.pt"):
        assert_same_weights(comps, load_model(tmp_path / name))


def test_lightning_checkpoint_metadata_is_admitted_as_inert_stubs(tmp_path, monkeypatch):
    """CompVis .ckpt files pickle a Lightning ModelCheckpoint (as a dict key) and numpy scalars."""
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    ran = []

    class ModelCheckpoint:
        def __setstate__(self, state):  # would run on a normal unpickle, must not run here
            ran.append(state)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    import numpy as np

    cb = ModelCheckpoint()
    cb.best_model_score = torch.tensor(0.1)
    obj = {"state_dict": {"w": torch.ones(3)}, "callbacks": {ModelCheckpoint: {"best": np.float64(0.5)}}, "cb": cb}
    torch.save(obj, tmp_path / "lightning.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.delitem(sys.modules, name)
    sd, _ = read_state_dict(tmp_path / "lightning.ckpt")
    assert list(sd) == ["w"] and torch.equal(sd["w"], torch.ones(3))
    assert ran == [] and "pytorch_lightning" not in sys.modules


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _Evil(marker)}, tmp_path / "evil.ckpt")
    with open(tmp_path / "evil_legacy.pt", "wb") as f:
        pickle.dump({"w": _Evil(marker)}, f, protocol=2)
    for name in ("evil.ckpt", "evil_legacy.pt"):
        with pytest.raises(ValueError, match=r"refusing to load .*system.*safetensors") as err:
            load_model(tmp_path / name)
        assert "weights_only" in str(err.value)
        assert not marker.exists()


def test_non_tensor_state_dict_entries_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1), "step": 3}}, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match="non-tensor.*step"):
        read_state_dict(tmp_path / "odd.ckpt")


# --- refusals: never a partial load --------------------------------------------------------------------

def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"junk\.safetensors.*not a checkpoint.*binary data"):
        load_model(junk)
    (tmp_path / "page.ckpt").write_text("<html><body>Not found</body></html>")
    with pytest.raises(ValueError, match="HTML page"):
        load_model(tmp_path / "page.ckpt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        load_model(tmp_path / "empty.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_model(tmp_path / "missing.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        load_model(tmp_path / "folder")


def test_truncated_safetensors(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    for cut in (len(data) // 2, 100):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}\.safetensors.*truncated"):
            load_model(bad)


def _rewrite(src: Path, dst: Path, change) -> None:
    sd, meta = read_state_dict(src)
    change(sd)
    save_file(sd, str(dst), metadata=meta)


def test_wrong_shape_missing_and_unexpected_keys(tiny_file, tmp_path):
    key = "model.diffusion_model.out.2.weight"
    cases = {
        "shape": (lambda sd: sd.__setitem__(key, torch.zeros(5, 5, 3, 3)),
                  r"shape mismatch.*out\.2\.weight.*\(5, 5, 3, 3\)"),
        "missing": (lambda sd: sd.pop(key), r"1 missing keys: model\.diffusion_model\.out\.2\.weight"),
        "unexpected": (lambda sd: sd.__setitem__("model.diffusion_model.extra.weight", torch.zeros(1)),
                       r"1 unexpected keys: model\.diffusion_model\.extra\.weight"),
        "stray": (lambda sd: sd.__setitem__("lora_unet_down.alpha", torch.zeros(())),
                  r"unexpected keys.*lora_unet_down"),
        "text": (lambda sd: sd.pop("cond_stage_model.transformer.text_model.final_layer_norm.bias"),
                 r"final_layer_norm\.bias"),
    }
    for name, (change, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        _rewrite(tiny_file, bad, change)
        with pytest.raises(ValueError, match=message):
            load_model(bad)


def test_lora_or_unet_only_files_are_not_models(tmp_path):
    save_file({"lora_unet_down_blocks_0.alpha": torch.ones(())}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint"):
        load_model(tmp_path / "lora.safetensors")


# --- diffusers folders (tiny) ----------------------------------------------------------------------------

def test_diffusers_round_trip_canonical_text_layers(tmp_path):
    """gelu text encoder, penultimate layer: exported with the last layer dropped (skip 0), re-imported with an
    identity layer appended (skip 1); the conditioning is identical (the pooled output, which uses the dropped
    layer and projection, is not: docs/formats.md), and an fp16 variant / .bin files load."""
    comps = random_components(small_config(openclip=True))
    folder = tmp_path / "pipe"
    save_diffusers(comps, folder)
    import json

    text_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert text_cfg["num_hidden_layers"] == comps.config.text_encoder.layers - 1
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["timestep_spacing"] == "leading"
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)  # diffusers reads the export ...
    ids = comps.tokenizer(["a red cube"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # ... and computes what daguerre computes
        hidden = comps.text_encoder(ids).hidden
        theirs = pipe.text_encoder(ids).last_hidden_state
        assert (theirs - hidden).abs().max() <= OUT_TOL * hidden.abs().max()
        eps, eps_theirs = comps.unet(x, 500, hidden), pipe.unet(x, 500, encoder_hidden_states=hidden).sample
        assert (eps_theirs - eps).abs().max() <= OUT_TOL * eps.abs().max()
    assert pipe.scheduler.config.prediction_type == comps.config.schedule.prediction_type
    del pipe
    loaded = load_model(folder)
    assert loaded.config.text_encoder.layers == comps.config.text_encoder.layers
    assert loaded.config.text_encoder.skip_layers == 1
    assert_same_outputs(comps, loaded, pooled=False)
    hidden_a = outputs(comps)[3]
    # the plain file missing: the fp16 variant is used; .bin pickles are read with weights_only
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = read_state_dict(unet_file)[0]
    save_file({k: v.half() for k, v in sd.items()}, str(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    unet_file.unlink()
    text_file = folder / "text_encoder" / "model.safetensors"
    torch.save(read_state_dict(text_file)[0], folder / "text_encoder" / "pytorch_model.bin")
    text_file.unlink()
    again = load_model(folder)
    assert torch.equal(again.unet.out[2].weight, comps.unet.out[2].weight.half().float())
    assert (outputs(again)[3] - hidden_a).abs().max() <= OUT_TOL * hidden_a.abs().max()


# --- hashes and atomic writes --------------------------------------------------------------------------------

def test_hashes(tiny_file):
    digest = hashlib.sha256(tiny_file.read_bytes()).hexdigest()
    assert file_hash(tiny_file) == digest
    assert short_hash(tiny_file) == digest[:10]


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half-written")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]

    class Failing(dict):  # the second tensor cannot be written (a meta tensor has no data)
        def items(self):
            yield "a", torch.ones(1000)
            yield "b", torch.empty(10, device="meta")

    st = tmp_path / "model.safetensors"
    with pytest.raises((NotImplementedError, RuntimeError)):
        atomic_save_safetensors(Failing(), st)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]

    folder = tmp_path / "pipe"
    with atomic_dir(folder) as d:
        (d / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(folder) as d:
        (d / "a.txt").write_text("new")
        raise RuntimeError("disk full")
    assert (folder / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "pipe"]
    with atomic_dir(folder) as d:
        (d / "b.txt").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]


def test_class_conditional_model_without_text_encoder_round_trips(tmp_path, capsys):
    cfg = preset("tiny")
    cfg.unet.context_dim, cfg.unet.num_classes, cfg.text_encoder = None, 10, None
    cfg.conditioning, cfg.class_names = "class", [f"c{i}" for i in range(10)]
    torch.manual_seed(0)
    comps = Components(cfg, UNetModel(cfg.unet).eval(), AutoencoderKL(cfg.vae).eval())
    path = tmp_path / "classes.safetensors"
    save_model(comps, path)
    assert not any(k.startswith("cond_stage_model.") for k in read_state_dict(path)[0])
    loaded = load_model(path)
    assert loaded.config == cfg and loaded.text_encoder is None and loaded.tokenizer is None
    assert torch.equal(loaded.unet.label_emb.weight, comps.unet.label_emb.weight)
    assert main(["info", str(path)]) == 0 and "text encoder:    none" in capsys.readouterr().out
    with pytest.raises(ValueError, match="context_dim=None"):  # diffusers' UNet2DConditionModel needs a context
        save_diffusers(comps, tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()


# --- hostile or damaged files: one ValueError naming the file, nothing built, nothing hangs -----------------

DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in any recursive JSON reader


def json_deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _with_config(src: Path, dst: Path, change) -> Path:
    """A copy of daguerre checkpoint `src` whose daguerre_config metadata is `change(config dict)` (a str: as is)."""
    import json

    sd, meta = read_state_dict(src)
    config = change(json.loads(meta["daguerre_config"]))
    save_file(sd, str(dst), metadata={**meta, "daguerre_config": config if isinstance(config, str) else
                                      json.dumps(config)})
    return dst


@pytest.mark.parametrize("name, change, message", [
    ("deep", lambda c: DEEP, r"daguerre_config metadata: JSON nested too deeply"),
    ("deep_inside", lambda c: {**c, "provenance": {"x": json_deep(200)}},
     r"daguerre_config metadata: JSON nested too deeply"),
    ("not_json", lambda c: "{'unet': 1", r"daguerre_config metadata: not valid JSON"),
    ("huge_size", lambda c: {**c, "sample_size": 100_000}, r"config key sample_size: 100000 is out of range"),
    ("huge_mult", lambda c: {**c, "unet": {**c["unet"], "channel_mult": [1, 1000]}},
     r"config key unet\.channel_mult: 1000 is out of range"),
    ("wide", lambda c: {**c, "vae": {**c["vae"], "base_channels": 4096, "channel_mult": [1, 64]}},
     r"config key vae\.channel_mult: levels 4096 x 64 channels wide"),
    ("levels", lambda c: {**c, "unet": {**c["unet"], "channel_mult": [1] * 40}}, r"must have 1 to 8 levels"),
    ("string", lambda c: {**c, "unet": {**c["unet"], "model_channels": "32"}},
     r"config key unet\.model_channels: '32' is not of type int"),
    ("bool", lambda c: {**c, "text_encoder": {**c["text_encoder"], "layers": True}},
     r"config key text_encoder\.layers: True is not of type int"),
    ("steps", lambda c: {**c, "schedule": {**c["schedule"], "num_train_timesteps": 10**12}},
     r"config key schedule\.num_train_timesteps: 1000000000000 is out of range"),
    ("attn", lambda c: {**c, "unet": {**c["unet"], "attention_levels": [5]}}, r"names a level beyond the 2"),
    ("nan", lambda c: {**c, "vae": {**c["vae"], "scale_factor": float("nan")}},
     r"config key vae\.scale_factor: nan is not of type float"),
])
def test_hostile_config_metadata_is_one_error_naming_the_file(tiny_file, tmp_path, name, change, message):
    from daguerre.checkpoints.summary import describe

    bad = _with_config(tiny_file, tmp_path / f"{name}.safetensors", change)
    for read in (load_model, describe):
        with pytest.raises(ValueError, match=rf"{name}\.safetensors: .*{message}"):
            read(bad)


def test_every_real_and_project_config_is_within_the_bounds():
    """The bounds refuse only absurd files: every preset, the published SD 1.5 / 2.1 diffusers configs,
    the shipped models and every shipped run config's model pass."""
    from daguerre.checkpoints.text_keys import text_config_from_transformers
    from daguerre.checkpoints.unet_keys import unet_config_from_diffusers
    from daguerre.checkpoints.vae_keys import vae_config_from_diffusers
    from daguerre.config import CLIP_PRESETS, PRESETS, check_clip_config, check_model_config
    from daguerre.registry import shipped_models
    from daguerre.training.config import derive_model_config, load_run_config, shipped_configs
    from sd_configs import real_config

    for name in PRESETS:
        check_model_config(preset(name))
    for make in CLIP_PRESETS.values():
        check_clip_config(make())
    for sd in ("sd15", "sd21"):
        unet = unet_config_from_diffusers(real_config(sd, "unet"))
        vae = vae_config_from_diffusers(real_config(sd, "vae"))
        text = text_config_from_transformers(real_config(sd, "text_encoder"))
        side = real_config(sd, "unet")["sample_size"] * vae.downsample_factor
        check_model_config(ModelConfig(unet=unet, vae=vae, text_encoder=text, sample_size=side))
    xl = preset("sd15")  # an SDXL-sized U-Net: 2048-wide context, 10-deep transformers, 1024 px
    xl.unet.context_dim, xl.unet.transformer_depth, xl.sample_size = 2048, 10, 1024
    xl.unet.channel_mult, xl.unet.num_heads, xl.unet.head_dim = (1, 2, 4), None, 64
    check_model_config(xl)
    for path in shipped_models().values():
        assert load_model(path).config is not None
    for name, path in shipped_configs().items():
        if name.endswith("_clip"):
            check_clip_config(load_run_config(path, "clip").model, "model.")
            continue
        if name.endswith(("_lora", "_embedding")):  # an adapter's model is its --model file, not its config
            load_run_config(path, name.rsplit("_", 1)[1])
            continue
        stage = "vae" if name.endswith("_vae") else "ldm"
        cfg = load_run_config(path, stage, ["data.folder.root=photos"] if name.startswith("photos") else [])
        check_model_config(derive_model_config(cfg, 3, [f"c{i}" for i in range(10)]), "model.")


def test_diffusers_configs_are_read_strictly(tiny, tmp_path):
    """A diffusers folder's JSON files: bad, deeply nested or absurd values are one error naming the file."""
    import json

    folder = tmp_path / "pipe"
    save_diffusers(tiny, folder)
    unet_config = folder / "unet" / "config.json"
    good = json.loads(unet_config.read_text())
    cases = [
        (unet_config, DEEP, r"unet/config\.json: JSON nested too deeply"),
        (unet_config, json.dumps({**good, "sample_size": 100_000}),
         r"unet/config\.json: sample_size 100000 \(\d+ px\) is out of range"),
        (unet_config, json.dumps({**good, "block_out_channels": 7}), r"unet/config\.json: unusable value \(TypeError"),
        (unet_config, json.dumps({**good, "layers_per_block": 10**6}),
         r"pipe: config key unet\.num_res_blocks: 1000000 is out of range"),
        (unet_config, "[1, 2]", r"unet/config\.json: expected a JSON object"),
        (folder / "scheduler" / "scheduler_config.json", '{"num_train_timesteps": "many"}',
         r"scheduler_config\.json: invalid literal for int"),
        (folder / "tokenizer" / "tokenizer_config.json", DEEP, r"tokenizer_config\.json: JSON nested too deeply"),
        (folder / "model_index.json", "{" * 50_000, r"model_index\.json: (JSON nested too deeply|not valid JSON)"),
    ]
    for path, text, message in cases:
        original = path.read_text()
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_model(folder)
        path.write_text(original)
    assert load_model(folder).config.sample_size == tiny.config.sample_size


def test_a_shard_index_cannot_point_outside_its_folder(tiny, tmp_path):
    """Sharded weights load through their `*.index.json`, but only from shards that are files in the
    component folder: absolute paths, `..` and symlinks leading out are refused before anything is read."""
    import json

    folder = tmp_path / "pipe"
    save_diffusers(tiny, folder)
    unet = folder / "unet"
    whole = unet / "diffusion_pytorch_model.safetensors"
    sd, meta = read_state_dict(whole)
    names = sorted(sd)
    half = len(names) // 2
    shards = {"part-1.safetensors": names[:half], "part-2.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(unet / shard), metadata=meta)
    whole.unlink()
    index = unet / "diffusion_pytorch_model.safetensors.index.json"

    def write_index(mapping: dict[str, str]) -> None:
        index.write_text(json.dumps({"metadata": {}, "weight_map": mapping}))

    write_index({k: shard for shard, keys in shards.items() for k in keys})
    assert torch.equal(load_model(folder).unet.out[2].weight, tiny.unet.out[2].weight)  # legitimate shards load
    outside = tmp_path / "elsewhere.safetensors"
    save_file({k: sd[k] for k in names[half:]}, str(outside), metadata=meta)
    (unet / "link.safetensors").symlink_to(outside)
    for bad, message in [(str(outside), "not a file name in"), ("../vae/diffusion_pytorch_model.safetensors",
                                                               "not a file name in"),
                         ("..", "not a file name in"), ("link.safetensors", "is a symlink to .* outside"),
                         (7, "not a file name in")]:
        write_index({**{k: "part-1.safetensors" for k in names[:half]}, **{k: bad for k in names[half:]}})
        with pytest.raises(ValueError, match=rf"index\.json: .*{message}"):
            load_model(folder)


def test_non_regular_files_are_refused_before_opening(tmp_path):
    """A FIFO would block a read forever and /dev/zero never ends: refused from stat, one line each."""
    import signal

    from daguerre.checkpoints.summary import describe
    from daguerre.untrusted import read_json, regular_file

    def hung(signum, frame):
        raise TimeoutError("blocked reading a non-regular file")

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    previous = signal.signal(signal.SIGALRM, hung)  # a regression fails the test instead of hanging it
    signal.alarm(60)
    try:
        for call in (regular_file, read_state_dict, load_model, describe, file_hash, read_json):
            with pytest.raises(ValueError, match=r"model\.safetensors is a named pipe \(FIFO\), not a regular file"):
                call(fifo)
        if Path("/dev/zero").exists():
            for call in (read_state_dict, load_model, file_hash):
                with pytest.raises(ValueError, match=r"/dev/zero is a character device, not a regular file"):
                    call("/dev/zero")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_sharded_model_in_the_hugging_face_cache_loads(tiny, tmp_path):
    """An HF cache snapshot keeps every file as a symlink into its repo's `blobs/`: shards may lead there (and the
    shard-index rule above still refuses any other way out)."""
    import json
    import shutil

    folder = tmp_path / "pipe"
    save_diffusers(tiny, folder)
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    whole = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd, meta = read_state_dict(whole)
    names = sorted(sd)
    shards = {"part-1.safetensors": names[: len(names) // 2], "part-2.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(folder / "unet" / shard), metadata=meta)
    whole.unlink()
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    for i, path in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):  # the cache's layout
        blob = repo / "blobs" / f"{i:04x}"
        shutil.move(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    assert torch.equal(load_model(snapshot).unet.out[2].weight, tiny.unet.out[2].weight)
    elsewhere = tmp_path / "hub" / "models--other" / "blobs"
    elsewhere.mkdir(parents=True)
    part = snapshot / "unet" / "part-2.safetensors"
    shutil.copy(part.resolve(), elsewhere / "x")
    part.unlink()
    part.symlink_to(elsewhere / "x")  # another repo's blob is outside
    with pytest.raises(ValueError, match="is a symlink to .* outside"):
        load_model(snapshot)
