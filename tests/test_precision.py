"""The compute precision (issue 15): `--dtype auto` decided for the machine, weights read straight into it,
the VAE decoding in it with a float32 retry, channels_last convolutions, and the PNG's `Precision` record."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import daguerre
from daguerre import precision
from daguerre.cli import main
from daguerre.pipelines.infotext import settings_from_parameters
from daguerre.pipelines.tiling import decode_latents
from daguerre.pngmeta import parse_parameters, read_png_parameters
from daguerre.registry import open_model

BIG = 860_000_000  # SD 1.5's U-Net
SHAPES_UNET = 9_979_908  # the shipped `shapes` model
FASHION_UNET = 3_483_412  # the shipped `fashion` model


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)


@pytest.fixture
def plain_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)


def test_auto_picks_bf16_on_a_cpu_with_bf16_units(bf16_cpu):
    assert precision.resolve_dtype("auto", "cpu", BIG) == torch.bfloat16
    assert precision.resolve_dtype("auto", "cpu") == torch.bfloat16  # size unknown: taken as large
    assert precision.resolve_dtype(None, "cpu", SHAPES_UNET) == torch.bfloat16


def test_auto_keeps_float32_for_the_smallest_u_nets_where_bf16_measured_slower(bf16_cpu):
    assert precision.BF16_MIN_UNET_PARAMETERS > FASHION_UNET
    assert precision.resolve_dtype("auto", "cpu", FASHION_UNET) == torch.float32
    assert precision.resolve_dtype("auto", "cpu", precision.BF16_MIN_UNET_PARAMETERS) == torch.bfloat16


def test_auto_picks_float32_on_a_cpu_without_bf16_units(plain_cpu):
    for size in (None, FASHION_UNET, SHAPES_UNET, BIG):
        assert precision.resolve_dtype("auto", "cpu", size) == torch.float32
    assert precision.resolve_dtype("auto", "mps", BIG) == torch.float32


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_is_bf16_where_supported_else_fp16(monkeypatch, plain_cpu, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert precision.resolve_dtype("auto", "cuda", FASHION_UNET) == expected
    assert precision.uses_channels_last(expected, "cuda", FASHION_UNET)


def test_explicit_dtypes_are_kept_and_unknown_ones_named(bf16_cpu):
    assert precision.resolve_dtype("fp32", "cpu", BIG) == torch.float32
    assert precision.resolve_dtype("bf16", "cpu", FASHION_UNET) == torch.bfloat16
    assert precision.resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        precision.resolve_dtype("fp8", "cpu")
    with pytest.raises(ValueError, match="unsupported compute dtype torch.float64"):
        precision.resolve_dtype(torch.float64, "cpu")


def test_fp16_on_a_cpu_is_never_automatic_and_warns(bf16_cpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for size in (None, FASHION_UNET, BIG):
            assert precision.resolve_dtype("auto", "cpu", size) != torch.float16  # and no warning
    with pytest.warns(UserWarning, match="fp16 on a CPU is very slow"):
        assert precision.resolve_dtype("fp16", "cpu") == torch.float16


def test_the_capability_probe_reads_proc_cpuinfo_when_torch_cannot_say(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "CPUINFO", info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert not precision.cpu_has_bf16()
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert precision.cpu_has_bf16()
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 amx_tile amx_bf16\n")
    assert precision.cpu_has_bf16()
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "missing")
    assert not precision.cpu_has_bf16()


def test_the_capability_probe_asks_torch_first(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True},
                        raising=False)
    assert precision.cpu_has_bf16()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False},
                        raising=False)
    assert not precision.cpu_has_bf16()


def test_load_defaults_to_auto_for_every_network(bf16_cpu):
    big = daguerre.load("random:tiny", dtype="auto")  # random:tiny has 1M U-Net parameters: fp32 by the rule
    assert big.dtype == torch.float32
    pipe = daguerre.load("random:tiny", dtype="bf16")
    for module in (pipe.components.unet, pipe.components.vae, pipe.components.text_encoder):
        assert next(module.parameters()).dtype == torch.bfloat16


def test_the_default_of_load_and_of_the_cli_is_auto(monkeypatch):
    import inspect

    from daguerre.commands import generate

    assert inspect.signature(daguerre.load).parameters["dtype"].default == "auto"
    parser = __import__("argparse").ArgumentParser()
    generate.add_model_arguments(parser)
    assert parser.parse_args([]).dtype == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "fp8"])


# --- the VAE decode and its float32 retry ----------------------------------------------------------------

def _overflowing_vae(dtype: torch.dtype):
    """random:tiny's VAE whose decoder input convolution is scaled by 1e5: float16 overflows (max 65504) before
    the next GroupNorm, while float32 normalises the scale away and decodes a finite image."""
    vae = copy.deepcopy(daguerre.load("random:tiny", dtype="fp32").components.vae)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    return vae.to(dtype)


def test_a_decode_that_overflows_is_done_again_in_float32():
    vae = _overflowing_vae(torch.float16)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = vae.decode(vae.unscale_latents(z).half()).float()
        assert not bool(torch.isfinite(raw).all())  # the fp16 decode does overflow
        x = decode_latents(vae, z)
        reference = decode_latents(copy.deepcopy(vae).float(), z)
    assert bool(torch.isfinite(x).all())
    torch.testing.assert_close(x, reference, rtol=0, atol=0)  # the retry is the float32 decode
    assert next(vae.parameters()).dtype == torch.float16  # cast back, bit for bit
    for k, v in vae.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_finite_bf16_decode_stays_in_bf16(monkeypatch):
    vae = daguerre.load("random:tiny", dtype="bf16").components.vae
    calls = []
    real = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z: calls.append(z.dtype) or real(z))
    with torch.no_grad():
        x = decode_latents(vae, torch.randn(1, 4, 8, 8))
    assert calls == [torch.bfloat16] and bool(torch.isfinite(x).all())


# --- channels_last --------------------------------------------------------------------------------------

def _is_channels_last(module) -> bool:
    w = next(m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def test_bf16_convolutions_run_channels_last_and_agree_with_contiguous(monkeypatch):
    monkeypatch.setattr(precision, "SMALL_MODEL_PARAMETERS", 0)  # random:tiny stands in for a large model
    comps, _ = open_model("random:tiny", dtype="bf16")
    assert _is_channels_last(comps.unet) and _is_channels_last(comps.vae)
    flat_unet = copy.deepcopy(comps.unet).to(memory_format=torch.contiguous_format)
    flat_vae = copy.deepcopy(comps.vae).to(memory_format=torch.contiguous_format)
    assert not _is_channels_last(flat_unet)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g).bfloat16()
    t = torch.tensor([10.0, 500.0]).bfloat16()
    ctx = torch.randn(2, 77, comps.config.unet.context_dim, generator=g).bfloat16()
    with torch.no_grad():
        out, ref = comps.unet(x, t, context=ctx).float(), flat_unet(x, t, context=ctx).float()
        img, img_ref = comps.vae.decode(x).float(), flat_vae.decode(x).float()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    torch.testing.assert_close(img, img_ref, rtol=2e-2, atol=2e-2 * img_ref.abs().max().item())


def test_float32_and_small_models_keep_contiguous_convolutions():
    fp32, _ = open_model("random:tiny", dtype="fp32")
    small_bf16, _ = open_model("random:tiny", dtype="bf16")  # small: measured slower channels_last
    for comps in (fp32, small_bf16):
        assert not _is_channels_last(comps.unet) and not _is_channels_last(comps.vae)


# --- the PNG record and --from-png -----------------------------------------------------------------------

def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_the_png_records_a_precision_that_is_not_fp32_and_from_png_reproduces_it(tmp_path):
    first, again, other = tmp_path / "bf16.png", tmp_path / "again.png", tmp_path / "fp32.png"
    common = ["--model", "random:tiny", "--steps", "3", "--size", "32"]
    assert main(["generate", "a red circle", "--dtype", "bf16", "--seed", "4", "-o", str(first), *common]) == 0
    _, _, params = parse_parameters(read_png_parameters(first))
    assert params["Precision"] == "bf16"
    assert main(["generate", "--from-png", str(first), "--model", "random:tiny", "-o", str(again)]) == 0
    np.testing.assert_array_equal(_pixels(again), _pixels(first))  # bit for bit, in bf16 again
    assert parse_parameters(read_png_parameters(again))[2]["Precision"] == "bf16"
    # the record matters: the same settings in float32 draw another image, and write no Precision key
    assert main(["generate", "--from-png", str(first), "--model", "random:tiny", "--dtype", "fp32",
                 "-o", str(other)]) == 0
    assert not np.array_equal(_pixels(other), _pixels(first))
    assert "Precision" not in parse_parameters(read_png_parameters(other))[2]


def test_a_png_without_precision_is_float32_and_a_bad_one_is_named():
    assert settings_from_parameters("a cat\nSteps: 3, Seed: 1").precision == "fp32"
    settings = settings_from_parameters("a cat\nSteps: 3, Seed: 1, Precision: bf16")
    assert settings.precision == "bf16" and "Precision" not in " ".join(settings.ignored)
    with pytest.raises(ValueError, match="x.png: Precision 'fp8' is not one of fp32, bf16, fp16"):
        settings_from_parameters("a cat\nSteps: 3, Seed: 1, Precision: fp8", "x.png")


def test_verbose_says_precision_attention_layout_and_threads(tmp_path, capsys):
    out = tmp_path / "v.png"
    assert main(["generate", "a cat", "--model", "random:tiny", "--steps", "1", "--size", "32", "--dtype", "bf16",
                 "--threads", "1", "--verbose", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "precision" in x)
    assert "precision bf16" in line and "attention:" in line and "contiguous" in line
    assert "1 CPU thread(s)" in line


# --- loading straight into the compute dtype -------------------------------------------------------------

LOAD_AND_MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from daguerre.registry import open_model
    from daguerre.api import set_compute_dtype

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    path, warm_up, how = sys.argv[1], sys.argv[2], sys.argv[3]
    open_model(warm_up, dtype="bf16")  # a small file first: imports, the tokenizer, torch's one-time set-up
    base = status("VmRSS")
    if how == "direct":
        comps, _ = open_model(path, dtype="bf16")
    else:  # the old way: a float32 copy first, then the cast
        comps, _ = open_model(path, dtype="fp32")
        set_compute_dtype(comps, "bf16")
    nets = [m for m in (comps.unet, comps.vae, comps.text_encoder) if m is not None]
    assert all(p.dtype == torch.bfloat16 for m in nets for p in m.parameters())
    footprint = sum(p.numel() * p.element_size() for m in nets for p in m.parameters())
    print(json.dumps({"footprint": footprint, "peak": status("VmHWM") - base}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_an_fp16_file_loads_into_bf16_without_a_float32_copy(mid_size_fp16_files):
    """Peak RSS (VmHWM) of a process loading a 64M-parameter model stored in fp16 into bf16, above its resident
    memory before the load: within 1.4x the model's final footprint (the tokenizer's tables take the rest),
    where a float32 copy alone is 2x (the second run, the old way, shows that the measure sees it)."""
    path, small = mid_size_fp16_files

    def measure(how: str) -> dict:
        out = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(path), str(small), how], capture_output=True,
                             text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
        return json.loads(out.stdout.strip().splitlines()[-1])

    direct, via_float32 = measure("direct"), measure("float32")
    assert direct["footprint"] > 100 * 2**20
    assert direct["peak"] < 1.4 * direct["footprint"]  # measured 1.17x
    assert via_float32["peak"] > 1.9 * direct["footprint"]  # measured 2.2x: the float32 copy is twice the model


def test_info_says_how_a_run_here_would_compute(bf16_cpu, capsys):
    assert main(["info", "shapes", "--no-hash", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    assert run == {"precision": "bf16", "attention": precision.attention_description(torch.bfloat16, "cpu"),
                   "convolutions": "contiguous", "threads": 1, "device": "cpu", "weights": "none"}  # small: one thread
    assert main(["info", "fashion", "--no-hash"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("a run here:"))
    assert "precision fp32" in line and "1 CPU thread(s)" in line and "int8" not in line
    assert main(["info", "fashion", "--no-hash", "--quantize", "int8"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("a run here:"))
    assert line.endswith(", int8 weights")


def test_the_cli_tells_the_fp16_warning_in_one_line(capsys):
    assert main(["info", "fashion", "--no-hash", "--dtype", "fp16"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["daguerre info: warning: fp16 on a CPU is very slow (about 25x slower than bf16 here): use "
                   "--dtype auto or bf16"]


def test_auto_threads_is_one_for_small_u_nets_on_the_cpu():
    assert precision.auto_threads("cpu", SHAPES_UNET) == 1
    assert precision.auto_threads("cpu", BIG) is None  # torch's default
    assert precision.auto_threads("cuda", SHAPES_UNET) is None


def test_from_png_without_a_precision_key_runs_in_fp32_even_where_auto_is_bf16(monkeypatch, bf16_cpu, tmp_path):
    monkeypatch.setattr(precision, "BF16_MIN_UNET_PARAMETERS", 0)  # random:tiny would now be bf16 under auto
    first, again = tmp_path / "fp32.png", tmp_path / "again.png"
    assert main(["generate", "a red circle", "--model", "random:tiny", "--steps", "3", "--size", "32", "--seed", "2",
                 "--dtype", "fp32", "-o", str(first)]) == 0
    assert "Precision" not in parse_parameters(read_png_parameters(first))[2]
    assert main(["generate", "--from-png", str(first), "--model", "random:tiny", "-o", str(again)]) == 0
    np.testing.assert_array_equal(_pixels(again), _pixels(first))
    assert daguerre.load("random:tiny").dtype == torch.bfloat16  # what auto would have picked without the file


def test_the_server_refuses_an_infotext_made_at_another_precision():
    """A PNG's parameters that name a Precision (or Weights) other than the server's would give another image
    silently: the API says so and which flags would reproduce it; texts without those keys (A1111's) pass."""
    from daguerre.server.app import ApiError, Server

    server = Server(daguerre.load("random:tiny", dtype="fp32"), "random:tiny")
    base = "a cat\nSteps: 1, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 32x32"
    with pytest.raises(ApiError, match=r"made in bf16, this server computes in fp32.*--dtype bf16"):
        server.generate({"infotext": base + ", Precision: bf16"}, "txt2img")
    with pytest.raises(ApiError, match=r"made in fp32 with int8 weights.*--dtype fp32 --quantize int8"):
        server.generate({"infotext": base + ", Weights: int8"}, "txt2img")
    assert len(server.generate({"infotext": base}, "txt2img")["images"]) == 1
