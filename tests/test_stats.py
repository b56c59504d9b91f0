"""Tests of whatislost.stats on cases with known answers."""
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from whatislost.metrics import modal_labels, pie_mask
from whatislost.stats import (
    BootstrapCI,
    _ModeSampler,
    _pie_count_replicates,
    adjust_p_values,
    bootstrap_ci,
    ci_columns,
    class_recall_tests,
    per_class_recall,
    permutation_test_more_pies,
    pie_count_ci,
    pie_difference_ci,
    population_cis,
    population_mean_ci,
    resample_weights,
    tie_report,
    ties_could_flip,
    welch_per_class,
)


# ------------------------------------------------------------------ bootstrap_ci
def test_resample_weights_are_multiplicities():
    w = resample_weights(7, 50, np.random.default_rng(0))
    assert w.shape == (50, 7) and (w.sum(1) == 7).all() and (w >= 0).all()
    idx = np.random.default_rng(0).integers(0, 7, size=(50, 7))
    assert (w == np.stack([np.bincount(i, minlength=7) for i in idx])).all()


def test_constant_population_gives_degenerate_interval():
    ci = bootstrap_ci(np.full(12, 0.8125), n_boot=300)
    assert ci.low == ci.high == ci.estimate == 0.8125
    q = np.tile(np.linspace(0, 1, 50), (6, 1))  # every model has the same per-sample scores
    ci = population_mean_ci(q, n_boot=300)
    assert ci.low == pytest.approx(ci.high) == pytest.approx(0.5)


def test_bootstrap_coverage_close_to_nominal():
    rng = np.random.default_rng(123)
    hits = 0
    for rep in range(200):
        x = rng.normal(loc=2.0, scale=1.5, size=40)
        ci = bootstrap_ci(x, n_boot=500, level=0.95, seed=rep)
        hits += ci.low <= 2.0 <= ci.high
    # percentile bootstrap of a mean, n = 40: ~0.93-0.94; binomial sd over 200 reps ~0.017
    assert 0.88 <= hits / 200 <= 0.99


def test_interval_shrinks_with_more_models():
    rng = np.random.default_rng(0)
    widths = {m: np.mean([np.subtract(*bootstrap_ci(rng.normal(size=m), seed=s).as_tuple()[::-1])
                          for s in range(10)]) for m in (20, 200)}
    assert widths[200] < 0.5 * widths[20]  # ~ sqrt(10) = 3.2x narrower


def test_bootstrap_needs_two_models_and_checks_arguments():
    ci = bootstrap_ci([0.9])
    assert ci.estimate == 0.9 and math.isnan(ci.low) and math.isnan(ci.high) and "2" in ci.note
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], statistic="median")


def test_mean_path_equals_two_step_population_mean():
    """'mean' on (M, N) = mean over samples of the per-sample mean over resampled models, as eval
    computes the population Q-Score / PD-Score; same seed -> same resamples -> same replicates."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 40))
    mask = rng.random(40) < 0.3
    fast = population_mean_ci(x, mask, n_boot=200, seed=5)
    slow = bootstrap_ci(x, lambda v: v.mean(0)[mask].mean(), n_boot=200, seed=5)
    assert fast.estimate == pytest.approx(x.mean(0)[mask].mean())
    np.testing.assert_allclose(fast.distribution, slow.distribution, rtol=0, atol=1e-12)
    assert (fast.low, fast.high) == pytest.approx((slow.low, slow.high))
    assert math.isnan(population_mean_ci(x, np.zeros(40, bool)).low)


def test_basic_interval_reflects_percentile_about_estimate():
    x = np.random.default_rng(2).exponential(size=30)
    pc = bootstrap_ci(x, method="percentile", seed=3)
    ba = bootstrap_ci(x, method="basic", seed=3)
    assert ba.low == pytest.approx(2 * pc.estimate - pc.high) and ba.high == pytest.approx(2 * pc.estimate - pc.low)


def test_centered_interval_is_percentile_shifted_onto_the_estimate():
    x = np.random.default_rng(2).exponential(size=30)
    pc = bootstrap_ci(x, method="percentile", seed=3)
    ce = bootstrap_ci(x, method="centered", seed=3)
    assert ce.low == pytest.approx(pc.low - pc.bias) and ce.high == pytest.approx(pc.high - pc.bias)


def test_close_votes_bias_the_percentile_pie_interval():
    """200 samples, both populations vote 16 x class 0 / 14 x class 1 (different models per sample):
    no PIE is observed, but a resample's mode flips often, so the replicates sit far above 0."""
    g = torch.Generator().manual_seed(0)
    order = torch.rand(30, 200, generator=g).argsort(0)  # which models vote 0 differs per sample
    votes = (order >= 16).long()
    assert ((votes == 0).sum(0) == 16).all()
    pc = pie_count_ci(votes, votes, 2, n_boot=300, method="percentile")
    assert pc.estimate == 0 and pc.low > 50 and pc.bias > 50 and "outside" in pc.note
    ce = pie_count_ci(votes, votes, 2, n_boot=300)  # default "centered"
    assert ce.method == "centered" and ce.low == 0 < ce.high == pytest.approx(pc.high - pc.bias)
    assert pc.low - pc.bias < 0  # clipped: a count cannot be negative


