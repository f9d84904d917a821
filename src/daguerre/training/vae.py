"""Stage 1, `daguerre train vae`: the KL- or VQ-regularised autoencoder of latent diffusion (LDM Sec. 3.1, App. G).

Each optimizer step: encode the images, draw z from the posterior (per-sample noise from the data
stream, see `dist`), decode, and minimise reconstruction + kl_weight KL (+ perceptual) (+ the adaptive
PatchGAN term from `loss.disc_start` on, with the discriminator trained on the same batch); see
`losses`. A VQ autoencoder (`model.vae.regularizer = "vq"`) quantises the encoder's latent instead and
takes codebook_weight (codebook loss + vq_beta commitment) in place of the KL term (VQGAN, Esser et al.
2021); the codebook's use in the batch (fraction of codes used, perplexity) is logged, and its options
(EMA codes, restart of dead codes) keep their state in `models.vq.CodebookState`. Held-out PSNR / SSIM
and an originals-above-reconstructions image are written as the run goes. At the end the latent scale
factor 1 / std(z) is measured on held-out images (LDM Sec. 4.3.2) and stored in the VAE config of the
output file RUN/vae.safetensors: a daguerre checkpoint holding only `first_stage_model.*` tensors plus
the ModelConfig JSON (metadata `format` = "daguerre-vae"; the format is `checkpoints/vae_file.py`),
which `daguerre train ldm --vae` loads.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints.vae_file import save_vae
from ..models.autoencoder import AutoencoderKL
from ..models.vq import CodebookState, codebook_usage
from . import dist, losses
from .config import RunConfig, derive_model_config, to_jsonable
from .data import batch_loader, images_of, load_items
from .init import init_vae
from .log import RunLogger
from .loop import RunSummary, Setup, autocast, make_optimizer, run, unwrap, wrap_ddp
from .metrics import latent_scale, psnr, ssim
from .samples import SAMPLES_DIR, comparison_image, save_png

logger = logging.getLogger("daguerre.train")
VAE_FILE = "vae.safetensors"
EVAL_BATCH = 32  # held-out images per forward pass in evaluation
LATENT_SCALE_SEED = 0  # the posterior samples of the scale measurement are drawn from this seed


class Reconstruct(nn.Module):
    """x, eps -> (reconstruction, regulariser terms): the autoencoder's training forward, as one module so
    that DistributedDataParallel sees every parameter used in one call. KL: decode(mean + std eps) and the
    KL per image ({"kl"}); VQ: decode(quantise(z)) with straight-through gradients, the codebook and
    commitment losses, the chosen codes and the pre-quantisation latent z."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        post = self.vae.encode(x)
        if self.vae.quantize is None:
            z = post.mean + post.std * eps.to(post.mean.dtype)  # (B, C, h, w)
            return self.vae.decode(z), {"kl": post.kl()}
        q = self.vae.quantize(post.mean)
        terms = {"codebook": q.codebook_loss, "commitment": q.commitment_loss, "indices": q.indices,
                 "latent": post.mean.detach()}
        return self.vae.decode(q.z_q, force_not_quantize=True), terms


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstructions through the posterior mode, and their mean PSNR / SSIM against `images`; a VQ
    autoencoder adds the fraction of its codebook the images use and the perplexity of their codes."""
    recs, codes = [], []
    for chunk in images.split(EVAL_BATCH):
        z = vae.encode(chunk).mode()
        if vae.quantize is not None:
            codes.append(vae.quantize.nearest(z))
        recs.append(vae.decode(z).float())
    rec = torch.cat(recs)
    metrics = {"psnr": float(psnr(images, rec).mean())}
    if min(images.shape[-2:]) >= 11:
        metrics["ssim"] = float(ssim(images, rec).mean())
    if codes:
        metrics["codes_used"], metrics["perplexity"] = codebook_usage(torch.cat(codes), vae.quantize.codebook_size)
    return rec, metrics


@torch.no_grad()
def measure_scale(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """1 / std of posterior samples of `images` (fixed seed)."""
    gen = torch.Generator("cpu").manual_seed(LATENT_SCALE_SEED)
    zs = [vae.encode(chunk).sample(gen).float() for chunk in images.split(EVAL_BATCH)]
    return latent_scale(torch.cat(zs))


def _per_sample_noise(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def _flip(x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """Mirror each image with probability 1/2, decided by its own generator."""
    flips = torch.tensor([bool(torch.rand(1, generator=g) < 0.5) for g in gens])
    return torch.where(flips[:, None, None, None].to(x.device), x.flip(-1), x)


def train_vae(cfg: RunConfig, out: str | Path, *, resume: bool = False, until: int | None = None) -> Path:
    """Run stage 1 as configured; returns the path of the VAE file (RUN/vae.safetensors), or with
    `until` < train.steps the checkpoint of step `until` (a pause: resume later with `resume`)."""
    return run(VAEStage(cfg), cfg, out, resume=resume, until=until)


class VAEStage:
    """Stage 1 for `loop.run`: the autoencoder (and the PatchGAN discriminator from `loss.disc_start` on; and
    for a VQ autoencoder with EMA codes or restarts, the codebook's state, checkpointed as a module)."""

    output = VAE_FILE
    ema_targets = evaluated = ("vae",)

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.init_record: dict[str, Any] | None = None

    def prepare(self, env) -> None:
        """Nothing to load before the run folder: the data and the networks come with `build`."""

    def build(self, setup: Setup) -> None:
        cfg, env, data = self.cfg, setup.env, setup.data
        t, lc = cfg.train, cfg.loss
        self.data, self.env, self.out = data, env, setup.out
        self.model_cfg = model_cfg = derive_model_config(cfg, data.channels, data.class_names)
        self.device = device = env.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed)
            vae = AutoencoderKL(model_cfg.vae)
            disc = None
            if lc.disc_weight > 0:
                disc = losses.PatchDiscriminator(data.channels, lc.disc_channels, lc.disc_layers)
        if t.init_from and setup.fresh:  # fine-tuning: the model's autoencoder (a resume has its own weights)
            self.init_record = init_vae(t.init_from, vae)
        vae.to(device).train()
        vae.gradient_checkpointing = t.gradient_checkpointing
        self.vae, self.disc = vae, disc
        self.modules: dict[str, nn.Module] = {"vae": vae}
        self.codebook = None
        if vae.quantize is not None and (lc.codebook_ema > 0 or lc.codebook_restart > 0):
            self.codebook = CodebookState(vae.quantize, lc.codebook_ema, lc.codebook_restart).to(device)
            self.modules["codebook"] = self.codebook
        self.optimizers = {"vae": make_optimizer(vae.parameters(), t)}
        self.peak_lr: dict[str, float] = {}
        self.ddp_rec = wrap_ddp(Reconstruct(vae), env)
        self.ddp_disc = None
        if disc is not None:
            disc.to(device).train()
            self.modules["disc"] = disc
            self.optimizers["disc"] = make_optimizer(disc.parameters(), t, lc.disc_lr)
            self.peak_lr["disc"] = lc.disc_lr
            self.ddp_disc = wrap_ddp(disc, env)
        self.pool = data.train_pool
        f = model_cfg.vae.downsample_factor
        self.latent_shape = (model_cfg.vae.latent_channels, cfg.data.size // f, cfg.data.size // f)
        self.n_pixels = data.channels * cfg.data.size**2
        self.perceptual = losses.perceptual_loss(lc.perceptual, device) if lc.perceptual else None
        self.holdout = images_of(load_items(data, data.holdout)) if env.is_main and len(data.holdout) else None

    def resumed(self, meta: dict[str, Any]) -> None:
        self.init_record = meta.get("init")  # what step 0 was initialised from (--init), kept by every checkpoint

    def describe(self, env) -> str:
        t, m = self.cfg.train, self.model_cfg
        n_params = sum(p.numel() for p in self.vae.parameters())
        vq = f", a codebook of {m.vae.codebook_size} codes" if m.vae.regularizer == "vq" else ""
        return (f"stage 1: autoencoder of {n_params / 1e6:.2f} M parameters, f={m.vae.downsample_factor}, "
                f"{m.vae.latent_channels} latent channels{vq}; {len(self.data.train_pool)} training images on "
                f"{env.world} process(es), global batch {t.batch_size * env.world * t.grad_accum}")

    def begin(self, sampler, start: int) -> None:
        t = self.cfg.train
        self.stream = iter(sampler.iter_steps(start, t.steps))
        n_pool = len(self.data.train_pool)
        batches = ((int(b[2][0]) // n_pool, b[3]) for b in sampler.iter_steps(start, t.steps))
        self.items = batch_loader(self.data, batches, self.cfg.data.workers)

    def step(self, step: int, micro: int, sync: bool) -> dict[str, float]:
        cfg, device, disc = self.cfg, self.device, self.disc
        t, lc = cfg.train, cfg.loss
        gan_on = disc is not None and step >= lc.disc_start
        sums: dict[str, float] = {}
        _, _, positions, _ = next(self.stream)
        x = images_of(next(self.items)).to(device)
        gens = [dist.sample_generator(t.seed, "vae", int(p)) for p in positions]
        if cfg.data.flip:
            x = _flip(x, gens)
        eps = _per_sample_noise(gens, self.latent_shape).to(device)
        with dist.maybe_no_sync(self.ddp_rec, not sync):
            with autocast(device, t.bf16):
                rec, terms = self.ddp_rec(x, eps)
            rec = rec.float()
            nll = losses.reconstruction_loss(x, rec, lc.rec).mean()
            if self.perceptual is not None:
                p_loss = self.perceptual(x, rec).mean()
                nll = nll + lc.perceptual_weight * p_loss
                sums["perceptual"] = float(p_loss.detach())
            loss = nll + self._regulariser(terms, sums)
            if gan_on:
                unwrap(disc).requires_grad_(False)
                with autocast(device, t.bf16):
                    g_loss = losses.generator_loss(disc(rec).float())
                unwrap(disc).requires_grad_(True)
                last_layer = self.vae.decoder.conv_out.weight
                g_rec = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
                g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
                d_weight = losses.adaptive_weight(dist.all_reduce_mean_(g_rec), dist.all_reduce_mean_(g_gan),
                                                  lc.disc_weight)
                loss = loss + d_weight * g_loss
                sums["g_loss"] = float(g_loss.detach())
                sums["d_weight"] = float(d_weight)
            (loss / t.grad_accum).backward()
        if self.codebook is not None:
            gen = dist.sample_generator(t.seed, "codebook", step * t.grad_accum + micro)
            restarted = self.codebook.update_(self.vae.quantize, terms["latent"], terms["indices"], step, gen,
                                              dist.all_reduce_mean_)
            sums["codes_restarted"] = float(restarted)
        if gan_on:
            with dist.maybe_no_sync(self.ddp_disc, not sync):
                with autocast(device, t.bf16):
                    logits = self.ddp_disc(torch.cat([x, rec.detach()])).float()
                real, fake = logits.chunk(2)
                d_loss = losses.hinge_d_loss(real, fake)
                (d_loss / t.grad_accum).backward()
            sums["d_loss"] = float(d_loss.detach())
        sums["loss"] = float(loss.detach())
        sums["rec"] = float(losses.reconstruction_loss(x, rec.detach(), lc.rec).mean())
        return sums

    def _regulariser(self, terms: dict[str, torch.Tensor], sums: dict[str, float]) -> torch.Tensor:
        """The KL term (kl_weight x the KL per image / its pixel count), or for a VQ autoencoder codebook_weight
        x (codebook loss, unless the codes are EMAs, + vq_beta x commitment loss); logs its parts."""
        lc = self.cfg.loss
        if "kl" in terms:
            kl = terms["kl"].float()
            sums["kl"] = float(kl.detach().mean())
            return lc.kl_weight * (kl.mean() / self.n_pixels)
        vq = lc.vq_beta * terms["commitment"]
        if lc.codebook_ema == 0:
            vq = vq + terms["codebook"]
        used, perplexity = codebook_usage(terms["indices"], self.vae.quantize.codebook_size)
        sums.update(vq=float(vq.detach()), commitment=float(terms["commitment"].detach()), codes_used=used,
                    perplexity=perplexity)
        return lc.codebook_weight * vq

    def sample(self, step: int, models: dict[str, nn.Module], runlog: RunLogger, *, grid: bool,
               evaluate: bool) -> None:
        """Held-out PSNR / SSIM (`evaluate`) and the originals-above-reconstructions image (`grid`)."""
        if self.holdout is None:
            return
        rec_h, metrics = evaluate_vae(models["vae"], self.holdout.to(self.device))
        if evaluate:
            runlog.log(step, {f"holdout_{k}": v for k, v in metrics.items()})
            codes = (f", {metrics['codes_used']:.1%} of the codes used, perplexity {metrics['perplexity']:.1f}"
                     if "codes_used" in metrics else "")
            logger.info("step %d: held-out PSNR %.2f dB%s%s", step, metrics["psnr"],
                        f", SSIM {metrics['ssim']:.4f}" if "ssim" in metrics else "", codes)
        if grid:
            k = self.cfg.sample.recon_images
            save_png(comparison_image(self.holdout[:k], rec_h[:k].cpu()),
                     self.out / SAMPLES_DIR / f"recon_{step:08d}.png")

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"init": self.init_record}

    def export(self, path: Path, models: dict[str, nn.Module], summary: RunSummary) -> None:
        """The VAE file: EMA weights, the latent scale factor measured on held-out images, provenance."""
        cfg, model_cfg, holdout, ema_vae = self.cfg, self.model_cfg, self.holdout, models["vae"]
        t = cfg.train
        final_metrics = {}
        if holdout is not None:
            scale_images = holdout[: cfg.sample.latent_scale_images].to(self.device)
            model_cfg.vae.scale_factor = measure_scale(ema_vae, scale_images)
            model_cfg.vae.shift_factor = 0.0
            _, final_metrics = evaluate_vae(ema_vae, holdout.to(self.device))
        else:
            logger.warning("data.holdout = 0: no held-out images, the latent scale factor stays %g",
                           model_cfg.vae.scale_factor)
        model_cfg.name = f"{cfg.data.kind}-vae"
        model_cfg.provenance = {
            "stage": "vae", "steps": t.steps, "training_seconds": round(summary.seconds, 1),
            "images_seen": t.steps * summary.global_batch, "parameters": sum(p.numel() for p in self.vae.parameters()),
            "data": self.data.description, "holdout_metrics": final_metrics, "run_config": to_jsonable(cfg.to_dict()),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "weights": "ema" if t.ema_decay > 0 else "raw",
        }
        if self.init_record is not None:  # fine-tuned from another autoencoder (train.init_from)
            model_cfg.provenance["init"] = self.init_record
        if summary.history:  # training phases: config keys changed at a resume (loop.PHASE_CHANGES)
            model_cfg.provenance["config_history"] = summary.history
        save_vae(ema_vae, model_cfg, path)
        logger.info("wrote %s (scale_factor %.5f; %s)", path, model_cfg.vae.scale_factor, json.dumps(final_metrics))
