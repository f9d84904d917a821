"""Memory at load (issue 15): weights converted while read into their own tensors, piece by piece, equal to the
plain conversion; freed heap memory given back (daguerre.memory)."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

import daguerre.weights.io as io
from daguerre.memory import resident_bytes, trim
from daguerre.weights.io import read_state_dict


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32, torch.float16])
def test_reading_in_pieces_equals_converting_whole_tensors(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(io, "READ_CHUNK", 64)  # many pieces per tensor, one ending mid-piece
    torch.manual_seed(0)
    stored = {"half": torch.randn(37, 5).half(), "int": torch.randint(-5, 5, (7,), dtype=torch.int32),
              "bf16": torch.randn(3, 3, 3, 3).bfloat16(), "empty": torch.zeros(0), "bool": torch.tensor([True, False]),
              "scalar": torch.randn(()).half(), "double": torch.randn(11, dtype=torch.float64)}
    path = tmp_path / "w.safetensors"
    save_file(stored, path)
    got, _ = read_state_dict(path, dtype)
    for key, t in stored.items():
        want = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        assert got[key].dtype == want.dtype and got[key].shape == want.shape and torch.equal(got[key], want), key


def test_a_truncated_tensor_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64).half()}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        read_state_dict(path, torch.bfloat16)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc")
def test_trim_gives_freed_heap_pages_back():
    pieces = [torch.ones(1 << 14) for _ in range(6400)]  # 64 KiB each: from the heap, below the mmap threshold
    keep = pieces[::50]  # pinning the heap: glibc trims only its top by itself
    del pieces
    before = resident_bytes()
    assert trim()
    assert resident_bytes() < before - 200 * 2**20  # ~390 MiB were freed between the kept pieces
    assert all(bool((k == 1).all()) for k in keep)


def test_channels_last_a_layer_at_a_time_equals_converting_the_whole_module(monkeypatch):
    import daguerre.registry as registry
    from daguerre.components import build_components
    from daguerre.config import preset
    from daguerre.quantize import quantize_int8_

    monkeypatch.setattr(registry, "TRIM_EVERY", 1)  # a trim after every converted layer
    comps = build_components(preset("tiny"))
    quantize_int8_(comps.unet, min_params=1)  # int8 conv weights and (out, 1, 1, 1) scales are 4-D buffers too
    whole = build_components(preset("tiny"))
    quantize_int8_(whole.unet, min_params=1)
    for mine, reference in ((comps.unet, whole.unet), (comps.vae, whole.vae)):
        registry._channels_last_(mine)
        reference.to(memory_format=torch.channels_last)
        a = dict([*mine.named_parameters(), *mine.named_buffers()])
        b = dict([*reference.named_parameters(), *reference.named_buffers()])
        assert a.keys() == b.keys()
        assert any(t.dim() == 4 and not t.is_contiguous() for t in a.values())
        for key in a:
            assert a[key].stride() == b[key].stride() and torch.equal(a[key], b[key]), key
