"""`python -m daguerre ...` is the `daguerre` command."""

import sys

from .cli import main

sys.exit(main())
