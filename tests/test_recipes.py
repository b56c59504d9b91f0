"""The recipes beyond the paper: each reaches its target (measured on the saved weights, in its own unit), does
what its method does, and the loop refuses what it cannot honour. All WRN-10-1 on digits, a few epochs."""
import csv
import re
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from whatislost.cli import UserError
from whatislost.rundir import is_finished, load_checkpoint, load_model
from whatislost.train import train

ROOT = Path(__file__).resolve().parent.parent


def zeros_of(ckpt) -> float:
    """Fraction of exact zeros over the checkpoint's pruned tensors, counted on its saved weights."""
    pruned = [w for k, w in ckpt["state_dict"].items() if k in ckpt["layer_sparsity"]]
    return sum(int((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned)


def metric_rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


class MaskLog:
    """Records, at every logged epoch, the zero pattern of every tensor the run prunes."""

    def __init__(self, monkeypatch):
        import whatislost.train as train_module

        self.masks, real = [], train_module.EpochLog.write

        def write(log, *args):
            real(log, *args)
            self.masks.append({k: (p.detach() == 0).clone() for k, p in log.tensors.items()})

        monkeypatch.setattr(train_module.EpochLog, "write", write)


class SampledCount:
    """Counts the batches the trainer's gradient sampler hands SparseML (OBS, M-FAC, RigL)."""

    def __init__(self, monkeypatch):
        import whatislost.pruning as pruning

        self.batches, real = 0, pruning.SampledBatches.__iter__

        def iterate(sampled):
            for item in real(sampled):
                self.batches += 1
                yield item

        monkeypatch.setattr(pruning.SampledBatches, "__iter__", iterate)


@pytest.fixture(scope="module")
def dense_scl_run(tmp_path_factory, digits):
    """A finished dense SupCon run (it keeps its projection head) for the SCL One-Shot variants."""
    torch.set_num_threads(1)
    return train(tiny_config(tmp_path_factory.mktemp("scl") / "dense", recipe="dense", loss="supcon", epochs=4),
                 data=digits)


# ---------------------------------------------------------------- training-time recipes
def test_acdc_alternates_dense_and_compressed_phases_and_ends_at_target(tmp_path, digits):
    run = train(tiny_config(tmp_path / "acdc", recipe="recipes/acdc.yaml", sparsity=0.9, epochs=6), data=digits)
    ckpt = load_checkpoint(run)
    assert abs(ckpt["sparsity"] - 0.9) <= 0.005 and zeros_of(ckpt) == pytest.approx(ckpt["sparsity"])
    # epochs=6: warm-up [0,1) dense, then phases of one epoch from epoch 1, the last one compressed
    per_epoch = [round(float(r["sparsity"]), 2) for r in metric_rows(run)]
    assert per_epoch == [0.0, 0.0, 0.9, 0.0, 0.9, 0.9]
    # global ranking: layers end at different sparsities
    assert max(ckpt["layer_sparsity"].values()) - min(ckpt["layer_sparsity"].values()) > 0.05


def test_rigl_is_sparse_from_the_start_and_rewires_its_mask_with_sampled_gradients(tmp_path, digits, monkeypatch):
    masks, sampled = MaskLog(monkeypatch), SampledCount(monkeypatch)
    cfg = tiny_config(tmp_path / "rigl", recipe="recipes/rigl.yaml", sparsity=0.8, epochs=5,
                      recipe_vars={"rigl_end": 3, "update_frequency": 0.5, "num_grads": 2})
    ckpt = load_checkpoint(train(cfg, data=digits))
    assert abs(ckpt["sparsity"] - 0.8) <= 0.005 and zeros_of(ckpt) == pytest.approx(ckpt["sparsity"])
    # uniform: every pruned tensor (weight matrices only) at the target from the first epoch on
    assert set(ckpt["layer_sparsity"]) >= {"classifier.weight", "encoder.conv.weight"}
    assert "classifier.bias" not in ckpt["layer_sparsity"]
    assert all(abs(v - 0.8) <= 0.01 for v in ckpt["layer_sparsity"].values())
    name = "encoder.blocks.2.conv2.weight"
    assert abs(float(masks.masks[0][name].float().mean()) - 0.8) <= 0.01
    # rewired inside the window (drop by magnitude, grow by sampled gradient), held after rigl_end
    assert not torch.equal(masks.masks[0][name], masks.masks[2][name])
    assert torch.equal(masks.masks[3][name], masks.masks[4][name])
    assert sampled.batches == 2 * 7  # num_grads batches at epochs 0, 0.5, ..., 3 (rigl_end)


def test_movement_ranks_by_movement_not_magnitude(tmp_path, digits):
    kw = dict(sparsity=0.7, loss="supcon", epochs=4, recipe_vars={"prune_start": 1, "prune_end": 2,
                                                                  "update_frequency": 0.5})
    movement = load_checkpoint(train(tiny_config(tmp_path / "mv", recipe="recipes/movement.yaml", **kw), data=digits))
    assert abs(movement["sparsity"] - 0.7) <= 0.005 and zeros_of(movement) == pytest.approx(movement["sparsity"])
    assert all(abs(v - 0.7) <= 0.01 for v in movement["layer_sparsity"].values())  # layer-wise
    assert not any(k.startswith("classifier") for k in movement["layer_sparsity"])  # SCL stage 1: the encoder
    # same seed and window as layer-wise GMP: the same weights until the first cut, then other weights go
    gmp = load_checkpoint(train(tiny_config(tmp_path / "gmp", recipe="recipes/gmp.yaml", **kw), data=digits))
    name = "encoder.blocks.2.conv1.weight"
    same = (movement["state_dict"][name] == 0) == (gmp["state_dict"][name] == 0)
    assert float(same.float().mean()) < 0.9


def test_filter_pruning_removes_whole_filters_counted_in_filters(tmp_path, digits):
    run = train(tiny_config(tmp_path / "f", recipe="recipes/filter.yaml", sparsity=0.7, epochs=4,
                            recipe_vars={"prune_start": 0.5, "prune_end": 2, "update_frequency": 0.5}), data=digits)
    ckpt = load_checkpoint(run)
    assert ckpt["sparsity_unit"] == "filters"
    layers = ckpt["layer_filters"]
    assert not any(k.startswith("classifier") for k in layers) and len(layers) == 9
    for name, (removed, total) in layers.items():
        w = ckpt["state_dict"][name]
        assert total == w.shape[0] and abs(removed - 0.7 * total) <= 1, name  # within one filter
        per_filter = (w != 0).flatten(1).any(1)
        assert int((~per_filter).sum()) == removed
        assert ckpt["layer_sparsity"][name] == pytest.approx(removed / total)  # zero weights: whole filters only
    # the run's sparsity counts filters; the fraction of zero weights is kept beside it
    assert ckpt["sparsity"] == pytest.approx(sum(r for r, _ in layers.values()) / sum(t for _, t in layers.values()))
    assert ckpt["weight_sparsity"] == pytest.approx(zeros_of(ckpt)) and ckpt["weight_sparsity"] != ckpt["sparsity"]
    assert float(metric_rows(run)[-1]["sparsity"]) == pytest.approx(ckpt["sparsity"], abs=1e-5)
    with pytest.raises(UserError, match="filters removed in .*more than one off"):  # the check is in filters too
        train(tiny_config(tmp_path / "late", recipe="recipes/filter.yaml", sparsity=0.7, epochs=3,
                          recipe_vars={"prune_start": 1, "prune_end": 10}), data=digits)
    assert not is_finished(tmp_path / "late")


# ---------------------------------------------------------------- recipes that prune a trained model
def test_obs_one_shot_samples_gradients_and_reaches_its_target(tmp_path, digits, dense_ce_run, monkeypatch):
    sampled, masks = SampledCount(monkeypatch), MaskLog(monkeypatch)
    cfg = tiny_config(tmp_path / "obs", recipe="recipes/obs.yaml", sparsity=0.8, init=str(dense_ce_run),
                      finetune_epochs=2, recipe_vars={"num_grads": 6, "num_recomputations": 2})
    ckpt = load_checkpoint(train(cfg, data=digits))
    assert abs(ckpt["sparsity"] - 0.8) <= 0.005 and zeros_of(ckpt) == pytest.approx(ckpt["sparsity"])
    assert {"classifier.weight", "classifier.bias"} <= set(ckpt["layer_sparsity"])
    # num_grads per recomputation, at the cut and again at the modifier's end (epoch 1), where nothing changes
    assert sampled.batches == 6 * 2 * 2
    assert all(torch.equal(masks.masks[0][k], masks.masks[-1][k]) for k in masks.masks[0])  # mask held
    # OBS ranks by w^2 / [F^-1]_ii, not |w|: the pruned set is not the dense model's smallest weights
    dense = load_checkpoint(dense_ce_run)["state_dict"]
    names = list(ckpt["layer_sparsity"])
    pruned = torch.cat([dense[n][ckpt["state_dict"][n] == 0].abs() for n in names])
    kept = torch.cat([dense[n][ckpt["state_dict"][n] != 0].abs() for n in names])
    assert pruned.max() > kept.min()


def test_mfac_prunes_gradually_during_the_fine_tune(tmp_path, digits, dense_ce_run, monkeypatch):
    sampled = SampledCount(monkeypatch)
    cfg = tiny_config(tmp_path / "mfac", recipe="recipes/mfac.yaml", sparsity=0.6, init=str(dense_ce_run),
                      finetune_epochs=3, recipe_vars={"num_grads": 4, "prune_end": 1, "update_frequency": 0.5,
                                                      "fisher_block_size": 100})
    run = train(cfg, data=digits)
    ckpt = load_checkpoint(run)
    assert abs(ckpt["sparsity"] - 0.6) <= 0.005 and zeros_of(ckpt) == pytest.approx(ckpt["sparsity"])
    assert sampled.batches == 4 * 3  # steps at epoch 0, 0.5 and 1 (the last one at the target)
    assert "channels_last off" in (run / "train.log").read_text()  # SparseML's M-FAC needs contiguous masks


def test_supcon_fine_tuned_one_shot_is_its_own_population(tmp_path, digits, dense_scl_run):
    dense = load_checkpoint(dense_scl_run)
    # SCL checkpoints keep the projection head beside the model, which is still encoder + classifier
    assert set(dense["head_state_dict"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert not any(k.startswith("head.") for k in dense["state_dict"]) and load_model(dense_scl_run)[0].head is None
    kw = dict(loss="supcon", sparsity=0.7, init=str(dense_scl_run), finetune_epochs=2, linear_epochs=3)
    run = train(tiny_config(tmp_path / "ft", recipe="recipes/oneshot_supcon.yaml", finetune_loss="supcon", **kw),
                data=digits)
    ckpt = load_checkpoint(run)
    assert abs(ckpt["sparsity"] - 0.7) <= 0.005 and zeros_of(ckpt) == pytest.approx(ckpt["sparsity"])
    assert all(k.startswith("encoder.") for k in ckpt["layer_sparsity"])  # the classifier is retrained, not cut
    # SupCon fine-tune of encoder + head (no accuracy: no classifier in it), then the linear stage
    rows = metric_rows(run)
    assert [r["stage"] for r in rows] == ["finetune"] * 2 + ["linear"] * 3
    assert all(r["train_acc"] == "" for r in rows[:2]) and rows[-1]["train_acc"] != ""
    assert not torch.equal(ckpt["head_state_dict"]["fc1.weight"], dense["head_state_dict"]["fc1.weight"])
    assert not torch.equal(ckpt["state_dict"]["classifier.weight"], dense["state_dict"]["classifier.weight"])
    assert ckpt["test_acc"] > 0.3
    # the paper's One-Shot (cross-entropy fine-tune) from the same dense run is another population
    ce = load_checkpoint(train(tiny_config(tmp_path / "ce", recipe="recipes/oneshot.yaml", **kw), data=digits))
    assert ce["population"] != ckpt["population"]
    assert ce["identity"]["settings"]["finetune_loss"] == "ce" and ckpt["identity"]["settings"]["finetune_loss"] == "supcon"
    assert [r["stage"] for r in metric_rows(tmp_path / "ce")] == ["finetune"] * 2


@pytest.mark.parametrize("kw,message", [
    (dict(recipe="recipes/oneshot_supcon.yaml"), "set finetune_loss=supcon"),
    (dict(recipe="recipes/oneshot.yaml", finetune_loss="supcon", loss="ce"), "needs loss supcon"),
    (dict(recipe="recipes/oneshot_supcon.yaml", finetune_loss="supcon", linear_epochs=0), "linear_epochs must be >= 1"),
])
def test_fine_tune_loss_mistakes_are_one_line(tmp_path, digits, dense_ce_run, kw, message):
    cfg = tiny_config(tmp_path / "x", **{"loss": "supcon", "sparsity": 0.5, "init": str(dense_ce_run), **kw})
    with pytest.raises(UserError, match=message):
        train(cfg, data=digits)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- what the loop honours, and what it refuses
def write_recipe(tmp_path, body: str, variables: str = "num_epochs: 4\ntarget_sparsity: 0.5\n") -> str:
    path = tmp_path / "r.yaml"
    path.write_text(variables + "modifiers:\n" + body)
    return str(path)


@pytest.mark.parametrize("body,message", [
    ("  - !TopKASTPruningModifier\n    params: ['re:.*conv.*weight']\n"
     "    forward_sparsity: 0.5\n    backward_sparsity: 0.3\n    start_epoch: 0.0\n    end_epoch: 2.0\n"
     "    update_frequency: 1.0\n", "uses TopKASTPruningModifier"),
    ("  - !LayerPruningModifier\n    layers: ['encoder.blocks.0']\n    start_epoch: 0.0\n", "uses LayerPruningModifier"),
    ("  - !StructuredPruningModifier\n    params: ['re:^encoder\\\\..*conv.*\\\\.weight$']\n    mask_type: filter\n"
     "    init_sparsity: 0.0\n    final_sparsity: eval(target_sparsity)\n    start_epoch: 0.0\n    end_epoch: 2.0\n"
     "    update_frequency: 1.0\n", "declare sparsity_unit: filters"),
])
def test_the_loop_refuses_what_it_cannot_honour(tmp_path, digits, body, message):
    with pytest.raises(UserError, match=message):
        train(tiny_config(tmp_path / "run", recipe=write_recipe(tmp_path, body), sparsity=0.5), data=digits)
    assert not (tmp_path / "run").exists()


def test_a_unit_must_match_its_modifiers(tmp_path, digits):
    body = ("  - !MagnitudePruningModifier\n    params: ['re:^encoder\\\\..*conv.*\\\\.weight$']\n    init_sparsity: 0.0\n"
            "    final_sparsity: eval(target_sparsity)\n    start_epoch: 0.0\n    end_epoch: 2.0\n    update_frequency: 1.0\n")
    recipe = write_recipe(tmp_path, body, "sparsity_unit: filters\nnum_epochs: 4\ntarget_sparsity: 0.5\n")
    with pytest.raises(UserError, match="does not prune whole filters"):
        train(tiny_config(tmp_path / "run", recipe=recipe, sparsity=0.5), data=digits)
    with pytest.raises(UserError, match="samples gradients"):  # the linear stage has no gradient sampler
        train(tiny_config(tmp_path / "lin", loss="supcon", recipe="recipes/gmp.yaml", sparsity=0.5,
                          linear_recipe="recipes/rigl.yaml"), data=digits)


# ---------------------------------------------------------------- shipped recipes: documented, used, declared
def shipped():
    return sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


BEYOND = ("acdc.yaml", "rigl.yaml", "movement.yaml", "filter.yaml", "obs.yaml", "mfac.yaml", "oneshot_supcon.yaml")


def test_every_shipped_recipe_is_documented_and_the_new_ones_are_in_a_study_example():
    readme = (ROOT / "recipes" / "README.md").read_text()
    examples = "\n".join(p.read_text() for p in (ROOT / "examples").glob("*.yaml"))
    for name in shipped():
        assert f"`{name}`" in readme, name
    for name in BEYOND:
        assert (ROOT / "recipes" / name).is_file() and f"recipes/{name}" in examples, name


def test_recipes_declare_what_they_are():
    from whatislost.pruning import load_manager, recipe_finetune_loss, recipe_from_dense, recipe_unit

    from_dense = {n for n in shipped() if recipe_from_dense(n)}
    assert from_dense == {"oneshot.yaml", "oneshot_supcon.yaml", "obs.yaml", "mfac.yaml"}
    assert {n: recipe_unit(n) for n in shipped() if recipe_unit(n) != "weights"} == {"filter.yaml": "filters"}
    assert recipe_finetune_loss("oneshot_supcon.yaml") == "supcon" and recipe_finetune_loss("oneshot.yaml") is None
    for name in shipped():  # SparseML builds each with the trainer's variables
        load_manager(name, 30, 0.0 if name == "dense.yaml" else 0.5)


def test_beyond_study_example_compares_every_method(tmp_path):
    from whatislost.study import expand, plan_runs
    from whatislost.studyfile import load_study

    study, _ = load_study(ROOT / "examples" / "beyond.yaml")
    assert {"gmp", "acdc", "rigl", "movement", "filter", "obs", "oneshot", "oneshot_supcon"} <= set(study.methods)
    assert study.methods["oneshot_supcon"].from_dense and list(study.methods["oneshot_supcon"].losses) == ["supcon"]
    assert len(study.seeds) == 2
    runs = expand(study, tmp_path)
    planned = plan_runs(runs)  # recipes, variables and data checked as the study does before it trains
    populations = {planned[r.name].population for r in runs if r.seed == study.seeds[0]}
    assert len(populations) == len([r for r in runs if r.seed == study.seeds[0]])
    names = re.findall(r"recipes/(\w+)\.yaml", (ROOT / "examples" / "beyond.yaml").read_text())
    assert set(names) >= {"acdc", "rigl", "movement", "filter", "obs", "mfac", "oneshot_supcon"}
