"""VQ autoencoders (issue 19): the quantiser (straight-through, losses, EMA codes, dead-code restarts, usage and
perplexity), equality with diffusers' VQModel on identical random weights at the LDM VQ-f4 config through
daguerre's import paths (a diffusers folder, a CompVis first-stage checkpoint), lossless round trips, training
(`--set model.regularizer=vq` overfits one batch with more than one code; a resume is exact), generation
through the quantiser, `daguerre info`, and the errors a user can cause."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from daguerre.config import VAEConfig, preset
from daguerre.models.autoencoder import AutoencoderKL
from daguerre.models.vq import CodebookState, VectorQuantizer, codebook_usage

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"
QUIET = ["train.progress=false", "train.sample_every=0", "train.eval_every=0", "train.checkpoint_every=0"]
# the LDM first stages (CompVis latent-diffusion models/first_stage_models/vq-f4 and vq-f8 config.yaml)
VQ_F4 = dict(base_channels=128, channel_mult=(1, 2, 4), num_res_blocks=2, attn_levels=(), latent_channels=3,
             regularizer="vq", codebook_size=8192, scale_factor=1.0)
VQ_F8 = dict(base_channels=128, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attn_levels=(3,), latent_channels=4,
             regularizer="vq", codebook_size=16384, scale_factor=1.0)
DIFFUSERS_VQ_F4 = dict(block_out_channels=[128, 256, 512], layers_per_block=2, latent_channels=3,
                       num_vq_embeddings=8192, down_block_types=["DownEncoderBlock2D"] * 3,
                       up_block_types=["UpDecoderBlock2D"] * 3, scaling_factor=1.0)
TOL = 1e-4


# --- the quantiser ---------------------------------------------------------------------------------------

def test_quantiser_picks_the_nearest_code_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 3)
    with torch.no_grad():
        q.embedding.weight.normal_()
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    brute = ((flat[:, None, :] - q.embedding.weight.detach()[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(out.indices.flatten(), brute)
    codes = q.embedding.weight.detach()[out.indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(out.z_q.detach(), codes, rtol=0, atol=1e-6)
    (out.z_q * torch.arange(out.z_q.numel()).reshape(out.z_q.shape)).sum().backward()
    torch.testing.assert_close(z.grad, torch.arange(z.numel(), dtype=torch.float32).reshape(z.shape))  # identity
    gap = torch.nn.functional.mse_loss(z.detach(), codes)
    torch.testing.assert_close(out.codebook_loss, gap)
    torch.testing.assert_close(out.commitment_loss, gap)
    # the codebook loss moves the codes, the commitment loss the encoder output
    q.zero_grad()
    z2 = z.detach().clone().requires_grad_(True)
    o2 = q(z2)
    o2.codebook_loss.backward(retain_graph=True)
    assert z2.grad is None and q.embedding.weight.grad.abs().sum() > 0
    q.zero_grad()
    o2.commitment_loss.backward()
    assert z2.grad.abs().sum() > 0 and (q.embedding.weight.grad is None or q.embedding.weight.grad.abs().sum() == 0)


def test_usage_and_perplexity():
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 8) == (1 / 8, 1.0)
    used, perplexity = codebook_usage(torch.arange(4).repeat(5), 8)  # 4 codes, equally often
    assert used == 0.5 and math.isclose(perplexity, 4.0)
    used, perplexity = codebook_usage(torch.tensor([0, 0, 0, 1]), 2)
    assert used == 1.0 and math.isclose(perplexity, math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_ema_codes_move_to_the_mean_of_their_vectors_and_dead_codes_restart():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2)
    state = CodebookState(q, ema_decay=0.5, restart_after=3)
    assert not q.embedding.weight.requires_grad  # EMA codes learn no gradient
    start = q.embedding.weight.detach().clone()
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]).t().reshape(1, 2, 1, 3)  # three vectors
    idx = torch.tensor([[[0, 0, 1]]])
    gen = torch.Generator().manual_seed(0)
    assert state.update_(q, z, idx, step=0, generator=gen) == 0
    # N_0 = 0.5 + 0.5 * 2, m_0 = 0.5 e_0 + 0.5 (v1 + v2): e_0 = m_0 / N_0 (up to the Laplace smoothing)
    expect0 = (0.5 * start[0] + 0.5 * torch.tensor([4.0, 6.0])) / 1.5
    torch.testing.assert_close(q.embedding.weight[0], expect0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(q.embedding.weight[2], start[2], rtol=1e-3, atol=1e-4)  # unused: unchanged
    assert state.update_(q, z, idx, step=2, generator=gen) == 0
    restarted = state.update_(q, z, idx, step=3, generator=gen)  # codes 2 and 3 unused since step 0
    assert restarted == 2
    vectors = {tuple(v.tolist()) for v in z.permute(0, 2, 3, 1).reshape(-1, 2)}
    assert {tuple(v.tolist()) for v in q.embedding.weight[2:]} <= vectors
    assert torch.equal(state.last_used, torch.tensor([3, 3, 3, 3]))


# --- equality with diffusers and the import paths --------------------------------------------------------

def _diffusers_vq_f4(tmp_path: Path):
    from diffusers import VQModel

    torch.manual_seed(0)
    ref = VQModel(**DIFFUSERS_VQ_F4).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # a codebook spread like the latents, so that many codes are in use
        h = ref.encode(x).latents
        ref.quantize.embedding.weight.copy_(torch.randn(8192, 3) * h.std() + h.mean())
    folder = tmp_path / "vqmodel"
    ref.save_pretrained(folder)
    return ref, x, folder


def _same_as_diffusers(ours: AutoencoderKL, ref, x: torch.Tensor) -> int:
    """encode, quantise and decode of `ours` equal diffusers' within TOL; returns the number of codes used."""
    with torch.no_grad():
        h_ref = ref.encode(x).latents
        _, _, (_, _, idx_ref) = ref.quantize(h_ref)
        dec_ref = ref.decode(h_ref).sample
        h = ours.encode(x).mean
        idx = ours.quantize.nearest(h)
        dec = ours.decode(h)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=TOL)
    assert torch.equal(idx.flatten(), idx_ref.flatten())
    torch.testing.assert_close(dec, dec_ref, rtol=0, atol=TOL)
    return int(idx.unique().numel())


