"""The table of `daguerre` sub-commands: each command module registers its `run` with `command`."""

from __future__ import annotations

import argparse
from collections.abc import Callable


class UserError(Exception):
    """An error caused by the user's input: printed as one line, without a traceback."""


# name -> (help, add_arguments(parser), run(args) -> exit code), in the order the modules register
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register `run(args) -> int` as the sub-command `name`."""

    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return register
