"""Run configurations of `daguerre train`: one TOML file per run, typed by dataclasses, overridable from the CLI.

A run file has the sections `[model]` (a preset name and overrides of any `ModelConfig` field, e.g.
`[model.unet] model_channels = 64`), `[data]` (with the subsection of its kind, `[data.shapes]`,
`[data.fashion_mnist]` or `[data.folder]`, and of model.concat, `[data.lowres]` or `[data.inpaint]`; the
previous release's flat keys such as `data.n` are still read into them: `upgrade_data`), `[train]`, `[loss]`
and `[sample]`. Every key is checked against its dataclass field (`daguerre.config.from_dict`): an unknown
key or a value of the wrong type is one `ValueError` naming the key (with the closest valid name).
`--set section.key=value` overrides are parsed as TOML values (`--set train.lr=2e-4`,
`--set model.unet.channel_mult=[1,2,2]`); a value that is not TOML is a bare string
(`--set data.folder.root=/my/images`) unless it starts like a TOML array, table or quoted string
(`[`, `{`, `"`, `'`): then it is a typo, and an error (`parse_value`). Fields the data fixes are derived
(`derive_model_config`): image channels and size, latent channels of the U-Net, the context width, the
class count. The resolved config is written into every checkpoint and into the final model's provenance.

The example configs ship inside the package (`daguerre/assets/configs/NAME.toml`, `shipped_configs`):
`--config NAME` names one, anything with a `/` or a suffix is a path (`resolve_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ..config import (
    LIMITS,
    CLIPConfig,
    GligenConfig,
    LayoutConfig,
    ModelConfig,
    check_clip_config,
    check_model_config,
    clip_preset,
    coerce,
    from_dict,
    merge_tables,
    parse_overrides,
    preset,
    resolve_text_encoder,
    toml,
)
from ..data.shapes import LABELS, LAYOUT_WORDS, MAX_OBJECTS
from ..untrusted import read_json, regular_file

STAGES = ("vae", "ldm", "clip", "lora", "embedding")
ADAPTER_STAGES = ("lora", "embedding")  # an adapter trained on a frozen model (training/lora.py, embedding.py)
LORA_LAYER_KINDS = ("attention", "conv")  # [lora] unet_layers: see LoraConfig
MAX_LOWRES_FACTOR = 8  # pipelines.request.MAX_UPSCALE
LOWRES_LEVELS = 1000  # pipelines.request.LOWRES_NOISE_STEPS: levels of the augmentation schedule
MAX_SEEDS_PER_PROMPT = 8  # [sample] seeds_per_prompt: a grid stays small enough to look at


@dataclass
class ShapesData:
    """`[data.shapes]`: the procedural shapes world (daguerre.data.shapes); item i is a pure function of (seed, i)."""

    n: int = 50_000  # number of images
    max_objects: int = 3  # objects per image (min_objects..max_objects, at most 4)
    min_objects: int = 1  # fewest objects per image
    p_relation: float = 0.5  # probability that a scene of two or more objects states a relation
    # "grid": centres on the 3x3 grid with jitter; "free": anywhere a box fits (layout models learn any box)
    placement: Literal["grid", "free"] = "grid"


@dataclass
class FashionMNISTData:
    """`[data.fashion_mnist]`: Fashion-MNIST idx files, captioned from the class names."""

    root: str | None = None  # the folder of the idx files; None = the Debian path
    split: Literal["train", "test"] = "train"


@dataclass
class FolderData:
    """`[data.folder]`: a folder of images with captions (daguerre.data.folder)."""

    root: str | None = None  # the image folder (required)
    captions: str = "auto"  # "auto", "txt" (sidecars), "metadata" (metadata.jsonl/csv), "folders", "none"
    channels: int = 3  # 3 = RGB, 1 = grayscale
    crop: Literal["center", "random"] = "center"  # "random": the VAE stage only (the LDM latent cache is centred)


@dataclass
class LowresData:
    """`[data.lowres]`, for model.concat = "lowres" (training/concat.py): how the low-res input is made."""

    factor: int = 4  # the conditioning image is the image / this (bicubic)
    noise: int = 0  # max noise-augmentation level (SD x4: 350); 0 = off


@dataclass
class InpaintData:
    """`[data.inpaint]`, for model.concat = "inpaint" (training/concat.py): the training masks."""

    mask_full: float = 0.25  # fraction of fully masked examples


DataKind = Literal["shapes", "fashion_mnist", "folder"]
# the subsection of each data kind and of each concatenation kind; a run has exactly those of its kinds
KIND_SECTIONS: dict[str, type] = {"shapes": ShapesData, "fashion_mnist": FashionMNISTData, "folder": FolderData}
CONCAT_SECTIONS: dict[str, type] = {"lowres": LowresData, "inpaint": InpaintData}
# the flat [data] keys of the previous release: key -> {subsection: its field there}
FLAT_DATA_KEYS: dict[str, dict[str, str]] = {
    "n": {"shapes": "n"}, "max_objects": {"shapes": "max_objects"}, "min_objects": {"shapes": "min_objects"},
    "p_relation": {"shapes": "p_relation"}, "root": {"fashion_mnist": "root", "folder": "root"},
    "split": {"fashion_mnist": "split"}, "captions": {"folder": "captions"}, "channels": {"folder": "channels"},
    "crop": {"folder": "crop"}, "lowres_factor": {"lowres": "factor"}, "lowres_noise": {"lowres": "noise"},
    "mask_full": {"inpaint": "mask_full"},
}


@dataclass
class DataConfig:
    """Where the training images come from (docs/training.md, "Data"): the keys every kind has, and the
    subsection of the chosen kind (`[data.shapes]`, `[data.fashion_mnist]` or `[data.folder]`) and of the
    model's image concatenation (`[data.lowres]`, `[data.inpaint]`); the other subsections are None."""

    kind: DataKind = "shapes"  # "shapes" (procedural), "fashion_mnist" (idx files) or "folder" (images + captions)
    size: int = 64  # image side in pixels after resize and crop
    seed: int = 0  # shapes: world seed; fashion_mnist: caption phrasing seed; folder: caption choice seed
    flip: bool = False  # random horizontal flips (LDM: both variants cached); off: flips falsify "left"/"right"
    holdout: int = 64  # images at the end of the dataset kept out of training: reconstructions, latent scale
    on_error: Literal["skip", "raise"] = "skip"  # unreadable image: "skip" it (named in the log) or stop the run
    workers: int = 0  # DataLoader worker processes (0 = load in the training process)
    cache_dir: str | None = None  # LDM latent cache; None = RUN_DIR/latents
    shapes: ShapesData | None = None
    fashion_mnist: FashionMNISTData | None = None
    folder: FolderData | None = None
    lowres: LowresData | None = None
    inpaint: InpaintData | None = None

    def __post_init__(self) -> None:
        if self.kind in KIND_SECTIONS and getattr(self, self.kind) is None:
            setattr(self, self.kind, KIND_SECTIONS[self.kind]())

    @property
    def source(self) -> ShapesData | FashionMNISTData | FolderData:
        """The subsection of the chosen kind."""
        return getattr(self, self.kind)

    # what training/concat.py reads; a model without that concatenation reads the defaults
    @property
    def lowres_factor(self) -> int:
        return (self.lowres or LowresData()).factor

    @property
    def lowres_noise(self) -> int:
        return (self.lowres or LowresData()).noise

    @property
    def mask_full(self) -> float:
        return (self.inpaint or InpaintData()).mask_full


