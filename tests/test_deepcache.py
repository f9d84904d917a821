"""DeepCache feature reuse (Ma et al., CVPR 2024; issue 15, item 4) in `daguerre.models.unet`: with a
`FeatureCache` the U-Net's deep part (the middle of the network between the first and the last `depth`
blocks) runs on every `interval`-th call and its output is reused in between; the shallow path runs on every
call. Interval 1 is the exact path bit for bit; the cache belongs to one sampling run (a batch), so two runs
never share it; a change of the batch's shape (guidance truncation) recomputes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import daguerre
from daguerre.config import UNetConfig, preset
from daguerre.models.unet import FeatureCache, UNetModel
from daguerre.pipelines.common import Interrupted
from daguerre.pipelines.request import GenerationRequest
from daguerre.pipelines.txt2img import txt2img
from daguerre.server.app import checks_inside
from test_pipelines import _components

# the block layout of Stable Diffusion 1.5 (four levels, two ResNet blocks each, attention at levels 0-2) at a
# tiny width: 12 input blocks, a middle block and 12 output blocks
SD15_SHAPED = UNetConfig(model_channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                         num_heads=None, head_dim=8, context_dim=24, norm_groups=8)


def woken_unet(cfg: UNetConfig = SD15_SHAPED) -> UNetModel:
    """A U-Net of `cfg` from seed 0 with its zero-initialised output layers woken, so every block reaches the
    output (also tests/test_tome.py's)."""
    torch.manual_seed(0)
    net = UNetModel(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.05)
    return net


@pytest.fixture(scope="module")
def unet():
    return woken_unet()


def _calls(n: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 4, 16, 16, generator=g), torch.tensor(900.0 - 100 * i),
             torch.randn(batch, 5, 24, generator=g)) for i in range(n)]


class Counter:
    """Counts the forward calls of some modules of a network."""

    def __init__(self, modules):
        self.n = {name: 0 for name in modules}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(_module, _args):
            self.n[name] += 1
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def test_interval_one_is_the_exact_path_bit_for_bit(unet):
    cache = FeatureCache(1, depth=2)
    for x, t, ctx in _calls(4):
        assert torch.equal(unet(x, t, ctx, cache=cache), unet(x, t, ctx))
    assert cache.deep_calls == cache.calls == 4


@pytest.mark.parametrize(("interval", "depth"), [(3, 1), (2, 4), (4, 11)])
@torch.no_grad()
def test_interval_n_runs_the_deep_blocks_every_nth_call_and_the_shallow_path_every_call(unet, interval, depth):
    watched = {"in0": unet.input_blocks[0], "in_deep": unet.input_blocks[depth], "middle": unet.middle_block,
               "out_deep": unet.output_blocks[-depth - 1], "out_last": unet.output_blocks[-1]}
    counter = Counter(watched)
    cache = FeatureCache(interval, depth)
    calls = _calls(7)
    try:
        outs = [unet(x, t, ctx, cache=cache) for x, t, ctx in calls]
    finally:
        counter.remove()
    deep = len(range(0, 7, interval))
    assert counter.n == {"in0": 7, "in_deep": deep, "middle": deep, "out_deep": deep, "out_last": 7}
    assert (cache.calls, cache.deep_calls) == (7, deep)
    exact = [unet(x, t, ctx) for x, t, ctx in calls]
    for i, (out, ref) in enumerate(zip(outs, exact, strict=True)):
        assert torch.equal(out, ref) == (i % interval == 0), i  # full calls exact, reusing calls not


@torch.no_grad()
def test_a_reusing_call_combines_the_cached_deep_features_with_a_fresh_shallow_path(unet):
    """Oracle: a call with the same inputs as the full call that filled the cache is the exact output."""
    (x, t, ctx), (x2, t2, ctx2) = _calls(2)
    cache = FeatureCache(2, depth=3)
    unet(x, t, ctx, cache=cache)
    assert torch.equal(unet(x, t, ctx, cache=cache), unet(x, t, ctx)) and cache.deep_calls == 1
    unet(x, t, ctx, cache=cache)  # full again (interval 2), caches the features of (x, t, ctx)
    reused = unet(x2, t2, ctx2, cache=cache)  # new shallow path, the old deep features
    assert cache.deep_calls == 2
    assert not torch.equal(reused, unet(x2, t2, ctx2)) and not torch.equal(reused, unet(x, t, ctx))


