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


@pytest.fixture(autouse=True, scope="session")
def cpu_precision_pinned():
    """auto's CPU precision is fp32 without measuring, here and in the commands tests run,
    so no test depends on this machine's bf16 speed (tests of the choice unset it). Session
    scope: module fixtures that train (test_trainer_fsdp.py) come before function ones."""
    import trainer

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(trainer.CPU_DTYPE_VARIABLE, "float32")
        yield


@pytest.fixture(autouse=True)
def cpu_precision_forgotten():
    """Each test starts with no CPU precision decided in this process."""
    import trainer

    trainer.remember_cpu_precision(None)
    yield
    trainer.remember_cpu_precision(None)


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


WORDS = "the model reads tokens and learns to predict the next one from the ones before it".split()


def write_corpus(path, documents: int = 60, seed: int = 0):
    """A small JSON-lines corpus of random sentences over a 16-word vocabulary."""
    import json

    rng = random.Random(seed)
    with open(path, "w") as file:
        for _ in range(documents):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
            file.write(json.dumps({"text": text}) + "\n")
    return path
