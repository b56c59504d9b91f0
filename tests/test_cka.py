"""Linear CKA (Kornblith et al. 2019): known answers of the metric, its bootstrap intervals, and the eval's cka
metric end to end on the tiny digits populations."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from whatislost import evalfolder
from whatislost.cli import UserError
from whatislost.cka import cka_intervals, cka_rows, cka_step
from whatislost.eval import DEFAULT_METRICS, check_settings, main, run_eval
from whatislost.populations import PopKey, Population, cka_subset
from whatislost.metrics import linear_cka, linear_cka_matrix


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def orthogonal(d, seed=0):
    q, r = torch.linalg.qr(randn(d, d, seed=seed, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def gram_cka(x, y):
    """CKA from its definition with N x N Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T,
    centred with H = I - 11^T / N (an independent route to the feature-space formula)."""
    x, y = x.double(), y.double()
    h = torch.eye(len(x), dtype=torch.float64) - 1.0 / len(x)
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))


# ---------------------------------------------------------------- the metric: known answers
def test_identical_rotated_scaled_and_shifted_representations_give_one():
    x = randn(400, 24)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    rotated = (x.double() @ orthogonal(24)).float()  # an orthogonal transform: the same representation
    assert linear_cka(x, rotated) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, x.double() @ orthogonal(24, seed=1)) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, -7.5 * x) == pytest.approx(1.0, abs=1e-6)  # isotropic scaling (a sign flip too)
    assert linear_cka(x, x + 100.0) == pytest.approx(1.0, abs=1e-6)  # a shift: centring removes it
    wider = torch.cat([x, torch.zeros(400, 8)], dim=1) @ orthogonal(32, seed=2).float()  # embedded in more dims
    assert linear_cka(x, wider) == pytest.approx(1.0, abs=1e-5)


def test_cka_is_symmetric_bounded_and_agrees_with_the_gram_definition():
    x = randn(300, 20, seed=1)
    y = x[:, :12] @ randn(12, 16, seed=2) + 0.7 * randn(300, 16, seed=3)  # related, not the same
    value = linear_cka(x, y)
    assert 0.2 < value < 0.95
    assert value == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert value == pytest.approx(gram_cka(x, y), abs=1e-10)
    # not invariant to a non-isotropic scaling of the features (Kornblith et al.: invertible linear maps change it)
    assert linear_cka(x, x * torch.linspace(0.1, 10, 20)) < 0.99


def test_independent_representations_have_a_small_cka():
    # E[CKA] of independent Gaussian X (N x D1), Y (N x D2) is about sqrt(D1 D2) / N
    assert linear_cka(randn(4000, 16, seed=4), randn(4000, 16, seed=5)) < 0.02
    assert linear_cka(randn(4000, 16, seed=4), randn(4000, 16, seed=5)) > 0.0


def test_the_matrix_form_is_every_pair_in_any_block_size():
    xs, ys = randn(4, 200, 12, seed=6), randn(3, 200, 7, seed=7)
    full = linear_cka_matrix(xs, ys)
    assert full.shape == (4, 3) and full.dtype == torch.float64
    expected = torch.tensor([[gram_cka(x, y) for y in ys] for x in xs], dtype=torch.float64)
    assert torch.allclose(full, expected, atol=1e-10)
    assert torch.allclose(linear_cka_matrix(xs, ys, block_bytes=1), full, atol=1e-14)  # one x per block
    assert torch.allclose(linear_cka_matrix(list(xs), list(ys)), full)  # a list of (N, D) tensors works too
    own = linear_cka_matrix(xs)
    assert torch.allclose(own, own.T, atol=1e-12) and torch.allclose(torch.diagonal(own), torch.ones(4, dtype=torch.float64))
    before = xs.clone()
    linear_cka_matrix(xs.double(), ys)
    assert torch.equal(xs, before)  # the caller's tensors are never changed (in-place steps work on a copy)


def test_undefined_cka_is_nan_and_shown():
    x = randn(100, 5)
    assert math.isnan(linear_cka(torch.ones(100, 5), x))  # constant over the samples: nothing left after centring
    bad = x.clone()
    bad[3, 2] = float("nan")
    inf = x.clone()
    inf[0, 0] = float("inf")
    values = linear_cka_matrix(torch.stack([x, bad, inf]), x)
    assert values[0, 0] == pytest.approx(1.0) and torch.isnan(values[1:]).all()
    huge = randn(100, 5, dtype=torch.float64) * 1e300  # float64 near its limit: scaled, not overflowed
    assert linear_cka(huge, huge / 1e300) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="same samples"):
        linear_cka_matrix(randn(2, 10, 3), randn(2, 11, 3))


# ---------------------------------------------------------------- intervals and the population rows
def test_intervals_have_known_answers():
    same = np.full((2, 3, 4), 0.8)  # every pair the same CKA: an interval of no width
    low, high = cka_intervals(same, False, 200)
    assert np.allclose(low, 0.8) and np.allclose(high, 0.8)
    k = np.random.default_rng(0).uniform(0.5, 1.0, (3, 4, 5))
    low, high = cka_intervals(k, False, 500)
    assert (low <= k.mean(axis=(1, 2))).all() and (k.mean(axis=(1, 2)) <= high).all() and (low < high).all()
    assert np.isnan(cka_intervals(k[:, :1], False, 500)[0]).all()  # one model a side: no spread to resample
    assert np.isnan(cka_intervals(k, False, 0)[0]).all()  # --n-boot 0
    own = np.ones((1, 4, 4))
    own[0, np.triu_indices(4, 1)[0], np.triu_indices(4, 1)[1]] = 0.9
    own[0, np.tril_indices(4, -1)[0], np.tril_indices(4, -1)[1]] = 0.9
    low, high = cka_intervals(own, True, 300)  # within one population the diagonal (a model with itself) never counts
    assert np.allclose(low, 0.9) and np.allclose(high, 0.9)
    assert np.isnan(cka_intervals(own[:, :2, :2], True, 300)[0]).all()  # 2 models: one pair, no spread


def toy(method, reps, sparsity=0.0):
    key = PopKey("toy", "wrn10-1", "ce", method, sparsity, f"ce-{method}")
    outputs = [dict(probes=list(r)) for r in reps]
    return Population(key, outputs=outputs, data=SimpleNamespace(), runs=[(i, f"/nowhere/{i}", {}) for i in range(len(reps))])


def test_rows_and_the_step_that_frees_the_representations():
    """Pruned models whose probes are rotations and rescalings of the dense models' own: CKA 1 at every probe, an
    interval of no width; the dense baseline pairs different dense models; once computed, the probes are dropped."""
    dense_reps = [[randn(80, 6, seed=10 + m), randn(80, 9, seed=20 + m)] for m in range(3)]
    pruned_reps = [[(3.0 * p.double() @ orthogonal(p.shape[1], seed=m)).float() for p in dense_reps[0]]
                   for m in range(2)]
    dense, pruned = toy("dense", dense_reps), toy("gmp", pruned_reps, 50.0)
    pruned.reference = dense.key
    stats = dict(n_boot=200, level=0.95, seed=0)
    rows = cka_rows(pruned, dense, "cpu", stats, "blocks", [])
    assert [r["probe"] for r in rows] == [1, 2] and [r["probe_dim"] for r in rows] == [6, 9]
    assert all(r["n_pairs"] == 6 and r["n_samples"] == 80 and r["reference"] == "Sup/Dense/0" for r in rows)
    # model 0 of the dense population is the one the pruned models are rotated from: CKA 1 with it, less with the others
    expected = np.mean([[linear_cka(p[0], d[0]) for d in dense_reps] for p in pruned_reps])
    assert rows[0]["cka_mean"] == pytest.approx(expected, abs=1e-9)
    assert rows[0]["cka_ci_low"] <= rows[0]["cka_mean"] <= rows[0]["cka_ci_high"]
    matched = toy("gmp", [dense_reps[0], dense_reps[0]], 50.0)
    one = cka_rows(matched, toy("dense", [pruned_reps[0], pruned_reps[1]]), "cpu", stats, "blocks", [])
    assert all(r["cka_mean"] == pytest.approx(1.0, abs=1e-6) and r["cka_ci_low"] == pytest.approx(1.0, abs=1e-6)
               for r in one)
    baseline = cka_rows(dense, dense, "cpu", stats, "blocks", [])
    assert all(r["n_pairs"] == 3 and r["population"] == r["reference"] == "Sup/Dense/0" for r in baseline)
    # the step: the dense baseline at once, the pruned population once its reference is scored, then no probes held
    pops = {dense.key: dense, pruned.key: pruned}
    collected, done, visited, log = [], set(), {dense.key}, []
    cka_step(pops, {dense.key: dense}, visited, done, collected, "cpu", stats, "blocks", log)
    assert len(collected) == 2 and all("probes" in o for o in dense.outputs)  # kept: the pruned one waits for it
    visited.add(pruned.key)
    cka_step(pops, pops, visited, done, collected, "cpu", stats, "blocks", log)
    assert len(collected) == 4 and done == set(pops) and not log
    assert not any("probes" in o for p in pops.values() for o in p.outputs)


# ---------------------------------------------------------------- the eval's cka metric, end to end
def test_cka_is_asked_for_by_name_and_checked():
    assert "cka" not in DEFAULT_METRICS
    check_settings(metrics=["acc", "cka"], cka_samples=0)
    with pytest.raises(UserError, match="cka_samples"):
        check_settings(metrics=["cka"], cka_samples=-1)
    index = cka_subset(450, 100)
    assert len(index) == 100 and torch.equal(index, cka_subset(450, 100)) and (index.diff() > 0).all()
    assert torch.equal(cka_subset(450, 0), torch.arange(450)) and torch.equal(cka_subset(450, 900), torch.arange(450))


def test_eval_writes_cka_per_probe_and_caches_the_probes(tiny_populations, tmp_path):
    out = run_eval(tiny_populations, tmp_path / "cka", metrics=("acc", "cka"), probes="blocks", report=False)
    table = pd.read_csv(out / "tables" / "cka.csv")
    assert list(table.columns[:8]) == ["group", "dataset", "model", "loss", "method", "sparsity", "population",
                                       "reference"]
    # 3 pruned populations against their dense reference, and the 2 dense baselines, at WRN-10-1's 5 block probes
    assert sorted(set(table.population)) == ["SCL/Dense/0", "SCL/GMP/50", "Sup/Dense/0", "Sup/GMP/50", "Sup/One-Shot/50"]
    assert len(table) == 5 * 5 and table.probe.tolist()[:5] == [1, 2, 3, 4, 5] and (table.n_samples == 450).all()
    assert table.cka_mean.between(0, 1).all() and (table.group == "digits-wrn10-1").all()
    pruned = table[table.method != "dense"]
    assert (pruned.n_pairs == 4).all() and (table[table.method == "dense"].n_pairs == 1).all()
    assert set(pruned.reference) == {"Sup/Dense/0", "SCL/Dense/0"}
    assert (pruned.cka_ci_low <= pruned.cka_mean + 1e-9).all() and (pruned.cka_mean <= pruned.cka_ci_high + 1e-9).all()
    # the number is the mean CKA of the cached probe representations over the (pruned, dense) model pairs
    cached = {n: torch.load(tiny_populations / n / "eval_cache.pt", weights_only=True)["cka"]["blocks-n450-seed0"]
              for n in ("ce-gmp50-seed0", "ce-gmp50-seed1", "ce-dense-seed0", "ce-dense-seed1")}
    last = np.mean([linear_cka(cached[p][-1], cached[d][-1]) for p in ("ce-gmp50-seed0", "ce-gmp50-seed1")
                    for d in ("ce-dense-seed0", "ce-dense-seed1")])
    row = pruned[(pruned.population == "Sup/GMP/50") & (pruned.probe == 5)].iloc[0]
    assert row.cka_mean == pytest.approx(last, abs=1e-5) and row.probe_dim == 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["cka_samples"] == 10000 and "cka" in summary["timing"]
    assert "tables/cka.csv" in evalfolder.marker_files(out)
    # again: everything from the cache; a smaller subset adds its probes beside the others
    again = run_eval(tiny_populations, tmp_path / "again", metrics=("acc", "cka"), probes="blocks", report=False)
    assert json.loads((again / "summary.json").read_text())["models_computed"] == 0
    assert pd.read_csv(again / "tables" / "cka.csv").equals(table)
    small = tmp_path / "small"
    assert main([str(tiny_populations), "--out", str(small), "--metrics", "acc,cka", "--probes", "blocks",
                 "--cka-samples", "100", "--n-boot", "0", "--no-report"]) == 0
    table = pd.read_csv(small / "tables" / "cka.csv")
    assert (table.n_samples == 100).all() and table.cka_ci_low.isna().all()
    cache = torch.load(tiny_populations / "ce-gmp50-seed0" / "eval_cache.pt", weights_only=True)["cka"]
    assert {"blocks-n450-seed0", "blocks-n100-seed0"} <= set(cache)
    # an eval without cka into the same folder leaves no stale cka.csv behind
    run_eval(tiny_populations, small, metrics=("acc",), report=False)
    assert not (small / "tables" / "cka.csv").exists()
