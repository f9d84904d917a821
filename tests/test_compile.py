"""daguerre.compile: the compiled U-Net keeps its object and attributes and computes what the eager one does;
int8-quantised networks are refused before any compilation."""

from __future__ import annotations

import pytest
import torch

from daguerre.compile import compile_for_inference_, is_compiled
from daguerre.config import preset
from daguerre.models.unet import UNetModel
from daguerre.quantize import quantize_int8_
from test_quantize import bf16_call
from test_unet import random_unet


@pytest.mark.slow  # inductor builds C++ kernels: 1.5-2.5 minutes on a busy 2-core machine, seconds when cached
def test_compiled_unet_equals_eager_and_keeps_its_attributes():
    cfg = preset("tiny").unet
    exact = random_unet(cfg)  # float32: the reference both bf16 forms are measured against
    model = random_unet(cfg).bfloat16()
    x, t, context = bf16_call(cfg)
    with torch.no_grad():
        reference = exact(x.float(), t, context.float())
        eager = model(x, t, context)
        same = compile_for_inference_(model)
        assert same is model and isinstance(model, UNetModel) and model.cfg == cfg and is_compiled(model)
        compiled = model(x, t, context)
    assert compiled.dtype == torch.bfloat16 and compiled.shape == eager.shape
    def rel(a):
        return ((a.float() - reference).norm() / reference.norm()).item()

    # the compiled graph rounds differently (fused kernels) but no worse than bf16 eager does (1.4% here)
    assert rel(compiled) < 1.5 * rel(eager) and not torch.equal(compiled, torch.zeros_like(compiled))


def test_an_int8_network_is_refused_before_compiling():
    model = random_unet(preset("tiny").unet).bfloat16()
    quantize_int8_(model)
    with pytest.raises(ValueError, match="int8.*--quantize int8, not both"):
        compile_for_inference_(model)
    assert not is_compiled(model)
