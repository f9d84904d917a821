"""The held-out split of a dataset: drawn at random with a seed, the same for every stage and for `daguerre eval`.

Holding out the last N items of a sorted folder held out one class only (class sub-folders sort together);
a seeded permutation holds out a fair sample of every class and caption. The split depends only on the
dataset's length, the number held out and the seed, so the autoencoder, the diffusion model trained on it
and `daguerre eval --data FOLDER` all agree on which images were never trained on.
"""

from __future__ import annotations

import numpy as np

SPLIT_KEY = 0x5B1177  # separates this stream from the other uses of data.seed


def holdout_split(n: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of a dataset of `n` items, both sorted; `holdout` items drawn at random."""
    if n < 0 or holdout < 0 or holdout > n:
        raise ValueError(f"cannot hold out {holdout} of {n} items: data.holdout must be between 0 and the dataset size")
    order = np.random.default_rng((SPLIT_KEY, seed)).permutation(n)
    return np.sort(order[holdout:]), np.sort(order[:holdout])