def test_vq_f4_equals_diffusers_vqmodel_through_both_import_paths(tmp_path):
    from daguerre.checkpoints.detect import infer_vae_config
    from daguerre.checkpoints.vae_file import load_vae
    from daguerre.checkpoints.vae_keys import vae_state_dict_from_diffusers

    ref, x, folder = _diffusers_vq_f4(tmp_path)
    ours, cfg = load_vae(folder)  # a diffusers VQModel folder
    assert cfg.vae == VAEConfig(**VQ_F4)
    assert _same_as_diffusers(ours, ref, x) > 10
    # the same weights CompVis-named, as a first-stage model.ckpt holds them (no prefix, its training loss beside)
    compvis = vae_state_dict_from_diffusers(ref.state_dict(), cfg.vae)
    assert "quantize.embedding.weight" in compvis and compvis["quant_conv.weight"].shape == (3, 3, 1, 1)
    assert infer_vae_config(compvis) == VAEConfig(**VQ_F4)
    bare = tmp_path / "model.ckpt"
    torch.save({"state_dict": {**compvis, "loss.discriminator.main.0.weight": torch.zeros(2)}}, bare)
    ours_bare, cfg_bare = load_vae(bare)
    assert cfg_bare.vae == VAEConfig(**VQ_F4)
    _same_as_diffusers(ours_bare, ref, x)
    # and inside an LDM-layout file (first_stage_model.*), which `daguerre train ldm --vae` reads
    prefixed = tmp_path / "ldm.safetensors"
    save_file({**{f"first_stage_model.{k}": v.contiguous() for k, v in compvis.items()},
               "model.diffusion_model.out.2.weight": torch.zeros(3, 4, 3, 3)}, str(prefixed))
    _same_as_diffusers(load_vae(prefixed)[0], ref, x)