@torch.no_grad()
def test_a_change_of_batch_size_recomputes(unet):
    cache = FeatureCache(10, depth=1)
    two, one = _calls(1, batch=2)[0], _calls(1, batch=1)[0]
    for args in (two, two, one, one, two):  # full, reuse, full (batch 1), reuse, full (batch 2 again)
        out = unet(*args, cache=cache)
        assert out.shape[0] == args[0].shape[0]
    assert cache.deep_calls == 3 and cache.calls == 5


@torch.no_grad()
def test_reuse_only_below_max_t(unet):
    cache = FeatureCache(3, depth=1, max_t=450.0)
    calls = _calls(7)  # timesteps 900, 800, ..., 300
    exact = [unet(x, t, ctx) for x, t, ctx in calls]
    outs = [unet(x, t, ctx, cache=cache) for x, t, ctx in calls]
    # 900-500 are above max_t: full calls; 400 reuses the features of 500, 300 too (interval 3)
    assert [torch.equal(o, e) for o, e in zip(outs, exact, strict=True)] == [True] * 5 + [False] * 2
    assert cache.deep_calls == 5


@torch.no_grad()
def test_the_stop_checks_still_run_before_every_block_that_runs(unet):
    x, t, ctx = _calls(1)[0]
    seen = []
    cache = FeatureCache(2, depth=2)
    with checks_inside(unet, lambda: seen.append(1)):
        unet(x, t, ctx, cache=cache)
        full = len(seen)
        unet(x, t, ctx, cache=cache)
    assert full == 12 + 1 + 12 and len(seen) - full == 2 + 2  # the reusing call: two blocks at each end

    def stop():
        raise Interrupted("stop")
    with checks_inside(unet, stop), pytest.raises(Interrupted):
        unet(x, t, ctx, cache=cache)  # a reusing call is stopped too


def test_a_cache_of_bad_settings_is_refused(unet):
    with pytest.raises(ValueError, match="interval and depth"):
        FeatureCache(0)
    x, t, ctx = _calls(1)[0]
    with pytest.raises(ValueError, match="depth 12 must be in"):
        unet(x, t, ctx, cache=FeatureCache(2, depth=12))
    with pytest.raises(ValueError, match="DeepCache interval"):
        GenerationRequest(prompt="a", deepcache_interval=0).validate(preset("tiny"))
    with pytest.raises(ValueError, match="DeepCache max sigma must be >= 0"):
        GenerationRequest(prompt="a", deepcache_interval=2, deepcache_max_sigma=-1.0).validate(preset("tiny"))
    with pytest.raises(ValueError, match=r"DeepCache depth must be in \[1, 3\]"):  # tiny: 4 input blocks
        GenerationRequest(prompt="a", deepcache_interval=2, deepcache_depth=4).validate(preset("tiny"))


# --- through the pipelines ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return _components(preset("tiny"))


def _run(comps, **fields):
    """The images of a txt2img run and how often the middle block ran."""
    counter = Counter({"middle": comps.unet.middle_block})
    try:
        fields = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 6, "sampler": "Euler", "seed": 5,
                  "cfg_scale": 6.0, **fields}
        results = txt2img(comps, GenerationRequest(**fields).validate(comps.config))
    finally:
        counter.remove()
    return [np.asarray(r.image) for r in results], counter.n["middle"], results


def test_pipeline_interval_one_is_the_exact_path(tiny):
    exact, exact_deep, _ = _run(tiny)
    same, deep, _ = _run(tiny, deepcache_interval=1, deepcache_depth=2)
    assert all(np.array_equal(a, b) for a, b in zip(same, exact, strict=True)) and deep == exact_deep == 6


