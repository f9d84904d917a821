import numpy as np
import pytest

from daguerre.data.split import holdout_split


def test_split_is_a_seeded_partition_that_spreads_over_the_dataset():
    train, held = holdout_split(1000, 100, seed=3)
    assert len(held) == 100 and len(train) == 900
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(1000))
    again_train, again_held = holdout_split(1000, 100, seed=3)
    assert np.array_equal(held, again_held) and np.array_equal(train, again_train)
    assert not np.array_equal(held, holdout_split(1000, 100, seed=4)[1])
    # ten classes of 100 sorted together: every class is represented in the held-out set
    assert len(set((held // 100).tolist())) == 10


def test_split_refuses_an_impossible_holdout():
    with pytest.raises(ValueError, match="hold out 5 of 3"):
        holdout_split(3, 5, seed=0)
    train, held = holdout_split(3, 0, seed=0)
    assert list(train) == [0, 1, 2] and len(held) == 0