def test_vq_f8_shapes_are_recognised():
    from daguerre.checkpoints.detect import infer_vae_config

    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig(**VQ_F8))
    assert infer_vae_config(vae.state_dict()) == VAEConfig(**VQ_F8)


def test_diffusers_folder_round_trip_is_lossless_and_convert_writes_both_forms(tmp_path, capsys):
    from daguerre.checkpoints.vae_file import load_vae, save_vae_diffusers
    from daguerre.cli import main

    _, _, folder = _diffusers_vq_f4(tmp_path)
    vae, cfg = load_vae(folder)
    save_vae_diffusers(vae, cfg, tmp_path / "again")
    a = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    conf_a, conf_b = (json.loads((f / "config.json").read_text()) for f in (folder, tmp_path / "again"))
    for key in ("_class_name", "block_out_channels", "latent_channels", "num_vq_embeddings", "scaling_factor",
                "down_block_types", "up_block_types", "layers_per_block", "norm_num_groups"):
        assert conf_a[key] == conf_b[key], key
    # CLI: folder -> daguerre VAE file -> folder
    assert main(["convert", str(folder), str(tmp_path / "vq.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "vq.safetensors"), str(tmp_path / "back")]) == 0
    c = load_file(str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"))
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert "autoencoder alone, vq" in capsys.readouterr().out


# --- training, generation, info ----------------------------------------------------------------------------

def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_vq_training_overfits_one_batch_with_many_codes_and_info_shows_the_codebook(tmp_path, capsys):
    from daguerre.checkpoints.vae_file import load_vae
    from daguerre.cli import main
    from daguerre.training.config import load_run_config
    from daguerre.training.vae import train_vae

    steps = 80
    cfg = load_run_config(CONFIGS / "tiny_vae.toml", "vae", [
        *QUIET, "data.n=12", "data.holdout=4", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=10",
        "train.decay='constant'", "train.log_every=10", f"train.steps={steps}",
        "model.regularizer=vq", "model.codebook_size=32", "loss.codebook_restart=10"])
    assert cfg.model.vae.regularizer == "vq" and cfg.model.vae.codebook_size == 32
    path = train_vae(cfg, tmp_path)
    rows = [r for r in _metrics(tmp_path) if "rec" in r]
    assert rows[-1]["rec"] < 0.4 * rows[0]["rec"]
    assert rows[-1]["codes_used"] * 32 > 1 and rows[-1]["perplexity"] > 1.5
    assert "vq" in rows[-1] and "commitment" in rows[-1] and "kl" not in rows[-1]
    vae, model_cfg = load_vae(path)
    held = model_cfg.provenance["holdout_metrics"]
    assert held["codes_used"] * 32 > 1 and held["perplexity"] > 1
    assert vae.quantize is not None and vae.quantize.embedding.weight.shape == (32, 4)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "regulariser:     vq, codebook 32 x 4" in out and "perplexity" in out


def test_vq_resume_with_ema_codes_and_restarts_is_exact(tmp_path):
    from daguerre.training.config import load_run_config
    from daguerre.training.vae import train_vae

    extra = [*QUIET, "data.n=40", "data.holdout=8", "train.steps=8", "train.checkpoint_every=4",
             "train.keep_last=3", "train.batch_size=4", "train.grad_accum=2", "model.regularizer=vq",
             "model.codebook_size=16", "loss.codebook_ema=0.9", "loss.codebook_restart=2", "data.flip=true"]
    cfg = load_run_config(CONFIGS / "tiny_vae.toml", "vae", extra)
    train_vae(cfg, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000008")
    train_vae(cfg, tmp_path / "b", resume=True)
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000008" / "state.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000008" / "state.safetensors"))
    assert any("codebook" in k and "last_used" in k for k in a)  # the codebook's state is checkpointed
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_generation_decodes_through_the_quantiser(monkeypatch):
    from daguerre.components import build_components
    from daguerre.pipelines.request import GenerationRequest
    from daguerre.pipelines.txt2img import txt2img

    cfg = preset("tiny")
    cfg.vae.regularizer, cfg.vae.codebook_size = "vq", 8
    comps = build_components(cfg)
    vae = comps.vae
    z = torch.randn(1, cfg.vae.latent_channels, 4, 4)
    with torch.no_grad():
        quantised = vae.quantize.lookup(vae.quantize.nearest(z))
        torch.testing.assert_close(vae.decode(z), vae.decode(quantised, force_not_quantize=True))
        assert not torch.allclose(vae.decode(z), vae.decode(z, force_not_quantize=True))
    calls = []
    forward = type(vae.quantize).forward
    monkeypatch.setattr(type(vae.quantize), "forward", lambda self, h: calls.append(h.shape) or forward(self, h))
    images = txt2img(comps, GenerationRequest(prompt="a red circle", steps=2, width=cfg.sample_size,
                                              height=cfg.sample_size, seed=1).validate(comps.config))
    assert images and calls and calls[-1][1] == cfg.vae.latent_channels


def test_a_model_on_vq_latents_saves_loads_and_shows_its_regulariser(tmp_path):
    from daguerre.checkpoints import load_model, save_diffusers, save_model
    from daguerre.checkpoints.summary import describe
    from daguerre.commands.info import format_info
    from daguerre.components import build_components

    cfg = preset("tiny")
    cfg.vae.regularizer, cfg.vae.codebook_size = "vq", 8
    comps = build_components(cfg)
    save_model(comps, tmp_path / "m.safetensors")
    assert "regulariser vq, codebook 8 x 4" in format_info(describe(tmp_path / "m.safetensors"))
    save_diffusers(comps, tmp_path / "folder")
    assert json.loads((tmp_path / "folder" / "vae" / "config.json").read_text())["_class_name"] == "VQModel"
    assert "regulariser vq, codebook 8 x 4" in format_info(describe(tmp_path / "folder"))
    for loaded in (load_model(tmp_path / "m.safetensors"), load_model(tmp_path / "folder")):
        assert loaded.config.vae.regularizer == "vq" and loaded.config.vae.codebook_size == 8
        for k, v in comps.vae.state_dict().items():
            assert torch.equal(loaded.vae.state_dict()[k], v), k
    kl = build_components(preset("tiny"))
    save_model(kl, tmp_path / "kl.safetensors")
    assert "regulariser kl (diagonal Gaussian)" in format_info(describe(tmp_path / "kl.safetensors"))


# --- errors a user can cause -------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["model.regularizer=vqq"], r"model.vae.regularizer: 'vqq' is not one of kl, vq"),
    (["model.regularizer=vq", "model.codebook_size=1"], r"model.vae.codebook_size: 1 is out of range"),
    (["loss.codebook_ema=0.5"], r"loss.codebook_ema: 0.5 is for a VQ autoencoder.*'kl'"),
    (["model.regularizer=vq", "loss.codebook_ema=1.0"], r"loss.codebook_ema: must be in \[0, 1\).*1.0"),
    (["model.regularizer=vq", "loss.vq_beta=-1"], r"loss.vq_beta: must be >= 0, got -1"),
    (["model.regularizer=vq", "loss.codebook_weight=0"], r"loss.codebook_weight: must be > 0 .*got 0"),
    (["model.codebook_dim=3", "model.vae.latent_channels=4"], r"model.codebook_dim: 3, but model.vae.latent_ch"),
])
def test_bad_vq_keys_are_one_error_naming_the_value(overrides, message):
    from daguerre.training.config import load_run_config

    with pytest.raises(ValueError, match=message):
        load_run_config(CONFIGS / "tiny_vae.toml", "vae", overrides)


def test_bad_diffusers_and_compvis_vq_files_are_refused_by_name(tmp_path):
    from daguerre.checkpoints.detect import detect_checkpoint, infer_vae_config
    from daguerre.checkpoints.vae_keys import vae_config_from_diffusers

    with pytest.raises(ValueError, match="vq_embed_dim=4 differs from latent_channels=3"):
        vae_config_from_diffusers({"_class_name": "VQModel", "latent_channels": 3, "vq_embed_dim": 4})
    with pytest.raises(ValueError, match="norm_type='spatial'"):
        vae_config_from_diffusers({"_class_name": "VQModel", "norm_type": "spatial"})
    with torch.device("meta"):
        sd = AutoencoderKL(VAEConfig(**{**VQ_F4, "base_channels": 32})).state_dict()
    sd["quant_conv.weight"] = torch.empty(3, 6, 1, 1, device="meta")
    with pytest.raises(ValueError, match="quant_conv maps 6 to 3 channels for 3-channel codes"):
        infer_vae_config(sd)
    from daguerre.checkpoints.single_file import single_file_state_dict
    from daguerre.components import build_components

    sd_file = single_file_state_dict(build_components(preset("tiny")))  # a text model, its text encoder removed
    no_text = {k: v for k, v in sd_file.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(ValueError, match="no text encoder .* and no ClassEmbedder, but a U-Net with spatial"):
        detect_checkpoint(no_text, {})


# --- a CompVis class-conditional LDM on a VQ first stage (ClassEmbedder as the cross-attention context) ---------

LDM_YAML = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    image_size: 16
    unet_config:
      params:
        num_head_channels: 16   # the heads are not in the weights
        use_spatial_transformer: true
        context_dim: 32
"""


def _compvis_class_ldm(tmp_path: Path, yaml: bool = True):
    """A tiny model in the layout of CompVis' cin LDMs: U-Net and VQ first stage under their prefixes, the
    ClassEmbedder as `cond_stage_model.embedding.weight`, the schedule and latent-scale buffers, the training
    loss of the first stage, as a .ckpt pickle; its YAML beside it."""
    from daguerre.checkpoints.single_file import single_file_state_dict
    from daguerre.components import build_components
    from daguerre.diffusion.schedules import make_betas

    cfg = preset("tiny")
    cfg.conditioning, cfg.text_encoder = "class", None
    cfg.unet.num_classes, cfg.unet.class_embedding = 11, "context"
    cfg.vae.regularizer, cfg.vae.codebook_size = "vq", 16
    comps = build_components(cfg, seed=3)
    sd = single_file_state_dict(comps)
    sd["cond_stage_model.embedding.weight"] = sd.pop("model.diffusion_model.label_emb.weight")
    betas = make_betas("scaled_linear", 1000, 0.0015, 0.0195).float()
    sd.update({"betas": betas, "alphas_cumprod": torch.cumprod(1 - betas, 0), "scale_factor": torch.tensor(0.5),
               "first_stage_model.loss.discriminator.main.0.weight": torch.zeros(2)})
    path = tmp_path / "cin.ckpt"
    torch.save({"state_dict": sd}, path)
    if yaml:
        path.with_suffix(".yaml").write_text(LDM_YAML)
    return comps, path


def test_a_compvis_class_conditional_ldm_on_vq_loads_and_generates(tmp_path, capsys):
    from daguerre.checkpoints import load_model, save_diffusers, save_model
    from daguerre.cli import main
    from daguerre.models.unet import UNetModel
    from daguerre.pipelines.request import GenerationRequest
    from daguerre.pipelines.txt2img import txt2img

    comps, path = _compvis_class_ldm(tmp_path)
    loaded = load_model(path)
    c = loaded.config
    assert c.conditioning == "class" and c.text_encoder is None and c.sample_size == 32  # image_size 16 x f2
    assert (c.unet.num_classes, c.unet.class_embedding, c.unet.head_dim, c.unet.num_heads) == (11, "context", 16, None)
    assert c.vae.regularizer == "vq" and c.vae.codebook_size == 16 and c.vae.scale_factor == 0.5
    assert math.isclose(c.schedule.beta_start, 0.0015, rel_tol=1e-5)
    assert math.isclose(c.schedule.beta_end, 0.0195, rel_tol=1e-5)
    for mine, theirs in ((loaded.unet, comps.unet), (loaded.vae, comps.vae)):
        for k, v in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[k], v), k
    # the oracle: the label's ClassEmbedder row is the one-token context of the same U-Net without classes
    plain_cfg = dataclasses.replace(c.unet, num_classes=None, class_embedding="time")
    plain = UNetModel(plain_cfg)
    plain.load_state_dict({k: v for k, v in loaded.unet.state_dict().items() if k != "label_emb.weight"})
    x, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 10])
    with torch.no_grad():
        context = loaded.unet.label_emb.weight[y][:, None, :]
        torch.testing.assert_close(loaded.unet(x, 500, y=y), plain(x, 500, context=context))
    images = txt2img(loaded, GenerationRequest(prompt="", class_label=3, steps=2, seed=1).validate(c))
    assert images
    assert main(["info", str(path), "--no-hash"]) == 0
    out = capsys.readouterr().out
    assert "CompVis class-conditional LDM (11 classes, ClassEmbedder) on a VQ-f2 first stage" in out
    assert "regulariser vq, codebook 16 x 4" in out
    save_model(loaded, tmp_path / "cin.safetensors")  # daguerre's own format keeps it whole
    again = load_model(tmp_path / "cin.safetensors")
    assert again.config.unet.class_embedding == "context"
    assert torch.equal(again.unet.label_emb.weight, loaded.unet.label_emb.weight)
    with pytest.raises(ValueError, match="ClassEmbedder\\) has no diffusers"):
        save_diffusers(loaded, tmp_path / "folder")


def test_a_compvis_class_ldm_without_its_yaml_asks_for_it(tmp_path):
    from daguerre.checkpoints import load_model

    _, path = _compvis_class_ldm(tmp_path, yaml=False)
    with pytest.raises(ValueError, match="heads are not in its weights; put the model's config YAML beside it as "
                                         "cin.yaml"):
        load_model(path)


def test_files_that_lie_about_a_vq_autoencoder_are_refused_before_anything_is_built(tmp_path):
    from daguerre.checkpoints import load_model
    from daguerre.checkpoints.vae_file import load_vae, save_vae
    from daguerre.config import ModelConfig

    cfg = ModelConfig(name="x", vae=VAEConfig(**{**VQ_F4, "base_channels": 32}))
    with pytest.raises(ValueError, match=r"vae.codebook_size: 1000000000 is out of range"):
        ModelConfig.from_dict({**cfg.to_dict(), "vae": {**cfg.to_dict()["vae"], "codebook_size": 10**9}})
    with pytest.raises(ValueError, match=r"vae.regularizer: 'vqx' is not of type"):
        ModelConfig.from_dict({**cfg.to_dict(), "vae": {**cfg.to_dict()["vae"], "regularizer": "vqx"}})
    vae = AutoencoderKL(cfg.vae)
    save_vae(vae, cfg, tmp_path / "vq.safetensors")
    sd = load_file(str(tmp_path / "vq.safetensors"))
    del sd["first_stage_model.quantize.embedding.weight"]  # a VQ config without its codebook: nothing loads
    save_file(sd, str(tmp_path / "bare.safetensors"), {"daguerre_config": cfg.to_json(), "format": "daguerre-vae"})
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        load_vae(tmp_path / "bare.safetensors")
    _, path = _compvis_class_ldm(tmp_path)
    path.with_suffix(".yaml").write_text("num_head_channels: lots\n")
    with pytest.raises(ValueError, match="num_head_channels: 'lots' is not an integer"):
        load_model(path)



# --- an unconditional CompVis LDM (ffhq-ldm-vq-4, celebahq-ldm-vq-4: ADM attention blocks) ----------------------

def _legacy_adm_attention(block, x: torch.Tensor) -> torch.Tensor:
    """CompVis `AttentionBlock` with `QKVAttentionLegacy`, written out as its source reads: the reference."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(flat))  # (B, 3C, T)
    heads = block.heads
    ch = qkv.shape[1] // (3 * heads)
    q, k, v = qkv.reshape(b * heads, ch * 3, -1).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).float().softmax(dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, flat.shape[-1])
    return (flat + block.proj_out(a)).reshape(b, c, h, w)


def test_adm_attention_block_equals_compvis_legacy_attention():
    from daguerre.config import UNetConfig
    from daguerre.models.unet import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(64, UNetConfig(num_heads=None, head_dim=16, norm_groups=8, context_dim=None))
    with torch.no_grad():
        block.proj_out.weight.normal_(0, 0.1)  # (zero-initialised: the residual branch would vanish)
        x = torch.randn(2, 64, 5, 6)
        torch.testing.assert_close(block(x), _legacy_adm_attention(block, x), rtol=1e-5, atol=1e-5)


def test_an_unconditional_compvis_ldm_on_vq_loads_and_generates(tmp_path, capsys):
    from daguerre.checkpoints import load_model, save_diffusers
    from daguerre.checkpoints.single_file import single_file_state_dict
    from daguerre.cli import main
    from daguerre.components import build_components
    from daguerre.diffusion.schedules import make_betas
    from daguerre.pipelines.request import GenerationRequest
    from daguerre.pipelines.txt2img import txt2img

    cfg = preset("tiny")
    cfg.conditioning, cfg.text_encoder, cfg.unet.context_dim, cfg.unet.attention_block = "none", None, None, "adm"
    cfg.vae.regularizer, cfg.vae.codebook_size = "vq", 16
    comps = build_components(cfg, seed=5)
    sd = single_file_state_dict(comps)
    assert any(k.endswith(".qkv.weight") for k in sd) and not any("transformer_blocks" in k for k in sd)
    sd["betas"] = make_betas("scaled_linear", 1000, 0.0015, 0.0195).float()
    path = tmp_path / "ffhq.ckpt"
    torch.save({"state_dict": sd}, path)
    path.with_suffix(".yaml").write_text(LDM_YAML.replace("context_dim: 32", ""))
    loaded = load_model(path)
    c = loaded.config
    assert (c.conditioning, c.unet.attention_block, c.unet.context_dim, c.unet.head_dim) == ("none", "adm", None, 16)
    assert c.vae.scale_factor == 1.0 and math.isclose(c.schedule.beta_end, 0.0195, rel_tol=1e-5)
    for k, v in comps.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v), k
    assert txt2img(loaded, GenerationRequest(prompt="", steps=2, seed=1).validate(c))
    assert main(["info", str(path), "--no-hash"]) == 0
    assert "CompVis unconditional LDM on a VQ-f2 first stage" in capsys.readouterr().out
    with pytest.raises(ValueError, match="ADM attention blocks .* has no diffusers"):
        save_diffusers(loaded, tmp_path / "folder")
    path.with_suffix(".yaml").unlink()
    with pytest.raises(ValueError, match="heads are not in its weights"):
        load_model(path)


def test_a_vq_run_killed_with_sigkill_resumes_bitwise(tmp_path):
    """SIGKILL after the first checkpoint, then --resume: the last checkpoint equals an uninterrupted run's
    (EMA codes, restarts and the weight EMA included)."""
    from test_training_runs import _killed_and_resumed

    steps, every = 24, 6
    extra = [*QUIET, f"train.steps={steps}", f"train.checkpoint_every={every}", "train.keep_last=5", "data.n=64",
             "data.holdout=8", "model.regularizer=vq", "model.codebook_size=16", "loss.codebook_ema=0.9",
             "loss.codebook_restart=3", "data.flip=true"]
    a, _ = _killed_and_resumed(tmp_path, "vae", None, extra, steps, every)
    assert any("codebook" in k for k in a)
