"""Stage 1, `daguerre train vae`: the KL-regularised autoencoder of latent diffusion (LDM Sec. 3.1, App. G).

Each optimizer step: encode the images, draw z from the posterior (per-sample noise from the data
stream, see `dist`), decode, and minimise reconstruction + kl_weight KL (+ perceptual) (+ the adaptive
PatchGAN term from `loss.disc_start` on, with the discriminator trained on the same batch); see
`losses`. Held-out PSNR / SSIM and an originals-above-reconstructions image are written as the run
goes. At the end the latent scale factor 1 / std(z) is measured on held-out images (LDM Sec. 4.3.2)
and stored in the VAE config of the output file RUN/vae.safetensors: a daguerre checkpoint holding
only `first_stage_model.*` tensors plus the ModelConfig JSON (metadata `format` = "daguerre-vae"; the
format is `checkpoints/vae_file.py`), which `daguerre train ldm --vae` loads.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.vae_file import save_vae
from ..models.autoencoder import AutoencoderKL
from . import dist, losses
from .config import RunConfig, derive_model_config, to_jsonable
from .data import batch_loader, images_of, load_items, load_train_data
from .ema import EMA
from .init import check_init_source, init_vae
from .log import RunLogger, setup_logging, teardown_logging, truncate_metrics
from .loop import (
    TrainingState,
    autocast,
    clip_gradients,
    configure_threads,
    due,
    lr_at,
    make_optimizer,
    paused,
    prepare_run_dir,
    resume_state,
    seed_everything,
    set_lr,
    stop_step,
    unwrap,
    wrap_ddp,
    write_config,
)
from .metrics import latent_scale, psnr, ssim
from .samples import SAMPLES_DIR, comparison_image, save_png

logger = logging.getLogger("daguerre.train")
VAE_FILE = "vae.safetensors"
EVAL_BATCH = 32  # held-out images per forward pass in evaluation
LATENT_SCALE_SEED = 0  # the posterior samples of the scale measurement are drawn from this seed


class Reconstruct(nn.Module):
    """x, eps -> (decode(mean + std eps), KL per image): the autoencoder's training forward, as one module
    so that DistributedDataParallel sees every parameter used in one call."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = self.vae.encode(x)
        z = post.mean + post.std * eps.to(post.mean.dtype)  # (B, C, h, w)
        return self.vae.decode(z), post.kl()


