"""whatislost-eval end to end on tiny populations that the tests train themselves on digits."""
import json
import shutil

import pandas as pd
import pytest

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
    runs = copy_runs(tiny_populations, tmp_path / "u", ["ce-dense-seed0", "ce-dense-seed1"])
    run_eval(runs, metrics=("acc", "umap"), report=False)
    coords = pd.read_csv(runs / "eval" / "figdata" / "umap_digits-wrn10-1.csv")
    assert set(coords.which) == {"first", "mean"} and set(coords.population) == {"Sup/Dense/0"}
    assert len(coords) == 2 * 450 and coords[["x", "y"]].notna().all().all()
    assert coords[coords.which == "first"].label.tolist() == coords[coords.which == "mean"].label.tolist()
