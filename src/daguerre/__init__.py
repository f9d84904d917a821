"""daguerre: latent diffusion and Stable Diffusion, to read, train and run on an ordinary computer."""

__version__ = "0.1.0"

_LAZY = {"load": "api", "Pipeline": "api", "GenerationRequest": "pipelines.request"}  # name -> module


def __getattr__(name: str):
    """`daguerre.load` and friends, imported on first use so that `import daguerre` stays light (no torch)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
