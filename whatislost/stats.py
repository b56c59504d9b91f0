"""Statistics for population comparisons: bootstrap CIs, tie reports, per-class Welch tests,
a paired permutation test of PIE counts.

Pure functions on torch tensors / numpy arrays; nothing here loads models or data. The unit
of replication throughout is the *model* (a training seed): a population is M models trained
with the same settings, so its sampling variability is estimated by resampling models.

* Bootstrap: resampling the models of each population with replacement, independently per
  population. Percentile intervals (Efron & Tibshirani 1993, ch. 13) for means (accuracy,
  Q-Score, PD-Score); for PIE counts, whose replicates are biased upward (see
  :func:`pie_count_ci`), the replicates' spread centred on the observed count. The basic
  interval (Davison & Hinkley 1997, sec. 5.2) is available too.
* PIEs: Hooker et al. 2019, "What do compressed deep neural networks forget?", as
  :func:`whatislost.metrics.pie_mask` computes them (modal label of the pruned population
  differs from the dense population's).
* Per-class recall tests: Hooker et al. 2019 compare, per class, the recall of the dense and
  the pruned population with a two-sided Welch t-test; their public code
  (google-research/pruning_identified_exemplars/per_class_accuracy/gen_tstatistic.py)
  subtracts each population's mean top-1 accuracy from its models' class recalls first, so
  the test asks whether the class moved *more than the overall accuracy did*.
* Multiple testing: Benjamini & Hochberg 1995 (FDR, default) or Holm 1979 (FWER).
* Permutation test: a paired sign-flip test on the test samples, which reduces to the exact
  one-sided McNemar (binomial) test on the discordant samples (McNemar 1947).

All random draws come from ``numpy.random.default_rng(seed)``, so results are reproducible
for a given seed whatever torch's global RNG state is.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from scipy import stats as _sps

__all__ = [
    "BootstrapCI",
    "ci_columns",
    "resample_weights",
    "bootstrap_ci",
    "population_mean_ci",
    "pie_count_ci",
    "pie_difference_ci",
    "tie_report",
    "ties_could_flip",
    "per_class_recall",
    "adjust_p_values",
    "welch_per_class",
    "class_recall_tests",
    "PermutationResult",
    "permutation_test_more_pies",
    "population_cis",
]

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]

# Largest (n_boot chunk) x (columns) block of resampled class counts held at once (float32 entries).
_BLOCK_ELEMS = 1 << 22


# ------------------------------------------------------------------------ result type
@dataclass
class BootstrapCI:
    """A bootstrap confidence interval.

    estimate: the statistic on the observed (not resampled) populations.
    low, high: interval ends (NaN when undefined, see ``note``).
    level: nominal coverage, e.g. 0.95. n_boot: replicates.
    method: "percentile" (quantiles of the replicates), "basic" (reflected about the estimate:
        2 * estimate - quantiles) or "centered" (the replicates' quantiles shifted by
        estimate - mean(replicates): the bootstrap supplies the spread only, the interval is
        centred on the observed value; used for PIE counts, see :func:`pie_count_ci`).
    distribution: (n_boot,) float64 bootstrap replicates of the statistic (empty when undefined).
    note: why the interval is NaN or degenerate, or a caveat (e.g. estimate outside the
        percentile interval); None when there is nothing to say.
    extra: statistic-specific additions (e.g. ``pie_difference_ci`` puts P*(diff <= 0) here).
    """

    estimate: float
    low: float
    high: float
    level: float
    n_boot: int
    method: str = "percentile"
    distribution: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    note: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def as_tuple(self) -> Tuple[float, float]:
        """(low, high)."""
        return self.low, self.high

    def columns(self, name: str, scale: float = 1.0) -> Dict[str, float]:
        """``{f"{name}_ci_low": low * scale, f"{name}_ci_high": high * scale}`` for a CSV row."""
        return ci_columns(name, self.low * scale, self.high * scale)

    @property
    def bias(self) -> float:
        """mean(bootstrap replicates) - estimate: how far resampling shifts the statistic."""
        if self.distribution.size == 0:
            return math.nan
        return float(self.distribution.mean() - self.estimate)


def ci_columns(name: str, low: float, high: float) -> Dict[str, float]:
    """CSV columns of one interval: ``{"<name>_ci_low": low, "<name>_ci_high": high}``."""
    return {f"{name}_ci_low": float(low), f"{name}_ci_high": float(high)}


# ------------------------------------------------------------------------ resampling
def _as_numpy(x: ArrayLike, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check_level(level: float, n_boot: int):
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def resample_weights(num_models: int, n_boot: int, rng) -> np.ndarray:
    """Bootstrap resamples of M models as multiplicities.

    Draws ``n_boot`` resamples of M model indices with replacement and returns
    W (n_boot, M) int64, W[b, m] = how often model m appears in resample b (rows sum to M).
    Any statistic that is a sum over models (class votes, means) of resample b is then
    ``W[b] @ per_model_values``, which is what makes the bootstraps here vectorised.
    """
    rng = _rng(rng)
    idx = rng.integers(0, num_models, size=(n_boot, num_models))
    flat = (np.arange(n_boot)[:, None] * num_models + idx).ravel()
    return np.bincount(flat, minlength=n_boot * num_models).reshape(n_boot, num_models)


def _interval(estimate: float, boot: np.ndarray, level: float, method: str) -> Tuple[float, float]:
    alpha = 1 - level
    q_lo, q_hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    if method == "percentile":
        return float(q_lo), float(q_hi)
    if method == "basic":
        return float(2 * estimate - q_hi), float(2 * estimate - q_lo)
    if method == "centered":
        shift = float(boot.mean()) - estimate
        return float(q_lo - shift), float(q_hi - shift)
    raise ValueError(f"method must be 'percentile', 'basic' or 'centered', got {method!r}")


def _finish(estimate: float, boot: np.ndarray, level: float, method: str, note: Optional[str] = None,
            extra: Optional[dict] = None) -> BootstrapCI:
    low, high = _interval(estimate, boot, level, method)
    if note is None and not low <= estimate <= high:
        note = (f"estimate {estimate:.6g} lies outside the {method} interval [{low:.6g}, {high:.6g}]: "
                "the statistic is biased under resampling (see BootstrapCI.bias); consider method='centered'")
    return BootstrapCI(estimate=float(estimate), low=low, high=high, level=level, n_boot=len(boot), method=method,
                       distribution=boot.astype(np.float64), note=note, extra=extra or {})


def _undefined(estimate: float, level: float, n_boot: int, method: str, note: str) -> BootstrapCI:
    return BootstrapCI(estimate=float(estimate), low=math.nan, high=math.nan, level=level, n_boot=n_boot,
                       method=method, note=note)


def bootstrap_ci(
    per_model_values: ArrayLike,
    statistic: Union[str, Callable[[np.ndarray], float]] = "mean",
    n_boot: int = 1000,
    level: float = 0.95,
    seed=0,
    method: str = "percentile",
) -> BootstrapCI:
    """Bootstrap CI of a population statistic, resampling models with replacement.

    Args:
        per_model_values: (M, ...) array or tensor, axis 0 = models. E.g. per-model accuracies
            (M,); per-model per-sample Q-Scores (M, N); per-model depths (M_d, N).
        statistic: "mean" (default): the mean over all non-model axes of the per-sample mean
            over models, which is how eval computes population accuracy, Q-Score and PD-Score
            (per-sample values averaged over models, then averaged over samples). Because that
            is linear, it equals the mean over models of each model's own mean, so it is
            computed exactly and fully vectorised from (M,) per-model means.
            A callable ``f(values[idx]) -> float`` is applied to each resample (idx: M indices
            drawn with replacement), in a Python loop over n_boot.
        n_boot: bootstrap replicates. level: nominal coverage (0.95 -> 2.5 / 97.5 percentiles).
        seed: int or numpy Generator. method: "percentile" (default), "basic" or "centered"
            (see BootstrapCI); for a mean they all agree up to the tiny resampling skew.

    Returns:
        BootstrapCI; with fewer than 2 models the interval is NaN (a single model carries no
        information about seed-to-seed variability) and ``note`` says so.
    """
    _check_level(level, n_boot)
    values = _as_numpy(per_model_values)
    if values.ndim == 0:
        raise ValueError("per_model_values needs a model axis (axis 0)")
    num_models = values.shape[0]
    if statistic == "mean":
        per_model = values.reshape(num_models, -1).mean(axis=1) if values.ndim > 1 else values
        estimate = float(per_model.mean()) if num_models else math.nan
    elif callable(statistic):
        estimate = float(statistic(values)) if num_models else math.nan
    else:
        raise ValueError(f"statistic must be 'mean' or a callable, got {statistic!r}")
    if num_models < 2:
        return _undefined(estimate, level, n_boot, method,
                          f"{num_models} model(s): a bootstrap over models needs at least 2")
    rng = _rng(seed)
    if statistic == "mean":
        if not np.isfinite(per_model).all():
            return _undefined(estimate, level, n_boot, method, "non-finite per-model values")
        boot = resample_weights(num_models, n_boot, rng) @ per_model / num_models
    else:
        idx = rng.integers(0, num_models, size=(n_boot, num_models))
        boot = np.array([float(statistic(values[i])) for i in idx])
    return _finish(estimate, boot, level, method)


def population_mean_ci(
    per_model_per_sample: ArrayLike,
    mask: Optional[ArrayLike] = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed=0,
    method: str = "percentile",
) -> BootstrapCI:
    """CI of a population's per-sample score averaged over samples (Q-Score, PD-Score).

    The population value is ``mean over samples in mask of (mean over models of x[m, i])``,
    as eval computes ``q_mean`` (all samples) and ``pd_pie_mean`` / ``pd_nonpie_mean``
    (samples inside / outside a PIE mask). Models are resampled; the mask is held fixed
    (its own uncertainty is not propagated).

    Args:
        per_model_per_sample: (M, N) per-model per-sample values (Q (M, N) from q_score of each
            model; depth (M_d, N) of the depth models).
        mask: optional (N,) bool, the samples to average over (e.g. the PIE mask, or ~mask).
    Returns:
        BootstrapCI; NaN interval (with note) when the mask selects no sample or M < 2.
    """
    x = _as_numpy(per_model_per_sample)
    if x.ndim != 2:
        raise ValueError(f"expected (models, samples), got shape {x.shape}")
    if mask is not None:
        m = _as_numpy(mask, dtype=bool)
        if m.shape != (x.shape[1],):
            raise ValueError(f"mask must be ({x.shape[1]},), got {m.shape}")
        if not m.any():
            return _undefined(math.nan, level, n_boot, method, "the mask selects no sample")
        x = x[:, m]
    return bootstrap_ci(x.mean(axis=1), "mean", n_boot=n_boot, level=level, seed=seed, method=method)


# ------------------------------------------------------------------------ PIE bootstrap
def _check_preds(preds: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    preds = torch.as_tensor(preds)
    if preds.dim() != 2:
        raise ValueError(f"{name} must be (models, samples), got shape {tuple(preds.shape)}")
    if preds.is_floating_point() or preds.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {preds.dtype}")
    if preds.numel() and (int(preds.min()) < 0 or int(preds.max()) >= num_classes):
        raise ValueError(f"{name}: predictions must lie in [0, {num_classes})")
    return preds.long().cpu()


class _ModeSampler:
    """Modal labels of resampled populations over a fixed set of columns, vectorised.

    For each column only the classes some model predicts can win, so votes are kept per
    (slot, column), slot = rank of the class among the column's distinct predicted classes
    (L slots, L = most distinct classes in any column, <= min(M, C)). Ties are resolved as
    metrics.modal_labels does, through one key per (slot, column):
        key = C * count + r,  r = C - 1 - class ("min": smallest class wins) or class ("max"),
    whose maximum over slots is the winner and decodes back to its class (key mod C). The keys
    of a chunk of resamples are one matrix product [W, 1] @ [C * onehot; r], followed by a max
    over slots: no argmax, no gather. Padded slots carry count 0, so they never beat a class
    with a vote. Exact in float32 while (M + 1) * C < 2**24 (float64 beyond).
    """

    def __init__(self, preds: torch.Tensor, num_classes: int, tie_break: str):
        if tie_break not in ("min", "max"):
            raise ValueError(f"tie_break must be 'min' or 'max', got {tie_break!r}")
        num_models, k = preds.shape
        self.k, self.c, self.tie_break = k, num_classes, tie_break
        cols = torch.arange(k).expand(num_models, k)
        present = torch.zeros(k, num_classes, dtype=torch.bool)
        present[cols, preds] = True
        self.slots = max(1, int(present.sum(1).max())) if k else 1
        # present classes first, in increasing class id (stable sort), then padding
        order = torch.sort(present.to(torch.int8), dim=1, descending=True, stable=True).indices
        cls = order[:, : self.slots]  # (K, L) class of each slot
        inv = torch.empty(k, num_classes, dtype=torch.long)
        inv.scatter_(1, order, torch.arange(num_classes).expand(k, num_classes).contiguous())
        slot = inv[cols, preds]  # (M, K)
        self.dtype = torch.float32 if (num_models + 1) * num_classes < 2**24 else torch.float64
        table = torch.zeros(num_models + 1, self.slots, k, dtype=self.dtype)
        table[torch.arange(num_models)[:, None], slot, cols] = float(num_classes)
        rank = (num_classes - 1 - cls) if tie_break == "min" else cls
        table[num_models] = rank.t().to(self.dtype)
        self.table = table.view(num_models + 1, self.slots * k)

    def modes(self, weights: torch.Tensor) -> torch.Tensor:
        """weights (B, M) resample multiplicities -> modal class (B, K) long."""
        w = torch.cat([weights.to(self.dtype), torch.ones(len(weights), 1, dtype=self.dtype)], dim=1)
        key = (w @ self.table).view(len(weights), self.slots, self.k).amax(dim=1).long() % self.c
        return (self.c - 1 - key) if self.tie_break == "min" else key


def _pie_count_replicates(dense: torch.Tensor, pruned: torch.Tensor, num_classes: int, tie_break: str,
                          w_dense: np.ndarray, w_pruned: np.ndarray) -> np.ndarray:
    """PIE count of each resample pair: (B,) int64. Samples unanimous in both populations are
    PIEs (or not) whatever the resample, so only the others are recomputed."""
    unanimous_d = (dense == dense[:1]).all(0)
    unanimous_p = (pruned == pruned[:1]).all(0)
    fixed = unanimous_d & unanimous_p
    base = int((dense[0, fixed] != pruned[0, fixed]).sum())
    cols = torch.nonzero(~fixed).flatten()
    n_boot = len(w_dense)
    if len(cols) == 0:
        return np.full(n_boot, base, dtype=np.int64)
    sd = _ModeSampler(dense[:, cols], num_classes, tie_break)
    sp = _ModeSampler(pruned[:, cols], num_classes, tie_break)
    chunk = max(1, _BLOCK_ELEMS // (len(cols) * max(sd.slots, sp.slots)))
    wd, wp = torch.from_numpy(w_dense), torch.from_numpy(w_pruned)
    out = np.empty(n_boot, dtype=np.int64)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        diff = sd.modes(wd[start:stop]) != sp.modes(wp[start:stop])
        out[start:stop] = diff.sum(1).numpy() + base
    return out


def pie_count_ci(
    dense_preds: torch.Tensor,
    pruned_preds: torch.Tensor,
    num_classes: int,
    tie_break: str = "min",
    n_boot: int = 1000,
    level: float = 0.95,
    seed=0,
    method: str = "centered",
) -> BootstrapCI:
    """Bootstrap CI of the PIE count, resampling the models of both populations independently.

    Each replicate draws M_d dense and M_p pruned models with replacement, recomputes both
    populations' modal labels (same ``tie_break`` rule as :func:`whatislost.metrics.pie_mask`)
    and counts the samples whose modes differ. Vectorised: class votes of a chunk of resamples
    are one matrix product of resample multiplicities with a one-hot of the predictions, and
    samples on which every model of both populations agrees are skipped (their PIE status
    cannot change), so cost scales with the number of contested samples.

    Why the default interval is "centered", not "percentile": the PIE count is a count of
    disagreements between two *modes*, a non-smooth statistic. A resample of M models with
    replacement holds only ~0.63 M distinct models, so its modes are noisier than the observed
    population's, samples with a close vote flip more often, and the replicates sit well above
    the observed count. In simulations (10 classes, N = 2000, per-sample class probabilities
    with 2-15% hard samples, models drawn independently, M = 5-30) the replicate mean exceeded
    the observed count by 70-110% of the count itself, and the 95% percentile interval covered
    the expected M-model count E[count] in 0-22% of repetitions, the basic interval in 0-32%;
    the centred interval (the replicates' spread, centred on the observed count) covered it in
    98-100% (conservative: the replicates' sd was 1.6-2.6x the sd of the count across
    independent M-model populations). The estimand is therefore "the PIE count another
    population of M models trained the same way would give", not the count of infinitely large
    populations (which can be far lower: near-tied votes make PIEs of finite populations).
    ``BootstrapCI.bias`` reports the shift; ``method="percentile"`` remains available.

    Args:
        dense_preds: (M_d, N) integer predictions of the dense population.
        pruned_preds: (M_p, N) integer predictions of the pruned population.
        num_classes: C. tie_break: "min" | "max". n_boot, level, seed: as bootstrap_ci.
        method: "centered" (default), "percentile" or "basic".

    Returns:
        BootstrapCI of the count (estimate = the observed PIE count; low clipped at 0);
        ``distribution`` holds the n_boot replicate counts. NaN interval when either
        population has < 2 models.
    """
    _check_level(level, n_boot)
    dense = _check_preds(dense_preds, num_classes, "dense_preds")
    pruned = _check_preds(pruned_preds, num_classes, "pruned_preds")
    if dense.shape[1] != pruned.shape[1]:
        raise ValueError(f"sample counts differ: dense {tuple(dense.shape)} vs pruned {tuple(pruned.shape)}")
    ones = (np.ones((1, dense.shape[0]), np.int64), np.ones((1, pruned.shape[0]), np.int64))
    estimate = float(_pie_count_replicates(dense, pruned, num_classes, tie_break, *ones)[0])
    if min(dense.shape[0], pruned.shape[0]) < 2:
        return _undefined(estimate, level, n_boot, method, "a population has fewer than 2 models")
    rng = _rng(seed)
    w_d = resample_weights(dense.shape[0], n_boot, rng)
    w_p = resample_weights(pruned.shape[0], n_boot, rng)
    boot = _pie_count_replicates(dense, pruned, num_classes, tie_break, w_d, w_p)
    ci = _finish(estimate, boot.astype(np.float64), level, method)
    ci.low = max(ci.low, 0.0)  # a count: the centred / basic interval may reach below 0
    return ci


def pie_difference_ci(
    sup_dense: torch.Tensor,
    sup_pruned: torch.Tensor,
    scl_dense: torch.Tensor,
    scl_pruned: torch.Tensor,
    num_classes: int,
    tie_break: str = "min",
    n_boot: int = 1000,
    level: float = 0.95,
    seed=0,
    method: str = "centered",
) -> BootstrapCI:
    """Bootstrap CI of count(SCL PIEs) - count(Sup PIEs) at one (method, sparsity).

    The model-level complement of :func:`permutation_test_more_pies`: the four populations
    (Sup dense / pruned, SCL dense / pruned; (M, N) predictions each, same N test samples)
    are resampled independently, so the interval reflects seed-to-seed variability of both
    PIE sets. ``extra["p_not_greater"]`` = fraction of replicates with difference <= 0, a
    rough bootstrap indication (not a calibrated p-value) against "SCL has more PIEs".
    Same resampling bias as :func:`pie_count_ci`, hence the same "centered" default (the
    shift largely cancels in the difference only when both losses have similar numbers of
    close votes).
    """
    _check_level(level, n_boot)
    named = (("sup_dense", sup_dense), ("sup_pruned", sup_pruned), ("scl_dense", scl_dense), ("scl_pruned", scl_pruned))
    pops = [_check_preds(p, num_classes, name) for name, p in named]
    if len({p.shape[1] for p in pops}) != 1:
        raise ValueError(f"sample counts differ: {[tuple(p.shape) for p in pops]}")
    ones = [np.ones((1, p.shape[0]), np.int64) for p in pops]
    estimate = float(_pie_count_replicates(pops[2], pops[3], num_classes, tie_break, ones[2], ones[3])[0]
                     - _pie_count_replicates(pops[0], pops[1], num_classes, tie_break, ones[0], ones[1])[0])
    if min(p.shape[0] for p in pops) < 2:
        return _undefined(estimate, level, n_boot, method, "a population has fewer than 2 models")
    rng = _rng(seed)
    w = [resample_weights(p.shape[0], n_boot, rng) for p in pops]
    boot = (_pie_count_replicates(pops[2], pops[3], num_classes, tie_break, w[2], w[3])
            - _pie_count_replicates(pops[0], pops[1], num_classes, tie_break, w[0], w[1])).astype(np.float64)
    return _finish(estimate, boot, level, method, extra={"p_not_greater": float((boot <= 0).mean())})


# ------------------------------------------------------------------------ ties
def _top_sets(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(M, N) -> (N, C) bool: classes sharing the top vote count of each sample."""
    counts = torch.zeros(preds.shape[1], num_classes, dtype=torch.long)
    counts.scatter_add_(1, preds.t(), torch.ones_like(preds.t()))
    return counts == counts.max(dim=1, keepdim=True).values


def tie_report(
    dense_preds: torch.Tensor,
    pruned_preds: torch.Tensor,
    num_classes: int,
    rel_tol: float = 0.05,
    abs_tol: int = 0,
) -> dict:
    """How much the PIE count depends on the rule that resolves tied modal labels.

    Returns a dict (flat, JSON/CSV-friendly):
        pie_count_min, pie_count_max: PIE counts with tie_break "min" / "max" (same rule in
            both populations, as :func:`whatislost.metrics.pie_mask`).
        n_tied: samples whose mode is tied in the dense or the pruned population (each once);
            n_tied_dense, n_tied_pruned: per population.
        n_rule_dependent: samples that are a PIE under one rule and not the other.
        pie_count_lower, pie_count_upper: bounds over *every* way of breaking ties (each
            population, each sample independently): lower = samples whose top-class sets are
            disjoint (a PIE whatever the choice); upper = lower + samples whose top sets
            intersect while at least one of them is tied (a PIE or not, by choice).
        warn: True when |pie_count_max - pie_count_min| > max(abs_tol, rel_tol * max count).
        message: human-readable warning text, "" when warn is False.
    Compare two populations' reports with :func:`ties_could_flip`.
    """
    dense = _check_preds(dense_preds, num_classes, "dense_preds")
    pruned = _check_preds(pruned_preds, num_classes, "pruned_preds")
    if dense.shape[1] != pruned.shape[1]:
        raise ValueError(f"sample counts differ: dense {tuple(dense.shape)} vs pruned {tuple(pruned.shape)}")
    top_d, top_p = _top_sets(dense, num_classes), _top_sets(pruned, num_classes)
    tied_d, tied_p = top_d.sum(1) > 1, top_p.sum(1) > 1
    cls = torch.arange(num_classes)

    def mode(top, rule):
        if rule == "min":
            return torch.where(top, cls, num_classes).min(1).values
        return torch.where(top, cls, -1).max(1).values

    pie_min = mode(top_d, "min") != mode(top_p, "min")
    pie_max = mode(top_d, "max") != mode(top_p, "max")
    always = ~(top_d & top_p).any(1)
    depends = ~always & (tied_d | tied_p)
    c_min, c_max = int(pie_min.sum()), int(pie_max.sum())
    delta = abs(c_max - c_min)
    warn = delta > max(abs_tol, rel_tol * max(c_min, c_max))
    n_tied = int((tied_d | tied_p).sum())
    message = ""
    if warn:
        message = (f"PIE count depends on the tie rule: {c_min} (min) vs {c_max} (max), {n_tied} tied sample(s); "
                   f"any tie resolution gives between {int(always.sum())} and {int((always | depends).sum())}")
    return dict(pie_count_min=c_min, pie_count_max=c_max, n_tied=n_tied, n_tied_dense=int(tied_d.sum()),
                n_tied_pruned=int(tied_p.sum()), n_rule_dependent=int((pie_min != pie_max).sum()),
                pie_count_lower=int(always.sum()), pie_count_upper=int((always | depends).sum()),
                warn=bool(warn), message=message)


def ties_could_flip(a_min: float, a_max: float, b_min: float, b_max: float, conservative: bool = False) -> bool:
    """Whether the tie rule could reverse the comparison of two counts A and B.

    Default (``conservative=False``): A and B are counts under the "min" and the "max" rule
    (both populations resolved with the same rule, e.g. ``pie_count_min`` / ``pie_count_max``
    of two :func:`tie_report` results); True when sign(A - B) differs between the two rules
    (A > B under one rule, A <= B under the other, or equal under one and not the other).

    ``conservative=True``: the arguments are bounds [a_min, a_max], [b_min, b_max] over any
    tie resolution (``pie_count_lower`` / ``pie_count_upper``); True unless one interval lies
    strictly above the other or both are the same single point.
    """
    if conservative:
        a_lo, a_hi, b_lo, b_hi = min(a_min, a_max), max(a_min, a_max), min(b_min, b_max), max(b_min, b_max)
        if a_lo > b_hi or b_lo > a_hi:
            return False
        return not (a_lo == a_hi == b_lo == b_hi)
    return bool(np.sign(a_min - b_min) != np.sign(a_max - b_max))


# ------------------------------------------------------------------------ per-class recall
def per_class_recall(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Recall of every class for every model.

    Args:
        preds: (M, N) integer predictions; labels: (N,) true labels in [0, C).
    Returns:
        (M, C) float64, recall[m, c] = fraction of the test samples of class c that model m
        predicts as c; NaN for a class with no test sample.
    """
    preds = _check_preds(preds, num_classes, "preds")
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != (preds.shape[1],):
        raise ValueError(f"labels must be ({preds.shape[1]},), got {tuple(labels.shape)}")
    onehot = torch.zeros(preds.shape[1], num_classes, dtype=torch.float64)
    onehot[torch.arange(preds.shape[1]), labels] = 1.0
    correct = (preds == labels).to(torch.float64) @ onehot  # (M, C)
    support = onehot.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (correct / support).numpy()


def adjust_p_values(p_values: ArrayLike, method: str = "bh") -> np.ndarray:
    """Multiple-testing adjusted p-values; NaNs are left out of the family and stay NaN.

    method: "bh" (Benjamini & Hochberg 1995, FDR; ``scipy.stats.false_discovery_control``
    computes the same), "holm" (Holm 1979, FWER), "bonferroni", or "none".
    Adjusted values are >= the raw ones and capped at 1; compare them with alpha.
    """
    p = _as_numpy(p_values)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    if method == "none":
        adj = q.copy()
    elif method == "bonferroni":
        adj = np.minimum(1.0, q * m)
    elif method == "holm":
        order = np.argsort(q, kind="stable")
        stepped = np.maximum.accumulate((m - np.arange(m)) * q[order])
        adj = np.empty(m)
        adj[order] = np.minimum(1.0, stepped)
    elif method == "bh":
        order = np.argsort(q, kind="stable")
        scaled = q[order] * m / np.arange(1, m + 1)
        stepped = np.minimum.accumulate(scaled[::-1])[::-1]
        adj = np.empty(m)
        adj[order] = np.minimum(1.0, stepped)
    else:
        raise ValueError(f"correction must be 'bh', 'holm', 'bonferroni' or 'none', got {method!r}")
    out[ok] = adj
    return out


def welch_per_class(
    dense_recall: ArrayLike,
    pruned_recall: ArrayLike,
    alpha: float = 0.05,
    correction: str = "bh",
    dense_accuracy: Optional[ArrayLike] = None,
    pruned_accuracy: Optional[ArrayLike] = None,
    class_names: Optional[Sequence[str]] = None,
) -> pd.DataFrame:
    """Per-class two-sided Welch t-test of dense versus pruned recall (Hooker et al. 2019).

    For each class c: H0 "the pruned population's mean recall of c equals the dense one's"
    (or, with accuracies given, "... after subtracting each population's mean accuracy"),
    Welch's unequal-variance t-test over models (``scipy.stats.ttest_ind(pruned, dense,
    equal_var=False)``: t > 0 means pruned higher). p-values are then adjusted over the
    classes with a defined test, and a class is significant when p_adjusted <= alpha.

    Normalisation: Hooker et al.'s code subtracts each population's mean top-1 accuracy
    (a constant per population) from every model's class recall before the test, so a
    significant class is one whose recall moved more (or less) than the overall accuracy.
    Pass ``dense_accuracy`` (M_d,) and ``pruned_accuracy`` (M_p,), as fractions, to do the
    same; the accuracy means are treated as known constants, as in their code.

    Degenerate cases (column ``note`` says which; such classes are left out of the
    correction, p_adjusted NaN, significant False, unless p = 1):
        * fewer than 2 models in either population: t, p NaN (no variance estimate);
        * a class with no test sample (NaN recall): t, p NaN;
        * every model of both populations has the same recall of c (e.g. all 1.0): no
          model moved, p = 1 (t = 0 without normalisation; NaN with it, since the tested
          difference is then just the accuracy shift). These stay in the family;
        * each population constant but at different values: the t-test is undefined (zero
          standard error); p NaN rather than 0, so no class is flagged on zero evidence.

    Args:
        dense_recall: (M_d, C); pruned_recall: (M_p, C), from :func:`per_class_recall`.
        alpha: significance level for the adjusted p-values.
        correction: "bh" (default; Benjamini-Hochberg FDR), "holm", "bonferroni", "none".
        class_names: optional C names, put in a ``class_name`` column.

    Returns:
        DataFrame, one row per class: class, [class_name], n_dense, n_pruned, dense_mean,
        pruned_mean, diff (pruned - dense, raw recall), norm_diff (diff minus the accuracy
        shift; equals diff without accuracies), t, df, p_value, p_adjusted, significant,
        correction, normalized, note.
    """
    d = _as_numpy(dense_recall)
    p = _as_numpy(pruned_recall)
    if d.ndim != 2 or p.ndim != 2 or d.shape[1] != p.shape[1]:
        raise ValueError(f"need (M_dense, C) and (M_pruned, C); got {d.shape}, {p.shape}")
    if (dense_accuracy is None) != (pruned_accuracy is None):
        raise ValueError("give both dense_accuracy and pruned_accuracy, or neither")
    normalized = dense_accuracy is not None
    shift_d = float(_as_numpy(dense_accuracy).mean()) if normalized else 0.0
    shift_p = float(_as_numpy(pruned_accuracy).mean()) if normalized else 0.0
    num_classes = d.shape[1]
    n_d, n_p = d.shape[0], p.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense_mean = d.mean(0) if n_d else np.full(num_classes, np.nan)
        pruned_mean = p.mean(0) if n_p else np.full(num_classes, np.nan)
        t = np.full(num_classes, np.nan)
        dof = np.full(num_classes, np.nan)
        pv = np.full(num_classes, np.nan)
        if n_d >= 2 and n_p >= 2:
            res = _sps.ttest_ind(p - shift_p, d - shift_d, axis=0, equal_var=False)
            t, pv = np.asarray(res.statistic, float).copy(), np.asarray(res.pvalue, float).copy()
            dof = np.asarray(getattr(res, "df", np.full(num_classes, np.nan)), float).copy()
    diff = pruned_mean - dense_mean
    norm_diff = diff - (shift_p - shift_d)
    notes = [""] * num_classes
    for c in range(num_classes):
        if n_d < 2 or n_p < 2:
            notes[c] = f"fewer than 2 models (dense {n_d}, pruned {n_p}): no variance estimate"
            t[c] = pv[c] = dof[c] = np.nan
            continue
        if np.isnan(d[:, c]).any() or np.isnan(p[:, c]).any():
            notes[c] = "no test sample of this class (recall undefined)"
            t[c] = pv[c] = dof[c] = np.nan
            continue
        const_d, const_p = np.ptp(d[:, c]) == 0, np.ptp(p[:, c]) == 0
        if const_d and const_p:
            if d[0, c] == p[0, c]:
                notes[c] = f"every model of both populations has recall {d[0, c]:.6g}: no change, p = 1"
                t[c] = 0.0 if not normalized else np.nan
                pv[c], dof[c] = 1.0, np.nan
            else:
                notes[c] = "recall constant within each population but different: zero standard error, test undefined"
                t[c] = pv[c] = dof[c] = np.nan
    p_adj = adjust_p_values(pv, correction)
    significant = np.nan_to_num(p_adj, nan=np.inf) <= alpha
    frame = {"class": np.arange(num_classes)}
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        frame["class_name"] = list(class_names)
    frame.update(n_dense=n_d, n_pruned=n_p, dense_mean=dense_mean, pruned_mean=pruned_mean, diff=diff,
                 norm_diff=norm_diff, t=t, df=dof, p_value=pv, p_adjusted=p_adj, significant=significant,
                 correction=correction, normalized=normalized, note=notes)
    return pd.DataFrame(frame)


def class_recall_tests(
    dense_preds: torch.Tensor,
    pruned_preds: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    normalize: bool = True,
    alpha: float = 0.05,
    correction: str = "bh",
    class_names: Optional[Sequence[str]] = None,
) -> pd.DataFrame:
    """:func:`welch_per_class` straight from predictions: per-class recall of every model of
    both populations, and (``normalize``, default, as Hooker et al.'s code) each population's
    mean accuracy subtracted. dense_preds (M_d, N), pruned_preds (M_p, N), labels (N,)."""
    labels_t = torch.as_tensor(labels).long().cpu()
    rd = per_class_recall(dense_preds, labels_t, num_classes)
    rp = per_class_recall(pruned_preds, labels_t, num_classes)
    acc = {}
    if normalize:
        for name, preds in (("dense", dense_preds), ("pruned", pruned_preds)):
            acc[name] = (torch.as_tensor(preds).long().cpu() == labels_t).double().mean(1).numpy()
    return welch_per_class(rd, rp, alpha=alpha, correction=correction, dense_accuracy=acc.get("dense"),
                           pruned_accuracy=acc.get("pruned"), class_names=class_names)


# ------------------------------------------------------------------------ permutation test
@dataclass
class PermutationResult:
    """Result of :func:`permutation_test_more_pies`.

    observed_diff: n_scl - n_sup (= scl_only - sup_only). p_value: Monte-Carlo permutation
    p-value, (1 + #{perm stat >= observed}) / (n_perm + 1) for "greater" (Phipson & Smyth 2010,
    never 0). p_exact: the exact p-value of the same test (binomial on discordant samples).
    """

    observed_diff: int
    p_value: float
    p_exact: float
    n_perm: int
    n_sup: int
    n_scl: int
    sup_only: int
    scl_only: int
    n_discordant: int
    alternative: str = "greater"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def permutation_test_more_pies(
    sup_mask: ArrayLike,
    scl_mask: ArrayLike,
    n_perm: int = 10000,
    seed=0,
    alternative: str = "greater",
) -> PermutationResult:
    """Paired permutation test of "SCL has more PIEs than Sup" at one (method, sparsity).

    Data: two PIE indicators on the same N test samples, s_i (Sup) and r_i (SCL). Statistic:
    T = sum_i (r_i - s_i) = n_SCL - n_Sup.

    H0 (exchangeability of the loss labels within each sample): for every test sample, the
    pair (Sup PIE indicator, SCL PIE indicator) is as likely as its swap, i.e. among samples
    that are a PIE for exactly one loss, being SCL-only and being Sup-only are equally likely
    (equivalently P(PIE | SCL) = P(PIE | Sup) given the observed pairs). H1 ("greater"): SCL
    is the PIE more often, T > 0. Permutation: swap each sample's two indicators with
    probability 1/2. Concordant samples (both or neither) contribute 0, so T* is a sum of
    d = #discordant independent random signs, and P(T* >= T) = P(K >= scl_only) with
    K ~ Binomial(d, 1/2): the exact one-sided McNemar test, given as ``p_exact``.

    What it does not cover: the PIE sets are held fixed, so this is a statement about this
    test set given these populations; variability from training seeds is not in the null.
    :func:`pie_difference_ci` gives the model-resampling view; report both.

    Args:
        sup_mask, scl_mask: (N,) bool PIE masks (same test samples, same order).
        n_perm: Monte-Carlo sign-flip permutations (vectorised in chunks).
        alternative: "greater" (default, SCL more), "less", or "two-sided" (|T*| >= |T|).

    Identical masks: d = 0, T = T* = 0, p_value = p_exact = 1.
    """
    s = _as_numpy(sup_mask, dtype=bool)
    r = _as_numpy(scl_mask, dtype=bool)
    if s.shape != r.shape or s.ndim != 1:
        raise ValueError(f"masks must be (N,) of the same length, got {s.shape}, {r.shape}")
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    scl_only, sup_only = int((r & ~s).sum()), int((s & ~r).sum())
    d = scl_only + sup_only
    observed = scl_only - sup_only
    signs = np.concatenate([np.ones(scl_only), -np.ones(sup_only)]).astype(np.float32)

    rng = _rng(seed)
    hits = 0
    chunk = max(1, _BLOCK_ELEMS // max(1, d))
    for start in range(0, n_perm, chunk):
        b = min(chunk, n_perm - start)
        if d == 0:
            perm = np.zeros(b)
        else:
            flips = rng.integers(0, 2, size=(b, d), dtype=np.int8).astype(np.float32) * 2 - 1
            perm = flips @ signs
        if alternative == "greater":
            hits += int((perm >= observed).sum())
        elif alternative == "less":
            hits += int((perm <= observed).sum())
        else:
            hits += int((np.abs(perm) >= abs(observed)).sum())
    p_value = (1 + hits) / (n_perm + 1)

    # exact: T* = 2K - d, K ~ Binomial(d, 1/2)
    if alternative == "greater":
        p_exact = float(_sps.binom.sf(scl_only - 1, d, 0.5))
    elif alternative == "less":
        p_exact = float(_sps.binom.cdf(scl_only, d, 0.5))
    else:
        if observed == 0:
            p_exact = 1.0
        else:
            hi = (d + abs(observed)) // 2  # K >= hi  <=>  T* >= |T|
            p_exact = float(min(1.0, _sps.binom.sf(hi - 1, d, 0.5) + _sps.binom.cdf(d - hi, d, 0.5)))
    return PermutationResult(observed_diff=observed, p_value=float(p_value), p_exact=p_exact, n_perm=n_perm,
                             n_sup=int(s.sum()), n_scl=int(r.sum()), sup_only=sup_only, scl_only=scl_only,
                             n_discordant=d, alternative=alternative)


# ------------------------------------------------------------------------ integration helper
def population_cis(
    acc: Optional[ArrayLike] = None,
    per_sample: Optional[Mapping[str, ArrayLike]] = None,
    depth: Optional[ArrayLike] = None,
    pd_mask: Optional[ArrayLike] = None,
    dense_preds: Optional[torch.Tensor] = None,
    pruned_preds: Optional[torch.Tensor] = None,
    num_classes: Optional[int] = None,
    tie_break: str = "min",
    n_boot: int = 1000,
    level: float = 0.95,
    seed=0,
) -> Dict[str, float]:
    """CI columns of one populations.csv row, named to sit beside eval's mean columns.

    acc: (M,) per-model accuracies as fractions -> ``acc_ci_low/high`` in percent (like acc_mean).
    per_sample: {name: (M, N)} per-model per-sample scores, e.g. {"q": ..., "z": ..., "l1": ...}
        -> ``<name>_ci_low/high`` (CI of ``<name>_mean``).
    depth (M_d, N) with pd_mask (N,) bool -> ``pd_pie_ci_*`` and ``pd_nonpie_ci_*``.
    dense_preds (M_d, N), pruned_preds (M_p, N), num_classes -> ``pie_count_ci_*``.
    Every interval uses the same seed (so populations of equal size share resample indices).
    Omitted inputs give no columns.
    """
    cols: Dict[str, float] = {}
    kw = dict(n_boot=n_boot, level=level, seed=seed)
    if acc is not None:
        cols.update(bootstrap_ci(acc, **kw).columns("acc", scale=100.0))
    for name, values in (per_sample or {}).items():
        cols.update(population_mean_ci(values, **kw).columns(name))
    if depth is not None and pd_mask is not None:
        m = _as_numpy(pd_mask, dtype=bool)
        cols.update(population_mean_ci(depth, m, **kw).columns("pd_pie"))
        cols.update(population_mean_ci(depth, ~m, **kw).columns("pd_nonpie"))
    if dense_preds is not None and pruned_preds is not None:
        if num_classes is None:
            raise ValueError("num_classes is needed for the PIE count interval")
        cols.update(pie_count_ci(dense_preds, pruned_preds, num_classes, tie_break, **kw).columns("pie_count"))
    return cols
