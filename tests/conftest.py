"""Shared test settings.

Tiny models run fastest on one thread (with two, OpenMP threads spin-wait on each other for
millisecond-sized ops, many times slower on a busy machine); tests marked `slow` (full Stable
Diffusion configs) keep torch's default thread count.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads_for_test_size(request):
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
