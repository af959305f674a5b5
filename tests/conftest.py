import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Everything the tests (and the commands they start) write goes under one temporary folder: text-embedding caches,
# matplotlib's font cache. Nothing lands in the user's home.
_SCRATCH = tempfile.mkdtemp(prefix="textspan-tests-")
os.environ["TEXTSPAN_CACHE"] = os.path.join(_SCRATCH, "textspan-cache")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_SCRATCH, "matplotlib"))

from helpers import tiny_clip  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_clip(seed=0)


@pytest.fixture(scope="session")
def tiny_model64():
    return tiny_clip(seed=0, dtype=torch.float64)
