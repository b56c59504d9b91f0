"""Shared fixtures: the embedded digits data and tiny, fast training configs."""
import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import pytest
import torch

from whatislost.config import TrainConfig
from whatislost.data import load_digits



@pytest.fixture(scope="session")
def digits():
    return load_digits()


def tiny_config(out, **kw) -> TrainConfig:
    """A WRN-10-1 on digits that trains in about a second."""
    base = dict(dataset="digits", depth=10, widen=1, epochs=4, batch_size=128, lr=0.05, crop_padding=1,
                hflip=False, linear_epochs=3, finetune_epochs=2, finetune_lr=0.01, eval_every=0, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def dense_ce_run(tmp_path_factory, digits):
    """A finished dense cross-entropy run, shared by the One-Shot and checkpoint tests."""
    from whatislost.train import train

    return train(tiny_config(tmp_path_factory.mktemp("runs") / "dense", recipe="dense", epochs=6), data=digits)


@pytest.fixture(autouse=True)
def _few_threads():
    # tests are tiny: more threads only add contention on small CI machines
    torch.set_num_threads(1)
    yield