@torch.no_grad()
def evaluate(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstructions through the posterior mode, and their mean PSNR / SSIM against `images`."""
    recs = []
    for chunk in images.split(EVAL_BATCH):
        recs.append(vae.decode(vae.encode(chunk).mode()).float())
    rec = torch.cat(recs)
    metrics = {"psnr": float(psnr(images, rec).mean())}
    if min(images.shape[-2:]) >= 11:
        metrics["ssim"] = float(ssim(images, rec).mean())
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
    env = dist.init_distributed(cfg.train.device)
    threads = torch.get_num_threads()
    try:
        return _train(cfg, Path(out), resume, until, env)
    finally:
        dist.shutdown()
        teardown_logging()
        torch.set_num_threads(threads)


def _train(cfg: RunConfig, out: Path, resume: bool, until: int | None, env: dist.DistEnv) -> Path:
    t, lc = cfg.train, cfg.loss
    configure_threads(t)
    resume_from = prepare_run_dir(out, cfg, resume, env, until)
    latest = resume_from.folder
    if latest is None:
        check_init_source(t.init_from)
    setup_logging(out, env.is_main)
    data = load_train_data(cfg.data)
    model_cfg = derive_model_config(cfg, data.channels, data.class_names)
    device = env.device
    seed_everything(t.seed, env.rank)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        vae = AutoencoderKL(model_cfg.vae)
        disc = None
        if lc.disc_weight > 0:
            disc = losses.PatchDiscriminator(data.channels, lc.disc_channels, lc.disc_layers)
    init_record = None
    if t.init_from and latest is None:  # fine-tuning: the model's autoencoder (a resume has its own weights)
        init_record = init_vae(t.init_from, vae)
    vae.to(device).train()
    vae.gradient_checkpointing = t.gradient_checkpointing
    modules: dict[str, nn.Module] = {"vae": vae}
    ema = EMA(vae, t.ema_decay, t.ema_warmup)
    opt = make_optimizer(vae.parameters(), t)
    optimizers = {"vae": opt}
    ddp_rec = wrap_ddp(Reconstruct(vae), env)
    ddp_disc = opt_d = None
    if disc is not None:
        disc.to(device).train()
        modules["disc"] = disc
        opt_d = make_optimizer(disc.parameters(), t, lc.disc_lr)
        optimizers["disc"] = opt_d
        ddp_disc = wrap_ddp(disc, env)
    ts = TrainingState(modules, {"vae": ema}, optimizers)
    start, meta = resume_state(ts, resume_from, env)
    if meta is not None:
        init_record = meta.get("init")  # what step 0 was initialised from (--init), kept by every checkpoint
        if env.is_main:
            truncate_metrics(out, start)
    write_config(out, cfg, env)
    n_params = sum(p.numel() for p in vae.parameters())
    logger.info("stage 1: autoencoder of %.2f M parameters, f=%d, %d latent channels; %d training images on "
                "%d process(es), global batch %d", n_params / 1e6, model_cfg.vae.downsample_factor,
                model_cfg.vae.latent_channels, len(data.train_pool), env.world,
                t.batch_size * env.world * t.grad_accum)

    sampler = dist.StreamSampler(data.train_pool, t.seed, t.batch_size, env.world, env.rank, t.grad_accum)
    f = model_cfg.vae.downsample_factor
    latent_shape = (model_cfg.vae.latent_channels, cfg.data.size // f, cfg.data.size // f)
    n_pixels = data.channels * cfg.data.size**2
    perceptual = losses.perceptual_loss(lc.perceptual, device) if lc.perceptual else None
    last_layer = vae.decoder.conv_out.weight
    holdout = images_of(load_items(data, data.holdout)) if env.is_main and len(data.holdout) else None
    ema_vae = copy.deepcopy(vae).eval().requires_grad_(False) if env.is_main else None
    runlog = RunLogger(out, enabled=env.is_main, start=start, total=t.steps, images_per_step=sampler.global_batch,
                       progress=t.progress, tensorboard=t.tensorboard)
    stream = iter(sampler.iter_steps(start, t.steps))
    n_pool = len(data.train_pool)
    items_iter = batch_loader(data, ((int(b[2][0]) // n_pool, b[3]) for b in sampler.iter_steps(start, t.steps)),
                              cfg.data.workers)

    stop = stop_step(start, t.steps, until)
    for step in range(start, stop):
        set_lr(opt, lr_at(step, t))
        gan_on = disc is not None and step >= lc.disc_start
        if opt_d is not None:
            set_lr(opt_d, lr_at(step, t, lc.disc_lr))
        sums: dict[str, float] = defaultdict(float)
        for micro in range(t.grad_accum):
            _, _, positions, _ = next(stream)
            x = images_of(next(items_iter)).to(device)
            gens = [dist.sample_generator(t.seed, "vae", int(p)) for p in positions]
            if cfg.data.flip:
                x = _flip(x, gens)
            eps = _per_sample_noise(gens, latent_shape).to(device)
            sync = micro == t.grad_accum - 1
            with dist.maybe_no_sync(ddp_rec, not sync):
                with autocast(device, t.bf16):
                    rec, kl = ddp_rec(x, eps)
                rec = rec.float()
                nll = losses.reconstruction_loss(x, rec, lc.rec).mean()
                if perceptual is not None:
                    p_loss = perceptual(x, rec).mean()
                    nll = nll + lc.perceptual_weight * p_loss
                    sums["perceptual"] += float(p_loss.detach())
                kl_loss = kl.float().mean() / n_pixels
                loss = nll + lc.kl_weight * kl_loss
                if gan_on:
                    unwrap(disc).requires_grad_(False)
                    with autocast(device, t.bf16):
                        g_loss = losses.generator_loss(disc(rec).float())
                    unwrap(disc).requires_grad_(True)
                    g_rec = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
                    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
                    d_weight = losses.adaptive_weight(dist.all_reduce_mean_(g_rec), dist.all_reduce_mean_(g_gan),
                                                      lc.disc_weight)
                    loss = loss + d_weight * g_loss
                    sums["g_loss"] += float(g_loss.detach())
                    sums["d_weight"] += float(d_weight)
                (loss / t.grad_accum).backward()
            if gan_on:
                with dist.maybe_no_sync(ddp_disc, not sync):
                    with autocast(device, t.bf16):
                        logits = ddp_disc(torch.cat([x, rec.detach()])).float()
                    real, fake = logits.chunk(2)
                    d_loss = losses.hinge_d_loss(real, fake)
                    (d_loss / t.grad_accum).backward()
                sums["d_loss"] += float(d_loss.detach())
            sums["loss"] += float(loss.detach())
            sums["rec"] += float(losses.reconstruction_loss(x, rec.detach(), lc.rec).mean())
            sums["kl"] += float(kl.detach().float().mean())
        grad_norm = clip_gradients(list(vae.parameters()), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gan_on:
            clip_gradients(list(disc.parameters()), t.grad_clip)
            opt_d.step()
        if opt_d is not None:
            opt_d.zero_grad(set_to_none=True)
        ema.update(vae)
        done = step + 1
        avg = {k: v / t.grad_accum for k, v in sums.items()}
        runlog.add({**avg, "grad_norm": grad_norm})
        runlog.step(done, avg["loss"])
        if due(done, t.log_every, t.steps):
            means = runlog.take_means()  # over the steps since the last line, averaged over processes
            vals = dist.all_reduce_mean_(torch.tensor(list(means.values()), dtype=torch.float64))
            runlog.log(done, {**dict(zip(means, vals.tolist(), strict=True)), "lr": opt.param_groups[0]["lr"],
                              "images_per_s": runlog.images_per_second(done)})
        evaluate_now, recon_now = due(done, t.eval_every, t.steps), due(done, t.sample_every, t.steps)
        if env.is_main and holdout is not None and (evaluate_now or recon_now):
            ema.copy_to(ema_vae)
            rec_h, metrics = evaluate(ema_vae, holdout.to(device))
            if evaluate_now:
                runlog.log(done, {f"holdout_{k}": v for k, v in metrics.items()})
                logger.info("step %d: held-out PSNR %.2f dB%s", done, metrics["psnr"],
                            f", SSIM {metrics['ssim']:.4f}" if "ssim" in metrics else "")
            if recon_now:
                k = cfg.sample.recon_images
                save_png(comparison_image(holdout[:k], rec_h[:k].cpu()), out / SAMPLES_DIR / f"recon_{done:08d}.png")
        if due(done, t.checkpoint_every, stop):  # stop: train.steps, or the pause of --until
            ts.save(out, done, cfg, sampler, env, extra={"init": init_record})
    runlog.close()
    if stop < t.steps:
        return paused(out, stop, t.steps, env)

    path = out / VAE_FILE
    if env.is_main:
        ema.copy_to(ema_vae)
        final_metrics = {}
        if holdout is not None:
            scale_images = holdout[: cfg.sample.latent_scale_images].to(device)
            model_cfg.vae.scale_factor = measure_scale(ema_vae, scale_images)
            model_cfg.vae.shift_factor = 0.0
            _, final_metrics = evaluate(ema_vae, holdout.to(device))
        else:
            logger.warning("data.holdout = 0: no held-out images, the latent scale factor stays %g",
                           model_cfg.vae.scale_factor)
        model_cfg.name = f"{cfg.data.kind}-vae"
        model_cfg.provenance = {
            "stage": "vae", "steps": t.steps, "training_seconds": round(ts.seconds(), 1),
            "images_seen": t.steps * sampler.global_batch, "parameters": n_params, "data": data.description,
            "holdout_metrics": final_metrics, "run_config": to_jsonable(cfg.to_dict()),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "weights": "ema" if t.ema_decay > 0 else "raw",
        }
        if init_record is not None:  # fine-tuned from another autoencoder (train.init_from)
            model_cfg.provenance["init"] = init_record
        if ts.history:  # training phases: config keys changed at a resume (loop.PHASE_CHANGES)
            model_cfg.provenance["config_history"] = ts.history
        save_vae(ema_vae, model_cfg, path)
        logger.info("wrote %s (scale_factor %.5f; %s)", path, model_cfg.vae.scale_factor, json.dumps(final_metrics))
    dist.barrier()
    return path
