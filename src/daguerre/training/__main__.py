"""`python -m daguerre.training vae|ldm ...` = `daguerre train vae|ldm ...` (a module path for torchrun -m)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
