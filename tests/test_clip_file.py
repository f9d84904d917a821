"""CLIP files (checkpoints/clip_file.py, checkpoints/torchscript.py): daguerre's own file round trip, the
formats users have (transformers folders in their three weight layouts, OpenCLIP state dicts, OpenAI's
TorchScript archives read without running them), activation rules, refusals, the registry's CLIP names and
`daguerre info` on a CLIP. Tiny configurations; the real-size parity is tests/test_clip_model.py."""

from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from daguerre.checkpoints.clip_file import describe_clip, load_clip, read_clip, save_clip
from daguerre.checkpoints.torchscript import read_torchscript
from daguerre.cli import main
from daguerre.config import CLIPConfig, TextEncoderConfig, VisionConfig
from daguerre.models.clip import CLIPModel, init_clip_
from daguerre.models.tokenizer import CLIPTokenizer
from daguerre.registry import clip_for_model, open_clip, shipped_clips

transformers = pytest.importorskip("transformers")
from test_clip_model import hf_config, reference_outputs, to_openclip  # noqa: E402

TOL = 1e-5


def tiny_config(activation: str = "quick_gelu") -> CLIPConfig:
    return CLIPConfig(
        name="tiny-clip",
        text_encoder=TextEncoderConfig(vocab_size=49408, width=64, layers=2, heads=1, mlp_dim=96, projection_dim=32,
                                       activation=activation),
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=1, mlp_dim=96,
                            activation=activation),
    )


@pytest.fixture(scope="module")
def hf_tiny():
    """A random transformers CLIPModel at the tiny config (heads = width / 64, as OpenCLIP files imply),
    every 1-d tensor random too, with inputs and its outputs."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = transformers.CLIPModel(hf_config(cfg)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                        + 0.1 * torch.randn(p.shape, generator=gen))
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    ids = CLIPTokenizer()(["a red circle", "two blue squares on grey"])
    return model, pixels, ids, reference_outputs(model, pixels, ids)


def assert_same(model: CLIPModel, hf_tiny) -> None:
    _, pixels, ids, ref = hf_tiny
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(ids)
        logits = model.logits(image, text)
    for name, ours in (("image", image), ("text", text), ("logits", logits)):
        assert (ours - ref[name]).abs().max().item() <= TOL, name


def test_save_load_round_trip_is_lossless(tmp_path):
    model = init_clip_(CLIPModel(tiny_config()), torch.Generator().manual_seed(0))
    save_clip(model, tmp_path / "c.safetensors")
    back = load_clip(tmp_path / "c.safetensors")
    assert back.clip_config == model.clip_config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert not any(p.requires_grad for p in back.parameters()) and not back.training
    half = load_clip(tmp_path / "c.safetensors", dtype=torch.bfloat16)  # read straight into the dtype
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    save_clip(model, tmp_path / "h.safetensors", dtype=torch.float16)
    assert read_clip(tmp_path / "h.safetensors").stored_dtypes == {"float16": len(model.state_dict())}


@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded"])
def test_transformers_folder_in_each_weight_layout(tmp_path, hf_tiny, layout):
    hf = hf_tiny[0]
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    if layout != "safetensors":
        (folder / "model.safetensors").unlink()
        sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if layout == "bin":  # read with torch.load(weights_only=True)
            torch.save(sd, folder / "pytorch_model.bin")
        else:
            keys = sorted(sd)
            shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
            for name, part in shards.items():
                save_file({k: sd[k] for k in part}, str(folder / name))
            index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_clip(folder)
    assert model.clip_config.text_encoder.activation == "quick_gelu"
    assert_same(model, hf_tiny)


def test_openclip_activation_rules(tmp_path, hf_tiny):
    """OpenCLIP state dicts cannot state their activation: GELU (OpenCLIP's default) unless OpenAI's marker
    entries are there (quick_gelu), or as the argument says; files that state it refuse the argument."""
    sd = to_openclip(hf_tiny[0].state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "oc.safetensors"))
    assert read_clip(tmp_path / "oc.safetensors").config.vision.activation == "gelu"
    told = load_clip(tmp_path / "oc.safetensors", activation="quick_gelu")
    assert told.clip_config.text_encoder.activation == told.clip_config.vision.activation == "quick_gelu"
    assert_same(told, hf_tiny)
    openai = {**sd, "input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
              "vocab_size": torch.tensor(49408)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in openai.items()}}, tmp_path / "openai.pt")  # DDP names
    model = load_clip(tmp_path / "openai.pt")
    assert model.clip_config.vision.activation == "quick_gelu"
    assert_same(model, hf_tiny)
    with pytest.raises(ValueError, match="activation 'relu'"):
        read_clip(tmp_path / "oc.safetensors", activation="relu")
    save_clip(model, tmp_path / "ours.safetensors")
    with pytest.raises(ValueError, match="states its activation"):
        load_clip(tmp_path / "ours.safetensors", activation="gelu")


def openai_module(sd: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree whose parameters carry OpenAI's names, with OpenAI's extra buffers and `attn_mask`
    attributes, as OpenAI's scripted CLIP has them."""

    class Node(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Node()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if part not in node._modules:
                node.add_module(part, Node())
            node = node._modules[part]
        node.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        if leaf == "in_proj_weight" and not key.startswith("visual."):
            root_block = node if path[-1] != "attn" else root.get_submodule(".".join(path[:-1]))
            root_block.attn_mask = torch.full((77, 77), float("-inf")).triu(1)
    for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(name, torch.tensor(value))
    return root


def test_openai_torchscript_archive_is_read_without_running_it(tmp_path, hf_tiny):
    sd = {k: v.half() for k, v in to_openclip(hf_tiny[0].state_dict()).items()}  # OpenAI ships fp16
    torch.jit.save(torch.jit.script(openai_module(sd)), tmp_path / "ViT-tiny.pt")
    with zipfile.ZipFile(tmp_path / "ViT-tiny.pt") as z:
        assert any(n.endswith("/constants.pkl") for n in z.namelist())  # a real TorchScript archive
    model = load_clip(tmp_path / "ViT-tiny.pt")
    assert model.clip_config.vision.activation == "quick_gelu"  # an OpenAI archive: OpenAI-trained
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ref = {k: v.float() for k, v in sd.items()}
    exact = load_clip_from_openclip(ref, tmp_path)
    for k, v in exact.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    info = describe_clip(tmp_path / "ViT-tiny.pt")
    assert info["format"] == "OpenAI TorchScript archive" and info["stored_dtypes"]["float16"] == len(sd)


def load_clip_from_openclip(sd: dict[str, torch.Tensor], tmp_path) -> CLIPModel:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "ref.safetensors"))
    return load_clip(tmp_path / "ref.safetensors", activation="quick_gelu")


