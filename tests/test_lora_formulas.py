"""LoRA, LoCon, LoHa and LoKr deltas against their published formulas on random tensors, the errors of files that
do not fit, and merging as a model uses it: switching LoRAs, a LoRA with a part read again (one-shot runs),
several at once, prompt tags, --lora, the PNG parameters (daguerre.lora)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import daguerre
from daguerre.lora.formats import LoraLayer, group_layers, read_lora
from daguerre.lora.syntax import LoraRef, a1111_hash, parse_lora_arg, prompt_loras, request_loras, strip_tags

GEN = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=GEN)


def test_lora_linear_equals_running_down_then_up():
    w, down, up = randn(12, 10), randn(4, 10), randn(12, 4)
    layer = LoraLayer("l", {"down": down, "up": up, "alpha": torch.tensor(2.0)})
    x = randn(3, 10)
    expected = x @ w.T + (x @ down.T @ up.T) * (2.0 / 4)  # kohya's LoRAModule.forward, multiplier 1
    assert torch.allclose(x @ (w + layer.delta(w.shape)).T, expected, atol=1e-5)


def test_locon_3x3_equals_running_the_two_convolutions():
    w, down, up = randn(8, 6, 3, 3), randn(4, 6, 3, 3), randn(8, 4, 1, 1)
    layer = LoraLayer("c", {"down": down, "up": up, "alpha": torch.tensor(1.0)})
    x = randn(2, 6, 9, 9)
    expected = F.conv2d(x, w, padding=1) + F.conv2d(F.conv2d(x, down, padding=1), up) * (1.0 / 4)
    assert torch.allclose(F.conv2d(x, w + layer.delta(w.shape), padding=1), expected, atol=1e-4)


def test_locon_tucker_equals_down_mid_up():
    w, down, mid, up = randn(8, 6, 3, 3), randn(4, 6, 1, 1), randn(4, 4, 3, 3), randn(8, 4, 1, 1)
    layer = LoraLayer("c", {"down": down, "mid": mid, "up": up, "alpha": torch.tensor(8.0)})
    x = randn(2, 6, 9, 9)
    expected = F.conv2d(x, w, padding=1) + F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * 2.0
    assert torch.allclose(F.conv2d(x, w + layer.delta(w.shape), padding=1), expected, atol=1e-4)


def test_loha_is_the_hadamard_product_of_two_low_rank_products():
    w1a, w1b, w2a, w2b = randn(12, 4), randn(4, 10), randn(12, 4), randn(4, 10)
    layer = LoraLayer("h", {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                            "alpha": torch.tensor(1.0)})
    expected = (w1a @ w1b) * (w2a @ w2b) / 4  # FedPara / LyCORIS: (w1a w1b) . (w2a w2b) * alpha / rank
    assert torch.allclose(layer.delta(torch.Size([12, 10])), expected, atol=1e-5)
    conv = {k: (v.reshape(4, 10 // 10 * 10) if k.endswith("_b") else v) for k, v in layer.tensors.items()}
    conv["hada_w1_b"], conv["hada_w2_b"] = randn(4, 2 * 9), randn(4, 2 * 9)
    conv_layer = LoraLayer("hc", conv)
    expected = ((w1a @ conv["hada_w1_b"]) * (w2a @ conv["hada_w2_b"]) / 4).reshape(12, 2, 3, 3)
    assert torch.allclose(conv_layer.delta(torch.Size([12, 2, 3, 3])), expected, atol=1e-5)


def test_loha_tucker_factors():
    r, out, inp = 3, 8, 5
    t1, t2 = randn(r, r, 3, 3), randn(r, r, 3, 3)
    w1a, w1b, w2a, w2b = randn(r, out), randn(r, inp), randn(r, out), randn(r, inp)
    layer = LoraLayer("t", {"hada_t1": t1, "hada_t2": t2, "hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a,
                            "hada_w2_b": w2b})

    def rebuild(t, wa, wb):  # LyCORIS: einsum("i j k l, j r, i p -> p r k l"), written per kernel position
        out_ = torch.zeros(out, inp, 3, 3)
        for k in range(3):
            for m in range(3):
                out_[:, :, k, m] = wa.T @ t[:, :, k, m] @ wb
        return out_

    expected = rebuild(t1, w1a, w1b) * rebuild(t2, w2a, w2b)  # no alpha: scale 1
    assert torch.allclose(layer.delta(torch.Size([out, inp, 3, 3])), expected, atol=1e-4)


def test_lokr_is_a_kronecker_product():
    w1, w2a, w2b = randn(2, 3), randn(4, 2), randn(2, 5)
    layer = LoraLayer("k", {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)})
    w2 = w2a @ w2b
    expected = torch.zeros(8, 15)
    for i in range(2):
        for j in range(3):
            expected[i * 4:(i + 1) * 4, j * 5:(j + 1) * 5] = w1[i, j] * w2 / 2  # alpha / rank of w2's factors
    assert torch.allclose(layer.delta(torch.Size([8, 15])), expected, atol=1e-5)
    full = LoraLayer("kf", {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)})  # no factors: scale 1
    assert torch.allclose(full.delta(torch.Size([8, 15])), expected * 2, atol=1e-5)


def test_lokr_convolution_with_tucker_w2():
    w1a, w1b = randn(2, 1), randn(1, 3)
    t2, w2a, w2b = randn(2, 2, 3, 3), randn(2, 4), randn(2, 5)
    layer = LoraLayer("kc", {"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_t2": t2, "lokr_w2_a": w2a, "lokr_w2_b": w2b})
    w1 = w1a @ w1b
    w2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
    expected = torch.zeros(8, 15, 3, 3)
    for i in range(2):
        for j in range(3):
            expected[i * 4:(i + 1) * 4, j * 5:(j + 1) * 5] = w1[i, j] * w2
    assert torch.allclose(layer.delta(torch.Size([8, 15, 3, 3])), expected, atol=1e-5)


def test_lycoris_full_is_the_stored_difference():
    diff = randn(8, 6, 3, 3)
    assert torch.equal(LoraLayer("f", {"diff": diff, "alpha": torch.tensor(3.0)}).delta(diff.shape), diff)
    with pytest.raises(ValueError, match="does not fit"):
        LoraLayer("f", {"diff": randn(8, 6)}).delta(torch.Size([8, 6, 3, 3]))


@pytest.mark.parametrize("tensors, message", [
    ({"down": randn(4, 10), "up": randn(13, 4)}, "does not fit the layer's weight"),
    ({"down": randn(40, 10), "up": randn(12, 40)}, "rank 40"),
    ({"down": randn(4, 10)}, "no up tensor"),
    ({"hada_w1_a": randn(12, 2), "hada_w1_b": randn(2, 10), "hada_w2_a": randn(12, 2), "hada_w2_b": randn(2, 11)},
     "does not fit"),
    ({"lokr_w1": randn(3, 3), "lokr_w2": randn(4, 4)}, "does not fit"),
    ({"down": randn(4, 10), "up": randn(12, 4), "alpha": torch.tensor([1.0, 2.0])}, "alpha must be one"),
])
def test_tensors_that_do_not_fit_the_layer_are_named(tensors, message):
    with pytest.raises(ValueError, match=message):
        LoraLayer("lora_unet_x", tensors).delta(torch.Size([12, 10]))


def test_keys_of_other_kinds_are_refused_by_name():
    with pytest.raises(ValueError, match="DoRA"):
        group_layers({"lora_unet_x.lora_down.weight": randn(2, 2), "lora_unet_x.dora_scale": randn(2)}, "f")
    with pytest.raises(ValueError, match="model.diffusion_model.x.weight: not a LoRA tensor"):
        group_layers({"model.diffusion_model.x.weight": randn(2, 2)}, "f")


def test_prompt_tags_and_lora_arguments():
    refs = prompt_loras("a cat <lora:detail:0.5>, <lora:style> <lora:both:0.3:0.9> <lyco:x:te=0.2:unet=0.4>")
    assert refs == [LoraRef("detail", 0.5, 0.5, True), LoraRef("style", 1.0, 1.0, True),
                    LoraRef("both", 0.3, 0.9, True), LoraRef("x", 0.2, 0.4, True)]
    assert strip_tags("a cat <lora:detail:0.5>, dog") == "a cat , dog"
    assert parse_lora_arg("dir/my.lora.safetensors:0.25") == LoraRef("dir/my.lora.safetensors", 0.25, 0.25)
    assert parse_lora_arg("C:\\loras\\x.safetensors") == LoraRef("C:\\loras\\x.safetensors", 1.0, 1.0)
    assert parse_lora_arg(("x.pt", 2)) == LoraRef("x.pt", 2.0, 2.0)
    for bad, message in (("<lora:../etc/x:1>", "without a path"), ("<lora:x:nan>", "finite"),
                         ("<lora:x:1e9>", "finite"), ("<lora:x:abc>", "not a number")):
        with pytest.raises(ValueError, match=message):
            prompt_loras(bad)
    with pytest.raises(ValueError, match="negative prompt"):
        request_loras("a", "<lora:x:1>", None)
    with pytest.raises(ValueError, match="more than 16"):
        request_loras(" ".join(f"<lora:x{i}>" for i in range(17)), "", None)


# --- merged into a model ----------------------------------------------------------------------------

def tiny_lora(pipe, seed: int, scale: float = 0.3, text: bool = True) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA of every layer of a tiny model's U-Net attention and convolutions and text encoder."""
    from daguerre.lora.targets import target_table

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, target in target_table(pipe.components).items():
        if not name.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_te_text_model")):
            continue
        if target.part == "text_encoder" and not text:
            continue
        root = pipe.components.unet if target.part == "unet" else pipe.components.text_encoder
        w = root.get_submodule(target.module).weight
        k = tuple(w.shape[2:])
        sd[f"{name}.lora_down.weight"] = torch.randn(2, w.shape[1], *k, generator=gen) * scale
        sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 2, *((1, 1) if k else ()), generator=gen) * scale
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    return sd


