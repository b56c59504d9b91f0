"""Shared fixtures: the embedded digits data and tiny, fast training configs."""
import os

import tempfile

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
# the tests' decoded-image caches go to a folder of their own, never the user's ~/.cache/whatislost
os.environ["WHATISLOST_CACHE_DIR"] = tempfile.mkdtemp(prefix="whatislost-test-cache-")

import pytest
import torch

# tests are tiny: more threads only add contention on small CI machines (session fixtures included)
torch.set_num_threads(1)

from whatislost.config import TrainConfig
from whatislost.data import load_digits



def write_imagefolder(root, classes, n_train, n_test, size, seed=0):
    """root/{train,test}/<class>/<i>.png of random RGB size x size images; returns root."""
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
                write_png(image, str(root / split / cls / f"{i}.png"))
    return root


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


@pytest.fixture(scope="session")
def tiny_populations(tmp_path_factory, digits):
    """Finished runs of tiny populations on digits: Sup and SCL, dense and GMP 50%, two seeds each,
    plus Sup One-Shot 50% from the dense Sup runs. Returns the runs folder."""
    from whatislost.train import train

    root = tmp_path_factory.mktemp("populations")
    for loss in ("ce", "supcon"):
        for seed in (0, 1):
            dense = train(tiny_config(root / f"{loss}-dense-seed{seed}", recipe="recipes/dense.yaml", loss=loss,
                                      seed=seed, epochs=4), data=digits)
            train(tiny_config(root / f"{loss}-gmp50-seed{seed}", recipe="recipes/gmp.yaml", loss=loss, sparsity=0.5,
                              seed=seed, epochs=4), data=digits)
            if loss == "ce":
                train(tiny_config(root / f"{loss}-oneshot50-seed{seed}", recipe="recipes/oneshot.yaml", loss=loss,
                                  sparsity=0.5, seed=seed, init=str(dense)), data=digits)
    return root
