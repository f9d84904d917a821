"""The sub-commands of `daguerre`: one module each, registered with `daguerre.cli.command`.

Import heavy dependencies (torch, the models) inside each `run` so that `daguerre --help` stays fast.
"""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
