"""Figures and tables drawn from a small made-up eval folder: what each one shows, checked on its matplotlib figure
(no training, no UMAP: every case here takes a fraction of a second)."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from whatislost import figures
from whatislost.tables import CAPTIONS, TABLES, build_table, cell, count_cell, ties_cell

GROUP = "toy-wrn10-1"
N, C = 60, 4


def population_rows():
    rows = []
    for loss, method, sparsity, pies in (("ce", "dense", 0.0, None), ("ce", "gmp", 50.0, 12), ("supcon", "dense", 0.0, None),
                                         ("supcon", "gmp", 50.0, 20), ("supcon", "magic", 50.0, 9),
                                         ("supcon", "magic [3fa2c1]", 50.0, 7)):
        name = {"ce": "Sup", "supcon": "SCL"}[loss]
        label = f"{name}/{'Dense' if method == 'dense' else method}/{sparsity:g}"
        row = dict(dataset="toy", model="wrn10-1", loss=loss, method=method, sparsity=sparsity, population=label,
                   n_models=3, n_test=N, acc_mean=80.0 - sparsity / 10, acc_std=1.0, acc_ci_low=78.5 - sparsity / 10,
                   acc_ci_high=81.0 - sparsity / 10, depth_models=2, n_probes=8,
                   reference="" if method == "dense" else f"{name}/Dense/0")
        if pies is not None:
            row.update(pie_count=pies, pie_count_ci_low=pies - 3.2, pie_count_ci_high=pies + 4.1, pie_tied=5,
                       pie_count_other=pies + 2, pie_tie_warning=False)
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """tables/populations.csv, per_sample, training and layer logs of six made-up populations (one of them a method
    the figures do not know, one a variant of it)."""
    out = tmp_path_factory.mktemp("eval")
    (out / "tables").mkdir()
    (out / "figdata").mkdir()
    pops = population_rows()
    pops.to_csv(out / "tables" / "populations.csv", index=False)
    rng = np.random.default_rng(0)
    y = np.arange(N) % C
    samples = {"sample_id": np.arange(N), "true_label": y}
    for r in pops.itertuples():
        pie = np.zeros(N, int)
        if r.method != "dense":
            pie[rng.choice(N, int(r.pie_count), replace=False)] = 1
            samples[f"{r.population}:pie"] = pie
        samples[f"{r.population}:modal"] = np.where(pie == 1, (y + 1) % C, y)
        scale = 1.0 if r.loss == "ce" else 3.0  # SCL's Q-Scores span a wider range: one range for every panel
        samples[f"{r.population}:q"] = scale * rng.random(N)
        samples[f"{r.population}:pd"] = rng.integers(2, 17, N) / 2  # means of 2 depth models: a 0.5 lattice
    pd.DataFrame(samples).to_csv(out / "tables" / f"per_sample_{GROUP}.csv", index=False)
    curves, layers = [], []
    for r in pops.itertuples():
        stages = [("ce", 4)] if r.loss == "ce" else [("supcon", 3), ("linear", 2)]
        for seed in (0, 1):
            for stage, epochs in stages:
                for epoch in range(1, epochs + 1):
                    curves.append(dict(population=r.population, seed=seed, run=f"run{seed}", stage=stage, epoch=epoch,
                                       loss=2.0 / epoch + seed, train_acc=0.5 + 0.1 * epoch, test_acc=np.nan,
                                       sparsity=r.sparsity / 100 * min(1, epoch / 2), lr=0.1 / epoch, seconds=1.0))
                    if seed == 0:
                        layers.append(dict(population=r.population, seed=0, run="run0", stage=stage, epoch=epoch,
                                           **{"encoder.conv.weight": r.sparsity / 200,
                                              "encoder.blocks.0.conv1.weight": r.sparsity / 100}))
    pd.DataFrame(curves).to_csv(out / "figdata" / f"training_{GROUP}.csv", index=False)
    pd.DataFrame(layers).to_csv(out / "figdata" / f"layer_sparsity_{GROUP}.csv", index=False)
    return out


@pytest.fixture
def drawn(monkeypatch):
    """Figure functions return their matplotlib Figure instead of writing files."""
    monkeypatch.setattr(figures, "save", lambda fig, eval_dir, name, group: fig)


# ---------------------------------------------------------------- styles
def test_every_method_gets_its_own_style_and_every_loss_a_safe_colour():
    methods = ["gmp", "oneshot", "delta_gmp", "magic", "magic [3fa2c1]", "gmp [77aa00]", *[f"m{i}" for i in range(20)]]
    styles = figures.method_styles(methods)
    assert len(set(styles.values())) == len(methods)  # told apart by marker and line style
    assert styles["gmp"] == figures.METHOD_STYLES["gmp"] and styles["gmp [77aa00]"] != styles["gmp"]
    assert figures.method_styles(reversed(methods)) == styles  # the same whatever the order
    assert figures.loss_colour("ce") == "#0072B2" and figures.loss_colour("supcon") == "#D55E00"
    other = figures.loss_colour("triplet")
    assert other in figures.OKABE_ITO and other not in figures.LOSS_COLOURS.values()
    assert figures.loss_colour("triplet") == other


# ---------------------------------------------------------------- figures
def test_accuracy_and_pies_start_at_zero_and_give_n(eval_dir, drawn):
    fig = figures.accuracy_and_pies(eval_dir, GROUP)
    acc, pies = fig.axes
    assert "of 60 test images" in pies.get_ylabel() and "95% CI" in acc.get_ylabel()
    lines = [line for line in pies.get_lines() if line.get_linestyle() not in ("None", "")]
    assert len(lines) == 4  # Sup/GMP, SCL/GMP, SCL/magic, its variant
    for line in lines:
        x, y = line.get_data()
        assert y[0] == 0 and abs(x[0]) < 0.5  # the dense point: 0 PIEs at 0%
    assert len({(line.get_marker(), line.get_linestyle()) for line in lines if line.get_color() == "#D55E00"}) == 3
    hollow = [line for line in pies.get_lines() if line.get_linestyle() in ("None", "") and line.get_markerfacecolor() == "none"]
    assert sorted(float(line.get_ydata()[0]) for line in hollow) == [9, 11, 14, 22]  # counts under the other rule


def test_scatters_share_one_range_and_pd_is_jittered_with_histograms(eval_dir, drawn):
    fig = figures.qscore_scatter(eval_dir, GROUP)
    limits = {(ax.get_xlim(), ax.get_ylim()) for ax in fig.axes}
    assert len(fig.axes) == 4 and len(limits) == 1  # Sup and SCL panels on the same axes
    (xlim, _), = limits
    assert xlim[1] > 2.5  # SCL's wider range holds for Sup's panel too
    pies = [c for ax in fig.axes for c in ax.collections if c.get_label().startswith("PIE")]
    assert all(np.allclose(c.get_facecolor()[0][:3], 0) for c in pies)  # black crosses, not red on orange
    fig = figures.pdscore_scatter(eval_dir, GROUP)
    scatters, hists = fig.axes[:4], fig.axes[4:]
    assert len(hists) == 4 and all(ax.get_ylabel() == "density" for ax in hists)
    assert "1-8" in scatters[0].get_xlabel() and "mean of 2" in scatters[0].get_xlabel()
    points = np.vstack([c.get_offsets() for c in scatters[0].collections])
    off_lattice = np.abs(points * 2 - np.round(points * 2))  # jittered off the 0.5 lattice, by at most 0.4 of a step
    assert off_lattice.max() > 0.05 and off_lattice.max() <= 0.4 * 1 + 1e-9


def test_training_curves_put_stages_one_after_the_other(eval_dir, drawn):
    fig = figures.training_curves(eval_dir, GROUP)
    rows = {ax.get_title(loc="left"): i for i, ax in enumerate(fig.axes) if ax.get_title(loc="left")}
    assert list(rows) == ["Sup/Dense", "SCL/Dense", "Sup/GMP", "SCL/GMP", "SCL/magic", "SCL/magic [3fa2c1]"]
    scl_loss = fig.axes[rows["SCL/GMP"]]
    x, _ = scl_loss.get_lines()[0].get_data()
    assert list(x) == [1, 2, 3, 4, 5]  # supcon epochs 1-3, then linear 1-2
    assert [t.get_text() for t in scl_loss.texts] == ["supcon", "linear"]
    assert [ax.get_ylabel() for ax in fig.axes[:4]] == ["loss", "accuracy (train —, test - -)", "learning rate",
                                                        "sparsity %"]


def test_layer_sparsity_shows_every_pruned_tensor(eval_dir, drawn):
    fig = figures.layer_sparsity(eval_dir, GROUP)
    final = fig.axes[0]
    assert [t.get_text() for t in final.get_xticklabels()] == ["conv", "blocks.0.conv1"]
    assert list(final.get_lines()[0].get_ydata()) == [25, 50]  # Sup/GMP/50 at the end of training, in %


def test_gallery_rows_say_how_many_of_how_many(eval_dir):
    samples = pd.read_csv(eval_dir / "tables" / f"per_sample_{GROUP}.csv")
    pops = figures.load_populations(eval_dir)
    _, rows = figures.gallery_rows(samples, pops, per_row=3)
    titles = [t for t, _ in rows if t.startswith("Sup/GMP")]
    # every made-up PIE is a dense-right, sparse-wrong one: 3 of 12 shown, the other rows empty
    assert [t.split("\n")[1:] for t in titles] == [["sparse right, dense wrong", "0 of 0 shown"],
                                                   ["dense right, sparse wrong", "3 of 12 shown"],
                                                   ["both wrong", "0 of 0 shown"]]


def test_umap_shows_each_dense_population_once_and_highlights_pies(eval_dir, drawn, tmp_path):
    rng = np.random.default_rng(1)
    pops = population_rows()
    samples = pd.read_csv(eval_dir / "tables" / f"per_sample_{GROUP}.csv")
    frames = [pd.DataFrame(dict(population=r.population, loss=r.loss, method=r.method, sparsity=r.sparsity,
                                which="first", aligned_to=r.reference, sample_id=np.arange(N), label=samples.true_label,
                                pred=samples[f"{r.population}:modal"],
                                pie=samples.get(f"{r.population}:pie", pd.Series(0, index=samples.index)),
                                x=rng.random(N), y=rng.random(N))) for r in pops.itertuples()]
    folder = Path(tmp_path)
    (folder / "figdata").mkdir()
    (folder / "tables").mkdir()
    pops.to_csv(folder / "tables" / "populations.csv", index=False)
    pd.concat(frames).to_csv(folder / "figdata" / f"umap_{GROUP}.csv", index=False)
    fig = figures.umap_grid(folder, GROUP)
    axes = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
    columns = len(figures.pruned_pairs(pops))
    dense_row, pruned_row = axes[:columns], axes[columns:]
    drawn_dense = [ax for ax in dense_row if ax.collections]
    assert len(drawn_dense) == 2  # Sup's and SCL's dense population, once each
    assert all("as in the first" in ax.texts[0].get_text() for ax in dense_row if not ax.collections)
    gmp = pruned_row[0]  # Sup/GMP/50: 12 PIEs with a black edge
    edged = [c for c in gmp.collections if len(c.get_offsets()) == 12]
    assert edged and np.allclose(edged[0].get_edgecolor()[0][:3], 0)
    by_pred = figures.umap_grid(folder, GROUP, colour="predicted")
    assert "colour: predicted class" in by_pred._suptitle.get_text()


def test_cka_draws_one_line_per_pruned_population_per_sparsity_with_bands_and_baselines(eval_dir, drawn, tmp_path):
    rows = []
    for r in population_rows().itertuples():
        for probe, dim in enumerate((16, 32, 32, 64), start=1):
            mean = 1.0 - 0.05 * probe * (1 + r.sparsity / 50)
            rows.append(dict(group=GROUP, dataset="toy", model="wrn10-1", loss=r.loss, method=r.method,
                             sparsity=r.sparsity, population=r.population, reference=r.reference or r.population,
                             probes="authors", probe=probe, probe_dim=dim, n_samples=N, n_models=3,
                             n_reference_models=3, n_pairs=3 if r.method == "dense" else 9, cka_mean=mean,
                             cka_std=0.01, cka_ci_low=mean - 0.02, cka_ci_high=mean + 0.02))
    folder = Path(tmp_path)
    (folder / "tables").mkdir()
    with pytest.raises(figures.MissingData, match="add cka to whatislost-eval --metrics"):
        figures.cka_by_probe(folder, GROUP)
    pd.DataFrame(rows).to_csv(folder / "tables" / "cka.csv", index=False)
    fig = figures.cka_by_probe(folder, GROUP)
    (ax,) = fig.axes  # one sparsity: one panel
    solid = [line for line in ax.get_lines() if line.get_linestyle() != ":"]
    dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert len(solid) == 4 and len(dotted) == 2  # Sup/GMP, SCL/GMP, SCL/magic and its variant; two dense baselines
    assert len({(line.get_marker(), line.get_linestyle()) for line in solid if line.get_color() == "#D55E00"}) == 3
    assert all(list(line.get_xdata()) == [1, 2, 3, 4] for line in ax.get_lines())
    assert len(ax.collections) == 4  # a 95% CI band per pruned population
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1\n16", "2\n32", "3\n32", "4\n64"]
    assert ax.get_ylim()[1] == pytest.approx(1.01)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "Sup/Dense, seed to seed" in legend and "SCL/magic [3fa2c1]" in legend
    pd.DataFrame([r for r in rows if r["method"] == "dense"]).to_csv(folder / "tables" / "cka.csv", index=False)
    with pytest.raises(figures.MissingData, match="no pruned population"):
        figures.cka_by_probe(folder, GROUP)


# ---------------------------------------------------------------- tables
def test_cells_give_intervals_ties_and_n():
    assert cell(82.995, 0.005) == "83.00±0.01"
    assert cell(3.5, 1.2, low=3.1, high=3.9, n=2) == "3.50±1.20 [3.10, 3.90] n=2"
    assert cell(float("nan"), float("nan"), n=0) == "nan n=0" and cell(None, None) == ""
    assert count_cell(119, 83.3, 152.3) == "119 [83, 153]" and count_cell(7) == "7"
    assert ties_cell(197, 107, "max", True) == "197 tied; max: 107 ⚠" and ties_cell(3, 3, "min") == "3 tied; min: 3"


def test_tables_say_what_each_plus_minus_is_over(eval_dir):
    assert "over the population's n models" in CAPTIONS["table1"]
    assert "std over the test samples" in CAPTIONS["table4"] and "std over the test samples" in CAPTIONS["table5"]
    assert "n samples of the cell" in CAPTIONS["table6"]
    pops = population_rows()
    table = build_table(pops, [("ce", "gmp")], TABLES["table1"][2], tie_break="min")
    assert table.iloc[1].tolist() == ["50", "12 [8, 17]", "5 tied; max: 14", "75.00±1.00 [73.50, 76.00] n=3"]
    assert table.iloc[0].tolist() == ["0", "", "", "80.00±1.00 [78.50, 81.00] n=3"]
