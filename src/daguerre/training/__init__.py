"""Training both stages of latent diffusion (Rombach et al. 2022): `daguerre train vae | ldm` (docs/training.md).

    config.py    RunConfig from a TOML file + `--set` overrides, typed and checked key by key
    vae.py       stage 1: KL autoencoder (+ optional PatchGAN, perceptual term), PSNR/SSIM, latent scale
    ldm.py       stage 2: U-Net + text encoder (jointly trained or frozen) on cached latents, CFG dropout,
                 min-SNR, EMA
    latents.py   the latent cache (safetensors shards keyed by the VAE file and the data)
    text_cache.py  the text-embedding cache of a frozen pretrained encoder (MiniLM)
    concat.py    image-concatenation conditioning: super-resolution (low-res image) and inpainting (mask)
    losses.py    reconstruction / KL / hinge GAN / adaptive weight; diffusion targets and min-SNR weights
    metrics.py   PSNR, SSIM (Wang et al. 2004), latent scale factor
    loop.py      AdamW, warm-up + cosine learning rate, clipping, bf16 autocast, checkpointing of the state
    state.py     resumable training state: safetensors + JSON, atomic folders, keep-last-K
    ema.py       EMA of the weights with LitEma warm-up
    dist.py      torchrun / DDP (gloo on CPU, NCCL on GPU), the deterministic data stream
    data.py      datasets of a [data] section, held-out split, unreadable images skipped or fatal
    log.py       tqdm bar, metrics.jsonl, optional TensorBoard
    samples.py   reconstruction images and sample grids (txt2img with the EMA weights)
"""

from .config import RunConfig, load_run_config
from .ldm import train_ldm
from .vae import train_vae

__all__ = ["RunConfig", "load_run_config", "train_ldm", "train_vae"]
