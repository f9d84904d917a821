"""The photos recipe (issue 17): `--config photos32` names the config of the stage being trained, `--data FOLDER`
points any run at an image folder, and both stages run end to end on a folder of photos."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daguerre.cli import main
from daguerre.commands.train import resume_command
from daguerre.training.config import load_run_config, resolve_config

QUICK = ["--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.sample_every=0",
         "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", "data.holdout=4",
         "--set", "sample.latent_scale_images=4", "--set", "sample.recon_images=2", "--set", "train.progress=false"]


def _photos(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for name, colour in (("cat", (200, 120, 40)), ("ship", (40, 80, 200))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(colour, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg")
    return root


@pytest.mark.parametrize("recipe", ["photos32", "photos64"])
def test_a_recipe_name_means_the_config_of_each_stage(recipe):
    for stage in ("vae", "ldm"):
        assert resolve_config(recipe, stage).name == f"{recipe}_{stage}.toml"
        cfg = load_run_config(recipe, stage, ["data.folder.root=photos"])
        assert cfg.stage == stage and cfg.data.kind == "folder" and cfg.data.folder.root == "photos"
        assert cfg.data.size == int(recipe[-2:])
    assert resolve_config("photos32_vae", "ldm").name == "photos32_vae.toml"  # a full name is taken as it is
    with pytest.raises(FileNotFoundError, match="no such run config"):
        resolve_config("photos32", None)  # no stage: the name alone is not a config


def test_both_stages_share_the_latent_shape():
    """photos64's autoencoder down-samples once more, so both recipes' U-Nets see 16x16x4 latents."""
    for recipe in ("photos32", "photos64"):
        vae = load_run_config(recipe, "vae", ["data.folder.root=x"])
        assert vae.data.size // 2 ** (len(vae.model.vae.channel_mult) - 1) == 16
        assert vae.model.vae.latent_channels == 4


def test_train_with_data_and_a_recipe_name_writes_its_default_run_folders(tmp_path, monkeypatch, capsys):
    photos = _photos(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "vae", "--config", "photos32", "--data", "photos", *QUICK]) == 0
    vae = tmp_path / "runs" / "photos32_vae" / "vae.safetensors"
    assert vae.is_file()
    assert main(["train", "ldm", "--config", "photos32", "--data", str(photos), "--vae", str(vae), *QUICK,
                 "--set", "model.text_encoder.kind=clip", "--set", "model.text_encoder.width=32",
                 "--set", "model.text_encoder.layers=1", "--set", "model.text_encoder.heads=2",
                 "--set", "model.text_encoder.mlp_dim=64", "--set", "loss.train_text_encoder=true",
                 "--set", "model.text_encoder.max_length=77",
                 "--set", "model.unet.model_channels=32", "--set", "model.unet.attention_levels=[2]"]) == 0
    assert (tmp_path / "runs" / "photos32_ldm" / "model.safetensors").is_file()
    config = (tmp_path / "runs" / "photos32_ldm" / "config.json").read_text()
    assert str(photos) in config


def test_data_flag_refuses_a_missing_folder_in_one_line(tmp_path, capsys):
    assert main(["train", "vae", "--config", "photos32", "--data", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0] and "nope" in err[0]
    assert not (tmp_path / "run").exists()


def test_the_resume_command_repeats_data(tmp_path):
    import argparse

    args = argparse.Namespace(stage="vae", config="photos32", data="photos", overrides=["train.lr=1e-4"], until=None,
                              init=None, vae=None)
    command = resume_command(args, tmp_path / "run")
    assert "--config photos32 --data photos" in command and command.endswith("--resume")


def test_a_trained_text_encoder_must_read_77_token_windows():
    """A jointly trained CLIP-style encoder with another max_length failed only at the first sample grid."""
    sets = ["data.folder.root=x", "model.text_encoder.kind=clip", "loss.train_text_encoder=true"]
    with pytest.raises(ValueError, match="model.text_encoder.max_length: .*77-token windows.*got 32"):
        load_run_config("photos32", "ldm", sets)
    assert load_run_config("photos32", "ldm", [*sets, "model.text_encoder.max_length=77"]).model.text_encoder
