"""Run configs of `daguerre train`: TOML + typed `--set` overrides, one clear error per bad key or value,
fields derived from the data, and the JSON round trip stored in checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daguerre.cli import main
from daguerre.config import parse_overrides
from daguerre.training.config import (
    LDMLossConfig,
    RunConfig,
    VAELossConfig,
    derive_model_config,
    load_run_config,
    shipped_configs,
    to_jsonable,
)

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"  # the shipped run configs


@pytest.mark.parametrize("name", ["tiny_vae", "tiny_ldm", "shapes_vae", "shapes_ldm", "fashion_vae", "fashion_ldm"])
def test_shipped_configs_load(name):
    stage = name.rsplit("_", 1)[1]
    cfg = load_run_config(CONFIGS / f"{name}.toml", stage)
    assert isinstance(cfg.loss, VAELossConfig if stage == "vae" else LDMLossConfig)
    assert cfg.stage == stage


def test_overrides_are_typed_by_the_dataclass_field():
    cfg = load_run_config(CONFIGS / "tiny_vae.toml", "vae", [
        "train.lr=2e-4", "train.steps=7", "train.bf16=true", "data.n=99", "model.vae.channel_mult=1,2,2",
        "train.betas=[0.8, 0.95]", "loss.perceptual=ssim", "model.unet.num_heads=none",
    ])
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and cfg.train.bf16 is True
    assert cfg.data.shapes.n == 99  # the previous release's flat key, read into [data.shapes]
    assert cfg.model.vae.channel_mult == (1, 2, 2)
    assert cfg.train.betas == (0.8, 0.95)
    assert cfg.loss.perceptual == "ssim"
    assert cfg.model.unet.num_heads is None


def test_shipped_configs_are_package_data_named_by_name_and_listed(capsys):
    """The example configs ship inside the package (pyproject's package-data puts them in the wheel), so an
    installed daguerre runs `--config shapes_vae`; a path still works; an unknown name lists the known ones."""
    import fnmatch

    import tomllib

    import daguerre

    package = Path(daguerre.__file__).parent
    patterns = tomllib.loads((package.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["daguerre"]
    shipped = shipped_configs()
    assert set(shipped) == {p.stem for p in CONFIGS.glob("*.toml")} and len(shipped) >= 12
    for name, path in shipped.items():
        inside = path.resolve().relative_to(package.resolve()).as_posix()
        assert any(fnmatch.fnmatch(inside, pat) for pat in patterns), inside
        stage = next((s for s in ("vae", "clip", "lora", "embedding") if name.endswith(f"_{s}")), "ldm")
        sets = ["data.folder.root=photos"] if name.startswith("photos") else []  # a recipe for the user's folder
        assert load_run_config(name, stage, sets) == load_run_config(path, stage, sets)
    with pytest.raises(FileNotFoundError, match=r"'shapes_vea' is neither .* did you mean 'shapes_vae'\?.*tiny_ldm"):
        load_run_config("shapes_vea", "vae")
    with pytest.raises(FileNotFoundError, match="the shipped config of that name is --config shapes_vae"):
        load_run_config("configs/shapes_vae.toml", "vae")  # the README's old form, outside a checkout
    assert main(["train", "--list-configs"]) == 0
    listing = capsys.readouterr().out
    for name in shipped:
        assert f"  {name} " in listing
    assert "tiny_vae             vae " in listing and "shapes_ldm           ldm " in listing
    assert main(["train"]) == 2 and "--list-configs" in capsys.readouterr().err


def test_parse_overrides_nests_sections():
    assert parse_overrides(["a.b.c=1", "a.d='x'"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["train.lr"])


@pytest.mark.parametrize("override, message", [
    (["train.lrr=1e-4"], r"unknown config key train\.lrr; did you mean 'lr'\?"),
    (["train.steps=many"], r"config key train\.steps: expected a whole number, got 'many'"),
    (["train.bf16=maybe"], r"config key train\.bf16: expected true or false"),
    (["data.kind=imagenet"], r"config key data\.kind: 'imagenet' is not one of"),
    (["train.decay=linear"], r"config key train\.decay: 'linear' is not one of cosine, constant"),
    (["loss.rec=l3"], r"config key loss\.rec: 'l3' is not one of l1, l2"),
    (["data.on_error=ignore"], r"config key data\.on_error: 'ignore' is not one of skip, raise"),
    (["model.unet.channel_mult=[1, 'x']"], r"config key model\.unet\.channel_mult\[1\]"),
    (["train.ema_decay=1.5"], r"config key train\.ema_decay"),
    (["model.preset=sd99"], r"config key model\.preset: unknown preset"),
    (["bogus.key=1"], r"unknown config key bogus"),
    (["data.kind='folder'"], r"config key data\.folder\.root"),
    (["data.p_relation=1.5"], r"config key data\.shapes\.p_relation"),
    (["data.shapes.min_objects=3", "data.max_objects=2"], r"data\.shapes\.min_objects, data\.shapes\.max_objects"),
    (["data.folder.crop='random'"], r"config key data\.folder: a \[data\.folder\] section, but data\.kind is 'shapes'"),
    (["data.split='test'"], r"data\.split: 'test' is a key of \[data\.fashion_mnist\] split, but data\.kind"),
    (["data.lowres_noise=5"], r"data\.lowres_noise: 5 is a key of \[data\.lowres\] noise, but model\.concat"),
    (["data.kind='folder'", "data.folder.crop='middle'", "data.root=/x"], r"data\.folder\.crop: 'middle' is not one"),
    (["data.shapes=3"], r"config key data\.shapes: 3 is not a table; \[data\.shapes\] is a section"),
    # a malformed --set value is an error naming key and value, never read as something else ([1, -> [1])
    (["model.vae.channel_mult=[1,"], r"--set model\.vae\.channel_mult=\[1,: not a valid TOML value"),
    (["model.vae.channel_mult=[1, 2"], r"--set model\.vae\.channel_mult=\[1, 2: not a valid TOML value"),
    (["data.root='/x"], r"--set data\.root='/x: not a valid TOML value"),
    (["data.root=\"/x"], r"--set data\.root=\"/x: not a valid TOML value"),
    (["train.betas={a = 1"], r"--set train\.betas=\{a = 1: not a valid TOML value"),
    (["model.vae.channel_mult=1,,2"], r"config key model\.vae\.channel_mult: '1,,2' has an empty item"),
    (["model.vae.channel_mult=1,2,"], r"config key model\.vae\.channel_mult: '1,2,' has an empty item"),
    (["model.vae.channel_mult=(1,2)"], r"config key model\.vae\.channel_mult\[0\]: expected a whole number, got '\(1'"),
    (["train.lr=nan"], r"config key train\.lr: expected a finite number, got nan"),
    (["train.lr=2e-4x"], r"config key train\.lr: expected a number, got '2e-4x'"),
    # absurd architecture values in a run config: refused like those of a checkpoint's config
    (["model.unet.model_channels=100000"], r"config key model\.unet\.model_channels: 100000 is out of range"),
    (["model.vae.channel_mult=[1, 2, 4, 8, 16, 32, 64, 64, 64]"], r"model\.vae\.channel_mult: .* 1 to 8 levels"),
    (["data.size=100000"], r"config key data\.size: 100000 pixels is more than 8192"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(CONFIGS / "tiny_vae.toml", "vae", override)


def test_cli_reports_a_bad_key_in_one_line(capsys, tmp_path):
    code = main(["train", "vae", "--config", str(CONFIGS / "tiny_vae.toml"), "--out", str(tmp_path / "r"),
                 "--set", "train.stepz=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "train.stepz" in err and "steps" in err
    code = main(["train", "vae", "--config", "tiny_vae", "--out", str(tmp_path / "r"),
                 "--set", "model.vae.channel_mult=[1,"])  # the typo that once trained an f=1 autoencoder
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "model.vae.channel_mult=[1," in err
    assert not (tmp_path / "r").exists()


def test_set_values_that_stay_accepted():
    cfg = load_run_config("tiny_vae", "vae", ["data.kind=folder", "data.folder.root=C:\\data\\photos",
                                              "sample.prompts=a red circle, a cat", "sample.labels=",
                                              "model.vae.channel_mult= [1, 2] "])
    assert cfg.data.folder.root == "C:\\data\\photos" and cfg.sample.prompts == ["a red circle", "a cat"]
    assert cfg.data.shapes is None  # tiny_vae's [data.shapes] belongs to the kind --set replaced
    assert cfg.sample.labels == [] and cfg.model.vae.channel_mult == (1, 2)


def test_stage_mismatch_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="stage"):
        load_run_config(CONFIGS / "tiny_vae.toml", "ldm")
    with pytest.raises(FileNotFoundError):
        load_run_config(tmp_path / "nope.toml", "vae")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_run_config(bad, "vae")


def test_derived_model_fields():
    cfg = load_run_config(CONFIGS / "fashion_ldm.toml", "ldm", ["model.conditioning='class'"])
    names = [f"class{i}" for i in range(10)]
    m = derive_model_config(cfg, channels=1, class_names=names)
    assert m.unet.num_classes == 11 and m.class_names == names  # K + 1: the last label is "no class"
    assert m.text_encoder is None and m.unet.context_dim is None
    assert m.vae.in_channels == m.vae.out_channels == 1
    assert m.unet.in_channels == m.unet.out_channels == m.vae.latent_channels
    text = derive_model_config(load_run_config(CONFIGS / "shapes_ldm.toml", "ldm"), channels=3, class_names=None)
    assert text.unet.context_dim == text.text_encoder.width and text.unet.num_classes is None
    with pytest.raises(ValueError, match="model.conditioning"):
        derive_model_config(cfg, channels=1, class_names=None)
    with pytest.raises(ValueError, match="data.size"):
        derive_model_config(load_run_config(CONFIGS / "shapes_ldm.toml", "ldm", ["data.size=62"]), 3, None)


def test_resolved_config_round_trips_through_json(tmp_path):
    cfg = load_run_config(CONFIGS / "shapes_ldm.toml", "ldm", ["train.lr=3e-4"])
    again = RunConfig.from_dict(to_jsonable(cfg.to_dict()))
    assert again == cfg
    path = tmp_path / "config.json"  # RUN/config.json is accepted as --config (resuming with the run's own config)
    path.write_text(json.dumps(to_jsonable(cfg.to_dict())))
    assert load_run_config(path, "ldm") == cfg
    assert load_run_config(path, "ldm", ["train.steps=5"]).train.steps == 5
    with pytest.raises(ValueError, match="stage"):
        load_run_config(path, "vae")


def test_flat_data_keys_of_the_previous_release():
    """The previous release's flat [data] keys read into the subsection of the run's kinds; in its resolved
    configs (which listed every key) a key of another kind is dropped at its default, an error otherwise."""
    cfg = load_run_config("tiny_sr_ldm", "ldm")
    old = to_jsonable(cfg.to_dict())
    data = old["data"]
    flat = {k: v for k, v in data.items() if k not in ("shapes", "fashion_mnist", "folder", "lowres", "inpaint")}
    old["data"] = {**flat, "n": 256, "max_objects": 3, "min_objects": 1, "p_relation": 0.5, "root": None,
                   "split": "train", "captions": "auto", "channels": 3, "crop": "center", "lowres_factor": 4,
                   "lowres_noise": 100, "mask_full": 0.25}  # as the previous release wrote RUN/config.json
    assert RunConfig.from_dict(old) == cfg
    assert cfg.data.lowres.noise == 100 and cfg.data.inpaint is None and cfg.data.lowres_noise == 100
    with pytest.raises(ValueError, match=r"config key data\.split: 'test' is a key of \[data\.fashion_mnist\]"):
        RunConfig.from_dict({**old, "data": {**old["data"], "split": "test"}})
    # --set model.concat replaces the file's concatenation: its [data.lowres] goes, [data.inpaint] comes
    inpaint = load_run_config("tiny_sr_ldm", "ldm", ["model.concat=inpaint", "data.inpaint.mask_full=0.5"])
    assert inpaint.data.lowres is None and inpaint.data.inpaint.mask_full == 0.5


def test_model_config_from_a_file_names_the_key():
    from daguerre.config import ModelConfig, preset

    good = preset("tiny").to_dict()
    assert ModelConfig.from_dict(json.loads(json.dumps(good))) == preset("tiny")  # lists back to tuples
    with pytest.raises(ValueError, match=r"unknown config key unet\.model_channel; did you mean 'model_channels'"):
        ModelConfig.from_dict({**good, "unet": {**good["unet"], "model_channel": 3}})
    with pytest.raises(ValueError, match=r"config key conditioning: 'txt' is not of type"):
        ModelConfig.from_dict({**good, "conditioning": "txt"})
