"""Stage 2, `daguerre train ldm`: the latent diffusion model on a frozen autoencoder (LDM Sec. 3.2-3.3).

The images are encoded once (`latents`); each step draws, per sample and from the sample's own
generator (`dist.sample_generator`), a timestep t ~ U{0..T-1}, noise eps (plus offset noise), a
posterior sample z = mean + std eps' (or the mode), the caption-dropout decision and, with flips
cached, the view. With z0 = (z - shift) * scale and x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, the
U-Net learns eps, v or x0 under the min-SNR-gamma weights (`objective`, shared with the LoRA stages);
tau_theta (daguerre's CLIP-style text transformer) is trained jointly, as LDM does, or is the frozen
pretrained MiniLM, whose contexts are encoded once per caption (`text_cache`). Dropped captions become the
empty prompt and dropped labels the null class K, the unconditional branches classifier-free guidance uses
at sampling time. The final file RUN/model.safetensors is a daguerre checkpoint (EMA U-Net and text encoder, the
VAE, the schedule, the config with provenance) that `daguerre generate --model` loads.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..checkpoints.vae_file import load_vae
from ..components import Components
from ..conditioning import conditioner_for
from ..models.gligen import freeze_base, gate_parameters
from ..models.text_encoder import CLIPTextEncoder
from ..models.unet import UNetModel
from . import dist, latents, losses, text_cache
from .concat import build_concat_inputs
from .config import RunConfig, derive_model_config
from .export import ADAPTER_FILE, MODEL_FILE, ModelRecord, caption_tokens, networks, write_adapter, write_model
from .init import init_ldm
from .log import RunLogger
from .loop import RunSummary, Setup, autocast, make_optimizer, run, wrap_ddp
from .objective import DiffusionObjective, NoisedBatch
from .samples import SAMPLES_DIR, ignored_sample_settings, save_png

logger = logging.getLogger("daguerre.train")


class Teacher(NamedTuple):
    """loss.teacher_weight's frozen model: its U-Net, how it reads a micro-batch's captions, its file's sha256."""

    unet: nn.Module
    text: Any  # a text_cache hook, the run's own unless the run trains its text encoder
    sha256: str


class DiffusionModel(nn.Module):
    """U-Net and (trainable) text encoder in one module: pred = unet(x_t, t, tau(ids)) or unet(x_t, t, y=labels).

    One module so that DistributedDataParallel averages the gradients of both networks together.
    """

    def __init__(self, unet: UNetModel, text_encoder: CLIPTextEncoder | None) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor | None = None,
                context: torch.Tensor | None = None, y: torch.Tensor | None = None,
                layout: torch.Tensor | None = None) -> torch.Tensor:
        if ids is not None:
            context = self.text_encoder(ids, output_pooled=False).hidden  # (B, 77, width)
        return self.unet(x, t, context=context, y=y, layout=layout)  # a layout model's tokens: its layout_net


def train_ldm(cfg: RunConfig, out: str | Path, *, vae_path: str | Path, resume: bool = False,
              until: int | None = None) -> Path:
    """Run stage 2 as configured on the autoencoder in `vae_path`; returns RUN/model.safetensors, or with
    `until` < train.steps the checkpoint of step `until` (a pause: resume later with `resume`)."""
    return run(LDMStage(cfg, Path(vae_path)), cfg, out, resume=resume, until=until)


