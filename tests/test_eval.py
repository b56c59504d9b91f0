"""whatislost-eval end to end on tiny populations that the tests train themselves on digits."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from whatislost import metrics
from whatislost.cli import run_cli
from whatislost.eval import main, run_eval
from whatislost.rundir import load_checkpoint

FAST = ("acc", "pie", "qscore", "depth")


@pytest.fixture(scope="module")
def evaluated(tiny_populations, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    run_eval(tiny_populations, out, metrics=FAST, depth_models=2, knn_k=5, report=False)
    return tiny_populations, out


def test_outputs_and_population_numbers(evaluated):
    runs, out = evaluated
    for name in ("summary.json", "tables/populations.csv", "tables/table1.md", "tables/table4.csv", "tables/table5.md",
                 "tables/table6.md", "tables/pie_per_class.csv", "tables/pie_overlap.csv", "figdata/pie_images_digits-wrn10-1.npz"):
        assert (out / name).is_file(), name
    pops = pd.read_csv(out / "tables" / "populations.csv")
    assert set(pops.population) == {"Sup/Dense/0", "Sup/GMP/50", "Sup/One-Shot/50", "SCL/Dense/0", "SCL/GMP/50"}
    assert (pops.n_models == 2).all()
    # accuracy agrees with what the trainer measured on the same checkpoints
    accs = [100 * load_checkpoint(runs / f"ce-gmp50-seed{s}")["test_acc"] for s in (0, 1)]
    row = pops[pops.population == "Sup/GMP/50"].iloc[0]
    assert row.acc_mean == pytest.approx(sum(accs) / 2, abs=0.3)


def test_pies_follow_the_modal_labels(evaluated):
    _, out = evaluated
    samples = pd.read_csv(out / "tables" / "per_sample_digits-wrn10-1.csv")
    pops = pd.read_csv(out / "tables" / "populations.csv").set_index("population")
    for pop in ("Sup/GMP/50", "Sup/One-Shot/50", "SCL/GMP/50"):
        dense = ("Sup" if pop.startswith("Sup") else "SCL") + "/Dense/0"
        differs = samples[f"{pop}:modal"] != samples[f"{dense}:modal"]
        assert (samples[f"{pop}:pie"] == differs.astype(int)).all()
        assert pops.loc[pop, "pie_count"] == differs.sum()
    overlap = pd.read_csv(out / "tables" / "pie_overlap.csv")
    gmp = overlap[overlap.method == "gmp"]
    sup = samples["Sup/GMP/50:pie"] == 1
    scl = samples["SCL/GMP/50:pie"] == 1
    assert gmp.shared.sum() == (sup & scl).sum() and gmp.sup_only.sum() == (sup & ~scl).sum()
    per_class = pd.read_csv(out / "tables" / "pie_per_class.csv")
    assert per_class[(per_class.loss == "ce") & (per_class.method == "gmp")]["count"].sum() == sup.sum()


def test_q_and_depth_columns(evaluated):
    _, out = evaluated
    samples = pd.read_csv(out / "tables" / "per_sample_digits-wrn10-1.csv")
    pops = pd.read_csv(out / "tables" / "populations.csv").set_index("population")
    assert samples["SCL/GMP/50:q"].mean() == pytest.approx(pops.loc["SCL/GMP/50", "q_mean"], rel=1e-3)
    pd_col = samples["Sup/GMP/50:pd"]
    # WRN-10-1 under the authors' probe layout: stem + 3 (16->16 block) + 2 + 2 = 8 probes; depth is in [1, 8]
    assert pd_col.between(1, 8).all() and pd_col.max() > 1
    pie = samples["Sup/GMP/50:pie"] == 1
    assert pops.loc["Sup/GMP/50", "pd_pie_mean"] == pytest.approx(pd_col[pie].mean(), rel=1e-3)
    table6 = (out / "tables" / "table6.md").read_text()
    assert "Sup/GMP PIE" in table6 and "| 50 |" in table6


def test_second_run_uses_the_cache(evaluated, tmp_path):
    runs, _ = evaluated
    cache = runs / "ce-gmp50-seed0" / "eval_cache.pt"
    before = cache.stat().st_mtime_ns
    out = run_eval(runs, tmp_path / "again", metrics=FAST, depth_models=2, knn_k=5, report=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models_computed"] == 0 and summary["models_scored"] == 10
    assert cache.stat().st_mtime_ns == before
    # a different k recomputes depth only for the depth models
    out = run_eval(runs, tmp_path / "k3", metrics=FAST, depth_models=1, knn_k=3, report=False)
    assert json.loads((out / "summary.json").read_text())["models_computed"] == 5


def copy_runs(src, dst, names):
    for name in names:
        shutil.copytree(src / name, dst / name, ignore=shutil.ignore_patterns("eval_cache.pt"))
    return dst


def test_bad_input(tiny_populations, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(main, [str(empty)], prog="whatislost-eval") == 2
    assert "no finished runs" in capsys.readouterr().err

    mixed = copy_runs(tiny_populations, tmp_path / "mixed", ["ce-gmp50-seed0", "ce-gmp50-seed1", "supcon-dense-seed0",
                                                              "supcon-gmp50-seed0", "ce-dense-seed0"])
    (mixed / "ce-dense-seed0" / "done.json").unlink()  # unfinished
    (mixed / "supcon-gmp50-seed0" / "model.pt").write_bytes(b"garbage")  # fails to load
    code = run_cli(main, [str(mixed), "--metrics", "acc,pie,qscore", "--no-report"], prog="whatislost-eval")
    err = capsys.readouterr().err
    assert code == 0
    assert "without done marker" in err and "ce-dense-seed0" in err
    assert "cannot load checkpoint" in err and "supcon-gmp50-seed0" in err
    assert "no dense population" in err and "Sup/GMP/50" in err
    pops = pd.read_csv(mixed / "eval" / "tables" / "populations.csv")
    assert set(pops.population) == {"Sup/GMP/50", "SCL/Dense/0"}


def test_single_model_population_warns_and_keeps_other_metrics(tiny_populations, tmp_path, capsys):
    one = copy_runs(tiny_populations, tmp_path / "one", ["ce-dense-seed0", "ce-gmp50-seed0"])
    run_eval(one, metrics=("acc", "pie", "qscore"), report=False)
    assert "PIEs (a difference of modal labels) are undefined" in capsys.readouterr().err
    pops = pd.read_csv(one / "eval" / "tables" / "populations.csv")
    assert pops.q_mean.notna().all() and "pie_count" not in pops


def test_unknown_metric_is_exit_2(tiny_populations, capsys):
    assert run_cli(main, [str(tiny_populations), "--metrics", "acc,bogus"], prog="whatislost-eval") == 2
    assert "unknown metric" in capsys.readouterr().err


def test_mixed_datasets_are_scored_separately(tiny_populations, tmp_path, digits):
    from conftest import tiny_config, write_imagefolder
    from whatislost.train import train

    root = write_imagefolder(tmp_path / "imgs", ("a", "b"), n_train=20, n_test=6, size=8)
    runs = copy_runs(tiny_populations, tmp_path / "runs", ["ce-dense-seed0", "ce-gmp50-seed0"])
    train(tiny_config(runs / "img-dense", dataset="imagefolder", data_root=str(root), recipe="recipes/dense.yaml",
                      epochs=1, batch_size=8))
    run_eval(runs, metrics=("acc", "qscore"), report=False)
    pops = pd.read_csv(runs / "eval" / "tables" / "populations.csv")
    assert sorted(pops.dataset.unique()) == ["digits", "imgs"]
    assert (runs / "eval" / "tables" / "per_sample_imgs-wrn10-1.csv").is_file()
    assert (runs / "eval" / "tables" / "per_sample_digits-wrn10-1.csv").is_file()


def test_umap_coordinates_are_saved_for_plotting(tiny_populations, tmp_path):
    runs = copy_runs(tiny_populations, tmp_path / "u", ["ce-dense-seed0", "ce-dense-seed1", "ce-gmp50-seed0",
                                                         "ce-gmp50-seed1"])
    run_eval(runs, metrics=("acc", "pie", "umap"), report=False)
    coords = pd.read_csv(runs / "eval" / "figdata" / "umap_digits-wrn10-1.csv", keep_default_na=False)
    assert set(coords.which) == {"first", "mean"} and set(coords.population) == {"Sup/Dense/0", "Sup/GMP/50"}
    assert len(coords) == 2 * 2 * 450 and coords[["x", "y"]].notna().all().all()
    assert coords[coords.which == "first"].label.tolist() == coords[coords.which == "mean"].label.tolist()
    # the pruned layout started from the dense one and was rotated onto it; PIEs and predictions ride along
    pruned = coords[coords.population == "Sup/GMP/50"]
    assert set(pruned.aligned_to) == {"Sup/Dense/0"} and set(coords[coords.population == "Sup/Dense/0"].aligned_to) == {""}
    samples = pd.read_csv(runs / "eval" / "tables" / "per_sample_digits-wrn10-1.csv")
    mean = pruned[pruned.which == "mean"]
    assert mean.pie.tolist() == samples["Sup/GMP/50:pie"].tolist() and mean.pred.tolist() == samples["Sup/GMP/50:modal"].tolist()
    dense = coords[(coords.population == "Sup/Dense/0") & (coords.which == "mean")]
    assert dense.pie.tolist() == samples["Sup/GMP/50:pie"].tolist()  # its only pruned population's PIEs


def test_procrustes_undoes_rotation_scale_and_shift():
    from whatislost.eval import procrustes

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 2))
    angle = 2.0
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = 3.5 * ref @ turn @ np.diag([1, -1]) + [10, -4]  # rotated, mirrored, scaled, shifted
    assert np.allclose(procrustes(moved, ref), ref)


# ---------------------------------------------------------------- statistics in the eval's outputs
def cached_preds(runs, *names):
    return torch.stack([torch.load(runs / n / "eval_cache.pt", weights_only=True)["preds"] for n in names])


def test_intervals_ties_and_tests_are_written(evaluated):
    runs, out = evaluated
    pops = pd.read_csv(out / "tables" / "populations.csv").set_index("population")
    for metric in ("acc", "q", "z", "l1", "pd_pie", "pd_nonpie"):  # every mean has its 95% interval around it
        low, high, mean = pops[f"{metric}_ci_low"], pops[f"{metric}_ci_high"], pops[f"{metric}_mean"]
        assert (low <= mean + 1e-9).all() and (mean <= high + 1e-9).all() and (low < high).any(), metric
    pruned = pops.loc[["Sup/GMP/50", "Sup/One-Shot/50", "SCL/GMP/50"]]
    assert (pruned.pie_count_ci_low <= pruned.pie_count).all() and (pruned.pie_count <= pruned.pie_count_ci_high).all()
    assert (pops.n_test == 450).all() and (pops.pd_pie_n + pops.pd_nonpie_n == 450).all() and (pops.n_probes == 8).all()
    # beside every PIE count: the tied samples and the count under the other tie rule, as metrics.pie_mask gives them
    dense = cached_preds(runs, "ce-dense-seed0", "ce-dense-seed1")
    gmp = cached_preds(runs, "ce-gmp50-seed0", "ce-gmp50-seed1")
    mask_max, tied = metrics.pie_mask(dense, gmp, 10, "max")
    row = pops.loc["Sup/GMP/50"]
    assert row.pie_count_other == int(mask_max.sum()) and row.pie_tied == tied
    assert row.pie_count_lower <= min(row.pie_count, row.pie_count_other) <= row.pie_count_upper
    # per-class Welch tests, p-values corrected over each population's classes
    tests = pd.read_csv(out / "tables" / "class_recall_tests.csv")
    assert {"p_value", "p_adjusted", "significant", "support"} <= set(tests.columns)
    mine = tests[tests.population == "Sup/GMP/50"].reset_index(drop=True)
    from whatislost.data import load_digits
    from whatislost.stats import class_recall_tests, permutation_test_more_pies

    expected = class_recall_tests(dense, gmp, load_digits().test_y, 10)
    assert np.allclose(mine.p_value, expected.p_value, equal_nan=True)
    assert np.allclose(mine.p_adjusted, expected.p_adjusted, equal_nan=True) and (mine.p_adjusted.dropna() >= mine.p_value.dropna()).all()
    assert (pops.loc["Sup/GMP/50", "recall_classes_down"] == (mine.significant & (mine.norm_diff < 0)).sum())
    # the permutation test of 'SCL has more PIEs than Sup', from the PIE columns of the per-sample table
    comparison = pd.read_csv(out / "tables" / "pie_comparison.csv")
    assert len(comparison) == 1 and comparison.method[0] == "gmp"
    samples = pd.read_csv(out / "tables" / "per_sample_digits-wrn10-1.csv")
    test = permutation_test_more_pies(samples["Sup/GMP/50:pie"].eq(1), samples["SCL/GMP/50:pie"].eq(1), n_perm=100)
    assert comparison.p_exact[0] == pytest.approx(test.p_exact, rel=1e-5) and comparison["diff"][0] == test.observed_diff
    assert comparison.diff_ci_low[0] <= comparison["diff"][0] <= comparison.diff_ci_high[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["statistics"]["n_boot"] == 1000 and {"statistics", "write"} <= set(summary["timing"])


def test_training_logs_are_kept_for_the_figures(evaluated):
    runs, out = evaluated
    from whatislost import evalfolder

    curves = pd.read_csv(out / "figdata" / "training_digits-wrn10-1.csv")
    assert len(curves) == sum(len(pd.read_csv(p)) for p in runs.glob("*/metrics.csv"))
    assert list(curves.columns[:5]) == ["population", "seed", "run", "stage", "epoch"] and "lr" in curves
    assert set(curves[curves.population == "SCL/GMP/50"].stage) == {"supcon", "linear"}
    layers = pd.read_csv(out / "figdata" / "layer_sparsity_digits-wrn10-1.csv")
    assert layers.groupby("population").run.nunique().eq(1).all()  # each population's first run
    assert set(layers.population) == set(curves.population) and "encoder.conv.weight" in layers
    listed = set(evalfolder.marker_files(out))
    assert {"tables/class_recall_tests.csv", "tables/pie_comparison.csv", "figdata/training_digits-wrn10-1.csv",
            "figdata/layer_sparsity_digits-wrn10-1.csv"} <= listed


# ---------------------------------------------------------------- known answers, without training
def toy_population(loss, method, sparsity, preds, labels, num_classes=4):
    from whatislost.populations import PopKey, Population

    key = PopKey("toy", "wrn10-1", loss, method, sparsity, f"{loss}-{method}-{sparsity}")
    g = torch.Generator().manual_seed(len(preds))
    outputs = [dict(preds=p, h=torch.rand(len(labels), 8, generator=g), acc=float((p == labels).double().mean()))
               for p in preds]
    data = SimpleNamespace(test_y=labels, num_classes=num_classes, classes=[f"c{i}" for i in range(num_classes)])
    pop = Population(key, outputs=outputs, data=data, runs=[(i, f"/nowhere/{i}", {}) for i in range(len(preds))])
    pop.modal, pop.modal_tied = metrics.modal_labels(torch.stack(preds), num_classes)
    return pop


STATS = dict(n_boot=300, level=0.95, seed=0, n_perm=2000, alpha=0.05, correction="bh")


def test_tie_counts_and_warning_have_known_answers():
    """Two pruned models that disagree on 10 samples (true label vs the next class): those 10 are tied; the 'min'
    rule keeps the true label except for class 3 (next class 0 < 3): 2 PIEs; 'max' picks the next class for
    classes 0-2: 8 PIEs."""
    from whatislost.eval import population_row
    from whatislost.populations import find_pies, reference_preds
    from whatislost.significance import warn_ties
    from whatislost.stats import tie_report

    labels = torch.arange(40) % 4
    dense = toy_population("ce", "dense", 0.0, [labels.clone(), labels.clone()], labels)
    shifted = labels.clone()
    shifted[:10] = (labels[:10] + 1) % 4
    pruned = toy_population("ce", "gmp", 50.0, [labels.clone(), shifted], labels)
    pruned.reference = dense.key
    scored, log = {dense.key: dense, pruned.key: pruned}, []
    pies = find_pies(scored, "min", log)
    tie = tie_report(*reference_preds(scored, pruned.key), 4)
    row = population_row(pruned, pies[pruned.key], None, dense=dense, tie=tie, stats=STATS)
    assert row["pie_count"] == 2 and row["pie_tied"] == 10 and row["pie_count_other"] == 8
    assert (row["pie_count_lower"], row["pie_count_upper"]) == (0, 10) and row["pie_tie_warning"]
    assert row["acc_ci_low"] == pytest.approx(75.0) and row["acc_ci_high"] == pytest.approx(100.0)  # models: 100%, 75%
    warn_ties(scored, {pruned.key: tie}, pd.DataFrame(), "min", log)
    assert "Sup/GMP/50 2 -> 8 (10 of 40 samples tied)" in log[-1] and "--tie-break max" in log[-1]


def test_sup_vs_scl_and_recall_tests_have_known_answers():
    """Sup's pruned models miss 10, 12, 14, 16 of the 20 class-0 samples (dense: 0, 1, 0, 1): 12 PIEs ('min'; the
    two samples 2 of 4 models miss are tied, and so is the dense population's first), 13 with 'max'. SCL's
    populations are unanimous, its pruned models missing all of class 0 and 12 more samples: 32 PIEs, an interval
    of no width, 20 PIEs of SCL only and none of Sup only: permutation p = 2^-20 (exact), SCL more with either
    tie rule. Per-class recall: class 0 of Sup's pruned models drops, with seed-to-seed spread."""
    from whatislost.eval import population_row
    from whatislost.populations import find_pies, reference_preds
    from whatislost.significance import class_tests, pie_comparisons
    from whatislost.stats import tie_report

    labels = torch.arange(80) % 4
    wrong = (labels + 1) % 4

    def missing(ids):
        p = labels.clone()
        p[ids] = wrong[ids]
        return p

    class0 = torch.nonzero(labels == 0).flatten()  # 20 samples
    sup_dense = toy_population("ce", "dense", 0.0, [missing(class0[:k]) for k in (0, 1, 0, 1)], labels)
    sup_gmp = toy_population("ce", "gmp", 50.0, [missing(class0[:k]) for k in (10, 12, 14, 16)], labels)
    scl_dense = toy_population("supcon", "dense", 0.0, [labels.clone() for _ in range(3)], labels)
    extra = torch.nonzero(labels != 0).flatten()[:12]
    scl_gmp = toy_population("supcon", "gmp", 50.0, [missing(torch.cat([class0, extra])) for _ in range(3)], labels)
    sup_gmp.reference, scl_gmp.reference = sup_dense.key, scl_dense.key
    scored = {p.key: p for p in (sup_dense, sup_gmp, scl_dense, scl_gmp)}
    pies = find_pies(scored, "min", [])
    ties = {k: tie_report(*reference_preds(scored, k), 4) for k in pies}
    row = population_row(scl_gmp, pies[scl_gmp.key], None, dense=scl_dense, tie=ties[scl_gmp.key], stats=STATS)
    assert row["pie_count"] == row["pie_count_ci_low"] == row["pie_count_ci_high"] == 32 and row["pie_tied"] == 0
    assert row["acc_ci_low"] == row["acc_mean"] == row["acc_ci_high"] == pytest.approx(100 * 48 / 80)
    comparison = pie_comparisons(scored, pies, ties, "min", STATS)
    (r,) = comparison.itertuples()
    assert (r.n_sup, r.n_scl, r.sup_only, r.scl_only, r.n_discordant) == (12, 32, 0, 20, 20)
    assert (r.n_sup_other, r.n_scl_other) == (13, 32) and ties[sup_gmp.key]["n_tied"] == 3
    assert r.p_exact == pytest.approx(2.0 ** -20) and r.significant and r.significant_other
    assert not r.conclusion_depends_on_ties and r.diff_ci_low <= r.diff <= r.diff_ci_high
    # Welch on class 0, each population's mean accuracy subtracted first (Hooker et al.'s code)
    tests = class_tests(scored, pies, STATS)
    sup0 = tests[(tests.population == "Sup/GMP/50") & (tests.cls == 0)].iloc[0]
    recall = {p: np.array([(o["preds"][class0] == 0).double().mean().item() for o in pop.outputs])
              for p, pop in (("d", sup_dense), ("p", sup_gmp))}
    acc = {p: np.mean([o["acc"] for o in pop.outputs]) for p, pop in (("d", sup_dense), ("p", sup_gmp))}
    from scipy import stats as sps

    expected = sps.ttest_ind(recall["p"] - acc["p"], recall["d"] - acc["d"], equal_var=False)
    assert sup0.p_value == pytest.approx(expected.pvalue) and sup0.t == pytest.approx(expected.statistic)
    assert sup0.significant and sup0.norm_diff < 0 and sup0.support == 20
    assert sup0["diff"] == pytest.approx(recall["p"].mean() - recall["d"].mean())


