import random
import numpy as np
import pytest
import torch

from model import ModelConfig


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture
def tiny() -> ModelConfig:
    """2 layers, 32 dims, 4 heads / 2 KV heads, vocab 64, context 16."""
    return ModelConfig.from_name("tiny")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