def test_ci_columns_names():
    assert ci_columns("acc", 1.0, 2.0) == {"acc_ci_low": 1.0, "acc_ci_high": 2.0}
    ci = BootstrapCI(estimate=0.5, low=0.25, high=0.75, level=0.95, n_boot=10)
    assert ci.columns("acc", scale=100) == {"acc_ci_low": 25.0, "acc_ci_high": 75.0}


# ------------------------------------------------------------------ PIE bootstrap
def _random_pops(m_d=7, m_p=6, n=300, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(0, c, (m_d, n), generator=g)
    p = torch.randint(0, c, (m_p, n), generator=g)
    d[:, : n // 2] = d[0, : n // 2]  # half the samples unanimous in both populations
    p[:, : n // 2] = p[0, : n // 2]
    return d, p


@pytest.mark.parametrize("tie_break", ["min", "max"])
def test_vectorised_replicates_equal_explicit_resampling(tie_break):
    d, p = _random_pops()
    rng = np.random.default_rng(1)
    wd, wp = resample_weights(len(d), 40, rng), resample_weights(len(p), 40, rng)
    got = _pie_count_replicates(d, p, 5, tie_break, wd, wp)
    modes = _ModeSampler(d, 5, tie_break).modes(torch.from_numpy(wd))
    for b in range(40):
        di, pi = np.repeat(np.arange(len(d)), wd[b]), np.repeat(np.arange(len(p)), wp[b])
        assert got[b] == int(pie_mask(d[di], p[pi], 5, tie_break)[0].sum())
        assert torch.equal(modes[b], modal_labels(d[di], 5, tie_break)[0])


def test_pie_count_ci_estimate_is_observed_count():
    d, p = _random_pops()
    for tie_break in ("min", "max"):
        ci = pie_count_ci(d, p, 5, tie_break, n_boot=100)
        assert ci.estimate == int(pie_mask(d, p, 5, tie_break)[0].sum())
        assert ci.distribution.shape == (100,)


def test_identical_unanimous_populations_have_no_pies():
    preds = torch.randint(0, 10, (1, 500)).expand(8, 500)
    ci = pie_count_ci(preds, preds[:5], 10, n_boot=200)
    assert (ci.estimate, ci.low, ci.high) == (0, 0, 0)


def test_pie_count_fixed_whatever_the_resampling():
    n = 60
    dense = torch.zeros(6, n, dtype=torch.long)
    pruned = torch.zeros(5, n, dtype=torch.long)
    pruned[:, :5] = 3                      # unanimous in both, different labels: 5 PIEs
    dense[:, 5:9] = torch.tensor([0, 1, 0, 1, 1, 0]).unsqueeze(1)  # dense votes 0/1 ...
    pruned[:, 5:9] = torch.tensor([2, 3, 3, 2, 2]).unsqueeze(1)   # ... pruned votes 2/3: 4 PIEs
    dense[:, 9:12] = torch.tensor([4, 4, 5, 4, 5, 5]).unsqueeze(1)  # dense votes 4/5, pruned all 0: 3 PIEs
    # the other 48 samples: every model of both populations predicts 0, never a PIE
    ci = pie_count_ci(dense, pruned, 6, n_boot=300, seed=7)
    assert ci.estimate == 12 and (ci.low, ci.high) == (12, 12) and (ci.distribution == 12).all()


def test_pie_count_ci_reproducible_and_seed_dependent():
    d, p = _random_pops()
    a, b = pie_count_ci(d, p, 5, n_boot=100, seed=3), pie_count_ci(d, p, 5, n_boot=100, seed=3)
    c = pie_count_ci(d, p, 5, n_boot=100, seed=4)
    assert np.array_equal(a.distribution, b.distribution) and (a.low, a.high) == (b.low, b.high)
    assert not np.array_equal(a.distribution, c.distribution)


def test_pie_count_ci_single_model_population_undefined():
    d, p = _random_pops()
    ci = pie_count_ci(d, p[:1], 5)
    assert math.isnan(ci.low) and ci.estimate == int(pie_mask(d, p[:1], 5)[0].sum())


def test_pie_difference_ci_fixed_case():
    n = 40
    sup_d, scl_d = torch.zeros(4, n, dtype=torch.long), torch.zeros(3, n, dtype=torch.long)
    sup_p, scl_p = sup_d.clone()[:3], scl_d.clone()
    sup_p[:, :3] = 1  # Sup: 3 PIEs
    scl_p[:, :8] = 2  # SCL: 8 PIEs
    ci = pie_difference_ci(sup_d, sup_p, scl_d, scl_p, 3, n_boot=200)
    assert (ci.estimate, ci.low, ci.high) == (5, 5, 5) and ci.extra["p_not_greater"] == 0.0


# ------------------------------------------------------------------ ties
@pytest.fixture
def tie_case():
    # 2 dense, 2 pruned models, 4 samples:
    #   s0: dense {0,1} tied, pruned 1        -> min: 0 vs 1 PIE;  max: 1 vs 1 no
    #   s1: dense {2,3} tied, pruned {2,3}    -> min: 2 vs 2 no;   max: 3 vs 3 no (but a PIE if broken apart)
    #   s2: dense 0, pruned 1                 -> PIE under any rule
    #   s3: dense {0,1} tied, pruned {1,2}    -> min: 0 vs 1 PIE;  max: 1 vs 2 PIE (top sets share 1)
    dense = torch.tensor([[0, 2, 0, 0],
                          [1, 3, 0, 1]])
    pruned = torch.tensor([[1, 3, 1, 1],
                           [1, 2, 1, 2]])
    return dense, pruned


def test_tie_report_hand_case(tie_case):
    dense, pruned = tie_case
    r = tie_report(dense, pruned, 4)
    assert (r["pie_count_min"], r["pie_count_max"]) == (3, 2)
    assert r["pie_count_min"] == int(pie_mask(dense, pruned, 4, "min")[0].sum())
    assert r["pie_count_max"] == int(pie_mask(dense, pruned, 4, "max")[0].sum())
    assert (r["n_tied"], r["n_tied_dense"], r["n_tied_pruned"], r["n_rule_dependent"]) == (3, 3, 2, 1)
    assert r["n_tied"] == pie_mask(dense, pruned, 4)[1]
    assert (r["pie_count_lower"], r["pie_count_upper"]) == (1, 4)
    assert r["warn"] and "3 (min) vs 2 (max)" in r["message"]


def test_tie_report_no_ties_no_warning():
    preds = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, 1]])
    r = tie_report(preds, preds.flip(0)[:, [0, 2, 1]], 3)
    assert r["n_tied"] == 0 and r["pie_count_min"] == r["pie_count_max"] == r["pie_count_lower"] == r["pie_count_upper"]
    assert not r["warn"] and r["message"] == ""