def test_depth_knn_fitted_on_augmented_training_images(tiny_populations, tmp_path):
    """--depth-train augmented (the authors' kNN fit): every model still scored, the augmentation fixed by a seed
    (a second eval reproduces the depths), and the depths differ from the clean fit."""
    runs = copy_runs(tiny_populations, tmp_path / "runs", ["ce-dense-seed0", "ce-dense-seed1"])
    kw = dict(metrics=("acc", "depth"), depth_models=2, knn_k=5, report=False)
    aug = run_eval(runs, tmp_path / "aug", depth_train="augmented", **kw)
    summary = json.loads((aug / "summary.json").read_text())
    assert not [w for w in summary["warnings"] if "failed to score" in w]
    assert summary["populations"][0]["n_models"] == 2
    samples = pd.read_csv(aug / "tables" / "per_sample_digits-wrn10-1.csv")["Sup/Dense/0:pd"]
    for p in runs.rglob("eval_cache.pt"):
        p.unlink()
    again = pd.read_csv(run_eval(runs, tmp_path / "again", depth_train="augmented", **kw)
                        / "tables" / "per_sample_digits-wrn10-1.csv")["Sup/Dense/0:pd"]
    assert samples.equals(again)
    clean = pd.read_csv(run_eval(runs, tmp_path / "clean", depth_train="clean", **kw)
                        / "tables" / "per_sample_digits-wrn10-1.csv")["Sup/Dense/0:pd"]
    assert not samples.equals(clean)
