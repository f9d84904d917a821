"""Stage 2, `daguerre train ldm`: the latent diffusion model on a frozen autoencoder (LDM Sec. 3.2-3.3).

The images are encoded once (`latents`); each step draws, per sample and from the sample's own
generator (`dist.sample_generator`), a timestep t ~ U{0..T-1}, noise eps (plus offset noise), a
posterior sample z = mean + std eps' (or the mode), the caption-dropout decision and, with flips
cached, the view. With z0 = (z - shift) * scale and x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, the
U-Net learns eps, v or x0 under the min-SNR-gamma weights (`losses`); tau_theta (daguerre's CLIP-style
text transformer) is trained jointly, as LDM does, or is the frozen pretrained MiniLM, whose contexts
are encoded once per caption (`text_cache`). Dropped captions become the empty prompt and
dropped labels the null class K, the unconditional branches classifier-free guidance uses at sampling
time. The final file RUN/model.safetensors is a daguerre checkpoint (EMA U-Net and text encoder, the
VAE, the schedule, the config with provenance) that `daguerre generate --model` loads.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.vae_file import load_vae
from ..components import Components
from ..conditioning import conditioner_for
from ..diffusion.schedules import alphas_cumprod, betas_from_config, q_sample
from ..models.text_encoder import CLIPTextEncoder
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNetModel
from . import dist, latents, losses, text_cache
from .concat import build_concat_inputs
from .config import RunConfig, derive_model_config
from .data import load_train_data
from .ema import EMA
from .export import MODEL_FILE, ModelRecord, caption_tokens, write_model
from .init import check_init_source, init_ldm
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
    wrap_ddp,
    write_config,
)
from .samples import SAMPLES_DIR, sample_grid, save_png

logger = logging.getLogger("daguerre.train")


class DiffusionModel(nn.Module):
    """U-Net and (trainable) text encoder in one module: pred = unet(x_t, t, tau(ids)) or unet(x_t, t, y=labels).

    One module so that DistributedDataParallel averages the gradients of both networks together.
    """

    def __init__(self, unet: UNetModel, text_encoder: CLIPTextEncoder | None) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor | None = None,
                context: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        if ids is not None:
            context = self.text_encoder(ids, output_pooled=False).hidden  # (B, 77, width)
        return self.unet(x, t, context=context, y=y)


def _draws(gens: list[torch.Generator], n_steps: int, shape: tuple[int, ...], views: int, offset: float,
           sample_posterior: bool, t_cdf: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sample random draws, each sample from its own generator, always in the same order."""
    ts, noise, post, drop, view = [], [], [], [], []
    for g in gens:
        ts.append(losses.draw_timestep(g, n_steps, t_cdf))
        eps = torch.randn(shape, generator=g)
        if offset > 0:  # offset noise: a per-channel constant shift (Guttenberg 2023)
            eps = eps + offset * torch.randn((shape[0], 1, 1), generator=g)
        noise.append(eps)
        post.append(torch.randn(shape, generator=g) if sample_posterior else torch.zeros(shape))
        drop.append(torch.rand(1, generator=g))
        view.append(torch.randint(0, views, (1,), generator=g) if views > 1 else torch.zeros(1, dtype=torch.long))
    return {"t": torch.cat(ts), "noise": torch.stack(noise), "post": torch.stack(post), "drop": torch.cat(drop),
            "view": torch.cat(view)}


def train_ldm(cfg: RunConfig, out: str | Path, *, vae_path: str | Path, resume: bool = False,
              until: int | None = None) -> Path:
    """Run stage 2 as configured on the autoencoder in `vae_path`; returns RUN/model.safetensors, or with
    `until` < train.steps the checkpoint of step `until` (a pause: resume later with `resume`)."""
    env = dist.init_distributed(cfg.train.device)
    threads = torch.get_num_threads()
    try:
        return _train(cfg, Path(out), Path(vae_path), resume, until, env)
    finally:
        dist.shutdown()
        teardown_logging()
        torch.set_num_threads(threads)