@dataclass
class TrainConfig:
    """The optimisation loop: AdamW, warm-up + cosine learning rate, EMA, precision, intervals."""

    steps: int = 10_000  # optimizer steps
    batch_size: int = 32  # images per process per micro-step; global batch = batch_size * world * grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4  # peak learning rate
    min_lr: float = 0.0  # cosine decay ends here
    warmup_steps: int = 500  # linear warm-up from 0 to lr
    decay: Literal["cosine", "constant"] = "cosine"  # "cosine": to min_lr at `steps`; or constant after warm-up
    weight_decay: float = 0.01  # AdamW decoupled weight decay (Loshchilov & Hutter 2019)
    # a GLIGEN adapter's scalar gates (alpha_attn, alpha_dense) learn at gate_lr_scale x the learning rate: Adam
    # moves a scalar about lr a step, so at lr 2e-4 a gate that starts at 0 stays below 0.1 for a thousand steps
    gate_lr_scale: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    ema_decay: float = 0.9999  # EMA of the weights; 0 = no EMA (the final model is the raw weights)
    ema_warmup: bool = True  # decay at update k = min(ema_decay, (1 + k) / (10 + k)) (CompVis LitEma)
    bf16: bool = False  # bfloat16 autocast of the forward passes (weights, optimizer, EMA stay float32)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory)
    seed: int = 0  # data order, noise, dropout decisions, initial weights
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when CUDA is available, else cpu; or "cpu"
    log_every: int = 10  # steps between metrics.jsonl lines
    sample_every: int = 1000  # steps between sample grids / reconstruction images; 0 = only at the end
    eval_every: int = 1000  # VAE: steps between held-out PSNR/SSIM; 0 = only at the end
    checkpoint_every: int = 1000  # steps between training-state checkpoints; 0 = only at the end
    keep_last: int = 3  # training-state checkpoints kept (older ones are deleted)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this, e.g. to export later
    tensorboard: bool = False  # also write TensorBoard events (if torch.utils.tensorboard imports)
    progress: bool = True  # tqdm progress bar on rank 0
    save_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # dtype of the final model file
    # stage 2, jointly trained text encoder: the final model keeps only the token-embedding rows of tokens
    # that occur in the training captions (the others were never trained); unknown words then embed as zeros
    prune_vocabulary: bool = True
    # fine-tuning: start the networks from this model file's weights (training/init.py); the run may add
    # to the model's architecture (new tensors start fresh). Used at step 0 only; None = random weights
    init_from: str | None = None
    # with init_from an adapter file (a GLIGEN adapter): the model to continue it on (a file or a shipped name) in
    # place of the one it was trained on (docs/layout.md); None = that one, checked by its sha256
    init_base: str | None = None


@dataclass
class VAELossConfig:
    """Stage 1 objective (LDM App. G; taming-transformers `LPIPSWithDiscriminator` without the learned logvar)."""

    rec: Literal["l1", "l2"] = "l1"  # pixel reconstruction loss
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)), summed over latent elements, per image
    perceptual: str | None = None  # name of a registered perceptual loss (training.losses.PERCEPTUAL); None = off
    perceptual_weight: float = 1.0
    disc_weight: float = 0.0  # PatchGAN hinge loss weight; 0 = no discriminator (the default)
    disc_start: int = 5000  # step at which the discriminator and its loss start
    disc_layers: int = 3  # PatchGAN depth (Isola et al. 2017: 3 -> 70x70 receptive field)
    disc_channels: int = 64
    disc_lr: float | None = None  # None = train.lr
    # model.vae.regularizer = "vq" (models/vq.py): the codebook loss ||sg[z] - e||^2 + vq_beta ||z - sg[e]||^2
    # (VQ-VAE eq. 3) in place of the KL term, weighted by codebook_weight (taming's VQLPIPSWithDiscriminator)
    vq_beta: float = 0.25  # the commitment weight beta
    codebook_weight: float = 1.0
    codebook_ema: float = 0.0  # > 0: the codes are moving averages of their encoder outputs with this decay
    codebook_restart: int = 0  # > 0: a code unused for this many steps restarts at an encoder output of the batch


VQ_LOSS_KEYS = ("vq_beta", "codebook_weight", "codebook_ema", "codebook_restart")  # of VAELossConfig, VQ only
# [model] shorthand of a VQ autoencoder's keys (`--set model.regularizer=vq`): model.vae.<field>
MODEL_SHORTHAND = {"regularizer": "regularizer", "codebook_size": "codebook_size", "codebook_dim": "latent_channels"}


@dataclass
class LDMLossConfig:
    """Stage 2 objective: the LDM denoising loss (Rombach et al. 2022, eq. 2) with its modern refinements."""

    min_snr_gamma: float = 5.0  # min-SNR-gamma weighting (Hang et al. 2023); 0 = uniform weights
    offset_noise: float = 0.0  # per-channel constant added to the noise (Guttenberg 2023); 0.1 is usual
    caption_dropout: float = 0.1  # probability of the empty prompt / null class (classifier-free guidance)
    latents: Literal["sample", "mode"] = "sample"  # "sample" the cached posterior each step, or use its "mode"
    train_text_encoder: bool = True  # train tau_theta jointly with the U-Net (LDM); False = keep it frozen
    # layout models: probability of dropping the prompt alone (the layout kept), besides caption_dropout's both,
    # so the model draws from the boxes with or without a prompt
    text_dropout: float = 0.0
    # which training timesteps to draw more often (diffusers' --timestep_bias_*): "later" = the noisiest
    # `portion` of the T steps (layout, composition), "earlier" = the least noisy (detail), "range" =
    # [begin, end); those are drawn `multiplier` times as often as the others. "none" = uniform
    timestep_bias: Literal["none", "later", "earlier", "range"] = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    # token grounding (TokenCompose, Wang et al. CVPR 2024; training/grounding.py, shapes data): the weight of a loss
    # pushing each object's words' cross-attention inside the object's mask; 0 = off (the old training bit for bit)
    grounding_weight: float = 0.0
    grounding_pixel_weight: float = 0.0  # TokenCompose's pixel term, BCE(A / max A, mask), relative to the token term
    grounding_words: Literal["nouns", "nouns+colours"] = "nouns"  # the shape nouns, or each object's colour too
    grounding_rest: bool = False  # the words that name no object (articles, relations, places) on the background
    grounding_resolutions: list[int] = field(default_factory=list)  # map heights of the layers (e.g. [8]); [] = all
    grounding_exclude: list[str] = field(default_factory=list)  # transformers not grounded (e.g. ["output_blocks.4.1"])
    grounding_max_timestep: int = 1000  # only samples noised at t < this are grounded (where the layout is decided)
    grounding_min_timestep: int = 0  # ... and at t >= this (the noisiest only: leaving the steps that draw outlines)
    grounding_min_timestep_heights: list[int] = field(default_factory=list)  # the map heights it holds for ([] = all)
    grounding_dilation: int = 0  # each object's mask grown by this many latent pixels (its outline's surroundings)
    grounding_ring: float = 1.0  # how much of the object a cell of that ring counts as (1: the whole; 0.5: half)
    # where the grounded attention is read: "data" = the noised training images; "samples" = the --init model's own
    # sampling runs of training captions (training/sampled_grounding.py): `grounding_runs` runs whose images draw
    # each object once, `grounding_batch` of their states added to each micro-batch's network call, and
    # `grounding_keep_weight` x the MSE of the output there to the --init model's (0 = off)
    grounding_source: Literal["data", "samples"] = "data"
    grounding_runs: int = 256
    grounding_batch: int = 8
    grounding_keep_weight: float = 0.0
    # GLIGEN layout models: extra weight of the diffusion loss inside each object's box, in inverse proportion to
    # the box's area (a box of 1/16 of the image gets box_weight more, a smaller one more still), the map then
    # scaled to a mean of 1 per image, so that small objects' shapes count as much as large ones'; 0 = off
    box_weight: float = 0.0
    # a fine-tune's teacher: the model --init named, frozen, predicts on the same inputs, and the MSE of the run's
    # prediction to its (min-SNR-weighted, as the diffusion loss) is added with this weight, so the fine-tune keeps
    # drawing what the model drew while another term (token grounding) changes how it does; 0 = off
    teacher_weight: float = 0.0