def test_ties_could_flip():
    assert ties_could_flip(5, 3, 4, 4)          # A > B under min, A < B under max
    assert ties_could_flip(4, 5, 4, 4)          # equal under min, A > B under max
    assert not ties_could_flip(5, 6, 2, 3)      # A > B under both
    assert not ties_could_flip(1, 4, 5, 6, conservative=True)
    assert ties_could_flip(1, 5, 5, 6, conservative=True)
    assert not ties_could_flip(3, 3, 3, 3, conservative=True)


# ------------------------------------------------------------------ per-class recall, Welch
def test_per_class_recall_hand_case():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    preds = torch.tensor([[0, 1, 1, 1, 0, 2],
                          [0, 0, 0, 0, 1, 1]])
    r = per_class_recall(preds, labels, 4)
    np.testing.assert_allclose(r[:, :3], [[0.5, 2 / 3, 1.0], [1.0, 1 / 3, 0.0]])
    assert np.isnan(r[:, 3]).all()  # no sample of class 3


def test_welch_matches_scipy_on_hand_case():
    dense = np.array([[0.90, 0.80], [0.92, 0.81], [0.91, 0.79], [0.93, 0.80]])
    pruned = np.array([[0.85, 0.80], [0.88, 0.78], [0.86, 0.82]])
    df = welch_per_class(dense, pruned, correction="none")
    for c in range(2):
        ref = sps.ttest_ind(pruned[:, c], dense[:, c], equal_var=False)
        assert df.loc[c, "t"] == pytest.approx(ref.statistic) and df.loc[c, "p_value"] == pytest.approx(ref.pvalue)
        assert df.loc[c, "df"] == pytest.approx(ref.df)
    # hand: class 0 means 0.915 / 0.86333..., Welch t = diff / sqrt(s_p^2/3 + s_d^2/4)
    s_d, s_p = np.var(dense[:, 0], ddof=1), np.var(pruned[:, 0], ddof=1)
    assert df.loc[0, "t"] == pytest.approx((0.86 + 1 / 300 - 0.915) / math.sqrt(s_p / 3 + s_d / 4))
    assert df.loc[0, "diff"] == pytest.approx(pruned[:, 0].mean() - 0.915) and df.loc[0, "t"] < 0
    assert list(df.columns[:1]) == ["class"] and {"p_value", "p_adjusted", "significant"} <= set(df.columns)


