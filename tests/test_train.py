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
def test_layerwise_recipe_puts_every_pruned_tensor_at_target(tmp_path, digits, recipe, loss, target):
    run = train(tiny_config(tmp_path / "run", recipe=f"recipes/{recipe}.yaml", loss=loss, sparsity=target), data=digits)
    ckpt = load_checkpoint(run)
    assert abs(ckpt["sparsity"] - target) <= 0.005
    # measured on the saved weights, not taken from the recipe
    pruned = [v for k, v in ckpt["state_dict"].items() if k in ckpt["layer_sparsity"]]
    zeros = sum(int((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned)
    assert zeros == pytest.approx(ckpt["sparsity"])
    # layer-wise ranking (the authors' GMP): every pruned tensor within 1 point of the target
    for name, value in ckpt["layer_sparsity"].items():
        assert abs(value - target) <= 0.01, (name, value)
        assert abs(float((ckpt["state_dict"][name] == 0).float().mean()) - value) < 1e-6
    if loss == "ce":  # the authors prune the Linear layer's bias too
        assert {"classifier.weight", "classifier.bias"} <= set(ckpt["layer_sparsity"])
    else:  # no linear_recipe: the classifier is trained after the contrastive stage, on the frozen sparse encoder
        assert not any(k.startswith("classifier") for k in ckpt["layer_sparsity"])
        assert not any(k.startswith("head.") for k in ckpt["state_dict"])


def test_global_recipe_gives_layers_different_sparsities(tmp_path, digits):
    run = train(tiny_config(tmp_path / "run", recipe="recipes/gmp_global.yaml", sparsity=0.8), data=digits)
    ckpt = load_checkpoint(run)
    assert abs(ckpt["sparsity"] - 0.8) <= 0.005
    assert max(ckpt["layer_sparsity"].values()) - min(ckpt["layer_sparsity"].values()) > 0.05


def test_scl_linear_stage_prunes_the_classifier_with_its_own_recipe(tmp_path, digits):
    cfg = tiny_config(tmp_path / "run", recipe="recipes/gmp.yaml", loss="supcon", sparsity=0.7, linear_epochs=4,
                      linear_recipe="recipes/gmp.yaml", linear_augment=True, vflip=True,
                      linear_recipe_vars={"prune_start": 0.5, "prune_end": 2, "update_frequency": 0.5})
    ckpt = load_checkpoint(train(cfg, data=digits))
    assert abs(ckpt["layer_sparsity"]["classifier.weight"] - 0.7) <= 0.01
    assert abs(ckpt["layer_sparsity"]["classifier.bias"] - 0.7) <= 0.1  # 10 values: 7 of them zero
    assert abs(ckpt["sparsity"] - 0.7) <= 0.005


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
    from whatislost.cli import UserError

    cfg = tiny_config(tmp_path / "late", recipe="recipes/gmp.yaml", sparsity=0.9, epochs=3,
                      recipe_vars={"prune_start": 1, "prune_end": 10})
    with pytest.raises(UserError, match="not the target"):
        train(cfg, data=digits)
    assert not is_finished(tmp_path / "late")


def test_multistep_schedule_gives_the_expected_rates_at_the_milestones():
    from whatislost.train import LRSchedule

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = LRSchedule(opt, "multistep", epochs=10, steps_per_epoch=3, per="epoch", milestones=[2, 5], gamma=0.1)
    rates = []
    for _ in range(7):
        rates.append(opt.param_groups[0]["lr"])
        for _ in range(3):
            sched.after_step()  # per-epoch schedules ignore steps
        sched.after_epoch()
    assert rates == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01])
    # per step: milestones are still epochs, counted in steps
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = LRSchedule(opt, "multistep", epochs=10, steps_per_epoch=3, per="step", milestones=[2], gamma=0.5)
    seen = []
    for _ in range(9):
        seen.append(opt.param_groups[0]["lr"])
        sched.after_step()
    assert seen == pytest.approx([1.0] * 6 + [0.5] * 3)


def test_cosine_floor_and_per_epoch_stepping():
    from whatislost.train import LRSchedule

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched = LRSchedule(opt, "cosine", epochs=4, steps_per_epoch=5, per="epoch", lr_min=0.05 * 1e-3)
    rates = []
    for _ in range(5):
        rates.append(opt.param_groups[0]["lr"])
        sched.after_epoch()
    assert rates[0] == pytest.approx(0.05) and rates[2] == pytest.approx((0.05 + 5e-5) / 2)
    assert rates[4] == pytest.approx(5e-5)


def test_non_finite_loss_fails_the_run_without_done_marker(tmp_path, digits):
    from whatislost.cli import UserError

    cfg = tiny_config(tmp_path / "nan", recipe="recipes/dense.yaml", lr=1e9, epochs=3)
    with pytest.raises(UserError, match=r"non-finite in ce epoch 1 \(steps 1-10\)"):
        train(cfg, data=digits)
    assert not is_finished(tmp_path / "nan") and not (tmp_path / "nan" / "model.pt").exists()


