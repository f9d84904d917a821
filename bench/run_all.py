"""`make bench`: run every benchmark in bench/ one after the other (each prints its own table).

Benchmarks are run by hand, never in CI; record their results in docs/benchmarks.md with the command.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = ["e2e.py", "unet_step.py", "sampler_convergence.py", "train_throughput.py", "attention_training.py"]


def main() -> int:
    here = Path(__file__).parent
    failed = []
    for name in BENCHES:
        print(f"\n=== {name} ===", flush=True)
        if subprocess.call([sys.executable, str(here / name)]) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
