"""`daguerre explain`: figures that show how latent diffusion works, on any model (issue 22, docs/explain.md).

One module per sub-command, `daguerre.explain.<name>`, each with `add_arguments(parser)` and
`run(args) -> list[Figure]` for the command line and plain functions beneath them (the Python API);
`page.py` holds `Figure` and `write_page`, the one self-contained HTML page. `EXPLAINERS` is the one table of
the sub-commands; a module is imported only when its sub-command runs (`module`), so `import daguerre.explain`
stays light (no torch, no matplotlib).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> what its figures show (the help line of `daguerre explain NAME`), in the order of docs/explain.md
EXPLAINERS: dict[str, str] = {
    "noising": "the forward process q(z_t | z_0) on an image at chosen timesteps, in latent and in pixel space",
    "schedules": "alpha-bar, SNR and sigma over t of the noise schedules, and the sampling sigmas at N steps",
    "trajectory": "the noisy latent x_t and the model's estimate of the clean image at every sampling step",
    "attention": "which pixels each word of the prompt attends to (cross-attention maps, DAAM)",
    "autoencoder": "the autoencoder's reconstruction of an image, its error, PSNR and the latent channels",
    "samplers": "each sampler's error against the exact solution versus the number of steps (Gaussian data)",
}


def module(name: str) -> ModuleType:
    """The module of the sub-command `name` (`daguerre.explain.<name>`), imported now."""
    if name not in EXPLAINERS:
        raise ValueError(f"nothing to explain called {name!r}; choose one of {', '.join(EXPLAINERS)}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise ValueError(f"{name!r} is not available in this version of daguerre") from None
