"""The `daguerre` command line: one sub-command per task (daguerre.commands), user errors as one line on stderr."""

from __future__ import annotations

import argparse
import errno
import sys
import warnings
from collections.abc import Sequence

from .commands import COMMANDS, UserError  # the registered sub-commands (importing them registers them)

# OSErrors that say something about the machine or the paths given, not about daguerre: printed as one line.
# Others (EBADF, EINVAL, an OSError without errno, ...) may be bugs and keep their traceback.
ENVIRONMENT_ERRNOS = {
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOENT, errno.ENOTDIR,
    errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EIO, errno.ENOTEMPTY, errno.EMLINK,
    errno.EXDEV, errno.ETXTBSY, errno.EBUSY,
}


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: its message (daguerre's own, or the OS reason with the file it names),
    without Python's "[Errno N]" prefix."""
    if e.errno is None or e.strerror is None:
        return str(e)
    if e.filename is None:
        return e.strerror
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
    return f"{where}: {e.strerror}"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="daguerre", description="Latent diffusion and Stable Diffusion on your computer."
    )
    parser.add_argument("--version", action="version", version=f"daguerre {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():  # a warning is one line, like an error (e.g. fp16 on a CPU)
            warnings.showwarning = lambda message, *_args, **_kw: print(
                f"daguerre {args.command}: warning: {message}", file=sys.stderr)
            return int(args.run(args) or 0)
    except (UserError, ValueError) as e:
        print(f"daguerre {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        explicit = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
        if not isinstance(e, explicit) and e.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"daguerre {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"daguerre {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
