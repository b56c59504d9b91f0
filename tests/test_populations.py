"""Populations are defined by what defines them (identity.py), and each is scored on its own data.

Reproductions from the reliability issue: runs trained on two different image folders that share a
folder name; runs of one method and sparsity trained with different settings; sparsities 0.3 and
0.304. None of these may be pooled; each is scored and labelled on its own."""
import json

import pandas as pd
import pytest

from conftest import tiny_config, write_imagefolder
from whatislost.eval import run_eval
from whatislost.identity import population_label, reference_id, run_identity, sparsity_label
from whatislost.train import train


def test_sparsity_labels_keep_distinct_levels_apart():
    assert [sparsity_label(s) for s in (0, 0.3, 0.304, 0.295, 0.9, 0.99)] == ["0", "30", "30.4", "29.5", "90", "99"]
    assert population_label("ce", "gmp", 0.9) == "Sup/GMP/90"
    assert population_label("supcon", "delta_gmp", 0.304, "3fa2c1") == "SCL/ΔGMP/30.4 [3fa2c1]"


def test_identity_leaves_out_only_what_does_not_change_the_model():
    base = tiny_config("a").to_dict()
    ident = run_identity(base, "recipe text", "fp")
    same = run_identity({**base, "seed": 7, "out": "b", "threads": 3, "device": "cuda", "eval_every": 5}, "recipe text", "fp")
    assert ident == same
    for change in ({"lr": 0.1}, {"epochs": 9}, {"bf16": True}, {"vflip": True}, {"depth": 16}):
        assert run_identity({**base, **change}, "recipe text", "fp") != ident, change
    assert run_identity(base, "other recipe text", "fp") != ident  # the recipe as applied, not its file name
    assert run_identity(base, "recipe text", "other data") != ident
    # a pruned population and its dense reference differ only in what the pruning is
    pruned = run_identity({**base, "sparsity": 0.9, "recipe": "recipes/gmp.yaml"}, "gmp text", "fp")
    assert reference_id(pruned) == reference_id(ident)
    assert reference_id(run_identity({**base, "lr": 0.2, "sparsity": 0.9}, "gmp text", "fp")) != reference_id(ident)


@pytest.fixture(scope="module")
def same_name_folders(tmp_path_factory):
    """Two image folders both named 'pics', different images, two dense Sup runs trained on each."""
    root = tmp_path_factory.mktemp("same-name")
    runs = root / "runs"
    for where, seed in (("x", 0), ("y", 1)):
        folder = write_imagefolder(root / where / "pics", ("a", "b"), n_train=16, n_test=6, size=8, seed=seed)
        for run_seed in (0, 1):
            train(tiny_config(runs / f"{where}-dense-seed{run_seed}", dataset="imagefolder", data_root=str(folder),
                              recipe="recipes/dense.yaml", epochs=1, batch_size=8, seed=run_seed))
    return runs


def test_same_folder_name_different_content_is_two_populations_each_on_its_own_data(same_name_folders):
    out = run_eval(same_name_folders, same_name_folders.parent / "eval", metrics=("acc",), report=False)
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["populations"]
    assert len(rows) == 2 and all(r["n_models"] == 2 for r in rows)
    assert len({r["dataset"] for r in rows}) == 2 and all(r["dataset"].startswith("pics@") for r in rows)
    # each population's accuracy is measured on its own test images: the trainer's own figure
    from whatislost.rundir import load_checkpoint

    for r in rows:
        accs = [100 * load_checkpoint(run)["test_acc"] for run in r["runs"]]
        assert r["acc_mean"] == pytest.approx(sum(accs) / len(accs))
        folders = {load_checkpoint(run)["config"]["data_root"] for run in r["runs"]}
        assert len(folders) == 1


def test_changed_data_is_not_scored_as_if_it_were_the_same(same_name_folders, tmp_path):
    import shutil

    from whatislost.rundir import load_checkpoint

    runs = tmp_path / "runs"
    shutil.copytree(same_name_folders, runs)
    folder = load_checkpoint(runs / "x-dense-seed0")["config"]["data_root"]
    images = sorted((__import__("pathlib").Path(folder) / "test" / "a").iterdir())
    copy = tmp_path / "pics-backup"
    shutil.copytree(__import__("pathlib").Path(folder).parent, copy)
    try:
        images[0].unlink()  # the data changed after training
        out = run_eval(runs, tmp_path / "eval", metrics=("acc",), report=False)
        summary = json.loads((out / "summary.json").read_text())
        assert len(summary["populations"]) == 1
        assert any("has changed since its runs were trained" in w for w in summary["warnings"])
    finally:
        shutil.rmtree(__import__("pathlib").Path(folder).parent)
        shutil.copytree(copy, __import__("pathlib").Path(folder).parent)


def test_different_settings_and_near_sparsities_are_never_pooled(digits, tmp_path):
    runs = tmp_path / "runs"
    gmp = dict(recipe="recipes/gmp.yaml", epochs=3, recipe_vars={"prune_start": 0.5, "prune_end": 2})
    for seed in (0, 1):
        train(tiny_config(runs / f"dense-{seed}", recipe="recipes/dense.yaml", epochs=3, seed=seed), data=digits)
        train(tiny_config(runs / f"gmp30-{seed}", sparsity=0.3, seed=seed, **gmp), data=digits)
        train(tiny_config(runs / f"gmp304-{seed}", sparsity=0.304, seed=seed, **gmp), data=digits)
        train(tiny_config(runs / f"gmp30-lr-{seed}", sparsity=0.3, seed=seed, **{**gmp, "lr": 0.1}), data=digits)
    out = run_eval(runs, tmp_path / "eval", metrics=("acc", "pie"), report=False)
    summary = json.loads((out / "summary.json").read_text())
    pops = {r["population"]: r for r in summary["populations"]}
    assert "Sup/GMP/30.4" in pops and pops["Sup/GMP/30.4"]["n_models"] == 2
    variants = [label for label in pops if label.startswith("Sup/GMP") and label.endswith("]")]
    assert len(variants) == 2 and all(pops[v]["n_models"] == 2 for v in variants)
    assert any("differ in lr" in w and "2 separate populations" in w for w in summary["warnings"])
    # the dense reference has the same training settings: the lr-0.1 runs have none, so no PIEs for them
    compared = {label: r.get("reference") for label, r in pops.items()}
    assert compared["Sup/GMP/30.4"] == "Sup/Dense/0"
    assert sorted(compared[v] for v in variants) == ["", "Sup/Dense/0"]
    table1 = pd.read_csv(out / "tables" / "table1.csv")
    assert "30.4" in table1["sparsity %"].astype(str).tolist()