@pytest.fixture()
def tiny(tmp_path):
    pipe = daguerre.load("random:tiny", dtype="fp32", lora_dir=tmp_path)
    save_file(tiny_lora(pipe, 1), str(tmp_path / "one.safetensors"))
    save_file(tiny_lora(pipe, 2, text=False), str(tmp_path / "two.safetensors"))
    return pipe, tmp_path


def weights(pipe):
    return {k: v.clone() for m in (pipe.components.unet, pipe.components.text_encoder)
            for k, v in m.state_dict().items()}


def test_switching_loras_restores_the_loaded_weights_exactly(tiny):
    pipe, folder = tiny
    original = weights(pipe)
    plain = pipe("a red circle", steps=2, seed=3)[0]
    one = pipe("a red circle <lora:one:0.8>", steps=2, seed=3)[0]
    assert "Lora hashes: \"one: " + a1111_hash(folder / "one.safetensors")[:12] in one.parameters
    assert "<lora:one:0.8>" in one.parameters.splitlines()[0]
    merged_one = weights(pipe)
    both = pipe("a red circle <lora:one:0.8> <lora:two:-0.5>", steps=2, seed=3)[0]
    again = pipe("a red circle", steps=2, seed=3)[0]
    assert all(torch.equal(original[k], v) for k, v in weights(pipe).items())
    assert list(again.image.getdata()) == list(plain.image.getdata())
    assert list(one.image.getdata()) != list(plain.image.getdata())
    assert list(both.image.getdata()) != list(one.image.getdata())
    # the same weights again from the file
    pipe("a red circle <lora:one:0.8>", steps=2, seed=3)
    assert all(torch.equal(merged_one[k], v) for k, v in weights(pipe).items())


