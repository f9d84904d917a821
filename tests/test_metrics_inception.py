"""Inception-v3 from user-supplied weights (daguerre.metrics.inception).

No real Inception weights exist offline, so the tests build random state dicts in both published layouts
(torchvision's inception_v3_google-*.pth, pytorch-fid's pt_inception-2015-12-05-*.pth), write them to
.pth and .safetensors files and load those. The architecture is checked independently against figures
read from the reference sources; the full network at 299x299 costs ~6 GFLOP an image, so every forward
pass here uses one or two images.
"""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from daguerre.fileio import atomic_save_safetensors
from daguerre.metrics.inception import InceptionExtractor, InceptionV3, load_inception

# torchvision/models/inception.py, Inception_V3_Weights.IMAGENET1K_V1.meta["num_params"]: the parameter count of
# torchvision's inception_v3 with its auxiliary classifier (BatchNorm running statistics are buffers, not counted).
PUBLISHED_TORCHVISION_PARAMS = 27_161_264

# torchvision/models/inception.py, InceptionAux(768, num_classes=1000): conv0 = BasicConv2d(768, 128, 1x1),
# conv1 = BasicConv2d(128, 768, 5x5), fc = Linear(768, 1000). Present in torchvision's file, ignored by daguerre.
AUX_SHAPES = {
    "AuxLogits.conv0.conv.weight": (128, 768, 1, 1),
    "AuxLogits.conv0.bn.weight": (128,),
    "AuxLogits.conv0.bn.bias": (128,),
    "AuxLogits.conv0.bn.running_mean": (128,),
    "AuxLogits.conv0.bn.running_var": (128,),
    "AuxLogits.conv1.conv.weight": (768, 128, 5, 5),
    "AuxLogits.conv1.bn.weight": (768,),
    "AuxLogits.conv1.bn.bias": (768,),
    "AuxLogits.conv1.bn.running_mean": (768,),
    "AuxLogits.conv1.bn.running_var": (768,),
    "AuxLogits.fc.weight": (1000, 768),
    "AuxLogits.fc.bias": (1000,),
}

# Names and shapes read off torchvision/models/inception.py (Inception3.__init__, InceptionA-E, BasicConv2d:
# Conv2d(bias=False) + BatchNorm2d); pytorch-fid's FID network reuses these modules, with fc = Linear(2048, 1008).
REFERENCE_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),  # conv_block(3, 32, kernel_size=3, stride=2)
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch5x5_1.conv.weight": (48, 192, 1, 1),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),  # inception_a(192, pool_features=32)
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5d.branch_pool.bn.weight": (64,),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),  # channels_7x7=128, kernel (1, 7)
    "Mixed_6c.branch7x7dbl_2.conv.weight": (160, 160, 7, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch3x3dbl_3a.bn.running_mean": (384,),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1000, 2048),
    "fc.bias": (1000,),
}
# BasicConv2d count of the main network: stem 5, three InceptionA x 7, InceptionB 4, four InceptionC x 10,
# InceptionD 6, two InceptionE x 9 (counted from the reference blocks).
REFERENCE_CONVS = 5 + 3 * 7 + 4 + 4 * 10 + 6 + 2 * 9

# torchvision's ImageNet normalisation (its ImageClassification transform) and Inception3._transform_input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