def test_welch_flags_the_class_whose_recall_drops():
    rng = np.random.default_rng(0)
    dense = 0.9 + 0.01 * rng.standard_normal((10, 5))
    pruned = 0.9 + 0.01 * rng.standard_normal((10, 5))
    pruned[:, 3] -= 0.2
    for correction in ("bh", "holm"):
        df = welch_per_class(dense, pruned, correction=correction)
        assert df["significant"].tolist() == [False, False, False, True, False]
        assert (df["p_adjusted"] >= df["p_value"] - 1e-15).all()


def test_adjust_p_values_hand_computation():
    p = np.array([0.01, 0.04, 0.03])
    # Holm: sorted 0.01, 0.03, 0.04 -> 3*0.01, max(., 2*0.03), max(., 1*0.04) = 0.03, 0.06, 0.06
    np.testing.assert_allclose(adjust_p_values(p, "holm"), [0.03, 0.06, 0.06])
    # BH: 0.01*3/1, 0.03*3/2, 0.04*3/3 = 0.03, 0.045, 0.04 -> running min from the top: 0.03, 0.04, 0.04
    np.testing.assert_allclose(adjust_p_values(p, "bh"), [0.03, 0.04, 0.04])
    np.testing.assert_allclose(adjust_p_values(p, "bonferroni"), [0.03, 0.12, 0.09])
    q = np.random.default_rng(0).random(25) ** 3
    np.testing.assert_allclose(adjust_p_values(q, "bh"), sps.false_discovery_control(q, method="bh"))
    with_nan = adjust_p_values([0.01, np.nan, 0.04, 0.03], "holm")
    assert np.isnan(with_nan[1]) and np.allclose(with_nan[[0, 2, 3]], [0.03, 0.06, 0.06])


def test_welch_three_class_example_uses_the_correction():
    rng = np.random.default_rng(4)
    dense = 0.8 + 0.02 * rng.standard_normal((6, 3))
    pruned = dense[:5] + np.array([-0.03, -0.01, -0.05])
    for correction in ("holm", "bh"):
        df = welch_per_class(dense, pruned, correction=correction, alpha=0.05)
        np.testing.assert_allclose(df["p_adjusted"], adjust_p_values(df["p_value"].to_numpy(), correction))
        assert (df["significant"] == (df["p_adjusted"] <= 0.05)).all()


def test_welch_degenerate_cases():
    dense = np.array([[1.0, 0.5, 0.7, 0.9], [1.0, 0.5, 0.8, 0.9], [1.0, 0.5, 0.75, 0.9]])
    pruned = np.array([[1.0, 0.4, 0.6, np.nan], [1.0, 0.4, 0.65, np.nan]])
    df = welch_per_class(dense, pruned)
    assert df.loc[0, "p_value"] == 1.0 and df.loc[0, "t"] == 0.0 and "no change" in df.loc[0, "note"]
    assert np.isnan(df.loc[1, "p_value"]) and "zero standard error" in df.loc[1, "note"]
    assert not df.loc[1, "significant"] and np.isnan(df.loc[1, "p_adjusted"])
    assert np.isfinite(df.loc[2, "p_value"]) and df.loc[2, "note"] == ""
    assert np.isnan(df.loc[3, "p_value"]) and "no test sample" in df.loc[3, "note"]
    one = welch_per_class(dense, pruned[:1])
    assert one["p_value"].isna().all() and not one["significant"].any() and "fewer than 2" in one.loc[0, "note"]


