import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from helpers import tiny_clip  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_clip(seed=0)


@pytest.fixture(scope="session")
def tiny_model64():
    return tiny_clip(seed=0, dtype=torch.float64)