def test_a_new_compute_dtype_takes_the_merged_loras_out_first(tiny):
    from daguerre.api import set_compute_dtype

    pipe, _ = tiny
    original = weights(pipe)
    pipe("a red circle <lora:one>", steps=1)
    set_compute_dtype(pipe.components, "bf16")
    assert all(torch.equal(v, original[k].bfloat16()) for k, v in weights(pipe).items())
    pipe("a red circle <lora:one>", steps=1)  # merged again, into bf16 weights
    assert {v.dtype for v in weights(pipe).values() if v.is_floating_point()} == {torch.bfloat16}
    set_compute_dtype(pipe.components, "fp32")


def test_several_loras_add_their_weighted_deltas(tiny):
    pipe, folder = tiny
    original = weights(pipe)
    pipe.components.adapters.set(pipe.components, (LoraRef("one", 0.8, 0.8, True),))
    d1 = {k: v - original[k] for k, v in weights(pipe).items()}
    pipe.components.adapters.set(pipe.components, (LoraRef("two", 1.0, 1.0, True),))
    d2 = {k: v - original[k] for k, v in weights(pipe).items()}
    pipe.components.adapters.set(pipe.components, (LoraRef("one", 0.8, 0.8, True), LoraRef("two", 1.0, 1.0, True)))
    for k, v in weights(pipe).items():
        assert torch.allclose(v, original[k] + d1[k] + d2[k], atol=1e-6), k
    # separate text-encoder and U-Net weights: the text encoder takes the first
    pipe.components.adapters.set(pipe.components, (LoraRef("one", 0.8, 0.0, True),))
    for k, v in pipe.components.unet.state_dict().items():
        assert torch.equal(v, original[k])
    assert any(not torch.equal(v, original[k]) for k, v in pipe.components.text_encoder.state_dict().items())