class _Payload:
    """Unpickling this would run `exec`, which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _torchscript_zip(path, data_pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", data_pkl)
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil/version", "3\n")
        z.writestr("evil/code/__torch__.py", "")


def test_a_malicious_pickle_in_a_pt_is_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    _torchscript_zip(tmp_path / "archive.pt", pickle.dumps({"x": _Payload(marker)}, protocol=2))
    with pytest.raises(ValueError, match=r"refusing to load .*global __builtin__\.exec"):
        load_clip(tmp_path / "archive.pt")
    torch.save({"state_dict": {"x": _Payload(marker)}}, tmp_path / "plain.pt")  # a torch.save zip
    with pytest.raises(ValueError, match="refusing to load"):
        load_clip(tmp_path / "plain.pt")
    assert not marker.exists()


@pytest.mark.parametrize("body, what", [
    # an allowed global called with what it must not get; a TorchScript class called as a function
    (b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R.", "OrderedDict with arguments"),
    (b"\x80\x02c__torch__\nM\n)R.", "a call of __torch__.M"),
    # BUILD on something that is not an inert record (the allowed list builder function)
    (b"\x80\x02ctorch.jit._pickle\nbuild_intlist\n}b.", "setting the state of a function"),
])
def test_torchscript_reader_refuses_calls_and_builds_outside_its_list(tmp_path, body, what):
    _torchscript_zip(tmp_path / "a.pt", body)
    with pytest.raises(ValueError, match=f"refusing to load .*{what}"):
        load_clip(tmp_path / "a.pt")


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    """A tensor record whose shape needs more elements than its storage holds is refused (it would read
    other memory), not clamped."""
    module = openai_module({"logit_scale": torch.tensor(1.0), "visual.proj": torch.zeros(4, 2)})
    torch.jit.save(torch.jit.script(module), tmp_path / "ok.pt")
    with zipfile.ZipFile(tmp_path / "ok.pt") as z:
        entries = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in entries if n.endswith("/data.pkl"))
    size = b"(K\x04K\x02t"  # the size tuple (4, 2) of visual.proj, as TorchScript pickles it
    assert entries[name].count(size) == 1
    entries[name] = entries[name].replace(size, b"(K\x09K\x02t")  # 9 x 2 over a storage of 8 elements
    with zipfile.ZipFile(tmp_path / "bad.pt", "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    with pytest.raises(ValueError, match="reaching past its storage of 8 elements"):
        read_torchscript(tmp_path / "bad.pt")
    assert read_torchscript(tmp_path / "ok.pt")["visual.proj"].shape == (4, 2)


def test_what_is_not_a_clip_is_named(tmp_path, hf_tiny):
    with pytest.raises(FileNotFoundError, match="no such CLIP"):
        load_clip(tmp_path / "missing.safetensors")
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(2)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(ValueError, match="a diffusion model: open it with --model"):
        load_clip(tmp_path / "unet.safetensors")
    sd = to_openclip(hf_tiny[0].state_dict())
    save_file({**sd, "visual.layer1.0.conv1.weight": torch.zeros(1)}, str(tmp_path / "rn.safetensors"))
    with pytest.raises(ValueError, match="ResNet image tower"):
        load_clip(tmp_path / "rn.safetensors")
    ours = init_clip_(CLIPModel(tiny_config()))
    save_clip(ours, tmp_path / "c.safetensors")
    tensors = dict(read_clip(tmp_path / "c.safetensors").state_dict)
    tensors["visual_projection.weight"] = torch.zeros(32, 65)
    from daguerre.fileio import atomic_save_safetensors

    meta = {"daguerre_clip_config": ours.clip_config.to_json(), "format": "daguerre-clip"}
    atomic_save_safetensors(tensors, tmp_path / "bad.safetensors", meta)
    for read in (load_clip, describe_clip):  # info checks the shapes as loading does
        with pytest.raises(ValueError, match="visual_projection.weight is \\(32, 65\\)"):
            read(tmp_path / "bad.safetensors")


def test_registry_clip_names(tmp_path):
    assert clip_for_model("shapes") == "shapes-clip"
    assert clip_for_model("fashion") is None and clip_for_model(None) is None
    with pytest.raises(FileNotFoundError, match="nor a shipped CLIP"):
        open_clip("no-such-clip")
    model = init_clip_(CLIPModel(tiny_config()))
    save_clip(model, tmp_path / "c.safetensors")
    opened = open_clip(str(tmp_path / "c.safetensors"), dtype="bf16")
    assert opened.logit_scale.dtype == torch.bfloat16
    assert all(path.suffix == ".safetensors" and path.is_file() for path in shipped_clips().values())


def test_info_describes_a_clip(tmp_path, capsys):
    model = init_clip_(CLIPModel(tiny_config()))
    save_clip(model, tmp_path / "c.safetensors")
    assert main(["info", str(tmp_path / "c.safetensors"), "--no-hash"]) == 0
    out = capsys.readouterr().out
    assert "image tower:     ViT, 32 px in 8 px patches (16 patches), width 64, 2 layers" in out
    assert "joint space:     32-d" in out
    assert main(["info", str(tmp_path / "c.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert info["parameters"]["vision"] + info["parameters"]["text"] + 1 == info["parameters"]["total"]
    assert len(info["sha256"]) == 64


def test_a_shard_outside_the_folder_is_refused(tmp_path, hf_tiny):
    folder = tmp_path / "hf"
    hf_tiny[0].save_pretrained(folder)
    (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
    index = {"weight_map": {k: "../outside.safetensors" for k in hf_tiny[0].state_dict()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is not a file name in the folder"):
        load_clip(folder)