def _random_state_dict(fid: bool, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in a published layout, scaled (He init, BatchNorm near identity) so activations stay finite."""
    with torch.device("meta"):
        shapes = InceptionV3(fid=fid).state_dict()
    keys = {k: tuple(v.shape) for k, v in shapes.items()}
    if not fid:
        keys.update(AUX_SHAPES)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys.items():
        if k.endswith(".num_batches_tracked"):
            sd[k] = torch.tensor(0)
        elif k.endswith("conv.weight"):
            fan_in = math.prod(shape[1:])
            sd[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif k.endswith("bn.weight") or k.endswith(".running_var"):
            sd[k] = 0.8 + 0.4 * torch.rand(shape, generator=g)
        elif k.endswith("fc.weight"):
            sd[k] = 0.05 * torch.randn(shape, generator=g)
        else:  # bn.bias, running_mean, fc.bias
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """{layout: (state dict, {suffix: file})}: torchvision ("tv") and pytorch-fid ("fid"), as .pth and .safetensors."""
    folder = tmp_path_factory.mktemp("inception")
    out = {}
    for layout, fid, seed in (("tv", False, 0), ("fid", True, 1)):
        sd = _random_state_dict(fid, seed)
        files = {".pth": folder / f"{layout}.pth", ".safetensors": folder / f"{layout}.safetensors"}
        torch.save(sd, files[".pth"])
        # the safetensors copy leaves out num_batches_tracked, as older exports do
        atomic_save_safetensors(
            {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, files[".safetensors"]
        )
        out[layout] = (sd, files)
    return out


@pytest.fixture(scope="module")
def extractors(weights):
    """One extractor per layout (torchvision from .pth, FID from .safetensors)."""
    return {"tv": load_inception(weights["tv"][1][".pth"]), "fid": load_inception(weights["fid"][1][".safetensors"])}


def _images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------- architecture against the reference


def test_parameter_count_matches_published_torchvision_figure(weights):
    sd = weights["tv"][0]
    params = sum(v.numel() for k, v in sd.items() if not k.endswith(BUFFER_SUFFIXES))
    assert params == PUBLISHED_TORCHVISION_PARAMS
    with torch.device("meta"):
        model = InceptionV3(fid=False)
    aux = sum(math.prod(s) for k, s in AUX_SHAPES.items() if not k.endswith(BUFFER_SUFFIXES))
    assert sum(p.numel() for p in model.parameters()) + aux == PUBLISHED_TORCHVISION_PARAMS


def test_key_names_and_shapes_match_reference():
    with torch.device("meta"):
        tv, fid = InceptionV3(fid=False).state_dict(), InceptionV3(fid=True).state_dict()
    for k, shape in REFERENCE_SHAPES.items():
        assert tuple(tv[k].shape) == shape, k
    assert sum(k.endswith("conv.weight") for k in tv) == REFERENCE_CONVS
    assert all(k.startswith(("Conv2d_", "Mixed_", "fc.")) for k in tv)
    # BasicConv2d = conv (no bias) + BatchNorm with running statistics
    assert not any(k.endswith("conv.bias") for k in tv)
    assert sum(k.endswith("bn.running_var") for k in tv) == REFERENCE_CONVS
    # the FID network has the same modules; only the classifier has 1008 outputs
    assert set(fid) == set(tv)
    assert tuple(fid["fc.weight"].shape) == (1008, 2048)
    assert all(fid[k].shape == tv[k].shape for k in tv if not k.startswith("fc."))


def test_batchnorm_eps_is_tensorflow_value():
    with torch.device("meta"):
        model = InceptionV3()
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert eps == {0.001}


def _valid_avg3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 'same' average over the pixels inside the image only: window sum / window count."""
    ones = torch.ones_like(x[:, :1])
    kernel = torch.ones(1, 1, 3, 3)
    total = F.conv2d(x.reshape(-1, 1, *x.shape[2:]), kernel, padding=1).reshape(x.shape)
    return total / F.conv2d(ones, kernel, padding=1)


@pytest.mark.parametrize(
    ("block", "cin", "size"),
    [("Mixed_5b", 192, 7), ("Mixed_6c", 768, 5), ("Mixed_7b", 1280, 4), ("Mixed_7c", 2048, 4)],
)
def test_pool_branches_of_both_variants(weights, block, cin, size):
    """torchvision averages with the padding counted; FID: valid-pixel averages, and Mixed_7c max-pools."""
    x = torch.rand(1, cin, size, size, generator=torch.Generator().manual_seed(3))
    for layout, fid in (("tv", False), ("fid", True)):
        model = InceptionV3.from_state_dict(weights[layout][0])
        assert model.fid is fid
        mod = getattr(model, block)
        with torch.no_grad():
            got = mod(x)[:, -mod.branch_pool.conv.out_channels :]
            if not fid:
                pooled = F.conv2d(x.reshape(-1, 1, size, size), torch.ones(1, 1, 3, 3) / 9, padding=1).reshape(x.shape)
            elif block == "Mixed_7c":
                pooled = F.max_pool2d(x, 3, stride=1, padding=1)
            else:
                pooled = _valid_avg3x3(x)
            want = mod.branch_pool(pooled)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("layout", ["tv", "fid"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_both_layouts_from_both_formats(weights, layout, suffix):
    sd, files = weights[layout]
    ext = load_inception(files[suffix], batch_size=4)
    assert isinstance(ext, InceptionExtractor)
    assert ext.name == ("inception-v3-fid" if layout == "fid" else "inception-v3")
    assert ext.num_classes == (1008 if layout == "fid" else 1000)
    assert ext.sha256 == hashlib.sha256(files[suffix].read_bytes()).hexdigest()
    loaded = ext.model.state_dict()
    for k in ("Conv2d_1a_3x3.conv.weight", "Mixed_6e.branch7x7dbl_3.bn.running_var", "fc.bias"):
        torch.testing.assert_close(loaded[k], sd[k], rtol=0, atol=0)
    assert not any(p.requires_grad for p in ext.model.parameters())
    assert not ext.model.training


def test_variant_override(weights):
    ext = load_inception(weights["fid"][1][".safetensors"], fid=False)
    assert ext.name == "inception-v3" and ext.num_classes == 1008 and not ext.model.fid
    assert load_inception(weights["tv"][1][".pth"], fid=True).model.fid


def test_loading_is_strict(weights):
    sd = weights["tv"][0]
    for drop in ("Mixed_6b.branch7x7_2.conv.weight", "Conv2d_1a_3x3.bn.running_mean"):
        with pytest.raises(ValueError, match=f"missing key.*{drop}"):
            InceptionV3.from_state_dict({k: v for k, v in sd.items() if k != drop})
    with pytest.raises(ValueError, match="unexpected key.*Mixed_8a.conv.weight"):
        InceptionV3.from_state_dict({**sd, "Mixed_8a.conv.weight": torch.zeros(1)})
    bad = {**sd, "Mixed_5c.branch1x1.conv.weight": torch.zeros(64, 256, 3, 3)}
    with pytest.raises(ValueError, match=r"Mixed_5c.branch1x1.conv.weight has shape \(64, 256, 3, 3\)"):
        InceptionV3.from_state_dict(bad)
    with pytest.raises(ValueError, match="fc.weight"):
        InceptionV3.from_state_dict({k: v for k, v in sd.items() if k != "fc.weight"})
    # AuxLogits (torchvision) and num_batches_tracked (absent from the .safetensors copies) are optional
    assert not any(k.startswith("AuxLogits") for k in InceptionV3.from_state_dict(sd).state_dict())


def test_load_errors_name_the_file(tmp_path, weights):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_inception(tmp_path / "nothere.pth")
    partial = tmp_path / "partial.safetensors"
    sd = weights["fid"][0]
    atomic_save_safetensors({k: sd[k] for k in ("fc.weight", "fc.bias")}, partial)
    with pytest.raises(ValueError, match=r"partial.safetensors.*missing key.*Conv2d_1a_3x3.conv.weight"):
        load_inception(partial)


# ---------------------------------------------------------------- features and probabilities


@pytest.mark.parametrize("layout", ["tv", "fid"])
def test_features_and_probabilities(extractors, weights, layout):
    ext = extractors[layout]
    x = _images(1, 3, 32, seed=10 + (layout == "fid"))
    feats = ext.features(x)
    assert feats.shape == (1, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and feats.abs().sum() > 0
    probs = ext.probabilities(x)  # same unchanged tensor: uses the cached pool3 features
    assert probs.shape == (1, 1008 if layout == "fid" else 1000) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(1))
    # torchvision: its classifier's logits; FID: the reference IS code's bias-free logits over all 1008
    sd = weights[layout][0]
    bias = None if layout == "fid" else sd["fc.bias"]
    torch.testing.assert_close(probs, torch.softmax(F.linear(feats, sd["fc.weight"], bias), 1), rtol=1e-5, atol=1e-6)
    # changing the images in place invalidates the cache
    x.neg_()
    assert not torch.allclose(ext.features(x), feats)


def test_input_convention_matches_torchvision_pipeline(extractors):
    """torchvision: x01 -> ImageNet Normalize -> transform_input -> network; daguerre feeds [-1, 1] directly."""
    ext = extractors["tv"]
    x = _images(1, 3, 40, seed=20)
    x01 = F.interpolate((x + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    normalised = (x01 - mean) / std
    transformed = torch.cat(  # Inception3._transform_input, written out per channel
        [normalised[:, c : c + 1] * (IMAGENET_STD[c] / 0.5) + (IMAGENET_MEAN[c] - 0.5) / 0.5 for c in range(3)], 1
    )
    with torch.no_grad():
        want = ext.model.pool3(transformed)
    torch.testing.assert_close(ext.features(x), want, rtol=1e-4, atol=1e-5)


def test_grayscale_and_batching_invariances(extractors):
    ext = extractors["fid"]
    gray = _images(1, 1, 28, seed=30)
    rgb = _images(1, 3, 28, seed=31)
    both = torch.cat([gray.repeat(1, 3, 1, 1), rgb])
    batched = InceptionExtractor(ext.model, ext.sha256, batch_size=2).features(both)
    single = InceptionExtractor(ext.model, ext.sha256, batch_size=1).features(both)  # one image per pass
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ext.features(gray), single[:1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(single[0], single[1])


def test_bad_images_are_value_errors(extractors):
    ext = extractors["tv"]
    for bad, what in (
        (torch.zeros(1, 2, 8, 8), "C = 1"),
        (torch.zeros(3, 8, 8), "shape"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating point"),
        ([[0.0]], "torch.Tensor"),
    ):
        with pytest.raises(ValueError, match=what):
            ext.features(bad)
    assert ext.features(torch.zeros(0, 3, 8, 8)).shape == (0, 2048)
    with pytest.raises(ValueError, match="batch_size"):
        InceptionExtractor(ext.model, ext.sha256, batch_size=0)


def test_matches_the_evaluation_extractor_protocol(extractors):
    extractors_module = pytest.importorskip("daguerre.metrics.extractors")
    for ext in extractors.values():
        assert isinstance(ext, extractors_module.FeatureExtractor)
        assert len(ext.sha256) == 64 and int(ext.sha256, 16) >= 0
