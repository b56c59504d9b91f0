"""Training core: recipes reach their targets, schedules behave, runs are verified and reproducible."""
import csv
import os

import pytest
import torch

from conftest import tiny_config
from whatislost.rundir import is_finished, load_checkpoint, load_model
from whatislost.train import train


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_dense_run_directory_is_complete(dense_ce_run):
    for name in ("config.yaml", "recipe.yaml", "metrics.csv", "layer_sparsity.csv", "model.pt", "done.json"):
        assert (dense_ce_run / name).is_file(), name
    ckpt = load_checkpoint(dense_ce_run)
    assert ckpt["method"] == "dense" and ckpt["sparsity"] == 0.0
    assert len(read_metrics(dense_ce_run)) == 6


@pytest.mark.parametrize("recipe,loss,target", [("gmp", "ce", 0.9), ("delta_gmp", "supcon", 0.5), ("gmp", "supcon", 0.7)])
def test_recipe_reaches_target_sparsity(tmp_path, digits, recipe, loss, target):
    run = train(tiny_config(tmp_path / "run", recipe=f"recipes/{recipe}.yaml", loss=loss, sparsity=target), data=digits)
    ckpt = load_checkpoint(run)
    assert abs(ckpt["sparsity"] - target) <= 0.005
    # measured on the saved weights, not taken from the recipe
    pruned = [v for k, v in ckpt["state_dict"].items() if k in ckpt["layer_sparsity"]]
    zeros = sum(int((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned)
    assert zeros == pytest.approx(ckpt["sparsity"])
    # global ranking: layers end at different sparsities
    assert len({round(v, 3) for v in ckpt["layer_sparsity"].values()}) > 1
    if loss == "supcon":  # classifier is trained after the contrastive stage, on the frozen sparse encoder
        assert "classifier.weight" not in ckpt["layer_sparsity"]
        assert not any(k.startswith("head.") for k in ckpt["state_dict"])


def test_gmp_rises_monotonically_inside_its_window(tmp_path, digits):
    cfg = tiny_config(tmp_path / "gmp", recipe="recipes/gmp.yaml", sparsity=0.8, epochs=8,
                      recipe_vars={"prune_start": 1, "prune_end": 5, "update_frequency": 0.5})
    rows = read_metrics(train(cfg, data=digits))
    sparsity = [float(r["sparsity"]) for r in rows]
    assert sparsity[0] < 0.8  # still rising after the first epoch
    assert all(b >= a for a, b in zip(sparsity, sparsity[1:]))
    assert len(set(sparsity[:5])) >= 4  # several distinct steps inside the window
    assert all(abs(s - 0.8) < 0.005 for s in sparsity[5:])


def test_delta_gmp_leaves_the_model_dense_before_its_start(tmp_path, digits):
    cfg = tiny_config(tmp_path / "dgmp", recipe="recipes/delta_gmp.yaml", sparsity=0.6, epochs=8,
                      recipe_vars={"prune_start": 4, "prune_end": 6})
    rows = read_metrics(train(cfg, data=digits))
    assert [float(r["sparsity"]) for r in rows[:4]] == [0.0] * 4
    assert float(rows[4]["sparsity"]) > 0
    assert abs(float(rows[-1]["sparsity"]) - 0.6) < 0.005


def test_oneshot_prunes_smallest_dense_weights_and_keeps_them_zero(tmp_path, digits, dense_ce_run):
    cfg = tiny_config(tmp_path / "os", recipe="recipes/oneshot.yaml", sparsity=0.7, init=str(dense_ce_run),
                      finetune_epochs=3)
    run = train(cfg, data=digits)
    dense, sparse = load_checkpoint(dense_ce_run)["state_dict"], load_checkpoint(run)
    names = list(sparse["layer_sparsity"])
    assert "classifier.weight" in names
    # global magnitude: every pruned dense weight is no larger than every kept one
    pruned_mag = torch.cat([dense[n][sparse["state_dict"][n] == 0].abs() for n in names])
    kept_mag = torch.cat([dense[n][sparse["state_dict"][n] != 0].abs() for n in names])
    assert pruned_mag.max() <= kept_mag.min()
    # the mask is held through fine-tuning: same layer sparsities every epoch
    with open(run / "layer_sparsity.csv") as f:
        rows = [r[2:] for r in csv.reader(f)][1:]
    assert len(rows) == 3 and all(r == rows[0] for r in rows)
    assert abs(sparse["sparsity"] - 0.7) <= 0.005


def test_short_digits_run_is_accurate(tmp_path, digits):
    cfg = tiny_config(tmp_path / "acc", recipe="recipes/dense.yaml", widen=2, epochs=10)
    assert load_checkpoint(train(cfg, data=digits))["test_acc"] >= 0.80


def test_checkpoint_round_trips(dense_ce_run, digits):
    model, ckpt = load_model(dense_ce_run)
    raw = torch.load(dense_ce_run / "model.pt", weights_only=True)  # no pickled code inside
    assert raw["arch"] == ckpt["arch"]
    x = (digits.test_x[:64].float() / 255 - digits.mean.view(1, -1, 1, 1)) / digits.std.view(1, -1, 1, 1)
    acc = float((model(x).argmax(1) == digits.test_y[:64]).float().mean())
    assert acc > 0.5
    reloaded = load_model(dense_ce_run)[0]
    assert torch.equal(model(x), reloaded(x))


def test_same_seed_gives_identical_weights(tmp_path, digits):
    runs = [train(tiny_config(tmp_path / f"r{i}", recipe="recipes/gmp.yaml", sparsity=0.5, loss="supcon", epochs=2,
                              seed=3), data=digits) for i in range(2)]
    a, b = (load_checkpoint(r)["state_dict"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = load_checkpoint(train(tiny_config(tmp_path / "r3", recipe="recipes/gmp.yaml", sparsity=0.5, loss="supcon",
                                              epochs=2, seed=4), data=digits))["state_dict"]
    assert not torch.equal(a["encoder.conv.weight"], other["encoder.conv.weight"])


def test_sparse_logs_go_into_the_run_directory(tmp_path, digits, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = train(tiny_config(tmp_path / "runs" / "x", recipe="recipes/gmp.yaml", sparsity=0.5, epochs=2), data=digits)
    assert (run / "sparse_logs" / "sparseml.log").stat().st_size > 0
    assert not (tmp_path / "sparse_logs").exists()
    assert is_finished(run)


def test_unreachable_target_fails_without_done_marker(tmp_path, digits):
    from whatislost.config import UserError

    cfg = tiny_config(tmp_path / "late", recipe="recipes/gmp.yaml", sparsity=0.9, epochs=3,
                      recipe_vars={"prune_start": 1, "prune_end": 10})
    with pytest.raises(UserError, match="not the target"):
        train(cfg, data=digits)
    assert not is_finished(tmp_path / "late")
