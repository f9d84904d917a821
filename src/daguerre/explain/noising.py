"""`daguerre explain noising IMAGE`: the forward process q(z_t | z_0) on an image, in latent and in pixel space.

Training noises data in closed form (Ho et al. 2020, eq. 4): z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps. A latent
diffusion model (Rombach et al. 2022) does this to the autoencoder's latent z_0 = E(x) (scaled to unit variance),
not to the pixels. The figure shows, at the chosen timesteps of the model's own schedule, what the decoder makes
of z_t (top row) beside the same q(x_t | x_0), at the same abar_t, applied to the pixels (bottom row): a latent
cell stands for f x f pixels, so the decoder turns latent noise into blobs the size of a cell, where pixel noise is
a speckle of single pixels.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .common import (
    IMAGE_INCHES,
    MAX_TIMESTEPS,
    check_count,
    figure_path,
    image_size,
    int_list,
    label_row,
    open_components,
    read_image,
    show_image,
    to_display,
)
from .page import Figure, new_figure, save_figure

if TYPE_CHECKING:
    import torch

    from ..components import Components
    from ..config import ScheduleConfig

DEFAULT_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)  # default timesteps, as fractions of T - 1


@dataclass(frozen=True)
class Noising:
    """The forward process on one image at K timesteps. Images are (., C, H, W) in [-1, 1] (the noised pixels
    unclamped), latents (K, c, h, w) diffusion latents (the VAE's, scaled), all float32 on the CPU."""

    timesteps: tuple[int, ...]
    alphas_cumprod: torch.Tensor  # (K,) float64: abar_t at each timestep
    image: torch.Tensor  # (1, C, H, W) the input x_0
    reconstruction: torch.Tensor  # (1, C, H, W) D(z_0): what the latent model can see of it at best
    latents: torch.Tensor  # (K, c, h, w) z_t = sqrt(abar) z_0 + sqrt(1 - abar) eps
    decoded: torch.Tensor  # (K, C, H, W) D(z_t)
    pixels: torch.Tensor  # (K, C, H, W) x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps_pixels


def default_timesteps(T: int) -> tuple[int, ...]:
    """Six timesteps from 0 to T - 1 (the end points and four between, denser early, where the image fades)."""
    return tuple(sorted({round(f * (T - 1)) for f in DEFAULT_FRACTIONS}))


def schedule_alphas_cumprod(schedule: ScheduleConfig) -> torch.Tensor:
    """(T,) float64 abar_t of the schedule a model was trained with (zero terminal SNR: abar_{T-1} = 0)."""
    from ..diffusion.schedules import alphas_cumprod, betas_from_config

    return alphas_cumprod(betas_from_config(schedule))


def check_timesteps(timesteps: tuple[int, ...], T: int) -> tuple[int, ...]:
    """The timesteps, each in [0, T - 1], at most MAX_TIMESTEPS of them; ValueError naming the bad one."""
    check_count(len(timesteps), 1, MAX_TIMESTEPS, "timesteps", "--timesteps with")
    for t in timesteps:
        if not 0 <= t <= T - 1:
            raise ValueError(f"--timesteps: {t} is outside the model's 0 to {T - 1} training timesteps")
    return tuple(timesteps)


def noise_image(components: Components, image: torch.Tensor, timesteps: tuple[int, ...], seed: int = 0) -> Noising:
    """`image` (1, C, H, W) in [-1, 1] (H, W multiples of the VAE factor) noised by the model's q(z_t | z_0) at each
    timestep. One latent noise eps and one pixel noise, drawn from a CPU generator seeded `seed`, serve every t, so
    the columns differ only in abar_t."""
    import torch

    from ..diffusion.schedules import q_sample
    from ..pipelines.tiling import decode_latents, encode_latents

    cfg = components.config
    timesteps = check_timesteps(tuple(int(t) for t in timesteps), cfg.schedule.num_train_timesteps)
    abar = schedule_alphas_cumprod(cfg.schedule)[list(timesteps)]  # (K,)
    image = image.float().cpu()
    with torch.no_grad():
        components.acquire("vae_encoder")
        z0 = encode_latents(components.vae, image).float().cpu()  # (1, c, h, w)
        components.done_with("vae_encoder")
        gen = torch.Generator("cpu").manual_seed(seed)
        eps = torch.randn(z0.shape, generator=gen)
        eps_pixels = torch.randn(image.shape, generator=gen)
        k = len(timesteps)
        latents = q_sample(z0.expand(k, -1, -1, -1), abar, eps.expand(k, -1, -1, -1))  # (K, c, h, w)
        pixels = q_sample(image.expand(k, -1, -1, -1), abar, eps_pixels.expand(k, -1, -1, -1))
        components.acquire("vae_decoder")
        # one latent at a time, so the decoder's memory is one image's (Stable Diffusion: ~1 GB at 512 x 512)
        decoded = torch.cat([decode_latents(components.vae, z[None]).float().cpu() for z in torch.cat([z0, latents])])
        components.done_with("vae_decoder")
    return Noising(timesteps, abar, image, decoded[:1], latents, decoded[1:], pixels)


def draw(result: Noising, model_name: str, factor: int, path, replace: bool = False):
    """Two rows: D(z_t) and x_t, each after its clean column (the reconstruction, the input)."""
    k = len(result.timesteps)
    fig = new_figure(IMAGE_INCHES * (k + 1) + 0.4, IMAGE_INCHES * 2 + 0.9)
    axes = fig.subplots(2, k + 1, squeeze=False)
    top = [to_display(result.reconstruction)[0], *to_display(result.decoded)]
    bottom = [to_display(result.image)[0], *to_display(result.pixels)]
    titles = ["clean"] + [f"t = {t}\nabar = {float(a):.3g}" for t, a in zip(result.timesteps,
                                                                          result.alphas_cumprod, strict=True)]
    for j in range(k + 1):
        show_image(axes[0, j], top[j], titles[j])
        show_image(axes[1, j], bottom[j])
    label_row(axes[0, 0], f"latent: D(z_t), f = {factor}")
    label_row(axes[1, 0], "pixels: x_t")
    axes[0, 0].set_xlabel("D(E(x))", fontsize=8)  # the clean column: what the decoder makes of z_0, and x itself
    axes[1, 0].set_xlabel("x, the input", fontsize=8)
    fig.suptitle(f"q(z_t | z_0) = N(sqrt(abar_t) z_0, (1 - abar_t) I) with the schedule of {model_name}",
                 fontsize=10)
    return save_figure(fig, path, replace=replace)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="the image to noise (cropped to a square at --size)")
    p.add_argument("--timesteps", type=int_list("0,250,999"), default=None,
                   help=f"comma-separated training timesteps, e.g. 0,250,500,999 (default: six from 0 to T - 1; "
                        f"at most {MAX_TIMESTEPS})")
    p.add_argument("--size", type=int, default=None,
                   help="side of the square the image is cropped to (default: the model's image size)")


def run(args: argparse.Namespace) -> list[Figure]:
    comps = open_components(args)  # reads no network yet: the bounds are checked before any work
    cfg = comps.config
    T = cfg.schedule.num_train_timesteps
    timesteps = check_timesteps(args.timesteps or default_timesteps(T), T)
    side = image_size(cfg, args.size)
    image = read_image(args.image, cfg, side)
    result = noise_image(comps, image, timesteps, args.seed)
    f = comps.config.vae.downsample_factor
    path = draw(result, comps.config.name, f, figure_path(args, "noising.png"), args.overwrite)
    return [Figure(path, f"The forward process at training timesteps {', '.join(map(str, timesteps))} of "
                         f"{comps.config.name}'s schedule: the top row decodes the noised latent z_t, the bottom row "
                         f"noises the pixels at the same alpha-bar; each latent cell stands for {f} x {f} pixels, "
                         "so latent noise decodes to blobs where pixel noise is a speckle, and both fade the "
                         f"picture as alpha-bar falls to {float(result.alphas_cumprod[-1]):.3g}.",
                   title="Noising")]