@dataclass
class CLIPLossConfig:
    """The CLIP stage's objective: symmetric InfoNCE over the batch (Radford et al. 2021; van den Oord et al.
    2018) with the learned temperature, and the augmentations of the image views (training/clip.py).

    Each augmentation is applied to an image with its probability, each image drawing its own: a random crop
    of side crop_min..1 of the image resized back (guidance cutouts, small shifts), a Gaussian blur of sigma
    up to `blur_sigma` pixels and Gaussian noise of std up to `noise_std` (blurry, noisy x0 estimates early
    in sampling, as CLIP guidance feeds it)."""

    crop_p: float = 0.0  # probability of a random crop, resized back to the image size
    crop_min: float = 0.8  # the smallest crop side, as a fraction of the image side
    blur_p: float = 0.0  # probability of a Gaussian blur
    blur_sigma: float = 2.0  # the largest blur sigma, in pixels (drawn uniformly from 0..blur_sigma)
    noise_p: float = 0.0  # probability of additive Gaussian noise
    noise_std: float = 0.2  # the largest noise std, in units of the [-1, 1] pixel range (drawn uniformly)
    # hard negatives (NegCLIP): groups of mutually exclusive words; each caption adds, per group it uses, a copy
    # with one of the group's words swapped for another, which its image must rank below its own caption
    swap_words: list[list[str]] = field(default_factory=list)
    # shapes data: each scene of several objects adds the caption of a part of it (one object, or all but one)
    # as a hard negative, which its image must rank below its own caption ("a red circle" is not the picture
    # of a red circle beside a blue square)
    subset_negatives: bool = False
    # a CLIP (a shipped name or a path) whose text tower the run takes as it is, frozen: only the image tower
    # and the temperature learn. "" = both towers trained from scratch
    text_tower: str = ""
    # noise-aware CLIPs (model.image_input = "latents") with a text_tower CLIP that reads pixels: the weight of
    # a distillation term, 1 - cos(E_I(x_t, sigma), E_I'(x0)), the text_tower CLIP's image embedding E_I' of
    # the clean image as the target (at high noise its best value is the expected embedding given x_t)
    distill: float = 0.0
    # noise-aware CLIPs with a text_tower CLIP: start the image tower's transformer and projection (a fitted stem)
    # from that CLIP's (same token grid, width and layers); the noise embedding and temperature are fresh
    init_image_tower: bool = False


@dataclass
class LoraConfig:
    """`[lora]`, stage "lora" (training/lora.py): the LoRA trained on a frozen model (Hu et al. 2022), as kohya's
    sd-scripts name its settings (network_dim / network_alpha / conv_dim / conv_alpha)."""

    rank: int = 8  # rank r of the linear (and 1x1) layers' LoRAs (kohya network_dim)
    alpha: float = 8.0  # the update is up @ down * alpha / rank (kohya network_alpha)
    conv_rank: int = 0  # rank of the 3x3 convolutions' LoRAs (LoCon, kohya conv_dim); 0 = rank
    conv_alpha: float = 0.0  # their alpha; 0 = alpha
    # "attention": every layer of the spatial transformers (attention, feed-forward, proj_in / proj_out: kohya's
    # LoRA); "conv": the ResNet blocks' convolutions, shortcuts and time projections and the down/upsamplers (LoCon)
    unet_layers: list[str] = field(default_factory=lambda: ["attention", "conv"])
    text_encoder: bool = False  # also a LoRA on the text encoder's attention and MLP layers (lora_te_)
    output_name: str = "lora"  # the file RUN/<output_name>.safetensors (kohya ss_output_name)


@dataclass
class EmbeddingConfig:
    """`[embedding]`, stage "embedding" (training/embedding.py): a textual-inversion word (Gal et al. 2022)."""

    word: str = ""  # the new word the captions use (required); also the file's name, RUN/<word>.safetensors
    init_word: str = "*"  # the vectors start as this word's token embeddings (cycled to `vectors`)
    vectors: int = 1  # token vectors of the word (A1111 "number of vectors per token")


@dataclass
class SampleConfig:
    """Fixed prompts / labels and seeds of the sample grids written during training (EMA weights)."""

    prompts: list[str] = field(default_factory=lambda: [
        "a red circle", "a blue square", "a large green triangle", "a yellow star on a white background",
        "a red circle above a blue square", "a purple heart to the left of an orange diamond",
        "a small cyan ring", "a pink cross at the top left",
    ])
    labels: list[int] = field(default_factory=list)  # class-conditional models; empty = every class once
    n_unconditional: int = 8  # unconditional models: images per grid
    seeds_per_prompt: int = 2  # images per prompt / label, seeds seed, seed + 1, ... (the same for every prompt)
    seed: int = 0
    steps: int = 25
    sampler: str = "DPM++ 2M"
    schedule: str = "Automatic"  # A1111 schedule type ("Uniform" suits zero-terminal-SNR models)
    cfg_scale: float = 4.0
    recon_images: int = 8  # VAE: originals above reconstructions in the comparison image
    latent_scale_images: int = 256  # VAE: held-out images whose latents give scale_factor = 1 / std
    zero_shot_images: int = 500  # CLIP: held-out images of the zero-shot accuracy logged at each sample step


@dataclass
class RunConfig:
    """One training run: the model, its data, the loop, the loss and the sample settings."""

    stage: str = "vae"  # "vae" (stage 1), "ldm" (stage 2) or "clip" (a contrastive image-text model)
    model: ModelConfig | CLIPConfig = field(default_factory=ModelConfig)  # a CLIPConfig for stage "clip"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: VAELossConfig | LDMLossConfig | CLIPLossConfig = field(default_factory=VAELossConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    preset: str = "tiny"  # the ModelConfig preset the [model] section starts from
    lora: LoraConfig | None = None  # stage "lora" only
    embedding: EmbeddingConfig | None = None  # stage "embedding" only

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Rebuild a resolved config (as stored in a checkpoint or RUN/config.json, by this release or, with
        flat [data] keys, the previous one: `upgrade_run_dict`); every key is checked."""
        if not isinstance(d, dict):
            raise ValueError(f"a run config is a JSON object, not {type(d).__name__}")
        d = upgrade_run_dict(d)
        stage = d.get("stage", "vae")
        cfg = RunConfig(stage=stage, loss=_loss_class(stage)())
        rest = {k: v for k, v in d.items() if k not in ("stage", "model", "data")}
        from_dict(RunConfig, rest, into=cfg)
        if d.get("model") is not None:
            model_class = CLIPConfig if stage == "clip" else ModelConfig
            cfg.model = model_class.from_dict(d["model"], "model.")
        elif stage == "clip":
            cfg.model = clip_stage_preset(DEFAULT_CLIP_PRESET)
        cfg.data = _data_config(d.get("data", {}))
        settle_data(cfg)
        return cfg


def _loss_class(stage: str) -> type:
    if stage not in STAGES:
        raise ValueError(f"config key stage: {stage!r} is not a training stage; choose one of {', '.join(STAGES)}")
    return {"vae": VAELossConfig, "ldm": LDMLossConfig, "clip": CLIPLossConfig, "lora": LDMLossConfig,
            "embedding": LDMLossConfig}[stage]


DEFAULT_CLIP_PRESET = "tiny"  # stage "clip": the [model] preset when none is named


def clip_stage_preset(name: str) -> CLIPConfig:
    """The CLIPConfig a clip run's `[model] preset` names: one of `daguerre.config.CLIP_PRESETS` ("tiny" too)."""
    return clip_preset(name)


# --- [data]: per-kind subsections, and the flat keys of the previous release ------------------------------

