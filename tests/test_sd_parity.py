"""End-to-end parity through files at the real Stable Diffusion v1.5 and v2.1 configs.

The reference networks are diffusers' `UNet2DConditionModel` / `AutoencoderKL` and transformers'
`CLIPTextModel`, built from the published configs (tests/sd_configs.py) with random weights, written
as a diffusers folder and loaded by `daguerre.checkpoints.load_model`; outputs must agree in float32.
Then diffusers -> daguerre -> single file -> daguerre -> diffusers must give back every tensor.

Memory: one SD U-Net in float32 is 3.4 GB. Each reference component is built, run, saved and freed
before the next; weights are rounded to float16-representable values and stored as float16 (the
float16 -> float32 load is then exact), which halves the disk traffic and exercises the conversion.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import shutil
import zlib

import pytest
import torch
from safetensors import safe_open

from daguerre.checkpoints import load_model, save_diffusers, save_model
from daguerre.checkpoints.detect import detect_checkpoint
from daguerre.checkpoints.diffusers_folder import read_component_weights
from daguerre.checkpoints.single_file import single_file_state_dict
from daguerre.checkpoints.text_keys import text_config_from_transformers
from daguerre.checkpoints.unet_keys import unet_config_from_diffusers
from daguerre.checkpoints.vae_keys import vae_config_from_diffusers
from daguerre.config import preset
from daguerre.fileio import atomic_save_safetensors
from daguerre.models.tokenizer import CLIPTokenizer
from daguerre.weights.io import read_shapes
from sd_configs import real_config

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs difference allowed in float32
NOISE_POOL = 1 << 24  # normal samples drawn once per model, reused at random offsets
PERTURB_STD = 0.02  # noise added to every parameter so that no zero-initialised layer hides a bug
SHARD = "500MB"  # diffusers shard size: keeps save_pretrained's extra memory to one shard
PROMPTS = ["a photograph of an astronaut riding a horse on the moon", "", "Ein Haus am See, watercolor, 4k (detailed)"]
LATENT_SIDE, PIXEL_SIDE, BATCH = 16, 64, 2
TIMESTEPS = (10, 900)
PRESET_OF = {"sd15": "sd15", "sd21": "sd21"}
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Fill every parameter with random float16-representable values: weights ~ N(0, ~1/fan_in), norm
    scales ~ 1 + N(0, s^2), biases ~ N(0, s^2) (s = PERTURB_STD), so that no zero-initialised layer hides a bug.

    The noise is cut from one pool of float16-exact normal samples at random offsets and weights are
    scaled by a power of two (which keeps them exact): drawing and rounding a billion fresh samples
    would take longer than the rest of the test, and the parity checks need no independent values.
    """
    pool = torch.randn(NOISE_POOL, generator=gen).half().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = p.numel()
            start = int(torch.randint(0, NOISE_POOL - min(n, NOISE_POOL) + 1, (1,), generator=gen))
            noise = pool[start:start + n] if n <= NOISE_POOL else pool.repeat(n // NOISE_POOL + 1)[:n]
            noise = noise.reshape(p.shape)
            if p.ndim >= 2:  # 2^-round(log2 sqrt(fan_in)) ~ 1/sqrt(fan_in)
                p.copy_(noise).mul_(2.0 ** -round(math.log2(math.sqrt(p[0].numel()))))
            elif "norm" in name and name.endswith("weight"):
                p.copy_((1 + PERTURB_STD * noise).half())
            else:
                p.copy_((PERTURB_STD * noise).half())
    return model.eval()


def _build(factory) -> torch.nn.Module:
    """factory() without its slow random init (every parameter is overwritten by `_randomize`).

    Built on the meta device, then given empty CPU storage; the only buffers these models have are
    CLIP's `position_ids` (arange), which are refilled.
    """
    with torch.device("meta"):
        model = factory()
    model = model.to_empty(device="cpu")
    for name, buf in model.named_buffers():
        if not name.endswith("position_ids"):
            raise AssertionError(f"_build does not know how to initialise buffer {name}")
        buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return model


def _write_reference_folder(name: str, folder, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Build each reference component from the real config, record its outputs, save it as fp16; return outputs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    variant = "fp16" if name == "sd21" else None  # sd21 exercises the `*.fp16.*` variant files
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(real_config(name, "model_index")))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(real_config(name, "scheduler")))
    ref: dict[str, torch.Tensor] = {}

    unet_cfg = real_config(name, "unet")
    unet_kwargs = {k: v for k, v in unet_cfg.items() if not k.startswith("_")}
    unet = _randomize(_build(lambda: UNet2DConditionModel.from_config(unet_kwargs)), gen)
    ref["x"] = torch.randn(BATCH, unet_cfg["in_channels"], LATENT_SIDE, LATENT_SIDE, generator=gen)
    ref["t"] = torch.tensor(TIMESTEPS)
    ref["context"] = torch.randn(BATCH, 77, unet_cfg["cross_attention_dim"], generator=gen)
    with torch.no_grad():
        ref["unet_out"] = unet(ref["x"], ref["t"], encoder_hidden_states=ref["context"]).sample
    unet.half().save_pretrained(folder / "unet", max_shard_size=SHARD, variant=variant)
    del unet
    gc.collect()

    vae_kwargs = {k: v for k, v in real_config(name, "vae").items() if not k.startswith("_")}
    vae = _randomize(_build(lambda: AutoencoderKL.from_config(vae_kwargs)), gen)
    ref["pixels"] = torch.rand(1, 3, PIXEL_SIDE, PIXEL_SIDE, generator=gen) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(ref["pixels"]).latent_dist
        ref["vae_mean"], ref["vae_logvar"] = dist.mean, dist.logvar
        ref["vae_decoded"] = vae.decode(dist.mean).sample
    vae.half().save_pretrained(folder / "vae", variant=variant)
    del vae, dist
    gc.collect()

    tok = CLIPTokenizer(pad_token_id=real_config(name, "pad_token_id"))
    tok.save_dir(folder / "tokenizer")
    ref["ids"] = tok(PROMPTS)
    text = _randomize(_build(lambda: CLIPTextModel(CLIPTextConfig(**real_config(name, "text_encoder")))), gen)
    with torch.no_grad():
        out = text(ref["ids"])
        ref["text_hidden"], ref["text_pooled"] = out.last_hidden_state, out.pooler_output
    text.half().save_pretrained(folder / "text_encoder", variant=variant)
    del text, out
    gc.collect()
    return ref