def test_pipeline_interval_three_runs_the_deep_part_every_third_step(tiny):
    exact, _, _ = _run(tiny)
    images, deep, results = _run(tiny, deepcache_interval=3)
    assert deep == 2  # steps 0 and 3 of 6
    assert any(not np.array_equal(a, b) for a, b in zip(images, exact, strict=True))
    assert "DeepCache interval: 3" in results[0].parameters


def test_pipeline_max_sigma_limits_reuse_to_the_low_noise_calls(tiny):
    exact, _, _ = _run(tiny)
    request = GenerationRequest(prompt="a", steps=6, sampler="Euler").validate(tiny.config)
    below_all = float(request.sigmas[-2]) / 2  # no call lies below it: every call runs the whole U-Net
    images, deep, _ = _run(tiny, deepcache_interval=3, deepcache_max_sigma=below_all)
    assert deep == 6 and all(np.array_equal(a, b) for a, b in zip(images, exact, strict=True))
    images, deep, results = _run(tiny, deepcache_interval=3, deepcache_max_sigma=float(request.sigmas[2]))
    assert deep == 4  # sigmas 0-2 full; 3 reuses 2's features, 4 and 5: full, reuse
    assert "DeepCache max sigma: " in results[0].parameters


def test_pipeline_guidance_truncation_recomputes_on_every_change_of_batch(tiny):
    """A1111's NGMS alternates full (2 rows) and conditional (1 row) calls: every call recomputes."""
    _, deep, _ = _run(tiny, deepcache_interval=3, cfg_min_sigma=1e6)
    assert deep == 6
    _, deep, _ = _run(tiny, deepcache_interval=3, cfg_cutoff_sigma=1e6)  # the cutoff keeps one batch size
    assert deep == 2


def test_each_batch_and_each_run_has_its_own_cache(tiny):
    """Images of a multi-batch request equal those of one request each; two runs in parallel threads equal the
    same runs one after the other (no cache is shared through the model)."""
    batched, _, _ = _run(tiny, deepcache_interval=3, n=2, batch_size=1)
    alone = [_run(tiny, deepcache_interval=3, seed=5 + i)[0][0] for i in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(batched, alone, strict=True))
    got: dict[int, list] = {}

    def work(i: int) -> None:
        got[i] = [np.asarray(r.image) for r in txt2img(tiny, GenerationRequest(
            prompt="a red circle", steps=6, sampler="Euler", seed=5 + i, cfg_scale=6.0,
            deepcache_interval=2 + i).validate(tiny.config))]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(2):
        sequential = _run(tiny, negative_prompt="", deepcache_interval=2 + i, seed=5 + i)[0]
        assert np.array_equal(got[i][0], sequential[0]), i
    assert not any(isinstance(v, FeatureCache) for v in vars(tiny.unet).values())


@pytest.mark.parametrize("name", ["shapes", "fashion"])
def test_shipped_models_interval_one_is_exact_and_reuse_runs(name):
    comps = daguerre.load(name).components
    exact, deep, _ = _run(comps, prompt="a photo of a shirt" if name == "fashion" else "a red circle",
                          negative_prompt="", steps=4)
    same, _, _ = _run(comps, prompt="a photo of a shirt" if name == "fashion" else "a red circle",
                      negative_prompt="", steps=4, deepcache_interval=1)
    fast, fast_deep, _ = _run(comps, prompt="a photo of a shirt" if name == "fashion" else "a red circle",
                              negative_prompt="", steps=4, deepcache_interval=2)
    assert all(np.array_equal(a, b) for a, b in zip(same, exact, strict=True))
    assert (deep, fast_deep) == (4, 2)
    assert not np.array_equal(fast[0], exact[0])


@pytest.mark.parametrize("name", ["tiny", "sd15", "sd21"])
def test_the_configs_count_of_input_blocks_is_the_networks(name):
    """`validate` bounds --deepcache-depth by `UNetConfig.input_block_count` before any network exists."""
    cfg = preset(name).unet
    with torch.device("meta"):
        net = UNetModel(cfg)
    assert cfg.input_block_count == len(net.input_blocks) == len(net.output_blocks)