def upgrade_data(table: Any, kind: Any, concat: Any, *, resolved: bool = False) -> dict[str, Any]:
    """The `[data]` table with the previous release's flat keys (`FLAT_DATA_KEYS`) moved into the subsection
    of the data kind or model.concat they belong to. A flat key of another kind is an error naming it, except
    in a `resolved` config of the previous release, which listed every key: there it is dropped at its default."""
    if not isinstance(table, dict):
        raise ValueError("config key data: must be a table ([data])")
    out = {k: v for k, v in table.items() if k not in FLAT_DATA_KEYS}
    for name, value in table.items():
        owners = FLAT_DATA_KEYS.get(name)
        if owners is None:
            continue
        section = next((s for s in owners if s in (kind, concat)), None)
        if section is not None:
            sub = out.get(section)
            if sub is not None and not isinstance(sub, dict):
                raise ValueError(f"config key data.{section}: must be a table ([data.{section}])")
            out[section] = {**(sub or {}), owners[section]: value}
            continue
        first = next(iter(owners))
        sections = {**KIND_SECTIONS, **CONCAT_SECTIONS}
        if resolved and value == getattr(sections[first], owners[first]):
            continue
        what, chosen = ("model.concat", concat) if first in CONCAT_SECTIONS else ("data.kind", kind)
        where = " or ".join(f"[data.{s}] {f}" for s, f in owners.items())
        raise ValueError(f"config key data.{name}: {value!r} is a key of {where}, but {what} is {chosen!r}")
    return out


