"""`daguerre train embedding` (issue 20 point 4): textual inversion on a frozen model through the shared loop. On a
small SD 1.5-architecture model file: the word's vectors start as the init word's and train, nothing else moves;
the exported `emb_params` safetensors and A1111 `.pt` load with `--embeddings-dir` and give the prompt the
contexts it trained with."""

from __future__ import annotations

import shutil

import pytest
import torch

from daguerre.checkpoints.single_file import save_model
from daguerre.lora.apply import attach
from daguerre.lora.embeddings import read_embedding
from daguerre.pipelines.common import encode_prompts
from daguerre.registry import open_model
from daguerre.training.config import load_run_config
from daguerre.training.embedding import A1111_DIR, EmbeddingStage, init_vectors
from daguerre.training.loop import run
from lora_oracle import daguerre_components, reference_models
from test_train_lora import write_folder


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    unet, text = reference_models("sd15")
    path = tmp_path_factory.mktemp("model") / "small-sd15.safetensors"
    save_model(daguerre_components("sd15", unet, text), path, dtype=torch.float32)
    return path


def embedding_config(model, data, *overrides):
    return load_run_config(None, "embedding", [
        f"train.init_from={model}", "data.kind=folder", f"data.folder.root={data}", "data.size=16",
        "data.holdout=0", "train.steps=3", "train.batch_size=2", "train.lr=0.05", "train.warmup_steps=0",
        "train.ema_decay=0", "train.progress=false", "train.save_dtype=float32", "train.checkpoint_every=0",
        "sample.prompts=['a sks']", "sample.seeds_per_prompt=1", "sample.steps=2", "embedding.word=sks",
        "embedding.init_word=photo", "embedding.vectors=2", *overrides])


@pytest.fixture(scope="module")
def trained(model_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = embedding_config(model_file, write_folder(tmp / "data"))
    stage = EmbeddingStage(cfg)
    return stage, run(stage, cfg, tmp / "run"), model_file


def test_vectors_start_as_the_init_word_and_cycle(model_file):
    comps, _ = open_model(str(model_file), dtype=torch.float32)
    ids = comps.tokenizer.encode("photo")
    table = comps.text_encoder.text_model.embeddings.token_embedding.weight
    v = init_vectors(comps, "photo", 3)
    assert v.shape == (3, 768)
    assert all(torch.equal(v[i], table[ids[i % len(ids)]]) for i in range(3))


def test_exported_files_load_and_give_the_trained_contexts(trained, tmp_path):
    stage, path, model = trained
    assert path.name == "sks.safetensors"
    trained_vectors = stage.adapter.vectors.detach()
    assert not torch.equal(trained_vectors, init_vectors(stage.components, "photo", 2))  # it trained
    prompts = ["a photo of a red sks", "a sks on a white background"]
    with torch.no_grad():
        trained_context = stage.contexts(prompts)
    for source in (path, path.parent / A1111_DIR / "sks.pt"):
        e = read_embedding(source)
        assert torch.allclose(e.vectors, trained_vectors)
        folder = tmp_path / source.suffix.lstrip(".")
        folder.mkdir()
        shutil.copy(source, folder / source.name)
        comps, _ = open_model(str(model), dtype=torch.float32)
        attach(comps, embeddings_dir=folder)
        with torch.no_grad():
            assert torch.allclose(encode_prompts(comps, prompts), trained_context, atol=1e-5)
    assert read_embedding(path.parent / A1111_DIR / "sks.pt").step == 3


def test_only_the_vectors_train(trained):
    stage, _, model = trained
    base, _ = open_model(str(model), dtype=torch.float32)
    for part in ("unet", "text_encoder"):
        mine, ref = getattr(stage.components, part).state_dict(), getattr(base, part).state_dict()
        assert all(torch.equal(mine[k], ref[k]) for k in ref), part
    assert [n for n, _ in stage.adapter.named_parameters()] == ["vectors"]


def test_a_word_the_captions_lack_is_a_clear_error(model_file, tmp_path):
    cfg = embedding_config(model_file, write_folder(tmp_path / "data"), "embedding.word=hexagon")
    with pytest.raises(ValueError, match="none of the training captions"):
        run(EmbeddingStage(cfg), cfg, tmp_path / "run")
    with pytest.raises(ValueError, match="embedding.word"):
        EmbeddingStage(load_run_config(None, "embedding", [f"train.init_from={model_file}"]))
    with pytest.raises(ValueError, match="embedding.word"):
        load_run_config(None, "embedding", [f"train.init_from={model_file}", "embedding.word='a b'"])
    with pytest.raises(ValueError, match="embedding.vectors"):
        load_run_config(None, "embedding", [f"train.init_from={model_file}", "embedding.word=x",
                                            "embedding.vectors=0"])
