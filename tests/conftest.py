"""Shared pytest settings: make the repository root importable and keep CPU tests deterministic."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TINY_DATA = os.path.join(ROOT, "tests", "data", "cifar10_tiny.npz")  # 200 CIFAR-10 test images, 20 per class


@pytest.fixture(autouse=True)
def _seed_everything():
    import numpy as np
    import torch
    torch.manual_seed(0)
    np.random.seed(0)
    yield