def _fingerprints(components, dtype: torch.dtype) -> dict[str, tuple]:
    """(shape, crc32 of the bytes in `dtype`) of every tensor: compares two models without holding both."""
    out = {}
    for part in ("unet", "vae", "text_encoder"):
        for k, v in getattr(components, part).state_dict().items():
            v = v.detach().to(dtype).contiguous().reshape(-1)
            out[f"{part}.{k}"] = (tuple(v.shape), zlib.crc32(memoryview(v.view(torch.uint8).numpy())))
    return out


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    err = (ours.float() - theirs.float()).abs().max().item()
    assert err <= TOL, f"{what}: max abs difference {err:.3g} > {TOL} (reference scale {theirs.abs().max():.3g})"


def _hub_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix the hub (and daguerre) use."""
    unprefixed = ("embeddings.", "encoder.", "final_layer_norm.")
    return {("text_model." + k if k.startswith(unprefixed) else k): v for k, v in sd.items()}


def _tensor_files(folder, stem: str) -> dict[str, tuple]:
    """Tensor name (hub layout) -> (safetensors file, stored name), for one component folder (shards, variants)."""
    index = sorted(folder.glob(f"{stem}*.json"))
    if index:
        files = sorted({folder / f for f in json.loads(index[0].read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob(f"{stem}*.safetensors"))
    return {hub: (f, raw) for f in files for raw in read_shapes(f)[0] for hub in _hub_names({raw: None})}


def _assert_folders_equal(a, b) -> None:
    """Every weight tensor in diffusers folder `b` equals the one in `a` (names, dtypes, values), read one by one."""
    for part, stem in WEIGHTS.items():
        x, y = _tensor_files(a / part, stem), _tensor_files(b / part, stem)
        assert set(x) == set(y), f"{part}: key sets differ: {sorted(set(x) ^ set(y))[:5]}"
        for k, (file_a, name_a) in x.items():
            file_b, name_b = y[k]
            with safe_open(str(file_a), "pt") as fa, safe_open(str(file_b), "pt") as fb:
                va, vb = fa.get_tensor(name_a), fb.get_tensor(name_b)
            assert va.dtype == vb.dtype and torch.equal(va, vb), f"{part}.{k} differs after the round trip"


def _check_exported_folder_loads_in_diffusers(folder, name: str) -> None:
    """The exported configs build diffusers / transformers modules whose keys and shapes are our tensors."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel
    from transformers import CLIPTokenizer as HFTokenizer

    for part, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(folder / part))
        shapes = read_component_weights(folder / part, (WEIGHTS[part],), shapes_only=True)
        theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert theirs == {k: tuple(v.shape) for k, v in shapes.items()}, part
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")  # transformers reads our files and config
    ours = read_component_weights(folder / "text_encoder", ("model",))
    theirs = _hub_names(text.state_dict())
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k].to(v.dtype), v) for k, v in ours.items())
    del text, ours, theirs
    original = json.loads(json.dumps(real_config(name, "scheduler")))
    theirs = DDIMScheduler.from_pretrained(folder / "scheduler")
    ref = DDIMScheduler.from_config(original)
    assert torch.equal(theirs.alphas_cumprod, ref.alphas_cumprod)
    assert theirs.config.prediction_type == original.get("prediction_type", "epsilon")
    hf_tok = HFTokenizer.from_pretrained(folder / "tokenizer")
    hf_ids = hf_tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(hf_ids, CLIPTokenizer.from_dir(folder / "tokenizer")(PROMPTS))