def _train(cfg: RunConfig, out: Path, vae_path: Path, resume: bool, until: int | None, env: dist.DistEnv) -> Path:
    from ..weights.io import file_hash

    t, lc = cfg.train, cfg.loss
    configure_threads(t)
    device = env.device
    vae, vae_model_cfg = load_vae(vae_path, device)
    vae_sha = file_hash(vae_path)
    resume_from = prepare_run_dir(out, cfg, resume, env, until)
    latest = resume_from.folder
    if latest is None:
        check_init_source(t.init_from)
    setup_logging(out, env.is_main)
    data = load_train_data(cfg.data)
    if data.channels != vae_model_cfg.vae.in_channels:
        raise ValueError(f"the VAE {vae_path} encodes {vae_model_cfg.vae.in_channels}-channel images but the "
                         f"data has {data.channels} channels")
    run_model = copy.deepcopy(cfg)
    run_model.model.vae = copy.deepcopy(vae_model_cfg.vae)  # the autoencoder is the trained one, scale included
    model_cfg = derive_model_config(run_model, data.channels, data.class_names)
    schedule = model_cfg.schedule
    abar_all = alphas_cumprod(betas_from_config(schedule)).float()  # (T,)
    seed_everything(t.seed, env.rank)

    cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "latents"
    lat = latents.build_or_load(vae, vae_sha, data, cfg.data.flip, cache_root, env)
    views = lat.mean.shape[1]
    concat_in = build_concat_inputs(model_cfg, cfg, data, vae, cache_root, env)  # SR / inpainting models
    frozen = text_cache.load_frozen_text_encoder(model_cfg, device)  # MiniLM: (encoder, tokenizer); else None
    text_emb = text_cache.build_or_load(*frozen, lat.captions, cache_root, env) if frozen else None  # once, to disk

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        unet = UNetModel(model_cfg.unet)
        te = CLIPTextEncoder(model_cfg.text_encoder) if model_cfg.text_encoder is not None and not frozen else None
    init_record = None
    if t.init_from and latest is None:  # fine-tuning: the model's weights (a resume has its own)
        init_record = init_ldm(t.init_from, unet, te if not frozen else None, vae_sha)
    tokenizer = frozen[1] if frozen else None
    if te is not None:
        tokenizer = CLIPTokenizer(max_length=model_cfg.text_encoder.max_length,
                                  pad_token_id=model_cfg.text_encoder.pad_token_id)
    train_te = te is not None and lc.train_text_encoder
    tokens = caption_tokens(tokenizer, lat.captions) if train_te else None  # what a pruned vocabulary keeps
    unet.to(device).train()
    unet.gradient_checkpointing = t.gradient_checkpointing
    modules: dict[str, nn.Module] = {"unet": unet}
    emas = {"unet": EMA(unet, t.ema_decay, t.ema_warmup)}
    params = list(unet.parameters())
    if te is not None:
        te.to(device)
        te.gradient_checkpointing = t.gradient_checkpointing
        modules["text_encoder"] = te
        if train_te:
            te.train()
            emas["text_encoder"] = EMA(te, t.ema_decay, t.ema_warmup)
            params += list(te.parameters())
        else:
            te.eval().requires_grad_(False)
    opt = make_optimizer(params, t)
    model = wrap_ddp(DiffusionModel(unet, te if train_te else None), env)
    ts = TrainingState(modules, emas, {"model": opt})
    start, meta = resume_state(ts, resume_from, env)
    if meta is not None:
        if meta.get("vae_sha256") != vae_sha:
            raise ValueError(f"cannot resume {out}: it was trained on another autoencoder than {vae_path}; "
                             "resume with the run's own --vae file")
        if env.is_main:
            truncate_metrics(out, start)
        init_record = meta.get("init")  # what step 0 was initialised from (--init), kept by every checkpoint
    write_config(out, cfg, env)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_te = sum(p.numel() for p in te.parameters()) if te is not None else 0
    logger.info("stage 2: U-Net %.2f M + text encoder %.2f M parameters, %s conditioning, %s prediction; %d "
                "cached latents %s; %d process(es), global batch %d", n_unet / 1e6, n_te / 1e6,
                model_cfg.conditioning, schedule.prediction_type, len(lat), tuple(lat.mean.shape[2:]), env.world,
                t.batch_size * env.world * t.grad_accum)

    sampler = dist.StreamSampler(torch.arange(len(lat)).numpy(), t.seed, t.batch_size, env.world, env.rank,
                                 t.grad_accum)
    shape = tuple(lat.mean.shape[2:])
    conditioner = conditioner_for(model_cfg)  # text, class or none: the condition of each micro-batch
    text = text_cache.text_hook(tokenizer, te, trained=train_te, cache=text_emb, bf16=t.bf16)
    scale, shift = model_cfg.vae.scale_factor, model_cfg.vae.shift_factor
    ema_copies = {}
    if env.is_main:
        ema_copies = {n: copy.deepcopy(m).eval().requires_grad_(False) for n, m in modules.items()}
    runlog = RunLogger(out, enabled=env.is_main, start=start, total=t.steps, images_per_step=sampler.global_batch,
                       progress=t.progress, tensorboard=t.tensorboard)

    def ema_components() -> Components:
        for name, e in emas.items():
            e.copy_to(ema_copies[name])
        return Components(config=model_cfg, unet=ema_copies["unet"], vae=vae,
                          text_encoder=ema_copies.get("text_encoder", frozen and frozen[0]), tokenizer=tokenizer)

    t_cdf = losses.timestep_cdf(lc.timestep_bias, schedule.num_train_timesteps, lc.timestep_bias_multiplier,
                                lc.timestep_bias_portion, lc.timestep_bias_begin, lc.timestep_bias_end)
    stop = stop_step(start, t.steps, until)
    for step in range(start, stop):
        set_lr(opt, lr_at(step, t))
        total = 0.0
        for micro in range(t.grad_accum):
            positions, idx = sampler.indices(step, micro)
            gens = [dist.sample_generator(t.seed, "ldm", int(p)) for p in positions]
            r = _draws(gens, schedule.num_train_timesteps, shape, views, lc.offset_noise, lc.latents == "sample",
                       t_cdf)
            rows = torch.from_numpy(idx)
            mean, std = lat.mean[rows, r["view"]], lat.std[rows, r["view"]]  # (B, C, h, w)
            z0 = ((mean + std * r["post"]) - shift) * scale
            abar = abar_all[r["t"]]  # (B,)
            x_t = q_sample(z0, abar, r["noise"]).to(device)  # sqrt(abar) z0 + sqrt(1 - abar) eps
            target = losses.diffusion_target(schedule.prediction_type, z0, r["noise"], abar).to(device)
            weights = losses.min_snr_weights(abar, lc.min_snr_gamma, schedule.prediction_type).to(device)
            dropped = r["drop"] < lc.caption_dropout
            kwargs = conditioner.batch(rows, dropped, lat, device, text)  # dropped: the null condition
            if concat_in is not None:  # cat(x_t, c): the low-res image or mask + masked-image latent
                c, y_extra = concat_in.step(rows, r["view"], gens, device)
                x_t = torch.cat([x_t, c.to(x_t)], dim=1)
                if y_extra is not None:  # the low-res noise level
                    kwargs["y"] = y_extra
            with dist.maybe_no_sync(model, micro < t.grad_accum - 1):
                with autocast(device, t.bf16):
                    pred = model(x_t, r["t"].float().to(device), **kwargs)
                loss = losses.weighted_mse(pred, target, weights)
                (loss / t.grad_accum).backward()
            total += float(loss.detach())
        grad_norm = clip_gradients(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for name, e in emas.items():
            e.update(modules[name])
        done = step + 1
        avg = total / t.grad_accum
        runlog.add({"loss": avg, "grad_norm": grad_norm})
        runlog.step(done, avg)
        if due(done, t.log_every, t.steps):
            means = runlog.take_means()  # over the steps since the last line, averaged over processes
            vals = dist.all_reduce_mean_(torch.tensor(list(means.values()), dtype=torch.float64))
            runlog.log(done, {**dict(zip(means, vals.tolist(), strict=True)), "lr": opt.param_groups[0]["lr"],
                              "images_per_s": runlog.images_per_second(done)})
        if env.is_main and due(done, t.sample_every, t.steps):
            grid = (sample_grid(ema_components(), cfg.sample) if concat_in is None
                    else concat_in.sample_grid(ema_components(), cfg.sample))
            save_png(grid, out / SAMPLES_DIR / f"step_{done:08d}.png")
        if due(done, t.checkpoint_every, stop):  # stop: train.steps, or the pause of --until
            extra = {"vae_sha256": vae_sha, "vae_file": str(vae_path), "init": init_record,
                     "class_names": data.class_names, "caption_token_ids": tokens}  # what export needs
            ts.save(out, done, cfg, sampler, env, extra=extra)
    runlog.close()
    if stop < t.steps:
        return paused(out, stop, t.steps, env)

    path = out / MODEL_FILE
    if env.is_main:
        record = ModelRecord(
            steps=t.steps, seconds=ts.seconds(), world=env.world, global_batch=sampler.global_batch,
            parameters={"unet": n_unet, "text_encoder": n_te}, vae_file=vae_path, vae_sha256=vae_sha,
            vae_provenance=vae_model_cfg.provenance, data=data.description, init=init_record, history=ts.history,
            caption_tokens=tokens)
        write_model(ema_components(), cfg, record, path)
    dist.barrier()
    return path