def upgrade_run_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A resolved run config (RUN/config.json, a checkpoint's run_config) in this release's form: the flat
    [data] keys of the previous release in their subsections, every subsection present (None if not chosen)."""
    data, model = d.get("data"), d.get("model")
    if not isinstance(data, dict):
        return d
    concat = model.get("concat") if isinstance(model, dict) else None
    kind = data.get("kind", DataConfig.kind)
    data = upgrade_data(data, kind, concat, resolved=True)
    for name in (*KIND_SECTIONS, *CONCAT_SECTIONS):
        data.setdefault(name, {} if name in (kind, concat) else None)
    return {**d, "data": data}


def _data_config(table: dict[str, Any]) -> DataConfig:
    """A DataConfig from an upgraded [data] table: its kind first (which makes that kind's subsection)."""
    if not isinstance(table, dict):
        raise ValueError("config key data: must be a table ([data])")
    kind = coerce(table.get("kind", DataConfig.kind), typing.get_type_hints(DataConfig)["kind"], "data.kind")
    return from_dict(DataConfig, {k: v for k, v in table.items() if k != "kind"}, "data.", into=DataConfig(kind=kind))


def settle_data(cfg: RunConfig) -> None:
    """Give the run exactly the [data] subsections of its data kind and model.concat (a default one where
    the config has none); a subsection of another kind is an error naming it."""
    d, concat = cfg.data, getattr(cfg.model, "concat", None)  # (a CLIPConfig has no concatenation)
    for name, section in (("lora", LoraConfig), ("embedding", EmbeddingConfig)):  # the adapter stages' sections
        if cfg.stage == name and getattr(cfg, name) is None:
            setattr(cfg, name, section())
        elif cfg.stage != name and getattr(cfg, name) is not None:
            raise ValueError(f"config key {name}: a [{name}] section is for `daguerre train {name}`, not stage "
                             f"{cfg.stage!r}; remove it")
    for name, section in {**KIND_SECTIONS, **CONCAT_SECTIONS}.items():
        chosen = name in (d.kind, concat)
        if chosen and getattr(d, name) is None:
            setattr(d, name, section())
        elif not chosen and getattr(d, name) is not None:
            what, value = ("model.concat", concat) if name in CONCAT_SECTIONS else ("data.kind", d.kind)
            raise ValueError(f"config key data.{name}: a [data.{name}] section, but {what} is {value!r}; "
                             f"remove it or set {what} = {name!r}")


# --- loading -------------------------------------------------------------------------------------------

def shipped_configs() -> dict[str, Path]:
    """Name -> file of every example run config that ships inside the package (`daguerre/assets/configs`)."""
    folder = resources.files("daguerre") / "assets" / "configs"
    if not folder.is_dir():
        return {}
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def resolve_config(spec: str | Path, stage: str | None = None) -> Path:
    """The file `--config SPEC` means: a shipped config when SPEC is a name (no `/`, no suffix), else a path.

    A recipe's name stands for its config of the stage being trained: with `stage="vae"`, `photos32` is
    `photos32_vae` (and `photos32_ldm` for stage 2) when no config is called `photos32` itself.
    """
    text = str(spec)
    shipped = shipped_configs()
    if "/" not in text and "\\" not in text and not Path(text).suffix:
        if text in shipped:
            return shipped[text]
        if stage is not None and f"{text}_{stage}" in shipped:
            return shipped[f"{text}_{stage}"]
        if Path(text).is_file():  # a file of the user's without a suffix
            return Path(text)
        close = difflib.get_close_matches(text, list(shipped), n=1)
        raise FileNotFoundError(
            f"no such run config: {text!r} is neither a file nor a shipped config"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + f" (shipped: {', '.join(sorted(shipped)) or 'none'}; see `daguerre train --list-configs`)")
    path = Path(text).expanduser()
    if not path.exists():
        hint = f"; the shipped config of that name is --config {path.stem}" if path.stem in shipped else ""
        raise FileNotFoundError(f"no such run config: {path}{hint}")
    return regular_file(path, "run config")


SUMMARY_CHARS = 100  # `daguerre train --list-configs`: the first sentence of a config's comment, cut to this


def config_summary(path: Path) -> tuple[str, str]:
    """(stage, the first sentence of the leading comment) of a run TOML, for `daguerre train --list-configs`."""
    text = regular_file(path, "run config").read_text(encoding="utf-8")
    words = []
    for line in text.splitlines():
        if not line.startswith("# ") or line.startswith("#  "):  # the comment's end, or an indented command
            break
        words.append(line[2:].strip())
    first = " ".join(words).split(". ")[0].rstrip(".")
    first = first if len(first) <= SUMMARY_CHARS else first[:SUMMARY_CHARS - 3].rstrip() + "..."
    try:
        stage = str(toml().loads(text).get("stage", "?"))
    except toml().TOMLDecodeError:
        stage = "?"
    return stage, first


def load_run_config(
    path: str | Path | None, stage: str, overrides: list[str] | None = None
) -> RunConfig:
    """Read a run TOML (or start from defaults when `path` is None), apply `--set` overrides, check every key.

    `path` is a file or the name of a shipped config (`resolve_config`). A `.json` path is a resolved
    config as written to RUN/config.json (resume a run with its own config). Flat [data] keys (the previous
    release's form, also as `--set data.n=...`) are read into the subsection of their kind; when `--set`
    changes data.kind or model.concat, the file's subsection of the kind it replaces is dropped.
    """
    table: dict[str, Any] = {}
    if path is not None:
        path = resolve_config(path, stage)
    if path is not None and path.suffix == ".json":
        return _load_resolved(path, stage, overrides)
    if path is not None:
        try:
            table = toml().loads(path.read_text(encoding="utf-8"))
        except Exception as e:  # TOMLDecodeError, UnicodeDecodeError, RecursionError of absurd nesting
            raise ValueError(f"{path}: not valid TOML ({str(e) or type(e).__name__})") from None
    extra = parse_overrides(overrides)
    file_data, extra_data = table.pop("data", {}), extra.pop("data", {})
    file_model = table.get("model", {})
    table = merge_tables(table, extra)
    file_stage = table.pop("stage", stage)
    if file_stage != stage:
        raise ValueError(f"config key stage: the file is for stage {file_stage!r}, but `daguerre train {stage}` ran")
    model_table = table.pop("model", {}) or {}
    if not isinstance(model_table, dict) or not isinstance(file_model, dict):
        raise ValueError("config key model: must be a table ([model])")
    model_table = upgrade_model_shorthand(model_table)
    preset_name = coerce(model_table.pop("preset", "tiny"), str, "model.preset")
    cfg = RunConfig(stage=stage, preset=preset_name, loss=_loss_class(stage)())
    try:
        cfg.model = clip_stage_preset(preset_name) if stage == "clip" else preset(preset_name)
    except ValueError as e:
        raise ValueError(f"config key model.preset: {e}") from None
    concat = getattr(cfg.model, "concat", None)
    file_concat = file_model.get("concat", concat)
    from_dict(type(cfg.model), model_table, "model.", into=cfg.model)
    from_dict(RunConfig, table, into=cfg)
    concat = getattr(cfg.model, "concat", None)
    cfg.data = _data_config(_data_table(file_data, extra_data, file_concat, concat))
    settle_data(cfg)
    check_run_config(cfg)
    return cfg


def _data_table(file: Any, extra: Any, file_concat: Any, concat: Any) -> dict[str, Any]:
    """The [data] table of a run file merged with its `--set data.*` overrides, both upgraded
    (`upgrade_data`); the file's subsections of a data kind or concatenation that `--set` replaced are dropped."""
    if not isinstance(file, dict):
        raise ValueError("config key data: must be a table ([data])")
    file_kind = file.get("kind", DataConfig.kind)
    kind = extra.get("kind", file_kind)
    file = upgrade_data(file, file_kind, file_concat)
    for old, new in ((file_kind, kind), (file_concat, concat)):
        if old != new and isinstance(old, str):
            file.pop(old, None)
    return merge_tables(file, upgrade_data(extra, kind, concat))


def upgrade_model_shorthand(table: dict[str, Any]) -> dict[str, Any]:
    """The [model] table with the shorthand keys `MODEL_SHORTHAND` (model.regularizer, model.codebook_size,
    model.codebook_dim) moved to the model.vae fields they stand for; a value given both ways must agree."""
    out = dict(table)
    short = {k: out.pop(k) for k in MODEL_SHORTHAND if k in out}
    if not short:
        return out
    vae = out.get("vae", {})
    if not isinstance(vae, dict):
        raise ValueError("config key model.vae: must be a table ([model.vae])")
    vae = dict(vae)
    for key, value in short.items():
        name = MODEL_SHORTHAND[key]
        if name in vae and vae[name] != value:
            raise ValueError(f"config key model.{key}: {value!r}, but model.vae.{name} is {vae[name]!r}; set one")
        vae[name] = value
    out["vae"] = vae
    return out


def check_vq_loss(cfg: RunConfig) -> None:
    """The VQ keys of a stage-1 [loss]: in range, and changed only for a VQ autoencoder; errors name the key."""
    lc = cfg.loss
    if cfg.model.vae.regularizer != "vq":
        changed = [k for k in VQ_LOSS_KEYS if getattr(lc, k) != getattr(VAELossConfig, k)]
        if changed:
            raise ValueError(f"config key loss.{changed[0]}: {getattr(lc, changed[0])!r} is for a VQ autoencoder, "
                             f"but model.vae.regularizer is {cfg.model.vae.regularizer!r}; set it to 'vq'")
        return
    for key in ("vq_beta", "codebook_restart"):
        if getattr(lc, key) < 0:
            raise ValueError(f"config key loss.{key}: must be >= 0, got {getattr(lc, key)}")
    if lc.codebook_weight <= 0:
        raise ValueError(f"config key loss.codebook_weight: must be > 0 (the codebook and commitment term), got "
                         f"{lc.codebook_weight}")
    if not 0.0 <= lc.codebook_ema < 1.0:
        raise ValueError(f"config key loss.codebook_ema: must be in [0, 1) (0 = learn the codes by the codebook "
                         f"loss), got {lc.codebook_ema}")


def _load_resolved(path: Path, stage: str, overrides: list[str] | None) -> RunConfig:
    try:
        cfg = RunConfig.from_dict(read_json(path, "run config"))
    except (ValueError, TypeError) as e:
        message = str(e)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    if cfg.stage != stage:
        raise ValueError(f"config key stage: the file is for stage {cfg.stage!r}, but `daguerre train {stage}` ran")
    extra = parse_overrides(overrides)
    model_table, data_table = upgrade_model_shorthand(extra.pop("model", {})), extra.pop("data", {})
    if "preset" in model_table:
        raise ValueError("config key model.preset: a resolved config (.json) has no preset to change")
    from_dict(type(cfg.model), model_table, "model.", into=cfg.model)
    from_dict(RunConfig, extra, into=cfg)
    data_table = upgrade_data(data_table, data_table.get("kind", cfg.data.kind), getattr(cfg.model, "concat", None))
    from_dict(DataConfig, data_table, "data.", into=cfg.data)
    settle_data(cfg)
    check_run_config(cfg)
    return cfg


def check_run_config(cfg: RunConfig) -> None:
    """Value checks the types cannot express (a `Literal` field's choices are checked as it is read); each
    error names its key."""
    d, t = cfg.data, cfg.train
    positive = [("train.steps", t.steps), ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                ("data.size", d.size), ("train.log_every", t.log_every), ("train.keep_last", t.keep_last)]
    for key, value in positive:
        if value < 1:
            raise ValueError(f"config key {key}: must be >= 1, got {value}")
    if isinstance(cfg.model, CLIPConfig):
        check_clip_config(cfg.model, "model.")  # types, sane sizes, the towers consistent
    else:
        check_model_config(cfg.model, "model.")  # types and sane sizes, channel and layer counts
    if d.size > LIMITS["sample_size"][1]:
        raise ValueError(f"config key data.size: {d.size} pixels is more than {LIMITS['sample_size'][1]}")
    non_negative = [("train.keep_every", t.keep_every),
                    ("train.lr", t.lr), ("train.min_lr", t.min_lr), ("train.warmup_steps", t.warmup_steps),
                    ("train.weight_decay", t.weight_decay), ("train.grad_clip", t.grad_clip),
                    ("train.gate_lr_scale", t.gate_lr_scale),
                    ("train.sample_every", t.sample_every), ("train.checkpoint_every", t.checkpoint_every),
                    ("train.eval_every", t.eval_every), ("data.holdout", d.holdout), ("data.workers", d.workers),
                    ("train.threads", t.threads)]
    for key, value in non_negative:
        if value < 0:
            raise ValueError(f"config key {key}: must be >= 0, got {value}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ValueError(f"config key train.ema_decay: must be in [0, 1), got {t.ema_decay}")
    if isinstance(cfg.loss, LDMLossConfig):
        if not 0.0 <= cfg.loss.caption_dropout <= 1.0:
            raise ValueError(f"config key loss.caption_dropout: must be in [0, 1], got {cfg.loss.caption_dropout}")
        if not 0.0 <= cfg.loss.text_dropout <= 1.0 - cfg.loss.caption_dropout:
            raise ValueError(f"config key loss.text_dropout: must be in [0, 1 - loss.caption_dropout], got "
                             f"{cfg.loss.text_dropout}")
        if t.gate_lr_scale != 1.0 and cfg.model.conditioning != "gligen":
            raise ValueError(f"config key train.gate_lr_scale: {t.gate_lr_scale} scales a GLIGEN adapter's gates, "
                             f"but model.conditioning is {cfg.model.conditioning!r}; leave it at 1")
        if cfg.loss.text_dropout and cfg.model.conditioning not in ("layout", "gligen"):
            raise ValueError(f"config key loss.text_dropout: drops a layout model's prompt alone, but "
                             f"model.conditioning is {cfg.model.conditioning!r}; use loss.caption_dropout")
        if cfg.loss.min_snr_gamma < 0:
            raise ValueError(f"config key loss.min_snr_gamma: must be >= 0, got {cfg.loss.min_snr_gamma}")
        check_timestep_bias(cfg.loss, cfg.model.schedule.num_train_timesteps)
        check_grounding(cfg)
        check_box_weight(cfg)
        check_teacher(cfg)
        check_text_encoder_config(cfg.model, cfg.loss.train_text_encoder)
    if isinstance(cfg.loss, CLIPLossConfig):
        check_clip_run(cfg)
    if isinstance(cfg.loss, VAELossConfig):
        check_vq_loss(cfg)
    if not 1 <= cfg.sample.seeds_per_prompt <= MAX_SEEDS_PER_PROMPT:
        raise ValueError(f"config key sample.seeds_per_prompt: must be 1 to {MAX_SEEDS_PER_PROMPT}, got "
                         f"{cfg.sample.seeds_per_prompt}")
    check_data_sections(d)
    check_concat_config(cfg)
    check_adapter_config(cfg)


def check_adapter_config(cfg: RunConfig) -> None:
    """Value checks of the [lora] / [embedding] section of an adapter stage; each error names its key."""
    lo = cfg.lora
    if lo is not None:
        for key in ("rank", "conv_rank"):
            if not 0 <= getattr(lo, key) <= 4096 or (key == "rank" and lo.rank < 1):
                raise ValueError(f"config key lora.{key}: must be 1 to 4096 (conv_rank 0 = rank), "
                                 f"got {getattr(lo, key)}")
        for key in ("alpha", "conv_alpha"):
            if getattr(lo, key) < 0 or (key == "alpha" and lo.alpha == 0):
                raise ValueError(f"config key lora.{key}: must be > 0 (conv_alpha 0 = alpha), got {getattr(lo, key)}")
        bad = [k for k in lo.unet_layers if k not in LORA_LAYER_KINDS]
        if bad or len(set(lo.unet_layers)) != len(lo.unet_layers) or not (lo.unet_layers or lo.text_encoder):
            raise ValueError(f"config key lora.unet_layers: {lo.unet_layers}; give distinct kinds among "
                             f"{', '.join(LORA_LAYER_KINDS)} (or none with lora.text_encoder = true)")
        if not lo.output_name or not all(c.isalnum() or c in "-_." for c in lo.output_name):
            raise ValueError(f"config key lora.output_name: {lo.output_name!r}; a file name of letters, digits, "
                             "'-', '_' and '.'")
    e = cfg.embedding
    if e is not None:
        if not all(c.isalnum() or c in "-_" for c in e.word):  # (an empty word: the stage says so)
            raise ValueError(f"config key embedding.word: {e.word!r}; the new word the captions use (letters, digits, "
                             "'-', '_'), e.g. --set embedding.word=hexagon")
        if not e.init_word.strip():
            raise ValueError("config key embedding.init_word: give a word whose vectors start the embedding")
        if not 1 <= e.vectors <= 75:
            raise ValueError(f"config key embedding.vectors: must be 1 to 75 (one prompt chunk), got {e.vectors}")


def check_clip_run(cfg: RunConfig) -> None:
    """Value checks of a clip run's [loss] and of what its data must leave alone; each error names its key."""
    lc = cfg.loss
    for key in ("crop_p", "blur_p", "noise_p"):
        if not 0.0 <= getattr(lc, key) <= 1.0:
            raise ValueError(f"config key loss.{key}: must be in [0, 1], got {getattr(lc, key)}")
    if not 0.0 < lc.crop_min <= 1.0:
        raise ValueError(f"config key loss.crop_min: must be in (0, 1], got {lc.crop_min}")
    for key in ("blur_sigma", "noise_std"):
        if getattr(lc, key) < 0:
            raise ValueError(f"config key loss.{key}: must be >= 0, got {getattr(lc, key)}")
    for i, group in enumerate(lc.swap_words):
        if len(group) < 2 or len(set(group)) != len(group) or not all(w.strip() for w in group):
            raise ValueError(f"config key loss.swap_words: group {i} ({group}) needs two or more distinct words")
    if cfg.sample.zero_shot_images < 0:
        raise ValueError(f"config key sample.zero_shot_images: must be >= 0, got {cfg.sample.zero_shot_images}")
    if lc.distill < 0 or (lc.distill and (cfg.model.image_input != "latents" or not lc.text_tower)):
        raise ValueError(f"config key loss.distill: {lc.distill} must be >= 0, and > 0 only for a noise-aware CLIP "
                         "(model.image_input = 'latents') with a loss.text_tower CLIP to distil from")
    if lc.init_image_tower and (cfg.model.image_input != "latents" or not lc.text_tower):
        raise ValueError("config key loss.init_image_tower: only for a noise-aware CLIP (model.image_input = "
                         "'latents') with a loss.text_tower CLIP to start from")
    if lc.subset_negatives and cfg.data.kind != "shapes":
        raise ValueError(f"config key loss.subset_negatives: needs the shapes world's scenes (data.kind = 'shapes'), "
                         f"not {cfg.data.kind!r}")
    if cfg.model.image_input == "latents" and not cfg.model.latent_space.model:
        raise ValueError("config key model.latent_space.model: a noise-aware CLIP (model.image_input = 'latents') "
                         "names the diffusion model whose latents it reads (a shipped name or a path)")
    if not cfg.model.text_encoder.causal:
        raise ValueError("config key model.text_encoder.causal: a CLIP text tower is causal (it pools at the end "
                         "token); set it to true")


def derive_clip_config(cfg: RunConfig, channels: int) -> CLIPConfig:
    """The run's CLIPConfig with what the data fixes: the image tower's channels (its per-channel mean and
    std must then have one value each)."""
    m = copy.deepcopy(cfg.model)
    m.vision.channels = channels
    for key in ("image_mean", "image_std"):
        if len(getattr(m, key)) != channels:
            raise ValueError(f"config key model.{key}: {list(getattr(m, key))} has {len(getattr(m, key))} values, but "
                             f"the data has {channels}-channel images; give one value per channel (e.g. [0.5])")
    return m


def check_data_sections(d: DataConfig) -> None:
    """Value checks of the data kind's subsection; each error names its key."""
    if d.folder is not None:
        if not d.folder.root:
            raise ValueError("config key data.folder.root: a folder dataset needs [data.folder] root = the image "
                             "folder (or `daguerre train ... --data FOLDER`)")
    s = d.shapes
    if s is None:
        return
    if s.n < 1:
        raise ValueError(f"config key data.shapes.n: must be >= 1, got {s.n}")
    if not 1 <= s.min_objects <= s.max_objects <= MAX_OBJECTS:
        raise ValueError(f"config keys data.shapes.min_objects, data.shapes.max_objects: need 1 <= min <= max "
                         f"<= {MAX_OBJECTS}, got {s.min_objects}, {s.max_objects}")
    if not 0.0 <= s.p_relation <= 1.0:
        raise ValueError(f"config key data.shapes.p_relation: must be in [0, 1], got {s.p_relation}")


def _distinct_heights(heights: list) -> bool:
    """Whether `heights` are distinct map heights: integers >= 1 (not bools)."""
    return all(not isinstance(r, bool) and isinstance(r, int) and r >= 1 for r in heights) and len(
        set(heights)) == len(heights)


def check_grounding(cfg: RunConfig) -> None:
    """The token-grounding keys (training/grounding.py): weights >= 0; on, only for stage 2 of a text model on
    the shapes world, whose scenes give each object's mask and words."""
    lc = cfg.loss
    for key in ("grounding_weight", "grounding_pixel_weight"):
        value = getattr(lc, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"config key loss.{key}: must be a number >= 0, got {value!r}")
    if lc.grounding_words not in ("nouns", "nouns+colours"):
        raise ValueError(f"config key loss.grounding_words: {lc.grounding_words!r}; choose 'nouns' or "
                         "'nouns+colours'")
    if not _distinct_heights(lc.grounding_resolutions):
        raise ValueError(f"config key loss.grounding_resolutions: {lc.grounding_resolutions}; give distinct map "
                         "heights >= 1 (e.g. [8, 4]), or [] for every cross-attention layer")
    d = lc.grounding_dilation
    if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_GROUNDING_DILATION:
        raise ValueError(f"config key loss.grounding_dilation: {d!r}; give an integer from 0 to "
                         f"{MAX_GROUNDING_DILATION} (latent pixels)")
    if not (isinstance(lc.grounding_ring, (int, float)) and 0 <= lc.grounding_ring <= 1):
        raise ValueError(f"config key loss.grounding_ring: {lc.grounding_ring!r}; give a number from 0 to 1")
    if lc.grounding_ring != 1.0 and not d:
        raise ValueError("config key loss.grounding_ring: it weighs the ring loss.grounding_dilation adds; set that "
                         "too")
    steps = cfg.model.schedule.num_train_timesteps
    m = lc.grounding_max_timestep
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= steps:
        raise ValueError(f"config key loss.grounding_max_timestep: {m!r}; give an integer from 1 to the schedule's "
                         f"{steps} timesteps ({steps} grounds every sample)")
    low = lc.grounding_min_timestep
    if isinstance(low, bool) or not isinstance(low, int) or not 0 <= low < m:
        raise ValueError(f"config key loss.grounding_min_timestep: {low!r}; give an integer from 0 to "
                         f"loss.grounding_max_timestep - 1 ({m - 1})")
    if not all(isinstance(n, str) and n for n in lc.grounding_exclude):
        raise ValueError(f"config key loss.grounding_exclude: {lc.grounding_exclude}; give transformer names, e.g. "
                         "[\"output_blocks.4.1\"] (`daguerre explain attention --layers` lists a U-Net's)")
    heights = lc.grounding_min_timestep_heights
    if not _distinct_heights(heights):
        raise ValueError(f"config key loss.grounding_min_timestep_heights: {heights}; give distinct map heights "
                         "(positive integers, e.g. [8])")
    if heights and not low:
        raise ValueError("config key loss.grounding_min_timestep_heights: it names the layers "
                         "loss.grounding_min_timestep holds for; set that too")
    if lc.grounding_weight == 0 and (lc.grounding_pixel_weight or lc.grounding_resolutions or m != steps or d or low
                                     or lc.grounding_rest or lc.grounding_exclude):
        raise ValueError("config keys loss.grounding_pixel_weight, loss.grounding_resolutions, "
                         "loss.grounding_max_timestep, loss.grounding_min_timestep, loss.grounding_dilation, "
                         "loss.grounding_rest, loss.grounding_exclude: set "
                         "loss.grounding_weight > 0 too (0 turns token grounding off)")
    check_grounding_source(cfg)
    if lc.grounding_weight == 0:
        return
    if cfg.stage != "ldm" or cfg.data.kind != "shapes" or cfg.model.conditioning != "text":
        raise ValueError(f"config key loss.grounding_weight: {lc.grounding_weight} needs stage 'ldm', "
                         f"data.kind 'shapes' and model.conditioning 'text' (it grounds the caption's words in the "
                         f"scene's objects); got {cfg.stage!r}, {cfg.data.kind!r}, {cfg.model.conditioning!r}")


MAX_GROUNDING_DILATION = 8  # loss.grounding_dilation, in latent pixels
MAX_GROUNDING_RUNS = 4096  # loss.grounding_runs: sampling runs recorded before training (each ~25 U-Net states)
MAX_GROUNDING_BATCH = 256  # loss.grounding_batch: run states added to one micro-batch


def check_grounding_source(cfg: RunConfig) -> None:
    """loss.grounding_source and its keys (training/sampled_grounding.py): "samples" reads the --init model's own
    runs, so it needs train.init_from; its keys in range, and set only with it."""
    lc = cfg.loss  # (grounding_source is one of its Literal's values: the loader checks that)
    for key, top in (("grounding_runs", MAX_GROUNDING_RUNS), ("grounding_batch", MAX_GROUNDING_BATCH)):
        value = getattr(lc, key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise ValueError(f"config key loss.{key}: {value!r}; give an integer from 1 to {top}")
    keep = lc.grounding_keep_weight
    if not (isinstance(keep, (int, float)) and math.isfinite(keep) and keep >= 0):
        raise ValueError(f"config key loss.grounding_keep_weight: must be a number >= 0, got {keep!r}")
    default = LDMLossConfig()
    if lc.grounding_source == "data":
        set_ = [k for k in ("grounding_runs", "grounding_batch", "grounding_keep_weight")
                if getattr(lc, k) != getattr(default, k)]
        if set_:
            raise ValueError(f"config keys {', '.join('loss.' + k for k in set_)}: they set the grounding on the "
                             "model's own runs; set loss.grounding_source = 'samples' too")
        return
    if lc.grounding_weight == 0:
        raise ValueError("config key loss.grounding_source 'samples': set loss.grounding_weight > 0 too "
                         "(0 turns token grounding off)")
    if not cfg.train.init_from:
        raise ValueError("config key loss.grounding_source 'samples': the runs are the --init model's own; name "
                         "the model the run starts from with --init MODEL")
    if lc.grounding_max_timestep != cfg.model.schedule.num_train_timesteps or lc.grounding_min_timestep:
        raise ValueError("config keys loss.grounding_max_timestep, loss.grounding_min_timestep: they leave noised "
                         "training images out; with loss.grounding_source 'samples' the grounded states are the "
                         "runs' own, every step")


def check_box_weight(cfg: RunConfig) -> None:
    """loss.box_weight: a number >= 0, on only for stage 2 of a GLIGEN model (its rows' boxes weigh the loss)."""
    value = cfg.loss.box_weight
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"config key loss.box_weight: must be a number >= 0, got {value!r}")
    if value and (cfg.stage != "ldm" or cfg.model.conditioning != "gligen"):
        raise ValueError(f"config key loss.box_weight: {value} needs stage 'ldm' and model.conditioning 'gligen' "
                         f"(it weighs the loss by the rows' boxes); got {cfg.stage!r}, {cfg.model.conditioning!r}")


def check_teacher(cfg: RunConfig) -> None:
    """loss.teacher_weight: a number >= 0, on only for stage 2 fine-tuning a whole U-Net from --init (a GLIGEN
    run's base is frozen already)."""
    value = cfg.loss.teacher_weight
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"config key loss.teacher_weight: must be a number >= 0, got {value!r}")
    if value and (cfg.stage != "ldm" or not cfg.train.init_from or cfg.model.conditioning == "gligen"):
        raise ValueError(f"config key loss.teacher_weight: {value} needs stage 'ldm' fine-tuning a model named by "
                         "--init (train.init_from), the teacher; a GLIGEN run keeps its base frozen already (got "
                         f"stage {cfg.stage!r}, init {cfg.train.init_from!r}, conditioning "
                         f"{cfg.model.conditioning!r})")


def check_timestep_bias(lc: LDMLossConfig, n_steps: int) -> None:
    if lc.timestep_bias == "none":
        return
    if not lc.timestep_bias_multiplier > 0:
        raise ValueError(f"config key loss.timestep_bias_multiplier: must be > 0, got {lc.timestep_bias_multiplier}")
    if lc.timestep_bias in ("later", "earlier") and not 0 < lc.timestep_bias_portion <= 1:
        raise ValueError(f"config key loss.timestep_bias_portion: must be in (0, 1], got {lc.timestep_bias_portion}")
    if lc.timestep_bias == "range" and not 0 <= lc.timestep_bias_begin < lc.timestep_bias_end <= n_steps:
        raise ValueError(f"config keys loss.timestep_bias_begin, loss.timestep_bias_end: need 0 <= begin < end <= "
                         f"{n_steps} (the training timesteps), got {lc.timestep_bias_begin}, {lc.timestep_bias_end}")


CLIP_CONTEXT = 77  # a CLIP-style text encoder's window: prompts are tokenized in chunks of 75 + start and end


def check_text_encoder_config(model: ModelConfig, train_text_encoder: bool) -> None:
    """A run's text-encoder choice: a pretrained (frozen) kind only with loss.train_text_encoder off (the kind
    itself is checked by its `Literal` type when the config is read)."""
    t = model.text_encoder
    if t is None or model.conditioning != "text":
        return
    if t.frozen and train_text_encoder:
        raise ValueError(f"config key loss.train_text_encoder: the pretrained {t.kind!r} text encoder is frozen; "
                         "set loss.train_text_encoder = false")
    if not t.frozen and t.max_length != CLIP_CONTEXT:
        raise ValueError(f"config key model.text_encoder.max_length: a CLIP-style text encoder reads prompts in "
                         f"{CLIP_CONTEXT}-token windows (as Stable Diffusion's), got {t.max_length}; remove the key "
                         f"(it is only for a frozen pretrained kind such as 'minilm')")


def check_concat_config(cfg: RunConfig) -> None:
    """Value checks of model.concat and the data keys it uses; each error names its key."""
    d, kind = cfg.data, getattr(cfg.model, "concat", None)  # kind: checked by its `Literal` type when read
    spatial = "a semantic-synthesis" if kind == "semantic" else "a layout" if getattr(
        cfg.model, "conditioning", None) in ("layout", "gligen") else None
    if spatial and cfg.stage == "ldm":
        if d.kind != "shapes":
            raise ValueError(f"config key data.kind: {spatial} model trains on the shapes world, whose every object "
                             f"is known (data.kind = 'shapes'), not {d.kind!r}")
        if d.flip:
            raise ValueError(f"config key data.flip: {spatial} model trains without flips (they falsify 'left' and "
                             "'right' in its captions); set data.flip = false")
    if d.inpaint is not None and not 0.0 <= d.inpaint.mask_full <= 1.0:
        raise ValueError(f"config key data.inpaint.mask_full: must be in [0, 1], got {d.inpaint.mask_full}")
    if d.lowres is None:
        return
    factor, noise = d.lowres.factor, d.lowres.noise
    if not 2 <= factor <= MAX_LOWRES_FACTOR:
        raise ValueError(f"config key data.lowres.factor: must be in [2, {MAX_LOWRES_FACTOR}], got {factor}")
    if not 0 <= noise < LOWRES_LEVELS:
        raise ValueError(f"config key data.lowres.noise: must be in [0, {LOWRES_LEVELS - 1}], got {noise}")
    if kind == "lowres" and cfg.stage == "ldm":
        if d.size % factor:
            raise ValueError(f"config key data.lowres.factor: data.size {d.size} is not a multiple of {factor}")
        if cfg.model.conditioning == "class":
            raise ValueError("config key model.conditioning: super-resolution models take 'text' or 'none', not "
                             "'class' (their label input is the low-res noise level)")


def derive_concat_inputs(m: ModelConfig, d: DataConfig) -> None:
    """Fill in what the concatenation fixes (in place on derive_model_config's copy): the U-Net's extra
    input channels (image channels for "lowres", 1 + latent channels for "inpaint") and, for noise-
    augmented SR, a label embedding with one row per noise level 0..data.lowres.noise."""
    if m.concat == "lowres":
        m.unet.in_channels = m.vae.latent_channels + m.vae.in_channels
        if d.lowres_noise > 0:
            m.unet.num_classes = d.lowres_noise + 1
    elif m.concat == "inpaint":
        m.unet.in_channels = 2 * m.vae.latent_channels + 1
    elif m.concat == "semantic":  # the shapes world's labels: background and the 8 shapes
        m.semantic_labels = list(m.semantic_labels or LABELS)
        m.unet.in_channels = m.vae.latent_channels + len(m.semantic_labels)


def derive_model_config(cfg: RunConfig, channels: int, class_names: list[str] | None) -> ModelConfig:
    """The run's ModelConfig with the fields the data and the other networks fix filled in.

    Image channels (VAE in/out) and `sample_size` come from the data; the U-Net sees and predicts
    `vae.latent_channels`; a text model's cross-attention width is the text encoder width; a
    class-conditional model gets K + 1 label embeddings (the last one is the "no class" label used for
    label dropout and as the unconditional branch of guidance, as `pipelines.txt2img` expects).
    """
    m = copy.deepcopy(cfg.model)
    m.vae.in_channels = m.vae.out_channels = channels
    m.sample_size = cfg.data.size
    m.unet.in_channels = m.unet.out_channels = m.vae.latent_channels
    m.concat = m.concat if cfg.stage == "ldm" else None  # image concatenation: stage 2 only
    if m.conditioning in ("text", "layout", "gligen"):
        if m.text_encoder is None:
            raise ValueError(f"config key model.conditioning: {m.conditioning!r} needs a [model.text_encoder] section")
        m.text_encoder = resolve_text_encoder(m.text_encoder)  # kind "minilm": the fixed MiniLM architecture
        m.unet.context_dim = m.text_encoder.width
        m.unet.num_classes, m.class_names = None, None
        if m.conditioning == "layout":  # the layout encoder: as wide as the prompt's context, the world's words
            layout = m.unet.layout or LayoutConfig()
            m.unet.layout = dataclasses.replace(layout, width=m.unet.context_dim,
                                                vocabulary=tuple(layout.vocabulary or LAYOUT_WORDS))
        else:
            m.unet.layout = None
        if m.conditioning == "gligen":  # the adapter: grounding tokens as wide as the context, phrases as pooled
            if m.text_encoder.kind != "clip":
                raise ValueError(f"config key model.text_encoder.kind: a GLIGEN adapter embeds phrases with a "
                                 f"CLIP-style text encoder's pooled output, not {m.text_encoder.kind!r}")
            from ..models.gligen import gligen_phrase_dim  # (torch: imported once a GLIGEN run needs it)

            gligen = m.unet.gligen or GligenConfig()
            m.unet.gligen = dataclasses.replace(gligen, phrase_dim=gligen_phrase_dim(m.text_encoder,
                                                                                     gligen.phrase_pool))
        else:
            m.unet.gligen = None
    elif m.conditioning == "class":
        if not class_names:
            raise ValueError(
                f"config key model.conditioning: 'class' needs labelled data, and data.kind = {cfg.data.kind!r} "
                "has no labels (use fashion_mnist or a folder of class sub-folders)"
            )
        m.text_encoder, m.unet.context_dim, m.unet.layout, m.unet.gligen = None, None, None, None
        m.unet.num_classes, m.class_names = len(class_names) + 1, list(class_names)
    else:
        m.text_encoder, m.unet.context_dim, m.unet.num_classes, m.class_names = None, None, None, None
        m.unet.layout, m.unet.gligen = None, None
    if m.concat != "semantic":
        m.semantic_labels = None
    if m.concat is not None:
        derive_concat_inputs(m, cfg.data)  # extra U-Net input channels (and the noise-level labels)
    factor = m.vae.downsample_factor * m.unet.downsample_factor
    if cfg.data.size % factor:
        raise ValueError(
            f"config key data.size: {cfg.data.size} is not a multiple of {factor} "
            f"(VAE factor {m.vae.downsample_factor} x U-Net factor {m.unet.downsample_factor})"
        )
    return m


def to_jsonable(obj: Any) -> Any:
    """Dataclasses and tuples as plain JSON data."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj
