"""Bounds on the work of one request, checked before any model work (shared/DESIGN.md, "Work is bounded").

One request must not be able to take the machine down: a 100000x100000 image, a million images, or a
2048x2048 image from a model trained at 64x64 (whose attention then costs 25 TFLOP a step) are refused
up front with an error that names the value, the limit and the flag that raises it. The CLI's image
commands and `daguerre serve` take the same flags (`add_limit_arguments`); the Python API applies
`DEFAULT_LIMITS` unless given others (`Limits.unlimited()` turns them off).

Work is the estimated floating-point work of the networks, counted layer by layer on the model's own
architecture (its `ModelConfig`) for the request's latent size: one U-Net forward (with a context as
long as the prompt can make it), one VAE decode (and encode, for the image tasks) and the text
encoder. That captures what a pixels x steps x images product cannot: attention's cost grows with the
square of the number of latent cells, and models differ a thousandfold in cost per pixel. The count
is arithmetic on the config (microseconds, no torch), held equal by the tests to PyTorch's
`FlopCounterMode` run on the real networks. Memory is bounded by the pixels held at once
(`max_batch_pixels`) and per image, input images by their pixels read from the file header before
decoding (`max_input_pixels`), and prompts by their length (`max_prompt_chars`: the tokenizer's time).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

TFLOP = 1e12


class LimitError(ValueError):
    """A request over one of the `Limits`: the message names the value, the limit and how to raise it."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds of one request. The defaults are safe on a 24 GB machine with 2 cores: the largest
    default request runs in well under an hour on such a CPU and its activations fit in a few GB."""

    # width x height of one image; None: MAX_PIXELS (A1111's slider stops at 2048), and for a model trained on
    # small images no more than MAX_SCALE times its native size per side (a 64-px model at 2048x2048 spends
    # minutes of attention a step on an image it cannot draw)
    max_pixels: int | None = None
    max_batch_pixels: int = 4 * 1024 * 1024  # batch_size x width x height: the images in memory at once
    max_images: int = 100  # images per request (n; A1111's batch_size x n_iter)
    max_steps: int = 1000  # sampler steps (DDPM's full chain is 1000)
    max_work: float = 500.0  # estimated network work of the whole request, in TFLOP (SD 1.5: ~36 per 512² image)
    max_input_pixels: int = 16 * 1024 * 1024  # width x height of an input image (init image, mask), before decoding
    max_prompt_chars: int = 10_000  # characters of the prompt and of the negative prompt, each

    @classmethod
    def unlimited(cls) -> Limits:
        """No bounds: for scripts that know what they ask for."""
        inf = math.inf
        return cls(max_pixels=inf, max_batch_pixels=inf, max_images=inf, max_steps=inf, max_work=inf,
                   max_input_pixels=inf, max_prompt_chars=inf)

    def pixel_limit(self, native: int | None = None) -> float:
        """The pixels one image may have, for a model of `native` size (pixels per side; None: not known yet)."""
        if self.max_pixels is not None:
            return self.max_pixels
        return MAX_PIXELS if native is None else min(MAX_PIXELS, (MAX_SCALE * native) ** 2)

    def check_size(self, width: int, height: int, batch_size: int = 1, native: int | None = None) -> None:
        """One image of width x height from a model of `native` size, and batch_size of them at once."""
        pixels, limit = width * height, self.pixel_limit(native)
        if pixels > limit:
            which = f"the limit of {_mp(limit)}"
            if self.max_pixels is None and limit < MAX_PIXELS:
                which = f"this model's limit of {_mp(limit)} ({MAX_SCALE}x its native {native} px per side)"
            raise LimitError(f"size {width}x{height} ({_mp(pixels)}) is over {which} per image; choose a smaller "
                             f"size or raise --max-pixels (Limits.max_pixels)")
        if batch_size * pixels > self.max_batch_pixels:
            raise LimitError(f"batch size {batch_size} x {width}x{height} ({_mp(batch_size * pixels)} in memory at "
                             f"once) is over the limit of {_mp(self.max_batch_pixels)}; use a smaller batch size "
                             f"(more batches make the same images) or raise --max-batch-pixels "
                             f"(Limits.max_batch_pixels)")

    def check_count(self, n: int, steps: int) -> None:
        if n > self.max_images:
            raise LimitError(f"{n} images is over the limit of {self.max_images} per request; ask for fewer or "
                             "raise --max-images (Limits.max_images)")
        if steps > self.max_steps:
            raise LimitError(f"{steps} steps is over the limit of {self.max_steps}; use fewer steps or raise "
                             "--max-steps (Limits.max_steps)")

    def check_input_image(self, width: int, height: int, name: str) -> None:
        """An input image's size, read from its header before its pixels are decoded."""
        if width * height > self.max_input_pixels:
            raise LimitError(f"image {name} is {width}x{height} ({_mp(width * height)}), over the input limit of "
                             f"{_mp(self.max_input_pixels)}; scale it down first or raise --max-input-pixels "
                             "(Limits.max_input_pixels)")

    def check_prompt(self, text: str, name: str = "prompt") -> None:
        if len(text) > self.max_prompt_chars:
            raise LimitError(f"the {name} is {len(text)} characters long, over the limit of {self.max_prompt_chars}; "
                             "shorten it or raise --max-prompt-chars (Limits.max_prompt_chars)")

    def check_work(self, tflop: float, what: str) -> None:
        if tflop > self.max_work:
            raise LimitError(f"{what} needs about {tflop:.4g} TFLOP of network work, over the limit of "
                             f"{self.max_work:g} TFLOP; use fewer steps, images or pixels, or raise --max-work "
                             "(Limits.max_work, in TFLOP)")


MAX_PIXELS = 2048 * 2048  # the default bound of one image's pixels ...
MAX_SCALE = 8  # ... and of its side, in multiples of the model's native size
DEFAULT_LIMITS = Limits()
# CLIP guidance (guidance.clip_guided_denoiser): CLIP's views of each image per network call, and the scale (its
# step is clamped, so a larger scale only saturates the clamp)
MAX_CUTOUTS = 64
MAX_CLIP_REPEATS = 16  # guided steps taken at most this many times (self-recurrence, request.clip_repeats)
# ... namely the steps starting in this sigma range (guidance.self_recurrent; Bansal et al. 2023, "Universal Guidance
# for Diffusion Models", sec. 3.3): where the shapes model decides its objects and the noise-aware CLIP can still
# read them (docs/clip.md). Here, not in guidance.py, so that the CLI's help and a request's validation read it
# without importing torch.
RECURRENCE_SIGMAS = (0.5, 4.0)
MAX_CLIP_GUIDANCE = 100_000.0


def _mp(pixels: float) -> str:
    """Megapixels for a message: 4.19 MP, 10,000 MP (never 1e+04)."""
    mp = pixels / 1e6
    return f"{mp:,.0f} MP" if mp >= 1000 else f"{mp:.3g} MP"


def request_work(config: ModelConfig, *, width: int, height: int, steps: int, n: int, guided: bool,
                 encodes: bool = False, prompt_chunks: int = 1, clip_guided: bool = False) -> float:
    """Estimated TFLOP of a request: steps x n U-Net calls (twice with classifier-free guidance), n VAE
    decodes, n VAE encodes for the image tasks, and the text encoder over `prompt_chunks` 77-token
    chunks per prompt (the cross-attention context is that long too). A sampler that calls the network
    twice a step (Heun, DPM2) costs up to twice this; the bound is on the order of magnitude. CLIP guidance
    (`clip_guided`) adds a backward pass of the U-Net calls (twice a forward) and a VAE decode with its
    backward pass (three decodes) per step; CLIP's own work is bounded by MAX_CUTOUTS, not counted here."""
    f = config.vae.downsample_factor
    h, w = height // f, width // f
    te = config.text_encoder
    context, text = 0, 0.0
    if config.unet.context_dim is not None:
        chunks = max(1, prompt_chunks) if te is None or not te.frozen else 1  # BERT: one window
        context = (te.max_length if te is not None else CONTEXT_TOKENS) * chunks
        text = (2 if guided else 1) * chunks * (text_tflop(te) if te is not None else 0.0)
    unet = unet_tflop(config.unet, h, w, context)
    vae = vae_tflop(config.vae, h, w, encodes)
    per_step = unet * (2 if guided else 1) * (3 if clip_guided else 1)
    if clip_guided:
        per_step += 3 * vae_tflop(config.vae, h, w, False)
    return text + n * (steps * per_step + vae)


# The counts below follow the networks' forward passes layer by layer, counting what PyTorch's
# `FlopCounterMode` counts (2 FLOP per multiply-add of every matrix product and convolution; attention
# 4 x query length x key length x width); tests/test_limits.py holds them equal to FlopCounterMode run
# on the real modules on the "meta" device. That count takes seconds (its first use imports
# torch._dynamo); this one takes microseconds and needs no torch.
CONTEXT_TOKENS = 77  # cross-attention context length of one prompt chunk


def _conv(cells: int, c_in: int, c_out: int, k: int = 3) -> int:
    return 2 * cells * c_in * c_out * k * k


def unet_tflop(cfg: UNetConfig, h: int, w: int, context: int = CONTEXT_TOKENS) -> float:
    """TFLOP of one U-Net forward of batch 1 on an (h, w) latent with a `context`-token context
    (ignored without cross-attention) and, for class-conditional models, a label (free: an embedding row)."""
    mc, emb = cfg.model_channels, 4 * cfg.model_channels  # the time embedding (unet.TIME_EMBED_MULT)
    context = context if cfg.context_dim else 0
    levels = len(cfg.channel_mult)
    sizes = [(h, w)]
    for _ in range(levels - 1):  # stride-2 convolutions with padding 1: ceil(h / 2)
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    cells = [a * b for a, b in sizes]

    def res(n: int, c_in: int, c_out: int) -> int:
        skip = _conv(n, c_in, c_out, 1) if c_in != c_out else 0
        return _conv(n, c_in, c_out) + 2 * emb * c_out + _conv(n, c_out, c_out) + skip

    def transformer(n: int, ch: int) -> int:
        heads, head_dim = cfg.heads_at(ch)
        d = heads * head_dim
        block = 2 * n * d * d * 4 + 4 * n * n * d  # self-attention: q, k, v, out; scores and values
        if context:  # cross-attention: q and out from the image, k and v from the context
            block += 2 * n * d * d * 2 + 2 * 2 * context * cfg.context_dim * d + 4 * n * context * d
        block += 2 * n * d * 8 * d + 2 * n * 4 * d * d  # GEGLU feed-forward (unet.FF_MULT = 4)
        return 2 * 2 * n * ch * d + cfg.transformer_depth * block  # proj_in, proj_out

    total = 2 * mc * emb + 2 * emb * emb + _conv(cells[0], cfg.in_channels, mc)
    ch, skips = mc, [mc]
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            total += res(cells[level], ch, mult * mc)
            ch = mult * mc
            total += transformer(cells[level], ch) if level in cfg.attention_levels else 0
            skips.append(ch)
        if level != levels - 1:
            total += _conv(cells[level + 1], ch, ch)  # Downsample
            skips.append(ch)
    total += 2 * res(cells[-1], ch, ch) + transformer(cells[-1], ch)  # middle block
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            total += res(cells[level], ch + skips.pop(), mult * mc)
            ch = mult * mc
            total += transformer(cells[level], ch) if level in cfg.attention_levels else 0
            if level != 0 and i == cfg.num_res_blocks:
                total += _conv(cells[level - 1], ch, ch)  # Upsample to the next skip's size
    total += _conv(cells[0], ch, cfg.out_channels)
    return total / TFLOP


def vae_tflop(cfg: VAEConfig, h: int, w: int, encodes: bool) -> float:
    """TFLOP of one VAE decode of an (h, w) latent, plus one encode of its image when `encodes`."""
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    levels = len(widths)

    def res(n: int, c_in: int, c_out: int) -> int:
        return _conv(n, c_in, c_out) + _conv(n, c_out, c_out) + (_conv(n, c_in, c_out, 1) if c_in != c_out else 0)

    def attn(n: int, c: int) -> int:
        return 4 * 2 * n * c * c + 4 * n * n * c  # q, k, v, proj_out as 1x1 convs; one head of width c

    def mid(n: int, c: int) -> int:
        return 2 * res(n, c, c) + attn(n, c)

    latent = h * w
    cells = [latent * 4 ** (levels - 1 - i) for i in range(levels)]  # level i: h 2^(levels-1-i) x w 2^(...)
    ch = widths[-1]
    total = _conv(latent, cfg.latent_channels, ch) + mid(latent, ch)  # the decoder, coarse to fine
    for i in reversed(range(levels)):
        for _ in range(cfg.num_res_blocks + 1):
            total += res(cells[i], ch, widths[i]) + (attn(cells[i], widths[i]) if i in cfg.attn_levels else 0)
            ch = widths[i]
        total += _conv(cells[i - 1], ch, ch) if i != 0 else 0  # Upsample
    total += _conv(cells[0], widths[0], cfg.out_channels)
    if encodes:  # the encoder, fine to coarse
        ch = widths[0]
        total += _conv(cells[0], cfg.in_channels, ch)
        for i in range(levels):
            for _ in range(cfg.num_res_blocks):
                total += res(cells[i], ch, widths[i]) + (attn(cells[i], widths[i]) if i in cfg.attn_levels else 0)
                ch = widths[i]
            total += _conv(cells[i + 1], ch, ch) if i != levels - 1 else 0  # Downsample
        total += mid(latent, ch) + _conv(latent, ch, 2 * cfg.latent_channels)
    return total / TFLOP


def text_tflop(cfg: TextEncoderConfig) -> float:
    """TFLOP of the text encoder on one window of `max_length` tokens (every layer: an upper bound
    under clip skip)."""
    t, d = cfg.max_length, cfg.width
    layer = 2 * t * d * d * 4 + 4 * t * t * d + 2 * 2 * t * d * cfg.mlp_dim  # q, k, v, out; attention; MLP
    return cfg.layers * layer / TFLOP


# --- the flags ------------------------------------------------------------------------------------------

def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """--max-pixels, --max-batch-pixels, --max-images, --max-steps, --max-work, --max-input-pixels,
    --max-prompt-chars."""
    d = DEFAULT_LIMITS
    g = p.add_argument_group("limits", "upper bounds of one request, checked before any work (docs/security.md)")
    g.add_argument("--max-pixels", type=_positive(int), default=d.max_pixels,
                   help=f"pixels of one image, width x height (default {MAX_PIXELS}, 2048x2048, and at most "
                   f"{MAX_SCALE}x the model's native size per side)")
    g.add_argument("--max-batch-pixels", type=_positive(int), default=d.max_batch_pixels,
                   help=f"pixels of one batch, batch size x width x height (default {d.max_batch_pixels})")
    g.add_argument("--max-images", type=_positive(int), default=d.max_images,
                   help=f"images per request (default {d.max_images})")
    g.add_argument("--max-steps", type=_positive(int), default=d.max_steps,
                   help=f"sampler steps (default {d.max_steps})")
    g.add_argument("--max-work", type=_positive(float), default=d.max_work,
                   help=f"estimated network work of one request in TFLOP (default {d.max_work:g}; "
                   "Stable Diffusion 1.5 costs about 36 per 512x512 image at 20 steps)")
    g.add_argument("--max-input-pixels", type=_positive(int), default=d.max_input_pixels,
                   help=f"pixels of an input image (default {d.max_input_pixels}, 4096x4096)")
    g.add_argument("--max-prompt-chars", type=_positive(int), default=d.max_prompt_chars,
                   help=f"characters of the prompt, and of the negative prompt (default {d.max_prompt_chars})")


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The `Limits` of the flags `add_limit_arguments` added."""
    return Limits(max_pixels=args.max_pixels, max_batch_pixels=args.max_batch_pixels, max_images=args.max_images,
                  max_steps=args.max_steps, max_work=args.max_work, max_input_pixels=args.max_input_pixels,
                  max_prompt_chars=args.max_prompt_chars)


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > 0) or (isinstance(value, float) and math.isnan(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse
