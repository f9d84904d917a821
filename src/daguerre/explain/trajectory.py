"""`daguerre explain trajectory PROMPT`: the noisy latent and the model's guess of the clean image at every step.

At step i a sampler holds x_i = z_0 + sigma_i eps (sigma space, schedules.py) and asks the denoiser for
D(x_i, sigma_i), its estimate of the clean latent z_0 (Karras et al. 2022, eq. 3); it then moves x towards it
and lowers the noise. The figure decodes both at every step: x_i (as the DDPM latent x_i / sqrt(1 + sigma_i^2)
the U-Net reads, top rows) and the x0 estimate (bottom rows). The estimate is a blurry average of every image that
fits the noise at first, and sharpens as sigma falls: coarse layout is decided in the first steps, detail last.
It runs the txt2img pipeline itself (any sampler, schedule and guidance scale, pipelines/common.py) and reads the
sampler's step callback, the one `daguerre generate --preview` reads, so the last picture is the image
`daguerre generate` makes with the same settings.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .common import (
    IMAGE_INCHES,
    MAX_STEPS,
    add_sampling_arguments,
    check_count,
    figure_path,
    label_row,
    open_components,
    pil_to_display,
    sampling_request,
    show_image,
    to_display,
)
from .page import Figure, new_figure, save_figure

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..components import Components
    from ..pipelines.request import ValidRequest

COLUMNS = 13  # steps per row of the figure, at most
SMALL_INCHES = 1.25  # the side of one image when there are more steps than fit in one row at IMAGE_INCHES


@dataclass(frozen=True)
class Trajectory:
    """One sampling run step by step: at step i the noise level `sigmas[i]`, the decoded noisy latent `noisy[i]`
    and the decoded x0 estimate `estimates[i]` ((steps, C, H, W) in [-1, 1], float32 on the CPU); `image` is the
    pipeline's final image and `request` the validated request it was made from."""

    sigmas: torch.Tensor  # (steps,) the sigma of each step's input
    noisy: torch.Tensor
    estimates: torch.Tensor
    image: Image.Image
    request: ValidRequest


def sample_trajectory(components: Components, request: ValidRequest, decode: str = "full") -> Trajectory:
    """Run the txt2img pipeline for one image of `request` (a txt2img `ValidRequest` for this model) and decode,
    after sampling, the noisy latent and the x0 estimate the sampler reported at each step, as the previews of
    `daguerre generate --preview` are decoded (`pipelines.preview.PreviewDecoder`): `decode="full"` with the VAE
    decoder (exact), "approx" with its fitted linear latent-to-RGB map (free; Stable Diffusion's many steps)."""
    import torch

    from ..pipelines.images import image_to_tensor
    from ..pipelines.preview import PREVIEW_MODES, PreviewDecoder
    from ..pipelines.txt2img import txt2img

    if decode not in PREVIEW_MODES:
        raise ValueError(f"--decode {decode!r}: choose one of {', '.join(PREVIEW_MODES)}")

    if request.n != 1:
        raise ValueError(f"a trajectory follows one image; the request asks for {request.n}")
    check_count(request.sampler_steps, 1, MAX_STEPS, "sampling steps", "--steps")
    steps: list[dict[str, Any]] = []

    def record(info: dict[str, Any]) -> None:
        sigma = torch.as_tensor(info["sigma"], dtype=torch.float32).reshape(-1)[0]
        steps.append({"sigma": float(sigma), "x": (info["x"] / (sigma**2 + 1).sqrt()).detach().float().cpu(),
                      "denoised": info["denoised"].detach().float().cpu()})

    result = txt2img(components, request, callback=record)[0]
    components.acquire("vae_decoder")
    decoder = PreviewDecoder(components.vae, decode, tiled=request.tile)

    def images(key: str) -> torch.Tensor:  # (steps, C, H, W) in [-1, 1], 8 bits per channel as the previews;
        # one latent at a time, so the decoder's memory is one image's (Stable Diffusion: ~1 GB at 512 x 512)
        return torch.cat([image_to_tensor(decoder.decode(s[key])[0]) for s in steps])

    noisy, estimates = images("x"), images("denoised")
    components.done_with("vae_decoder")
    sigmas = torch.tensor([s["sigma"] for s in steps], dtype=torch.float64)
    return Trajectory(sigmas, noisy, estimates, result.image, request)


def draw(traj: Trajectory, path, replace: bool = False):
    """Rows of up to COLUMNS steps, each as a pair: x_i decoded above, the x0 estimate below."""
    n = len(traj.sigmas)
    chunks = -(-n // COLUMNS)
    cols = -(-n // chunks)  # rows of equal length: 25 steps are rows of 13 and 12
    side = IMAGE_INCHES if n <= 10 else SMALL_INCHES
    fig = new_figure(side * cols + 0.5, (side * 2 + 0.45) * chunks + 0.4)
    axes = fig.subplots(2 * chunks, cols, squeeze=False)
    noisy, estimates = to_display(traj.noisy), to_display(traj.estimates)
    for i in range(chunks * cols):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        if i >= n:
            top.axis("off")
            bottom.axis("off")
            continue
        show_image(top, noisy[i], f"step {i + 1}\nsigma {float(traj.sigmas[i]):.3g}")
        show_image(bottom, estimates[i])
        if i % cols == 0:
            label_row(top, "x_t")
            label_row(bottom, "x0 estimate")
    req = traj.request
    how = f"{req.choice.a1111_name} ({req.choice.a1111_schedule})"
    fig.suptitle(f'"{req.prompt}": {req.sampler_steps} steps of {how}, CFG {req.cfg_scale:g}, seed {req.seed}',
                 fontsize=10)
    return save_figure(fig, path, replace=replace)


def draw_final(traj: Trajectory, path, replace: bool = False):
    """The finished image, alone, at its own size (at least IMAGE_INCHES)."""
    fig = new_figure(IMAGE_INCHES * 1.5, IMAGE_INCHES * 1.5 + 0.3)
    show_image(fig.subplots(), pil_to_display(traj.image), "the final image")
    return save_figure(fig, path, replace=replace)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_sampling_arguments(p)
    p.add_argument("--decode", choices=("full", "approx"), default="full",
                   help="full: every step through the VAE decoder, exact (default); approx: the previews' fitted "
                        "linear latent-to-RGB map, free but blurry, colours approximate (Stable Diffusion's large "
                        "images)")


def run(args: argparse.Namespace) -> list[Figure]:
    comps = open_components(args)
    request = sampling_request(args, comps)
    traj = sample_trajectory(comps, request, args.decode)
    a = draw(traj, figure_path(args, "trajectory.png"), args.overwrite)
    b = draw_final(traj, figure_path(args, "final.png"), args.overwrite)
    return [
        Figure(a, f"Sampling step by step: the top rows decode the noisy latent x_t the sampler holds at each of its "
                  f"{len(traj.sigmas)} steps, the bottom rows the model's estimate of the clean image; the estimate "
                  "starts as a blurry average of everything that fits the noise and sharpens as sigma falls, "
                  "layout first, detail last.", title="Trajectory"),
        Figure(b, "The image the run ends with: the same image `daguerre generate` makes with these settings and "
                  "seed.", title="Final image"),
    ]
