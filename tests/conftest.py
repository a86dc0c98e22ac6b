"""Shared pytest settings: make the repository root importable and keep CPU tests deterministic."""
import os
import sys

# Bitwise comparisons across processes (resume after kill -9, 2-process gloo vs 1 process) need every process to use
# the same number of CPU threads: float reductions split differently over 1 and 2 threads, and torchrun starts its
# workers with OMP_NUM_THREADS=1. So the whole suite, and every subprocess it starts, runs single-threaded.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TINY_DATA = os.path.join(ROOT, "tests", "data", "cifar10_tiny.npz")  # 200 CIFAR-10 test images, 20 per class


@pytest.fixture(autouse=True)
def _seed_everything():
    import numpy as np
    torch.manual_seed(0)
    np.random.seed(0)
    yield
