"""GLIGEN adapter files (issue 18; checkpoints/adapter.py, docs/layout.md "Shipping an adapter"): a GLIGEN run ends
with its adapter file beside its whole model and `daguerre train export --adapter` writes the same; the adapter
file holds only the grounding net and the gated layers and names its base (name and sha256); loaded over its base
(a shipped model by name, or --base / base=) it is the whole model bit for bit, images included; a base of another
sha256, a missing base, a --base for a whole model and an adapter of a model that changed its base are refused in
one line that says what to do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import daguerre
from daguerre.checkpoints import load_model, save_adapter, save_model
from daguerre.checkpoints.adapter import ADAPTER_FORMAT, BASE_NAME_KEY, BASE_SHA_KEY
from daguerre.cli import main
from daguerre.components import build_components
from daguerre.models.gligen import adapter_parameters
from daguerre.training.config import derive_model_config, load_run_config
from daguerre.weights.io import file_hash

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"
QUICK = ["train.progress=false", "data.n=8", "data.holdout=4", "train.batch_size=4", "train.steps=6",
         "train.sample_every=0", "train.checkpoint_every=6", "train.log_every=1", "train.warmup_steps=0",
         "train.lr=3e-3", "train.min_lr=3e-3", "train.ema_decay=0"]
BOXES = ["--box", "a red circle:0.1,0.1,0.45,0.45", "--box", "a big blue square:0.5,0.5,0.95,0.95"]


def _tiny_text_model(path: Path, seed: int) -> Path:
    """A tiny text model (tiny_ldm.toml, random weights, its zero-initialised layers made non-zero) in fp16, its
    own autoencoder inside (it serves as the run's --vae, as the shipped shapes model does for shapes_gligen_ldm)."""
    cfg = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm")
    cfg.model.vae = derive_model_config(load_run_config(CONFIGS / "tiny_vae.toml", "vae"), 3, None).vae
    comps = build_components(derive_model_config(cfg, 3, None), seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in comps.unet.parameters():
            if not p.any():
                torch.nn.init.normal_(p, std=0.05)
    save_model(comps, path, dtype=torch.float16)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(base model file, run folder) of a 6-step tiny GLIGEN run on that base (its gates opened by a high lr)."""
    from daguerre.training.ldm import train_ldm

    root = tmp_path_factory.mktemp("adapter")
    base = _tiny_text_model(root / "tinybase.safetensors", seed=1)
    cfg = load_run_config(CONFIGS / "tiny_gligen_ldm.toml", "ldm", [*QUICK, f"train.init_from={base}"])
    train_ldm(cfg, root / "run", vae_path=base)
    return base, root / "run"


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_a_gligen_run_ends_with_an_adapter_file_that_holds_the_adapter_alone_and_names_its_base(run):
    base, folder = run
    whole, adapter = folder / "model.safetensors", folder / "adapter.safetensors"
    meta = _metadata(adapter)
    assert meta["format"] == ADAPTER_FORMAT
    assert meta[BASE_NAME_KEY] == "tinybase" and meta[BASE_SHA_KEY] == file_hash(base)
    names = {n for n, _ in adapter_parameters(load_model(whole).unet)}
    tensors = load_file(adapter)
    assert set(tensors) == {f"model.diffusion_model.{n}" for n in names}
    assert all(t.dtype == torch.float16 for t in tensors.values())  # train.save_dtype, as the whole file
    gates = [float(t) for k, t in tensors.items() if k.endswith("alpha_attn")]
    assert any(g != 0 for g in gates)  # trained: the adapter changes the images
    assert adapter.stat().st_size < 0.5 * whole.stat().st_size


def test_an_adapter_over_its_base_is_the_whole_model_bit_for_bit(run):
    base, folder = run
    whole = load_model(folder / "model.safetensors")
    again = load_model(folder / "adapter.safetensors", base=base)
    assert again.config.to_dict() == whole.config.to_dict()
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(whole, part).state_dict(), getattr(again, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    boxes = ["a red circle:0.1,0.1,0.45,0.45"]
    images = [np.asarray(daguerre.load(str(p), base=b)("on a white background", boxes=boxes, steps=3, seed=2)[0].image)
              for p, b in ((folder / "model.safetensors", None), (folder / "adapter.safetensors", str(base)))]
    assert np.array_equal(*images)


def test_train_export_adapter_writes_the_runs_adapter_and_the_whole_export_its_model(run, tmp_path, capsys):
    base, folder = run
    out = tmp_path / "exported.safetensors"
    assert main(["train", "export", str(folder), "--adapter", "--out", str(out)]) == 0
    a, b = load_file(out), load_file(folder / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metadata(out)[BASE_SHA_KEY] == file_hash(base)
    assert main(["train", "export", str(folder), "--out", str(tmp_path / "whole.safetensors")]) == 0
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(folder / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the frozen encoder pruned as at the end
    capsys.readouterr()
    assert main(["train", "export", str(folder), "--adapter", "--out", str(tmp_path / "x.safetensors")]) == 0


def test_an_adapter_finds_a_shipped_base_by_name_and_draws_as_the_whole_model_from_the_cli(run, shipped, tmp_path,
                                                                                           capsys):
    base, folder = run
    (shipped / "tinybase.safetensors").write_bytes(base.read_bytes())
    common = ["generate", "on a white background", *BOXES, "--steps", "3", "--seed", "4"]
    assert main([*common, "--model", str(folder / "adapter.safetensors"), "-o", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--model", str(folder / "model.safetensors"), "-o", str(tmp_path / "w.png")]) == 0
    assert np.array_equal(_png(tmp_path / "a.png"), _png(tmp_path / "w.png"))
    capsys.readouterr()
    assert main(["info", str(folder / "adapter.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "format:          daguerre adapter (safetensors)" in out
    assert f"base model:      tinybase ({shipped / 'tinybase.safetensors'}, sha256 {file_hash(base)})" in out
    assert "GLIGEN adapter, up to 4 objects" in out
    assert main(["info", str(folder / "adapter.safetensors"), "--json", "--no-hash"]) == 0
    assert json.loads(capsys.readouterr().out)["base"]["name"] == "tinybase"
    converted = tmp_path / "converted.safetensors"  # `convert` writes the whole model again, tensor for tensor
    assert main(["convert", str(folder / "adapter.safetensors"), str(converted)]) == 0
    a, b = load_file(converted), load_file(folder / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_missing_or_different_base_is_refused_naming_both_hashes_and_what_to_do(run, shipped, tmp_path, capsys):
    base, folder = run
    adapter = folder / "adapter.safetensors"
    with pytest.raises(FileNotFoundError, match=r"adapter for the model 'tinybase' \(sha256 [0-9a-f]{64}\), which is "
                       r"not a shipped model here \(none installed\); give the base model's file with --base FILE"):
        load_model(adapter)
    other = _tiny_text_model(shipped / "tinybase.safetensors", seed=2)  # the same name, other weights
    want, got = file_hash(base), file_hash(other)
    with pytest.raises(ValueError, match=f"sha256 {want}, but its base .* has sha256 {got}: an adapter works on the "
                       "very weights it was trained on"):
        daguerre.load(str(adapter))
    argv = ["generate", "x", *BOXES, "--steps", "1", "-o", str(tmp_path / "x.png"), "--model", str(adapter)]
    assert main([*argv, "--base", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and want in err and got in err and "--base FILE" in err
    assert main(["info", str(adapter), "--base", str(tmp_path / "nowhere.safetensors")]) == 2
    assert "base model" in (err := capsys.readouterr().err) and "no such file, nor a shipped model" in err
    assert main(["serve", "--model", str(adapter), "--base", str(other), "--port", "0"]) == 2  # before listening
    assert f"has sha256 {got}" in capsys.readouterr().err
    assert main([*argv, "--base", str(base)]) == 0  # the right file, given by path, beats the shipped name
    capsys.readouterr()


def test_a_base_for_a_whole_model_is_refused(run, tiny_model_file):
    base, folder = run
    for model in (folder / "model.safetensors", tiny_model_file):
        with pytest.raises(ValueError, match="a base model goes with an adapter file; .* is a whole model, it needs "
                           "none"):
            load_model(model, base=base)
    with pytest.raises(ValueError, match="random:tiny is a random model, it needs none"):
        daguerre.load("random:tiny", base=str(base))


def test_a_model_that_changed_its_base_cannot_be_written_as_an_adapter(run, tmp_path):
    base, folder = run
    model = load_model(folder / "model.safetensors")
    with torch.no_grad():
        model.unet.out[2].weight.add_(0.5)  # a base weight trained too: no longer the base plus an adapter
    with pytest.raises(ValueError, match=r"the model is not an adapter on .*: 1 of its tensors differ from the "
                       r"base's \(model.diffusion_model.out.2.weight\); .* write the whole model instead"):
        save_adapter(model, tmp_path / "a.safetensors", base, "tinybase", dtype=torch.float16)
    assert not (tmp_path / "a.safetensors").exists()
    with pytest.raises(ValueError, match="is itself an adapter file: an adapter goes on a whole model file"):
        save_adapter(model, tmp_path / "a.safetensors", folder / "adapter.safetensors", "x", dtype=torch.float16)


def test_boxes_without_model_go_to_a_shipped_adapter_which_draws_over_its_shipped_base(run, shipped, tmp_path):
    """The shipping case: the adapter and its base both shipped; `generate --box` without --model picks the adapter
    (routing reads its header), which finds its base by name; the image is the whole model's."""
    base, folder = run
    (shipped / "tinybase.safetensors").write_bytes(base.read_bytes())
    (shipped / "tiny-gligen.safetensors").write_bytes((folder / "adapter.safetensors").read_bytes())
    common = ["generate", "on a white background", *BOXES, "--steps", "3", "--seed", "5"]
    assert main([*common, "-o", str(tmp_path / "routed.png")]) == 0
    assert main([*common, "--model", str(folder / "model.safetensors"), "-o", str(tmp_path / "whole.png")]) == 0
    assert np.array_equal(_png(tmp_path / "routed.png"), _png(tmp_path / "whole.png"))


def test_the_runs_base_is_its_init_file_or_else_the_shipped_model_of_its_sha256(run, shipped, tmp_path):
    """A run's --init file may be gone when its adapter is exported (a snapshot's copy of the shipped model): the
    shipped model of the same sha256 stands for it; with neither, or a run from scratch, one line says so."""
    from types import SimpleNamespace

    from daguerre.training.export import base_model_file

    base, _ = run
    missing = tmp_path / "gone.safetensors"
    gone = load_run_config(CONFIGS / "tiny_gligen_ldm.toml", "ldm", [f"train.init_from={missing}"])
    record = SimpleNamespace(init={"sha256": file_hash(base)})
    with pytest.raises(ValueError, match=r"the run's base model .*gone.safetensors \(sha256 [0-9a-f]{64}\) is gone and "
                       "no shipped model has that sha256"):
        base_model_file(gone, record)
    (shipped / "tinybase.safetensors").write_bytes(base.read_bytes())
    assert base_model_file(gone, record) == shipped / "tinybase.safetensors"
    here = load_run_config(CONFIGS / "tiny_gligen_ldm.toml", "ldm", [f"train.init_from={base}"])
    assert base_model_file(here, record) == base  # the run's own file first
    with pytest.raises(ValueError, match="this run started from scratch"):
        base_model_file(here, SimpleNamespace(init=None))


def _rewritten(adapter: Path, out: Path, metadata: dict[str, str], extra: dict | None = None) -> Path:
    """`adapter` written again to `out` with `metadata` over its own and the tensors `extra` added."""
    from daguerre.fileio import atomic_save_safetensors

    atomic_save_safetensors({**load_file(adapter), **(extra or {})}, out, {**_metadata(adapter), **metadata})
    return out


def test_an_adapter_file_never_names_a_file_to_read_nor_replaces_its_bases_weights(run, shipped, tmp_path):
    """The base an adapter records is a shipped model's name, never a path; a malformed record, and an adapter that
    would replace any of its base's tensors, are refused."""
    base, folder = run
    adapter = folder / "adapter.safetensors"
    by_path = _rewritten(adapter, tmp_path / "by_path.safetensors", {BASE_NAME_KEY: str(base)})
    with pytest.raises(FileNotFoundError, match="which is not a shipped model here"):
        load_model(by_path)  # the right sha256 at that path, but a recorded name is looked up among shipped models
    for bad in ({BASE_SHA_KEY: "not a hash"}, {BASE_NAME_KEY: ""}):
        with pytest.raises(ValueError, match="an adapter file must record its base model's name"):
            load_model(_rewritten(adapter, tmp_path / "bad.safetensors", bad), base=base)
    with pytest.raises(ValueError, match="is itself an adapter file: give the whole model file 'tinybase'"):
        load_model(adapter, base=by_path)  # an adapter's base is a whole model, never another adapter
    key = "model.diffusion_model.out.2.weight"
    replacing = _rewritten(adapter, tmp_path / "replacing.safetensors", {},
                           {key: torch.zeros_like(load_file(base)[key])})
    with pytest.raises(ValueError, match=rf"1 of its tensors are also in its base .* \({key}\): an adapter holds only "
                       "what its base lacks"):
        load_model(replacing, base=base)


def test_a_run_started_from_an_adapter_file_continues_it_on_its_base(run, tmp_path, monkeypatch):
    """`--init ADAPTER`: the run starts from the adapter's weights over its base (no tensor starts fresh), records
    the base as the model it fine-tunes and the adapter as where it started, and its own adapter file names the
    same base, so a shipped adapter can be trained further and shipped again."""
    from daguerre.checkpoints import adapter as adapter_module
    from daguerre.checkpoints import shipped
    from daguerre.training.ldm import train_ldm

    base, folder = run
    adapter = folder / "adapter.safetensors"
    monkeypatch.setattr(adapter_module, "shipped_models", lambda: {"tinybase": base})  # the base is "shipped"
    monkeypatch.setattr(shipped, "shipped_models", lambda: {"tinybase": base})
    cfg = load_run_config(CONFIGS / "tiny_gligen_ldm.toml", "ldm",
                          [*QUICK, "train.steps=2", "train.checkpoint_every=2", f"train.init_from={adapter}"])
    train_ldm(cfg, tmp_path / "run2", vae_path=base)
    init = load_model(tmp_path / "run2" / "model.safetensors").config.provenance["init"]
    assert init["sha256"] == file_hash(base) and init["adapter"] == {"file": adapter.name, "sha256": file_hash(adapter)}
    assert init["new_tensors"]["unet"] == 0  # every adapter tensor came from the file
    meta = _metadata(tmp_path / "run2" / "adapter.safetensors")
    assert meta[BASE_NAME_KEY] == "tinybase" and meta[BASE_SHA_KEY] == file_hash(base)


def test_the_model_and_adapter_files_of_a_run_carry_one_config_whenever_they_are_written(tmp_path, monkeypatch):
    """The run's end writes both files with one `finished` time, even when the clock ticks between the writes
    (it did, on a loaded machine: the two configs then differed by a second)."""
    import itertools
    import time as time_module

    from daguerre.training.ldm import train_ldm

    ticks = itertools.count()
    monkeypatch.setattr(time_module, "strftime", lambda fmt, *a: f"2026-12-06T00:00:{next(ticks):02d}")
    base = _tiny_text_model(tmp_path / "tinybase.safetensors", seed=1)
    cfg = load_run_config(CONFIGS / "tiny_gligen_ldm.toml", "ldm",
                          [*QUICK, "train.steps=2", "train.checkpoint_every=2", f"train.init_from={base}"])
    train_ldm(cfg, tmp_path / "run", vae_path=base)
    whole = load_model(tmp_path / "run" / "model.safetensors")
    again = load_model(tmp_path / "run" / "adapter.safetensors", base=base)
    assert again.config.to_dict() == whole.config.to_dict()


def test_an_adapter_continued_on_another_base_names_that_base(run, tmp_path, monkeypatch):
    """`train.init_base`: an adapter file continued on another base model (a fine-tune of its base) starts from
    the adapter's weights over that base, trains on it (its U-Net frozen, bit for bit that base's) and its own
    adapter file names the new base; init_base with a whole model as --init is refused."""
    from daguerre.training.ldm import train_ldm

    base, folder = run
    adapter = folder / "adapter.safetensors"
    other = tmp_path / "otherbase.safetensors"  # its base with another U-Net (a fine-tune: the autoencoder the same)
    tuned = load_model(base)
    with torch.no_grad():
        for p in tuned.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_model(tuned, other, dtype=torch.float16)
    cfg = load_run_config(CONFIGS / "tiny_gligen_ldm.toml", "ldm",
                          [*QUICK, "train.steps=2", "train.checkpoint_every=2", f"train.init_from={adapter}",
                           f"train.init_base={other}"])
    train_ldm(cfg, tmp_path / "run2", vae_path=base)
    init = load_model(tmp_path / "run2" / "model.safetensors").config.provenance["init"]
    assert init["sha256"] == file_hash(other) and init["adapter"]["sha256"] == file_hash(adapter)
    assert init["new_tensors"]["unet"] == 0
    meta = _metadata(tmp_path / "run2" / "adapter.safetensors")
    assert meta[BASE_NAME_KEY] == "otherbase" and meta[BASE_SHA_KEY] == file_hash(other)
    whole, theirs = load_model(tmp_path / "run2" / "adapter.safetensors", base=other), load_model(other)
    trained = whole.unet.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in theirs.unet.state_dict().items())
    with pytest.raises(ValueError, match="is an adapter for the model 'otherbase'"):  # not on its old base
        load_model(tmp_path / "run2" / "adapter.safetensors", base=base)
    whole_init = load_run_config(CONFIGS / "tiny_gligen_ldm.toml", "ldm",
                                 [*QUICK, f"train.init_from={base}", f"train.init_base={other}"])
    with pytest.raises(ValueError, match="train.init_base .* is no adapter file"):
        train_ldm(whole_init, tmp_path / "run3", vae_path=base)