@pytest.fixture
def big_tmp(tmp_path):
    """tmp_path, emptied after the test: the SD-size files take gigabytes that pytest would otherwise keep."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_real_sd_parity_and_lossless_round_trip(name, big_tmp):
    tmp_path = big_tmp
    gen = torch.Generator().manual_seed(1234)
    original = tmp_path / "original"
    ref = _write_reference_folder(name, original, gen)

    # diffusers folder -> daguerre: identical outputs in float32
    comps = load_model(original)
    expected_cfg = preset(PRESET_OF[name])
    assert comps.config.name == expected_cfg.name
    with torch.no_grad():
        _assert_close(comps.unet(ref["x"], ref["t"], ref["context"]), ref["unet_out"], f"{name} U-Net")
        posterior = comps.vae.encode(ref["pixels"])
        _assert_close(posterior.mean, ref["vae_mean"], f"{name} VAE mean")
        _assert_close(posterior.logvar, ref["vae_logvar"], f"{name} VAE logvar")
        _assert_close(comps.vae.decode(ref["vae_mean"]), ref["vae_decoded"], f"{name} VAE decode")
        assert torch.equal(comps.tokenizer(PROMPTS), ref["ids"])
        hidden, pooled = comps.text_encoder(ref["ids"])
        _assert_close(hidden, ref["text_hidden"], f"{name} text hidden")
        _assert_close(pooled, ref["text_pooled"], f"{name} text pooled")
    del posterior, hidden, pooled

    # daguerre -> single file (fp16: lossless for these weights) -> daguerre (loaded as fp16): identical tensors
    single = tmp_path / "model.safetensors"
    save_model(comps, single, dtype=torch.float16)
    fingerprints, config = _fingerprints(comps, torch.float16), comps.config
    del comps
    gc.collect()
    comps = load_model(single, dtype=torch.float16)
    assert comps.config == config
    assert _fingerprints(comps, torch.float16) == fingerprints

    # the same file read without its daguerre metadata: the variant is detected from keys and shapes
    shapes, _, value_of = read_shapes(single)
    if name == "sd21":  # v-prediction cannot be told from key names: the A1111 YAML convention
        single.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    det = detect_checkpoint(shapes, {}, path=single, value_of=value_of)
    assert det.preset == PRESET_OF[name]
    assert det.text_layout == ("openclip" if name == "sd21" else "transformers")
    found = dataclasses.replace(det.config, name=config.name, provenance=config.provenance)
    found.text_encoder.projection_dim = config.text_encoder.projection_dim  # diffusers' CLIPTextModel has none
    assert found == config

    # daguerre -> diffusers: every tensor equals the original folder's
    exported = tmp_path / "exported"
    save_diffusers(comps, exported)
    del comps
    gc.collect()
    _assert_folders_equal(original, exported)
    _check_exported_folder_loads_in_diffusers(exported, name)


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_presets_reproduce_the_published_configs(name):
    """The presets are what the published diffusers configs describe (after the SD v2 text canonical form)."""
    p = preset(PRESET_OF[name])
    assert unet_config_from_diffusers(real_config(name, "unet")) == p.unet
    assert vae_config_from_diffusers(real_config(name, "vae")) == p.vae
    text = text_config_from_transformers(real_config(name, "text_encoder"))
    text.pad_token_id = real_config(name, "pad_token_id")  # the tokenizer folder says how to pad
    if text.activation == "gelu":  # diffusers' SD v2: 23 layers, last one; canonical: 24 layers, penultimate
        text = dataclasses.replace(text, layers=text.layers + 1, skip_layers=1)
    assert text == dataclasses.replace(p.text_encoder, projection_dim=None)  # CLIPTextModel has no projection
    sched = real_config(name, "scheduler")
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"], sched["num_train_timesteps"]) == (
        p.schedule.beta_start, p.schedule.beta_end, p.schedule.beta_schedule, p.schedule.num_train_timesteps
    )
    assert sched.get("prediction_type", "epsilon") == p.schedule.prediction_type
    assert real_config(name, "unet")["sample_size"] * p.vae.downsample_factor == p.sample_size


def _small_diffusers_folder(folder, in_channels: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A small SD-v1-shaped pipeline folder (8 heads, 1x1-conv projections, CLIP layout), fp32; returns refs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir()
    index = dict(real_config("sd15", "model_index"), _class_name="StableDiffusionInpaintPipeline")
    (folder / "model_index.json").write_text(json.dumps(index))
    unet_cfg = dict(real_config("sd15", "unet"), in_channels=in_channels, block_out_channels=[64, 128],
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], layers_per_block=1,
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=64, norm_num_groups=32,
                    sample_size=8)
    unet_kwargs = {k: v for k, v in unet_cfg.items() if not k.startswith("_")}
    unet = _randomize(UNet2DConditionModel.from_config(unet_kwargs), gen)
    ref = {"x": torch.randn(1, in_channels, 8, 8, generator=gen), "context": torch.randn(1, 77, 64, generator=gen)}
    with torch.no_grad():
        ref["out"] = unet(ref["x"], torch.tensor([500]), encoder_hidden_states=ref["context"]).sample
    unet.save_pretrained(folder / "unet")
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32)
    vae.save_pretrained(folder / "vae")
    text_cfg = dict(real_config("sd15", "text_encoder"), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=1)
    CLIPTextModel(CLIPTextConfig(**text_cfg)).save_pretrained(folder / "text_encoder")
    CLIPTokenizer().save_dir(folder / "tokenizer")
    return ref


def test_inpainting_unet_detected_from_shapes_at_any_size(tmp_path):
    """A 9-channel U-Net is an inpainting model; shapes alone give back the full config at a small size."""
    gen = torch.Generator().manual_seed(7)
    ref = _small_diffusers_folder(tmp_path / "inpaint", in_channels=9, gen=gen)
    comps = load_model(tmp_path / "inpaint")
    assert comps.config.concat == "inpaint" and comps.config.unet.in_channels == 9
    with torch.no_grad():
        _assert_close(comps.unet(ref["x"], 500, ref["context"]), ref["out"], "small inpainting U-Net")
    raw = tmp_path / "raw.safetensors"  # SD layout, no daguerre metadata: everything must be detected
    atomic_save_safetensors(single_file_state_dict(comps), raw)
    again = load_model(raw)
    assert again.config.concat == "inpaint"
    for field in ("unet", "vae", "text_encoder", "schedule", "concat", "conditioning"):
        assert getattr(again.config, field) == getattr(comps.config, field), field
    with torch.no_grad():
        _assert_close(again.unet(ref["x"], 500, ref["context"]), comps.unet(ref["x"], 500, ref["context"]), "again")
    assert "inpainting" in detect_checkpoint(read_shapes(raw)[0], {}, path=raw).variant