def interrupted_then_resumed(tmp_path, digits, cfg_kw, stop_after):
    """Train with save_every=1, 'kill' the run after `stop_after` logged epochs, then run the same config again."""
    import whatislost.train as train_module

    cfg = lambda: tiny_config(tmp_path / "resumed", save_every=1, **cfg_kw)  # noqa: E731
    real_write, calls = train_module.EpochLog.write, []

    def dying_write(self, *args):
        real_write(self, *args)
        calls.append(args)
        if len(calls) == stop_after:
            raise KeyboardInterrupt  # as abrupt as the loop allows: after the epoch was logged, before its state save

    train_module.EpochLog.write = dying_write
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg(), data=digits)
    finally:
        train_module.EpochLog.write = real_write
    assert not is_finished(tmp_path / "resumed") and (tmp_path / "resumed" / "state.pt").is_file()
    return train(cfg(), data=digits)


@pytest.mark.parametrize("loss,stop_after", [("ce", 3), ("supcon", 5)])
def test_run_killed_inside_the_pruning_window_resumes_to_the_same_weights(tmp_path, digits, loss, stop_after):
    kw = dict(recipe="recipes/gmp.yaml", loss=loss, sparsity=0.7, epochs=6, linear_epochs=3,
              recipe_vars={"prune_start": 1, "prune_end": 4, "update_frequency": 0.5})
    whole = load_checkpoint(train(tiny_config(tmp_path / "whole", **kw), data=digits))
    resumed_dir = interrupted_then_resumed(tmp_path, digits, kw, stop_after)
    resumed = load_checkpoint(resumed_dir)
    for name, w in whole["state_dict"].items():
        assert torch.equal(w, resumed["state_dict"][name]), name
    assert whole["layer_sparsity"] == resumed["layer_sparsity"]
    rows = read_metrics(resumed_dir)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in read_metrics(tmp_path / "whole")]
    assert not (resumed_dir / "state.pt").exists()


def test_compiled_step_keeps_sparseml_masks_and_matches_eager(tmp_path, digits, monkeypatch):
    # aot_eager: dynamo capture + AOTAutograd, without inductor's minutes of C++ compilation on a CPU
    monkeypatch.setenv("WHATISLOST_COMPILE_BACKEND", "aot_eager")
    kw = dict(recipe="recipes/gmp.yaml", sparsity=0.6, epochs=3, recipe_vars={"prune_start": 0.5, "prune_end": 2})
    eager = load_checkpoint(train(tiny_config(tmp_path / "eager", **kw), data=digits))
    compiled = load_checkpoint(train(tiny_config(tmp_path / "compiled", compile=True, **kw), data=digits))
    for name, w in eager["state_dict"].items():
        if name in eager["layer_sparsity"]:
            assert torch.equal(w == 0, compiled["state_dict"][name] == 0), name  # same masks
        assert torch.allclose(w.float(), compiled["state_dict"][name].float(), atol=1e-4), name
    assert compiled["sparsity"] == eager["sparsity"]


def test_recipe_with_learning_rate_modifiers_takes_over_the_rate(tmp_path, digits):
    recipe = tmp_path / "lr.yaml"
    recipe.write_text("num_epochs: 4\nmodifiers:\n  - !EpochRangeModifier\n    start_epoch: 0.0\n    end_epoch: 4.0\n"
                      "  - !SetLearningRateModifier\n    start_epoch: 2.0\n    learning_rate: 0.0123\n")
    rows = read_metrics(train(tiny_config(tmp_path / "run", recipe=str(recipe), lr=0.05), data=digits))
    # the built-in cosine steps aside: the rate is the optimiser's own until the recipe sets it, then the recipe's
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05, 0.05, 0.0123, 0.0123])


def test_epoch_figures_go_through_sparsemls_logger_manager(tmp_path, digits):
    run = train(tiny_config(tmp_path / "run", recipe="recipes/gmp.yaml", sparsity=0.5, epochs=2), data=digits)
    text = (run / "sparse_logs" / "sparseml.log").read_text()
    assert text.count("whatislost/ce [") == 2 and "'loss':" in text and "'sparsity':" in text
    assert text.count("whatislost/layer_sparsity [") == 2


def test_extra_loggers_are_opt_in_and_checked_before_anything_is_written(tmp_path, digits):
    from whatislost.cli import UserError

    with pytest.raises(UserError, match="not one of tensorboard, wandb"):
        train(tiny_config(tmp_path / "a", loggers=["mlflow"]), data=digits)
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="needs the wandb package"):
            train(tiny_config(tmp_path / "b", loggers=["wandb"]), data=digits)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