class LDMStage:
    """Stage 2 for `loop.run`: the U-Net (and a jointly trained text encoder) on a frozen autoencoder's cached
    latents; the model's conditioner gives each micro-batch its condition."""

    output = MODEL_FILE

    def __init__(self, cfg: RunConfig, vae_path: Path) -> None:
        self.cfg, self.vae_path = cfg, vae_path
        self.init_record: dict[str, Any] | None = None

    def prepare(self, env: dist.DistEnv) -> None:
        """Before the run folder: the autoencoder the run trains on (a missing or damaged file fails first)."""
        from ..weights.io import file_hash

        self.vae, self.vae_model_cfg = load_vae(self.vae_path, env.device)
        self.vae_sha = file_hash(self.vae_path)

    def build(self, setup: Setup) -> None:
        cfg, env, data, out = self.cfg, setup.env, setup.data, setup.out
        t = cfg.train
        self.data, self.out, self.device = data, out, env.device
        device = env.device
        if data.channels != self.vae_model_cfg.vae.in_channels:
            raise ValueError(f"the VAE {self.vae_path} encodes {self.vae_model_cfg.vae.in_channels}-channel images "
                             f"but the data has {data.channels} channels")
        if cfg.model.unet.gligen is not None and not t.init_from:
            raise ValueError("a GLIGEN adapter trains on a frozen text-to-image model: name it with --init MODEL "
                             "(train.init_from; e.g. the shipped shapes model, docs/layout.md)")
        run_model = copy.deepcopy(cfg)
        run_model.model.vae = copy.deepcopy(self.vae_model_cfg.vae)  # the autoencoder is the trained one
        self.model_cfg = model_cfg = derive_model_config(run_model, data.channels, data.class_names)

        cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "latents"
        self.lat = lat = latents.build_or_load(self.vae, self.vae_sha, data, cfg.data.flip, cache_root, env)
        self.concat_in = build_concat_inputs(model_cfg, cfg, data, self.vae, cache_root, env)  # SR / inpainting
        self.frozen = frozen = text_cache.load_frozen_text_encoder(model_cfg, device)  # MiniLM: (encoder, tok.)
        text_emb = text_cache.build_or_load(*frozen, lat.captions, cache_root, env) if frozen else None  # once

        unet, te, self.tokenizer = networks(model_cfg, frozen, t.seed)
        if t.init_from and setup.fresh:  # fine-tuning: the model's weights (a resume has its own)
            self.init_record = init_ldm(t.init_from, unet, te if not frozen else None, self.vae_sha, t.init_base)
        train_te = te is not None and cfg.loss.train_text_encoder
        keep = train_te or model_cfg.unet.gligen is not None  # GLIGEN: the frozen encoder pruned back to its words
        self.tokens = caption_tokens(self.tokenizer, lat.captions) if keep else None  # kept by pruning
        unet.to(device).train()
        unet.gradient_checkpointing = t.gradient_checkpointing
        self.unet, self.te = unet, te
        self.modules: dict[str, nn.Module] = {"unet": unet}
        self.ema_targets: tuple[str, ...] = ("unet",)
        params = list(unet.parameters())
        if model_cfg.unet.gligen is not None:  # a GLIGEN adapter trains alone, on the frozen base model
            params = freeze_base(unet)
        if te is not None:
            te.to(device)
            te.gradient_checkpointing = t.gradient_checkpointing
            self.modules["text_encoder"] = te
            if train_te:
                te.train()
                self.ema_targets += ("text_encoder",)
                params += list(te.parameters())
            else:
                te.eval().requires_grad_(False)
        self.evaluated = tuple(self.modules)
        groups: list = params
        if model_cfg.unet.gligen is not None and t.gate_lr_scale != 1.0:  # the adapter's gates learn faster
            gates = {id(p) for p in gate_parameters(unet)}
            groups = [{"params": [p for p in params if id(p) not in gates]},
                      {"params": [p for p in params if id(p) in gates], "lr_scale": t.gate_lr_scale}]
        self.optimizers = {"model": make_optimizer(groups, t)}
        self.peak_lr: dict[str, float] = {}
        self.model = wrap_ddp(DiffusionModel(unet, te if train_te else None), env)
        self.pool = torch.arange(len(lat)).numpy()
        self.conditioner = conditioner_for(model_cfg)  # text, class or none: the condition of each micro-batch
        self.rows: Any = lat  # what the conditioner reads of the training rows (captions, labels; layouts)
        if self.conditioner.takes_layout:  # a layout model: each row's layout, and grids drawn from layouts
            from .layout import LayoutSamples, grounding_rows, layout_rows

            if model_cfg.unet.gligen is not None:  # GLIGEN: boxes and phrases embedded by the frozen text encoder
                self.rows = grounding_rows(lat, data, model_cfg.unet.gligen, te, self.tokenizer)
            else:
                self.rows = layout_rows(lat, data, model_cfg.unet.layout)
            count = self.conditioner.preview_count(cfg.sample.prompts, cfg.sample.n_unconditional)
            self.concat_in = LayoutSamples(self.rows, data, cfg.data.size, count if env.is_main else 0)
        for warning in ignored_sample_settings(self.conditioner, cfg.sample) if env.is_main else ():
            logger.warning(warning)
        self.text = text_cache.text_hook(self.tokenizer, te, trained=train_te, cache=text_emb, bf16=t.bf16)
        self.objective = DiffusionObjective(model_cfg, cfg.loss)
        self.teacher = None  # loss.teacher_weight: the --init model, frozen, whose predictions the run also matches
        if cfg.loss.teacher_weight > 0:
            self.teacher = self._teacher(frozen, text_emb, train_te)
        self.grounding = None  # token grounding (issue 22, `grounding`): each row's words and object masks
        if cfg.loss.grounding_weight > 0:
            from .grounding import GroundingTargets, grounded_layers

            self.grounding = GroundingTargets(data, lat.captions, self.tokenizer, tuple(lat.mean.shape[-2:]),
                                              cfg.loss.grounding_words, cfg.loss.grounding_rest)
            grounded_layers(self.unet, cfg.loss.grounding_exclude)  # its names checked before the first step
        self.runs = None  # loss.grounding_source = "samples": the --init model's own sampling runs, checked
        if self.grounding is not None and cfg.loss.grounding_source == "samples":
            self.runs = self._sampled_runs(env)

    def _sampled_runs(self, env: dist.DistEnv) -> Any:
        """The runs token grounding reads (`sampled_grounding`): RUN/grounding_runs.safetensors, recorded once
        from the --init model on training captions drawn from the run's seed."""
        from .sampled_grounding import MAX_ATTEMPTS, RUNS_FILE, load_or_record, record_runs

        lc, g = self.cfg.loss, self.grounding
        rng = np.random.default_rng(dist.mix_seed(self.cfg.train.seed, "grounding-runs"))
        rows = rng.permutation(len(self.lat))[:MAX_ATTEMPTS * lc.grounding_runs].tolist()

        def make() -> Any:
            return record_runs(self.cfg.train.init_from, [self.lat.captions[r] for r in rows],
                               [g.raw.scene(int(g.pool[r])) for r in rows], rows, lc.grounding_runs,
                               self.cfg.train.seed, self.tokenizer, g.latent_size, g.colours, self.device,
                               g.rest)

        return load_or_record(self.out / RUNS_FILE, make, env.is_main)

    def _teacher(self, frozen: Any, text_emb: Any, train_te: bool) -> Teacher:
        """The model --init names, loaded into networks of the run's own architecture, frozen (loss.teacher_weight);
        with the text encoder trained, it reads the captions with its own."""
        t = self.cfg.train
        unet, te, _ = networks(self.model_cfg, frozen, t.seed)
        record = init_ldm(t.init_from, unet, te if not frozen else None, self.vae_sha, t.init_base)
        unet.to(self.device).eval().requires_grad_(False)
        text = self.text
        if train_te:
            te.to(self.device).eval().requires_grad_(False)
            text = text_cache.text_hook(self.tokenizer, te, trained=False, cache=text_emb, bf16=t.bf16)
        return Teacher(unet, text, record["sha256"])

    def resumed(self, meta: dict[str, Any]) -> None:
        if meta.get("vae_sha256") != self.vae_sha:
            raise ValueError(f"cannot resume {self.out}: it was trained on another autoencoder than {self.vae_path}; "
                             "resume with the run's own --vae file")
        self.init_record = meta.get("init")  # what step 0 was initialised from (--init), kept by every checkpoint
        began = (self.init_record or {}).get("sha256")
        if self.teacher is not None and began != self.teacher.sha256:
            raise ValueError(f"cannot resume {self.out} with loss.teacher_weight: its teacher, --init "
                             f"{self.cfg.train.init_from}, is not the file the run began from (sha256 "
                             f"{str(began)[:16]}); resume with that file")

    def describe(self, env: dist.DistEnv) -> str:
        t, m, lat = self.cfg.train, self.model_cfg, self.lat
        def learnt(module: torch.nn.Module | None) -> int:
            return sum(p.numel() for p in module.parameters() if p.requires_grad) if module is not None else 0

        n_unet, n_te = learnt(self.unet), learnt(self.te)  # a GLIGEN run: the adapter alone, base and encoder frozen
        of_unet = self._parameters()["unet"]
        trained = f"U-Net {n_unet / 1e6:.2f} M" + (f" (of {of_unet / 1e6:.2f} M: the rest frozen)" if n_unet < of_unet
                                                  else "") + (f" + text encoder {n_te / 1e6:.2f} M" if n_te else "")
        return (f"stage 2: {trained} parameters trained, "
                f"{m.conditioning} conditioning, {m.schedule.prediction_type} prediction; {len(lat)} cached latents "
                f"{tuple(lat.mean.shape[2:])}; {env.world} process(es), global batch "
                f"{t.batch_size * env.world * t.grad_accum}")

    def begin(self, sampler: dist.StreamSampler, start: int) -> None:
        self.sampler = sampler

    def step(self, step: int, micro: int, sync: bool) -> dict[str, float]:
        t, lc, device = self.cfg.train, self.cfg.loss, self.device
        positions, idx = self.sampler.indices(step, micro)
        gens = [dist.sample_generator(t.seed, "ldm", int(p)) for p in positions]
        b = self.objective.draw(gens, self.lat, idx, device)
        dropped = b.drop < lc.caption_dropout
        text_dropped = b.drop < lc.caption_dropout + lc.text_dropout  # layout models: the prompt alone too
        kwargs = self.conditioner.batch(b.rows, dropped, self.rows, device, self.text, text_dropped)  # dropped: null
        x_t = self.concat_in.apply(b.x_t, kwargs, b.rows, b.view, gens, device)  # cat(x_t, c) for SR / inpainting
        if self.grounding is not None:
            return self._grounded_step(b, x_t, kwargs, dropped, text_dropped, sync, int(positions[0]))
        with dist.maybe_no_sync(self.model, not sync):
            with autocast(device, t.bf16):
                pred = self.model(x_t, b.t.float().to(device), **kwargs)
            loss = self.objective.loss(pred, b, self._pixel_weights(kwargs, pred))
            total, logged = self._with_teacher(loss, pred, b, x_t, kwargs, dropped, text_dropped)
            (total / t.grad_accum).backward()
        return {"loss": float(loss.detach()), **logged}

    def _with_teacher(self, loss: torch.Tensor, pred: torch.Tensor, b: NoisedBatch, x_t: torch.Tensor,
                      kwargs: dict[str, Any], dropped: torch.Tensor, text_dropped: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss plus loss.teacher_weight x the MSE of `pred` to the teacher's prediction on the same input
        (weighted by min-SNR as the diffusion loss), and what to log of it; without a teacher, the loss itself.
        `kwargs`: the run's condition, which the teacher reads as it is unless it has its own text encoder."""
        if self.teacher is None:
            return loss, {}
        device = self.device
        if self.teacher.text is not self.text:  # its own text encoder reads the captions again
            kwargs = self.conditioner.batch(b.rows, dropped, self.rows, device, self.teacher.text, text_dropped)
        with torch.no_grad(), autocast(device, self.cfg.train.bf16):
            want = self.teacher.unet(x_t, b.t.float().to(device), **kwargs)
        term = losses.weighted_mse(pred, want, b.weights)
        return loss + self.cfg.loss.teacher_weight * term, {"teacher_loss": float(term.detach())}

    def _pixel_weights(self, kwargs: dict[str, Any], pred: torch.Tensor) -> torch.Tensor | None:
        """The loss's weights by position: a GLIGEN run's `loss.box_weight` (`layout.box_loss_weights`), else None."""
        if not self.cfg.loss.box_weight:
            return None
        from .layout import box_loss_weights

        return box_loss_weights(kwargs["layout"], pred.shape[-2], pred.shape[-1], self.cfg.loss.box_weight)

    def _grounded_step(self, b: NoisedBatch, x_t: torch.Tensor, kwargs: dict[str, Any], dropped: torch.Tensor,
                       text_dropped: torch.Tensor, sync: bool, position: int) -> dict[str, float]:
        """`step` with token grounding: the cross-attention of the rows' object words recorded in the forward
        pass (`grounding.GroundingRecorder`), their loss added to the diffusion loss (`objective.total`). With
        the model's own runs as the source, `loss.grounding_batch` of their states join the network call and
        the grounding is theirs (`sampled_grounding`); `position` (the micro-batch's first) draws them."""
        from .grounding import GroundingRecorder, grounding

        t, lc, device = self.cfg.train, self.cfg.loss, self.device
        n, x_in, t_in, kw_in, kept = len(b.rows), x_t, b.t.float(), kwargs, None
        if self.runs is None:
            pairs = self.grounding.batch(b.rows, dropped, b.view, device)
            if lc.grounding_max_timestep < self.model_cfg.schedule.num_train_timesteps or lc.grounding_min_timestep:
                t_cpu = b.t.cpu()  # the noisiest, or the least noisy, left alone
                if lc.grounding_min_timestep_heights:  # ... the least noisy only at the layers of those heights
                    pairs = pairs.of_samples(t_cpu < lc.grounding_max_timestep).marking(
                        t_cpu < lc.grounding_min_timestep)
                else:
                    pairs = pairs.of_samples((t_cpu < lc.grounding_max_timestep) & (t_cpu >= lc.grounding_min_timestep))
        else:
            gen = dist.sample_generator(t.seed, "grounding-runs", position)
            rx, rt, kept, rows, pairs = self.runs.batch(gen, lc.grounding_batch, n, device)
            none = torch.zeros(len(rows), dtype=torch.bool)
            theirs = self.conditioner.batch(rows, none, self.rows, device, self.text, none)
            x_in, t_in = torch.cat([x_t, rx]), torch.cat([t_in, rt])
            kw_in = {k: torch.cat([v, theirs[k]]) for k, v in kwargs.items()}
        recorder = GroundingRecorder(pairs, self.grounding.latent_size, lc.grounding_resolutions, lc.grounding_dilation,
                                     lc.grounding_ring, lc.grounding_min_timestep_heights)
        # hung through the backward pass too: a checkpointed block recomputes its forward, the recorder's included
        with dist.maybe_no_sync(self.model, not sync), grounding(self.unet, recorder, lc.grounding_exclude):
            with autocast(device, t.bf16):
                out = self.model(x_in, t_in.to(device), **kw_in)
            recorder.active = False  # (the recomputation adds no terms)
            pred = out[:n]
            loss = self.objective.loss(pred, b)
            token, pixel = recorder.losses()
            total, logged = self._with_teacher(loss, pred, b, x_t, kwargs, dropped, text_dropped)
            if kept is not None and lc.grounding_keep_weight > 0:  # the runs' path: the --init model's outputs
                term = losses.weighted_mse(out[n:], kept, torch.ones(len(kept), device=device))
                total = total + lc.grounding_keep_weight * term
                logged["keep_loss"] = float(term.detach())
            (self.objective.total(total, token, pixel) / t.grad_accum).backward()
        return {"loss": float(loss.detach()), "grounding_loss": float(token.detach()),
                "grounding_pixel_loss": float(pixel.detach()), **logged}

    def sample(self, step: int, models: dict[str, nn.Module], runlog: RunLogger, *, grid: bool,
               evaluate: bool) -> None:
        """A grid of EMA samples at the `[sample]` settings (`grid`); stage 2 has no held-out evaluation."""
        if not grid:
            return
        components = self._components(models)
        image = self.concat_in.sample_grid(components, self.cfg.sample)
        save_png(image, self.out / SAMPLES_DIR / f"step_{step:08d}.png")

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"vae_sha256": self.vae_sha, "vae_file": str(self.vae_path), "init": self.init_record,
                "class_names": self.data.class_names, "caption_token_ids": self.tokens}  # what export needs

    def export(self, path: Path, models: dict[str, nn.Module], summary: RunSummary) -> None:
        """The model file (`export.write_model`); a GLIGEN run also writes its adapter file beside it
        (`export.write_adapter`: RUN/adapter.safetensors, on the model the run started from)."""
        record = ModelRecord(
            steps=self.cfg.train.steps, seconds=summary.seconds, world=summary.world,
            global_batch=summary.global_batch, parameters=self._parameters(), vae_file=self.vae_path,
            vae_sha256=self.vae_sha, vae_provenance=self.vae_model_cfg.provenance, data=self.data.description,
            init=self.init_record, history=summary.history, caption_tokens=self.tokens)
        write_model(self._components(models), self.cfg, record, path)
        if self.model_cfg.unet.gligen is not None:
            try:
                write_adapter(self._components(models), self.cfg, record, path.with_name(ADAPTER_FILE))
            except ValueError as e:  # the whole model is written: the run is not lost for its adapter
                logger.warning("no adapter file: %s; the whole model is %s", e, path)

    def _components(self, models: dict[str, nn.Module]) -> Components:
        frozen = self.frozen
        return Components(config=self.model_cfg, unet=models["unet"], vae=self.vae,
                          text_encoder=models.get("text_encoder", frozen and frozen[0]), tokenizer=self.tokenizer)

    def _parameters(self) -> dict[str, int]:
        return {"unet": sum(p.numel() for p in self.unet.parameters()),
                "text_encoder": sum(p.numel() for p in self.te.parameters()) if self.te is not None else 0}
