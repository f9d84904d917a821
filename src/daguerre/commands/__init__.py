"""The sub-commands of `daguerre`: one module each, registered in `registry.COMMANDS` when imported (here, in the
order `daguerre --help` lists them). Heavy dependencies (torch, the models) are imported inside each `run`, so
that `daguerre --help` stays fast."""

from . import (  # noqa: F401  (each module registers its command)
    classifier,
    convert,
    eval,
    explain,
    generate,
    img2img,
    info,
    inpaint,
    serve,
    train,
    upscale,
)
from .registry import COMMANDS, UserError, command  # noqa: F401