def test_normalized_test_follows_hooker_code():
    """Hooker et al.'s gen_tstatistic.py: recall minus the population's mean accuracy, then Welch."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(50)
    dense = torch.where(torch.rand(6, 200, generator=g) < 0.8, labels, torch.randint(0, 4, (6, 200), generator=g))
    pruned = torch.where(torch.rand(5, 200, generator=g) < 0.7, labels, torch.randint(0, 4, (5, 200), generator=g))
    df = class_recall_tests(dense, pruned, labels, 4, class_names=list("abcd"))
    rd, rp = per_class_recall(dense, labels, 4), per_class_recall(pruned, labels, 4)
    acc_d = (dense == labels).double().mean(1).mean().item()
    acc_p = (pruned == labels).double().mean(1).mean().item()
    ref = sps.ttest_ind(rp - acc_p, rd - acc_d, axis=0, equal_var=False)
    np.testing.assert_allclose(df["t"], ref.statistic)
    np.testing.assert_allclose(df["p_value"], ref.pvalue)
    np.testing.assert_allclose(df["norm_diff"], df["diff"] - (acc_p - acc_d))
    assert df["normalized"].all() and df["class_name"].tolist() == list("abcd")
    raw = class_recall_tests(dense, pruned, labels, 4, normalize=False)
    np.testing.assert_allclose(raw["p_value"], sps.ttest_ind(rp, rd, axis=0, equal_var=False).pvalue)


# ------------------------------------------------------------------ permutation test
def test_superset_gives_binomial_p_value():
    sup = np.zeros(200, bool)
    sup[:30] = True
    scl = sup.copy()
    scl[30:35] = True  # 5 extra SCL PIEs, no Sup-only one
    r = permutation_test_more_pies(sup, scl, n_perm=20000, seed=1)
    assert (r.observed_diff, r.n_discordant, r.scl_only, r.sup_only) == (5, 5, 5, 0)
    assert r.p_exact == pytest.approx(0.5 ** 5)
    assert abs(r.p_value - 0.5 ** 5) < 4 * math.sqrt(0.5 ** 5 * (1 - 0.5 ** 5) / 20000)
    scl[35:55] = True  # 25 extra: exact p ~ 3e-8, Monte-Carlo p at its floor 1/(n_perm + 1)
    r = permutation_test_more_pies(sup, scl, n_perm=2000)
    assert r.p_exact == pytest.approx(0.5 ** 25) and r.p_value == pytest.approx(1 / 2001)


def test_identical_masks_give_p_one():
    mask = np.random.default_rng(0).random(100) < 0.2
    for alternative in ("greater", "less", "two-sided"):
        r = permutation_test_more_pies(mask, mask, n_perm=500, alternative=alternative)
        assert r.observed_diff == 0 and r.n_discordant == 0 and r.p_value == 1.0 and r.p_exact == 1.0


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_permutation_agrees_with_exact_binomial(alternative):
    rng = np.random.default_rng(3)
    kind = rng.permutation(np.repeat([0, 1, 2, 3], [928, 20, 22, 30]))  # neither, both, Sup-only, SCL-only
    sup, scl = (kind == 1) | (kind == 2), (kind == 1) | (kind == 3)
    n_perm = 20000
    r = permutation_test_more_pies(torch.from_numpy(sup), torch.from_numpy(scl), n_perm=n_perm, seed=2,
                                   alternative=alternative)
    exact = sps.binomtest(r.scl_only, r.n_discordant, 0.5, alternative=alternative).pvalue
    assert r.p_exact == pytest.approx(exact)
    assert 0.05 < exact < 0.95  # an informative case, not a floor / ceiling
    assert abs(r.p_value - exact) < 4 * math.sqrt(exact * (1 - exact) / n_perm) + 1 / n_perm
    same = permutation_test_more_pies(sup, scl, n_perm=n_perm, seed=2, alternative=alternative)
    assert same.p_value == r.p_value  # reproducible


# ------------------------------------------------------------------ integration helper
def test_population_cis_columns():
    d, p = _random_pops()
    rng = np.random.default_rng(0)
    q = rng.random((6, 300))
    depth = rng.integers(1, 10, (3, 300)).astype(float)
    mask = pie_mask(d, p, 5)[0]
    cols = population_cis(acc=np.array([0.9, 0.91, 0.92]), per_sample={"q": q}, depth=depth, pd_mask=mask,
                          dense_preds=d, pruned_preds=p, num_classes=5, n_boot=100)
    assert set(cols) == {f"{m}_ci_{e}" for m in ("acc", "q", "pd_pie", "pd_nonpie", "pie_count") for e in ("low", "high")}
    assert 90 <= cols["acc_ci_low"] <= cols["acc_ci_high"] <= 92
    assert cols["q_ci_low"] <= q.mean() <= cols["q_ci_high"]
