"""A one-shot run holds each network only while it needs it (issue 15's memory targets; components.py):
released parts, partial reads of a model file, the order of a run's work, and the peak memory it saves."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from PIL import Image

import daguerre
from daguerre.checkpoints import save_diffusers, save_model
from daguerre.cli import main
from daguerre.components import PARTS, ReleasedError, build_components
from daguerre.config import preset
from daguerre.models.autoencoder import Decoder
from daguerre.models.text_encoder import CLIPTextEncoder
from daguerre.models.unet import UNetModel
from daguerre.pipelines.common import SkipBatch
from daguerre.registry import open_model

SETTINGS = dict(steps=3, n=3, batch_size=2, seed=5, width=64, height=64)  # two batches: 2 images, then 1


def pixels(results) -> list[bytes]:
    return [r.image.tobytes() for r in results]


@pytest.mark.parametrize("options", [{"dtype": "bf16"}, {"dtype": "fp32"}, {"dtype": "bf16", "quantize": "int8"}])
def test_a_one_shot_run_makes_the_images_of_the_models_kept_loaded(tiny_model_file, options):
    kept = daguerre.load(str(tiny_model_file), **options)
    one_shot = daguerre.load(str(tiny_model_file), release_after_use=True, **options)
    expected = kept("a red circle", **SETTINGS)
    got = one_shot("a red circle", **SETTINGS)
    assert pixels(got) == pixels(expected) and [r.parameters for r in got] == [r.parameters for r in expected]
    assert not any(one_shot.components.resident(part) for part in PARTS)  # everything freed after the run
    image = expected[0].image
    assert pixels(one_shot.img2img(image, "a blue square", steps=4, strength=0.6, seed=2)) == \
        pixels(kept.img2img(image, "a blue square", steps=4, strength=0.6, seed=2))
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (16, 16, 48, 48))
    assert pixels(one_shot.inpaint(image, mask, "a green star", steps=3, seed=3)) == \
        pixels(kept.inpaint(image, mask, "a green star", steps=3, seed=3))


def test_the_cli_runs_one_shot_and_makes_the_same_image(tiny_model_file, tmp_path):
    out = tmp_path / "cli.png"
    assert main(["generate", "a red circle", "--model", str(tiny_model_file), "--dtype", "bf16", "--steps", "3",
                 "--seed", "5", "--size", "64x64", "--threads", "1", "--out", str(out)]) == 0
    expected = daguerre.load(str(tiny_model_file), dtype="bf16")("a red circle", steps=3, seed=5, width=64, height=64)
    with Image.open(out) as im:
        assert im.convert("RGB").tobytes() == expected[0].image.tobytes()
        assert im.info["parameters"] == expected[0].parameters


def test_every_prompt_is_encoded_before_sampling_and_every_batch_sampled_before_the_first_decode(tiny_model_file):
    """The order of a one-shot run's work, batches included, and which networks are in memory at each call."""
    pipe = daguerre.load(str(tiny_model_file), dtype="bf16", release_after_use=True)
    comps = pipe.components
    calls: list[tuple[str, tuple[bool, ...]]] = []
    names = {CLIPTextEncoder: "text", UNetModel: "unet", Decoder: "decode"}

    def record(module, _):
        if type(module) in names:
            calls.append((names[type(module)], tuple(comps.resident(p) for p in PARTS)))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        pipe("a red circle", **SETTINGS)
    finally:
        handle.remove()
    runs = [(name, len(list(group))) for name, group in itertools.groupby(name for name, _ in calls)]
    assert [name for name, _ in runs] == ["text", "unet", "decode"]  # each network's calls in one stretch
    assert runs[1][1] == 2 * SETTINGS["steps"] and runs[2][1] == 2  # both batches sampled, then both decoded
    resident = {name: dict(zip(PARTS, flags, strict=True)) for name, flags in calls}
    assert resident["text"] == {"text_encoder": True, "vae_encoder": False, "unet": False, "vae_decoder": False}
    assert resident["unet"] == {"text_encoder": False, "vae_encoder": False, "unet": True, "vae_decoder": False}
    assert resident["decode"] == {"text_encoder": False, "vae_encoder": False, "unet": False, "vae_decoder": True}


def test_a_batch_skipped_early_is_decoded_as_when_kept_loaded(tiny_model_file):
    """A step callback's SkipBatch ends the first batch with its latest x0 estimate in both forms."""

    def skip_at_second_step(info):
        if info["batch_start"] == 0 and info["i"] == 1:
            raise SkipBatch

    kept = daguerre.load(str(tiny_model_file), dtype="bf16")
    one_shot = daguerre.load(str(tiny_model_file), dtype="bf16", release_after_use=True)
    expected = kept("a red circle", callback=skip_at_second_step, **SETTINGS)
    assert len(expected) == 3
    assert pixels(one_shot("a red circle", callback=skip_at_second_step, **SETTINGS)) == pixels(expected)


def test_a_released_part_is_read_again_from_its_file_when_used(tiny_model_file):
    """After a one-shot call nothing is held; the next call reads every part again and makes the same images.
    A kept model's part released by hand is read again by the next call too."""
    one_shot = daguerre.load(str(tiny_model_file), dtype="bf16", release_after_use=True)
    first = one_shot("a red circle", **SETTINGS)
    assert pixels(one_shot("a red circle", **SETTINGS)) == pixels(first)
    kept = daguerre.load(str(tiny_model_file), dtype="bf16")
    kept.components.release("unet", "text_encoder")
    assert not kept.components.resident("unet") and kept.components.resident("vae_decoder")
    assert pixels(kept("a red circle", **SETTINGS)) == pixels(first)
    assert kept.components.resident("unet") and kept.components.resident("text_encoder")  # kept loaded from now on


def test_a_released_network_called_directly_says_so(tiny_model_file):
    comps, _ = open_model(str(tiny_model_file), dtype="fp32", release_after_use=True)
    context = torch.zeros(1, 77, comps.config.text_encoder.width)
    with pytest.raises(ReleasedError, match=r"U-Net of model .* released .*acquire\('unet'\)"):
        comps.unet(torch.zeros(1, 4, 8, 8), torch.zeros(1), context=context)
    with pytest.raises(ReleasedError, match="VAE decoder"):
        comps.vae.decode(torch.zeros(1, 4, 8, 8))
    comps.acquire("unet")
    assert comps.unet(torch.zeros(1, 4, 8, 8), torch.zeros(1), context=context).shape == (1, 4, 8, 8)


def test_released_parts_without_a_file_cannot_come_back(tmp_path):
    comps = build_components(preset("tiny"))
    comps.release("unet")
    with pytest.raises(ReleasedError, match="U-Net of model 'tiny' was released.*no file to read it from"):
        comps.acquire("unet")
    with pytest.raises(ValueError, match=r"unknown model part\(s\) vae: the parts are text_encoder, "):
        comps.release("vae")


def test_a_model_file_changed_on_disk_is_not_read_again(tiny_model_file, tmp_path):
    path = tmp_path / "changing.safetensors"
    path.write_bytes(tiny_model_file.read_bytes())
    comps, _ = open_model(str(path), dtype="fp32", release_after_use=True)
    path.write_bytes(tiny_model_file.read_bytes())  # the same bytes, written again: a new modification time
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(ValueError, match="changed on disk since it was opened"):
        comps.acquire("unet")


def test_compiling_keeps_the_model_loaded(tiny_model_file):
    with pytest.raises(ValueError, match="compile and release_after_use do not go together"):
        open_model(str(tiny_model_file), release_after_use=True, compile=True)


@pytest.mark.parametrize("form", ["single file", "diffusers folder"])
def test_a_part_is_read_alone(tiny_model_file, tmp_path, form):
    """Acquiring one part reads that part's weights only: the VAE decoder without the encoder, and so on; what is
    read equals the same tensors of a whole load."""
    path = tiny_model_file
    if form == "diffusers folder":
        path = tmp_path / "folder"
        save_diffusers(open_model(str(tiny_model_file), dtype="fp32")[0], path)
    whole, _ = open_model(str(path), dtype="bf16")
    comps, _ = open_model(str(path), dtype="bf16", release_after_use=True)
    assert not any(comps.resident(p) for p in PARTS)
    for part in PARTS:
        comps.acquire(part)
        assert [comps.resident(p) for p in PARTS] == [p == part for p in PARTS]
        for mine, theirs in zip(comps.modules_of(part), whole.modules_of(part), strict=True):
            want = theirs.state_dict()
            assert all(torch.equal(t, want[k]) for k, t in mine.state_dict().items())
        comps.release(part)


# --- peak memory -------------------------------------------------------------------------------------------

GENERATE_AND_MEASURE = textwrap.dedent("""
    import json, sys
    import daguerre
    from daguerre.memory import resident_bytes
    from daguerre.quantize import weight_bytes

    path, warm_up, release = sys.argv[1], sys.argv[2], sys.argv[3] == "release"
    daguerre.load(warm_up, dtype="bf16")("a cat", steps=1, width=64, height=64)  # imports, one-time set-up
    base = resident_bytes("VmRSS")
    pipe = daguerre.load(path, dtype="bf16", release_after_use=release)
    pipe("a cat", steps=1, width=64, height=64)
    peak = resident_bytes("VmHWM") - base
    comps = daguerre.load(path, dtype="bf16").components if release else pipe.components  # (after the peak)
    nets = {"unet": comps.unet, "vae": comps.vae, "text_encoder": comps.text_encoder}
    print(json.dumps({"peak": peak, **{k: weight_bytes(m) for k, m in nets.items()}}))
""")


@pytest.fixture(scope="module")
def two_large_networks(tmp_path_factory):
    """(a model whose U-Net (~64M parameters) and text encoder (~58M: a wide embedding) are each ~45% of its
    weights, the tiny one), both in fp16."""
    cfg = preset("tiny")
    text = dataclasses.replace(cfg.text_encoder, width=1024, heads=8)
    cfg = dataclasses.replace(cfg, text_encoder=text,
                              unet=dataclasses.replace(cfg.unet, model_channels=256, context_dim=1024))
    folder = tmp_path_factory.mktemp("large")
    path, small = folder / "large.safetensors", folder / "small.safetensors"
    save_model(build_components(cfg), path, dtype=torch.float16)
    save_model(build_components(preset("tiny")), small, dtype=torch.float16)
    return path, small


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_released_weights_lower_the_peak(two_large_networks):
    """Peak RSS (VmHWM) of a process making one image, above its resident memory before the load: a kept model
    holds all of its networks at once (the peak is above their sum), a one-shot run one at a time (the peak is
    lower by about the smaller of the two large networks)."""
    path, small = two_large_networks

    def measure(how: str) -> dict:
        out = subprocess.run([sys.executable, "-c", GENERATE_AND_MEASURE, str(path), str(small), how],
                             capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
        return json.loads(out.stdout.strip().splitlines()[-1])

    kept, released = measure("keep"), measure("release")
    weights = kept["unet"] + kept["vae"] + kept["text_encoder"]
    assert kept["unet"] < 0.55 * weights and kept["text_encoder"] > 0.4 * weights
    assert kept["peak"] > weights  # measured 280 MiB for 240 MiB of weights
    # the U-Net and the text encoder are never in memory together: measured 110 MiB less (the text encoder: 113)
    assert released["peak"] < kept["peak"] - 0.75 * min(kept["unet"], kept["text_encoder"])


NO_DYNAMO = textwrap.dedent("""
    import sys
    from daguerre.cli import main

    path, out, quantize = sys.argv[1], sys.argv[2], sys.argv[3]
    assert main(["generate", "a cat", "--model", path, "--steps", "1", "--size", "64x64", "--dtype", "bf16",
                 "--quantize", quantize, "--threads", "1", "--out", out]) == 0
    import daguerre
    daguerre.load(path, dtype="bf16", quantize=None if quantize == "none" else quantize)  # kept loaded
    print("torch._dynamo" in sys.modules, "sympy" in sys.modules)
""")


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_loading_and_generating_never_import_torch_dynamo(tiny_model_file, tmp_path, quantize):
    """Networks built on the meta device run no initialisers and no meta kernels written in Python, whose first
    use imports torch._dynamo and sympy: ~75 MiB of every process's peak (weights.strict)."""
    out = subprocess.run([sys.executable, "-c", NO_DYNAMO, str(tiny_model_file), str(tmp_path / "x.png"), quantize],
                         capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.stdout.split()[-2:] == ["False", "False"]  # (the CLI printed the image path first)


MAPPED = textwrap.dedent("""
    import ctypes, sys
    import torch
    from daguerre.memory import mapped_allocations

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info

    def mapped_by(nbytes):  # bytes of memory mappings a new block of nbytes adds
        before = libc.mallinfo2().hblkhd
        block = torch.empty(nbytes, dtype=torch.uint8)
        return libc.mallinfo2().hblkhd - before

    MiB = 2**20
    with mapped_allocations():
        inside = mapped_by(2 * MiB)
    after_small, after_large = mapped_by(2 * MiB), mapped_by(40 * MiB)
    print(inside >= 2 * MiB, after_small == 0, after_large >= 40 * MiB)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("user_setting", [False, True])
def test_a_load_maps_its_blocks_and_the_run_uses_the_heap(user_setting):
    """Inside `mapped_allocations` (what a released part is read again with) a 2 MiB block gets its own mapping;
    after it blocks below 32 MiB come from the heap again, larger ones are mapped. A user's MALLOC_MMAP_THRESHOLD_
    is left alone (here 64 MiB: nothing below it is mapped, inside or after)."""
    env = {"OMP_NUM_THREADS": "1", "PATH": ""} | ({"MALLOC_MMAP_THRESHOLD_": str(64 * 2**20)} if user_setting else {})
    out = subprocess.run([sys.executable, "-c", MAPPED], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == (["False", "True", "False"] if user_setting else ["True", "True", "True"])


def test_a_random_model_stays_loaded():
    """A random: model has no file to read a part from (it would be built whole again each time): kept loaded."""
    comps, _ = open_model("random:tiny", release_after_use=True)
    assert all(comps.resident(p) for p in PARTS) and not comps.release_after_use


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_feed_forward_without_gradients_computes_the_same_in_place(dtype):
    """GEGLU without gradients multiplies into GELU's output (one activation fewer at once): bit for bit the
    product with gradients on, which keeps the out-of-place form autograd needs."""
    from daguerre.models.unet import GEGLU

    torch.manual_seed(0)
    layer = GEGLU(64, 256).to(dtype)
    x = torch.randn(2, 300, 64, dtype=dtype)
    with_grad = layer(x)
    with_grad.float().sum().backward()  # the training path still has its gradients
    assert layer.proj.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(layer(x), with_grad.detach())
    with torch.inference_mode():
        assert torch.equal(layer(x), with_grad.detach())
