"""Long checks on the real CIFAR-10 (JPEG) beside the checkout: `pytest -m slow` (skipped by `make test`)."""
from pathlib import Path

import pytest

from conftest import tiny_config

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CIFAR.exists(), reason=f"{CIFAR} not present")]


def test_wrn10_2_gmp_on_cifar10_then_eval(tmp_path):
    """Short WRN-10-2 runs on real CIFAR-10: GMP reaches its target, accuracy is far above chance, eval scores them."""
    import pandas as pd
    import torch

    from whatislost.data import load_data
    from whatislost.eval import run_eval
    from whatislost.rundir import load_checkpoint
    from whatislost.train import train

    torch.set_num_threads(2)
    data = load_data("imagefolder", str(CIFAR))
    assert data.train_x.shape == (50000, 3, 32, 32) and data.classes[0] == "airplane"
    for seed in (0, 1):
        for recipe, sparsity in (("dense", 0.0), ("gmp", 0.5)):
            cfg = tiny_config(tmp_path / "runs" / f"{recipe}-{seed}", dataset="imagefolder", data_root=str(CIFAR),
                              depth=10, widen=2, epochs=1, batch_size=256, crop_padding=4, hflip=True, recipe=f"recipes/{recipe}.yaml",
                              sparsity=sparsity, seed=seed, recipe_vars={"prune_end": 0.8, "update_frequency": 0.1}
                              if recipe == "gmp" else {})
            ckpt = load_checkpoint(train(cfg, data=data))
            assert abs(ckpt["sparsity"] - sparsity) <= 0.005
            assert ckpt["test_acc"] > 0.3
    run_eval(tmp_path / "runs", metrics=("acc", "pie", "qscore"), report=False)
    pops = pd.read_csv(tmp_path / "runs" / "eval" / "tables" / "populations.csv")
    assert set(pops.population) == {"Sup/Dense/0", "Sup/GMP/50"} and pops.pie_count.notna().any()
