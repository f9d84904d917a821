"""The model files that ship inside the package (`daguerre/assets/models/NAME.safetensors`): what a shipped name
means. `registry` resolves `--model NAME` with it; an adapter file (`checkpoints.adapter`) finds its base by name in
it, which is why the table lives at this layer."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def models_folder() -> Path:
    """The folder of the shipped model files."""
    return Path(str(resources.files("daguerre") / "assets" / "models"))


def shipped_models() -> dict[str, Path]:
    """Name -> path of every model that ships inside the package."""
    folder = models_folder()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in folder.iterdir() if p.name.endswith(".safetensors")}