def test_a_lora_of_another_model_is_a_clear_error_and_changes_nothing(tiny):
    pipe, folder = tiny
    original = weights(pipe)
    sd = tiny_lora(pipe, 3)
    sd["lora_unet_input_blocks_99_1_proj_in.lora_down.weight"] = torch.randn(2, 4)
    sd["lora_unet_input_blocks_99_1_proj_in.lora_up.weight"] = torch.randn(4, 2)
    save_file(sd, str(folder / "other.safetensors"))
    with pytest.raises(ValueError, match="1 of its .* layers match no layer .*lora_unet_input_blocks_99_1_proj_in"):
        pipe("a red circle <lora:other>", steps=1)
    wrong = {k: torch.randn(v.shape[0], v.shape[1] + 1) if k.endswith("lora_down.weight") and v.dim() == 2 else v
             for k, v in tiny_lora(pipe, 4).items()}
    save_file(wrong, str(folder / "wrong.safetensors"))
    with pytest.raises(ValueError, match="does not fit the layer's weight"):
        pipe("a red circle <lora:one> <lora:wrong>", steps=1)
    assert all(torch.equal(original[k], v) for k, v in weights(pipe).items())
    with pytest.raises(FileNotFoundError, match="no LoRA 'missing' in LoRA folder .* one, other, two, wrong"):
        pipe("a red circle <lora:missing>", steps=1)


def test_loras_are_merged_again_into_parts_read_again(tmp_path):
    """A one-shot run (release_after_use) reads each network from the file when it needs it: the LoRA is merged
    into what is read, and the image equals the one of the model kept loaded."""
    from daguerre.checkpoints import save_model

    kept = daguerre.load("random:tiny", dtype="fp32")
    save_model(kept.components, tmp_path / "tiny.safetensors")
    save_file(tiny_lora(kept, 1), str(tmp_path / "one.safetensors"))
    kept = daguerre.load(str(tmp_path / "tiny.safetensors"), dtype="fp32")
    lora = [f"{tmp_path / 'one.safetensors'}:0.7"]
    expected = kept("a blue square", steps=2, seed=5, loras=lora)[0]
    oneshot = daguerre.load(str(tmp_path / "tiny.safetensors"), dtype="fp32", release_after_use=True)
    got = oneshot("a blue square", steps=2, seed=5, loras=lora)[0]
    assert list(got.image.getdata()) == list(expected.image.getdata())
    assert "<lora:one:0.7>" in got.parameters.splitlines()[0]  # --lora written as A1111's tag
    plain = oneshot("a blue square", steps=2, seed=5)[0]
    assert list(plain.image.getdata()) == list(kept("a blue square", steps=2, seed=5)[0].image.getdata())


def test_int8_weights_refuse_loras(tiny):
    _, folder = tiny
    pipe = daguerre.load("random:tiny", dtype="fp32", quantize="int8", lora_dir=folder)
    with pytest.raises(ValueError, match="int8"):
        pipe("a red circle <lora:one>", steps=1)


def test_read_lora_refuses_other_files(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="a LoRA file is"):
        read_lora(tmp_path / "x.txt")
    save_file({"a.weight": torch.zeros(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA tensor"):
        read_lora(tmp_path / "y.safetensors")


def test_files_larger_than_any_lora_or_embedding_are_refused_unread(tmp_path):
    from daguerre.lora.embeddings import MAX_EMBEDDING_BYTES, read_embedding
    from daguerre.lora.formats import MAX_FILE_BYTES

    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:  # sparse: nothing written
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ValueError, match="larger than any LoRA"):
        read_lora(big)
    emb = tmp_path / "word.pt"
    with open(emb, "wb") as f:
        f.truncate(MAX_EMBEDDING_BYTES + 1)
    with pytest.raises(ValueError, match="larger than any embedding"):
        read_embedding(emb)


def test_clip_guidance_reads_the_prompt_without_its_lora_tags():
    from daguerre.config import clip_preset
    from daguerre.models.clip import CLIPModel
    from daguerre.pipelines.common import text_embedding

    clip = CLIPModel(clip_preset("tiny")).eval()
    tagged = text_embedding(clip, "a red <lora:one:0.8>circle")
    assert torch.equal(tagged, text_embedding(clip, "a red circle"))
    assert not torch.equal(tagged, text_embedding(clip, "a red lora one circle"))


def test_a_pickled_lora_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    """A .pt LoRA is read by the restricted unpickler: a global that is not a tensor building block is refused."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": Evil()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        read_lora(path)
    assert not marker.exists()
