"""Textual-inversion embeddings (daguerre.lora.embeddings) against diffusers' `load_textual_inversion`: files in the
AUTOMATIC1111 `.pt` (string_to_param), `emb_params` and diffusers learned_embeds structures, one and several
vectors, at SD 1.x's 768 and SD 2.x's 1024 widths, give the same prompt embeddings."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from clip_oracle import hf_clip_tokenizer
from daguerre.lora.apply import attach
from daguerre.lora.embeddings import MAX_VECTORS, load_embeddings, read_embedding
from daguerre.pipelines.common import encode_prompts
from lora_oracle import daguerre_components, reference_models

pytest.importorskip("diffusers")


def write_embedding(folder, fmt: str, name: str, vectors: torch.Tensor):
    """An embedding file as the tools that make each format write it; its stem is `name`."""
    if fmt == "a1111":  # AUTOMATIC1111's textual_inversion.py save()
        path = folder / f"{name}.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_()},
                    "name": name, "step": 1500, "sd_checkpoint": "6ce0161689",
                    "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path)
    elif fmt == "emb_params":
        path = folder / f"{name}.safetensors"
        save_file({"emb_params": vectors}, str(path))
    else:  # diffusers' textual_inversion.py: {placeholder token: vectors}
        path = folder / f"{name}.safetensors"
        save_file({"<cat-toy>": vectors[0] if len(vectors) == 1 else vectors}, str(path))
    return path


def reference_pipe(model, unet, text):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    vae = AutoencoderKL(block_out_channels=[32], latent_channels=4, down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"])
    tok = hf_clip_tokenizer() if model == "sd15" else hf_clip_tokenizer("!")
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def models(request):
    model = request.param
    unet, text = reference_models(model)
    return model, daguerre_components(model, unet, text), reference_pipe(model, unet, text)


@pytest.mark.parametrize("fmt", ["a1111", "emb_params", "diffusers"])
@pytest.mark.parametrize("n", [1, 3])
def test_prompt_embeddings_equal_diffusers_load_textual_inversion(models, fmt, n, tmp_path):
    model, comps, pipe = models
    width = comps.config.text_encoder.width
    assert width == {"sd15": 768, "sd21": 1024}[model]
    name = f"mystyle{fmt.replace('_', '')}{n}"
    vectors = torch.randn(n, width, generator=torch.Generator().manual_seed(n)) * 0.3
    path = write_embedding(tmp_path, fmt, name, vectors)
    state = read_embedding(path)
    assert torch.equal(state.vectors, vectors)
    attach(comps, embeddings_dir=tmp_path)
    pipe.load_textual_inversion({"emb_params": vectors}, token=name)
    try:
        for prompt in (f"a photo of {name}, watercolor", f"{name} in the style of {name}"):
            ref = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            mine = encode_prompts(comps, [prompt])
            assert torch.allclose(mine, ref, atol=1e-5, rtol=0), prompt
        plain = encode_prompts(comps, ["a photo of a cat"])
        assert torch.allclose(plain, pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0], atol=1e-5)
    finally:
        pipe.unload_textual_inversion()
        comps.adapters = None


def test_embeddings_of_another_width_are_skipped_and_bad_files_left_out(tmp_path, caplog):
    from daguerre.config import preset

    cfg = preset("sd15").text_encoder
    write_embedding(tmp_path, "a1111", "fits", torch.randn(2, 768))
    write_embedding(tmp_path, "emb_params", "sd2only", torch.randn(1, 1024))
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    save_file({"a": torch.randn(768), "b": torch.randn(768)}, str(tmp_path / "two.safetensors"))
    save_file({"emb_params": torch.randn(MAX_VECTORS + 1, 768)}, str(tmp_path / "long.safetensors"))
    table = load_embeddings(tmp_path, cfg)
    assert set(table.loaded) == {"fits"} and set(table.skipped) == {"sd2only"}
    assert table.loaded["fits"].info() == {"step": 1500, "sd_checkpoint": "6ce0161689",
                                           "sd_checkpoint_name": "v1-5-pruned-emaonly", "shape": 768, "vectors": 2}
    assert table.skipped["sd2only"].info()["shape"] == 1024
    logged = caplog.text
    assert "broken.pt" in logged and "two.safetensors" in logged and "long.safetensors" in logged


def test_a_pickled_embedding_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Evil()}}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        read_embedding(path)
