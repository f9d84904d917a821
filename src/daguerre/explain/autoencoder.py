"""`daguerre explain autoencoder IMAGE`: what the first stage keeps of an image, and what the diffusion model sees.

A latent diffusion model (Rombach et al. 2022, Sec. 3) never sees pixels: its autoencoder maps an H x W x C image to
an h x w x c latent, h = H / f, w = W / f for the down-sampling factor f (8 for Stable Diffusion, 4 for the shipped
models), and the diffusion runs there. The first figure shows the input, its reconstruction D(E(x)) (the
posterior mean decoded), the absolute error per pixel, and the PSNR and SSIM of the reconstruction
(`daguerre.training.metrics`, on the [0, 1] scale); the second shows the c latent channels as the diffusion
model sees them (scaled by the model's `scale_factor`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .common import IMAGE_INCHES, figure_path, image_size, open_components, read_image, show_image, to_display
from .page import Figure, new_figure, save_figure

if TYPE_CHECKING:
    import torch

    from ..components import Components

MAX_CHANNELS_SHOWN = 16  # latent channels drawn, at most (the first ones)
SSIM_MIN_SIDE = 11  # SSIM's window: smaller images have no SSIM


@dataclass(frozen=True)
class Reconstruction:
    """An image through the autoencoder, float32 on the CPU: images (1, C, H, W) in [-1, 1]."""

    image: torch.Tensor
    reconstruction: torch.Tensor  # D(E(x)), clamped to [-1, 1]
    latents: torch.Tensor  # (1, c, h, w) the diffusion latents: the posterior mean, scaled
    psnr: float  # dB, 10 log10(1 / MSE) on the [0, 1] scale
    ssim: float | None  # None for images smaller than SSIM's 11 x 11 window
    factor: int  # f: pixels per latent cell on each side

    @property
    def error(self) -> torch.Tensor:
        """(H, W) absolute error per pixel on the [0, 1] scale, averaged over the colour channels."""
        return ((self.reconstruction - self.image).abs() / 2).mean(dim=1)[0]

    @property
    def compression(self) -> float:
        """How many times fewer values the latent holds than the image."""
        return self.image.numel() / self.latents.numel()


def reconstruct(components: Components, image: torch.Tensor) -> Reconstruction:
    """`image` (1, C, H, W) in [-1, 1], H and W multiples of the VAE factor, through the model's autoencoder."""
    import torch

    from ..pipelines.tiling import decode_latents, encode_latents
    from ..training.metrics import psnr, ssim

    image = image.float().cpu()
    with torch.no_grad():
        components.acquire("vae_encoder")
        latents = encode_latents(components.vae, image).float().cpu()
        components.done_with("vae_encoder")
        components.acquire("vae_decoder")
        rec = decode_latents(components.vae, latents).float().cpu()
        components.done_with("vae_decoder")
    quality = float(ssim(image, rec)[0]) if min(image.shape[-2:]) >= SSIM_MIN_SIDE else None
    return Reconstruction(image, rec, latents, float(psnr(image, rec)[0]), quality,
                          components.config.vae.downsample_factor)


def draw_reconstruction(result: Reconstruction, path, replace: bool = False):
    fig = new_figure(IMAGE_INCHES * 3 + 1.0, IMAGE_INCHES + 0.8)
    axes = fig.subplots(1, 3)
    _, c, h, w = result.image.shape
    show_image(axes[0], to_display(result.image)[0], f"input x ({h} x {w} x {c})")
    show_image(axes[1], to_display(result.reconstruction)[0], f"D(E(x)): PSNR {result.psnr:.1f} dB")
    err = result.error.numpy()
    im = axes[2].imshow(err, cmap="magma", vmin=0, vmax=max(float(err.max()), 1e-3), interpolation="nearest")
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    axes[2].set_title(f"|error|, mean {float(err.mean()):.3f}", fontsize=9)
    fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.04)
    return save_figure(fig, path, replace=replace)


def draw_latents(result: Reconstruction, path, replace: bool = False):
    _, c, h, w = result.latents.shape
    shown = min(c, MAX_CHANNELS_SHOWN)
    cols = min(shown, 8)
    rows = -(-shown // cols)
    fig = new_figure(IMAGE_INCHES * cols + 0.6, IMAGE_INCHES * rows + 0.7)
    axes = fig.subplots(rows, cols, squeeze=False)
    lat = result.latents[0].numpy()
    bound = max(float(abs(lat[:shown]).max()), 1e-6)  # one colour scale for every channel, centred on 0
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= shown:
            ax.axis("off")
            continue
        im = ax.imshow(lat[i], cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
        ax.set_title(f"channel {i}", fontsize=9)
    fig.colorbar(im, ax=axes, fraction=0.02, pad=0.02, label="latent value")
    more = f" (the first {shown} shown)" if shown < c else ""
    fig.suptitle(f"the diffusion model's latent z_0: {h} x {w} x {c}{more}, one cell per {result.factor} x "
                 f"{result.factor} pixels\n(the encoder's E(x), scaled to about unit variance)", fontsize=10)
    return save_figure(fig, path, replace=replace)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="the image to encode and decode (cropped to a square at --size)")
    p.add_argument("--size", type=int, default=None,
                   help="side of the square the image is cropped to (default: the model's image size)")


def run(args: argparse.Namespace) -> list[Figure]:
    comps = open_components(args)
    side = image_size(comps.config, args.size)
    result = reconstruct(comps, read_image(args.image, comps.config, side))
    a = draw_reconstruction(result, figure_path(args, "autoencoder.png"), args.overwrite)
    b = draw_latents(result, figure_path(args, "latents.png"), args.overwrite)
    _, c, h, w = result.latents.shape
    quality = f"PSNR {result.psnr:.2f} dB" + (f", SSIM {result.ssim:.3f}" if result.ssim is not None else "")
    return [
        Figure(a, f"What {comps.config.name}'s autoencoder keeps of the image: its reconstruction D(E(x)) "
                  f"({quality}) and the absolute error per pixel, brightest where detail is lost (edges, fine "
                  "texture).", title="Reconstruction"),
        Figure(b, f"The {c} latent channels the diffusion model works on: {h} x {w} cells, each standing for "
                  f"{result.factor} x {result.factor} pixels, {result.compression:.0f} times fewer values than "
                  "the image; they still hold its layout, which is why diffusion in latent space is cheap.",
               title="Latent channels"),
    ]
