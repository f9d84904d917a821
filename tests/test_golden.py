"""Golden values: the training half's rewrite (issue 14) must leave behaviour unchanged, bit for bit.

Recorded with the code before that rewrite, on this project's machine (torch 2.13.0, CPU, one thread): the
sha256 of the final weights of a short run of every `tiny_*` config through the CLI (and of a run killed with
SIGKILL and resumed: tests/test_training_runs.py holds it equal to an uninterrupted one, `SIGKILL_RESUMED` below
pins that run's weights), and of images from both shipped models at fixed seeds. The same commands must give the
same hashes. A deliberate change of results (a new default precision, a fixed bug) updates these values in the
same commit, saying why: `TRAINED` and `SIGKILL_RESUMED` changed when the held-out split became a random draw
(issue 17; with the previous split, the last data.holdout items, the runs still give the earlier values); the
`shapes` images changed when the shipped model gained its phase 7 (issue 22, session 21).
`SHIPPED` pins the float32 path (dtype="fp32"); `SHIPPED_DEFAULT` the same images at the
default precision (issue 15: bf16 for `shapes` on a CPU with bf16 units).

Bits computed in bfloat16 (the trainings' autocast, the default precision) depend on the CPU: oneDNN picks its
kernels (AMX or AVX-512 bf16) and their blocking by the CPU and its caches, and a different summation order
gives different bits. So the bf16 values are kept per CPU kind (`cpu_kind`: vendor and bf16 units), each
recorded on a machine of that kind; on a kind with none recorded those tests skip, saying so (the float32
values hold everywhere these tests have run). The project's machine was an AMD Zen 5 (AVX-512 bf16) until
session 13 and an Intel Xeon with AMX from session 14: the same code gives each its own values.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import daguerre
from daguerre.cli import main
from daguerre.precision import cpu_has_bf16, short_name

QUIET = ["train.progress=false", "train.sample_every=0", "train.eval_every=0", "train.checkpoint_every=0",
         "train.steps=12", "train.log_every=4", "data.n=24", "data.holdout=4", "train.batch_size=4"]

# config -> sha256 of the final weights (tensors in key order: name, dtype, shape, bytes)
AMD_ZEN5, INTEL_AMX = "AuthenticAMD avx512_bf16", "GenuineIntel amx_bf16"  # cpu_kind() of the machines
TRAINED = {
    AMD_ZEN5: {
        "tiny_vae": "b1f15f7729b2bd6290cca98f3c095ada4d873b7564d092ffd5ecba83ae41adaa",
        "tiny_ldm": "152d5d99b0933f702cb559f4a4511005092ae97cc86e9ddb4793e2b4961d33dc",
        "tiny_inpaint_ldm": "38f3e05764d308afe0043cfb8099044587759f8ee7551d0feb3a6c13ee53711f",
        "tiny_sr_ldm": "c9d2e44dcdf32145336eac74e5fe4f7d01315969ef8d0c5ea9824bef72d49601",
        "tiny_minilm_ldm": "36c2e24a13730ab73b0b49a3a68f8f8dfe0d75f32eb87da72ef097f819112a34",
    },
    INTEL_AMX: {
        "tiny_vae": "32f689e19fc67eb80a488e70b4e8f2a352def2979440762c8673a757dc65943d",
        "tiny_ldm": "da23b3255b1607ea3c2c843e25f546f9087c95a1cd7bca1697bc4cea19a9bd2e",
        "tiny_inpaint_ldm": "f3422c8cc0a8249f641b2a07776eea2f5999da3795324fda09d413f4424df019",
        "tiny_sr_ldm": "aef4a588019265895333cb30589eadf30bd837fe0018eac31923a40c161fcb57",
        "tiny_minilm_ldm": "c58f81ad1ceabb764b0e6bf1f6b5a0a4ebdcd1ba329a1e0cbf6fb3c0fa3596e6",
    },
}
# the final state (model, EMA, optimiser) of tests/test_training_runs.py's run killed with SIGKILL and resumed
SIGKILL_RESUMED = {AMD_ZEN5: "9ad8703e45dbbd56ab916a0e25c22ffe2de2ef03071c068c6a62d78da91a3e7e",
                   INTEL_AMX: "5dec74485d81f2f5ef09ccc57cb0f5b0ec1d9137433cd6f6b061c03e5bb8c81a"}
# (model, prompt, seed, n) -> sha256 of the images' pixels
SHIPPED = {
    ("shapes", "a red circle above a blue square", 1, 2):
        "2d6a0540dfde37d00e885aed8c9d8cf124ea3bf44ce2d7935455d869efa161bd",
    ("shapes", "a small green triangle on a white background", 7, 1):
        "bf04606f54064b7129bd4ff878a32d893e5a514fa3aed35060fb4e980b7a8a71",
    ("fashion", "a photo of an ankle boot", 1, 2):
        "2d007d81e53a3b210f6210d9a5b6cfd53e7d78479ddfd985b35c0213c8c6698b",
}
# the same images at the default precision (dtype "auto") on a CPU with bf16 units (this project's machine):
# (model, prompt, seed, n) -> (the precision auto picks, sha256 of the pixels). fashion (3.5M U-Net
# parameters) stays fp32 (daguerre.precision.BF16_MIN_UNET_PARAMETERS), so its images are SHIPPED's.
SHIPPED_DEFAULT = {
    AMD_ZEN5: {
        ("shapes", "a red circle above a blue square", 1, 2):
            ("bf16", "cdcdfd9c90f5fcf9d90e95971a4437b089ef88c61e762d349ac1b8905c8503a2"),
        ("shapes", "a small green triangle on a white background", 7, 1):
            ("bf16", "a26187a76b7da0a1f284447ecc9f10cc25984e179fb3d86889fc6e00c9743f37"),
        ("fashion", "a photo of an ankle boot", 1, 2):
            ("fp32", "2d007d81e53a3b210f6210d9a5b6cfd53e7d78479ddfd985b35c0213c8c6698b"),
    },
    INTEL_AMX: {  # attention in torch's fused kernel there (nn/attention.py, chunked_pays), chunked on the AMD;
        # shapes changed (phase 7, session 21, on the AMD machine): its values on this kind are to be recorded again
        ("fashion", "a photo of an ankle boot", 1, 2):
            ("fp32", "2d007d81e53a3b210f6210d9a5b6cfd53e7d78479ddfd985b35c0213c8c6698b"),
    },
}


def cpu_kind() -> str:
    """The CPU's vendor and its bf16 units ("amx_bf16", "avx512_bf16" or "none"), from /proc/cpuinfo: what
    decides the bits of a bf16 computation here."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.is_file() else ""
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
    flags = set((re.search(r"^flags\s*:(.*)$", text, re.M) or re.match("()", "")).group(1).split())
    units = next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), "none")
    return f"{vendor.group(1) if vendor else 'unknown'} {units}"


def golden(table: dict[str, object]):
    """This CPU kind's values of `table`; the test skips, saying what to do, on a kind with none recorded."""
    kind = cpu_kind()
    if kind not in table:
        pytest.skip(f"no bf16 golden values recorded for this CPU ({kind}; recorded: {', '.join(table)}): bf16 "
                    "bits depend on the CPU's kernels; record this kind's values from a run of the unchanged code")
    return table[kind]


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor in key order: its name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensors[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pixels_digest(images) -> str:
    h = hashlib.sha256()
    for image in images:
        h.update(f"{image.mode}|{image.size}|".encode())
        h.update(np.asarray(image).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("config", sorted(TRAINED[AMD_ZEN5]))
def test_a_short_run_of_each_tiny_config_gives_its_golden_weights(config, tmp_path, vae_file):
    stage = "vae" if config.endswith("_vae") else "ldm"
    argv = ["train", stage, "--config", config, "--out", str(tmp_path / "run")]
    if stage == "ldm":
        argv += ["--vae", str(vae_file)]
    for item in QUIET:
        argv += ["--set", item]
    assert main(argv) == 0
    out = tmp_path / "run" / ("vae.safetensors" if stage == "vae" else "model.safetensors")
    assert weights_digest(load_file(str(out))) == golden(TRAINED)[config]


@pytest.mark.parametrize(("model", "prompt", "seed", "n"), sorted(SHIPPED))
def test_the_shipped_models_draw_their_golden_images(model, prompt, seed, n):
    pipe = daguerre.load(model, dtype="fp32")
    images = [r.image for r in pipe(prompt, seed=seed, n=n)]
    assert pixels_digest(images) == SHIPPED[model, prompt, seed, n]


@pytest.mark.parametrize(("model", "prompt", "seed", "n"), sorted(SHIPPED_DEFAULT[AMD_ZEN5]))
def test_the_shipped_models_draw_their_golden_images_at_the_default_precision(model, prompt, seed, n):
    if not cpu_has_bf16():  # a CPU without bf16 units computes in float32 (daguerre.precision)
        precision, digest = "fp32", SHIPPED[model, prompt, seed, n]
    else:
        values = golden(SHIPPED_DEFAULT)
        if (model, prompt, seed, n) not in values:
            pytest.skip(f"no bf16 golden value of {model!r} recorded for this CPU ({cpu_kind()}): the model changed "
                        "after this kind's values were recorded; record them from a run of the unchanged code")
        precision, digest = values[model, prompt, seed, n]
    pipe = daguerre.load(model)
    assert short_name(pipe.dtype) == precision
    images = [r.image for r in pipe(prompt, seed=seed, n=n)]
    assert pixels_digest(images) == digest



def test_a_cpu_kind_without_recorded_values_skips_saying_so(monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules[__name__], "cpu_kind", lambda: "SomeVendor none")
    with pytest.raises(pytest.skip.Exception, match=r"no bf16 golden values recorded for this CPU \(SomeVendor"):
        golden(TRAINED)
