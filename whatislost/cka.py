"""Representation similarity, dense versus pruned: linear CKA per probe (Kornblith et al. 2019; beyond the paper).

For every pruned population, at every prediction-depth probe, the CKA (metrics.linear_cka_matrix)
between each of its models and each model of its dense reference on the same test images, with
a 95% bootstrap interval resampling the models of both; within each dense population, the
seed-to-seed baseline. Computed batched over model pairs on the eval's device, as populations
are scored (the probe tensors are freed once nothing needs them).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cli import warn
from .metrics import linear_cka_matrix, mean_std
from .populations import Population
from .significance import CI_LEVEL, STATS_SEED
from .stats import resample_weights


CKA_COLUMNS = ["group", "dataset", "model", "loss", "method", "sparsity", "population", "reference", "probes", "probe",
               "probe_dim", "n_samples", "n_models", "n_reference_models", "n_pairs", "cka_mean", "cka_std",
               "cka_ci_low", "cka_ci_high"]


def cka_matrices(pop: Population, ref: Population, device) -> np.ndarray:
    """(P, M, M_ref) float64: linear CKA (metrics.linear_cka_matrix) of every model of `pop` against every model of
    `ref` at each probe, from the models' `probes` representations, computed on `device`."""
    num_probes = min(len(o["probes"]) for o in pop.outputs + ref.outputs)
    per_probe = []
    for p in range(num_probes):
        xs = torch.stack([o["probes"][p] for o in pop.outputs])
        ys = None if ref is pop else torch.stack([o["probes"][p] for o in ref.outputs])
        per_probe.append(linear_cka_matrix(xs, ys, device=device).cpu().numpy())
    return np.stack(per_probe)


def cka_intervals(k: np.ndarray, within: bool, n_boot: int, level: float = 0.95, seed=0):
    """Percentile bootstrap interval of the mean CKA at each probe, (low (P,), high (P,)), resampling models.

    k: (P, A, B) CKA of A models against B models. Between two populations the A and the B models are resampled
    independently and a replicate is the mean over all A x B pairs of the resamples (the same resamples at every
    probe). Within one population (k: A x A, `within`) a replicate is the mean over the pairs of two different
    models of the resample (copies of one model are not a pair); resamples of a single model are left out. NaN
    without resamples, with fewer than 2 models a side (3 within: 2 models make one pair, no spread) or a NaN CKA."""
    num_probes, num_a, num_b = k.shape
    nan = np.full(num_probes, math.nan)
    if not n_boot or num_a < (3 if within else 2) or num_b < (3 if within else 2) or not np.isfinite(k).all():
        return nan, nan
    rng = np.random.default_rng(seed)
    w_a = resample_weights(num_a, n_boot, rng).astype(np.float64)
    if within:
        off = k.copy()
        off[:, np.arange(num_a), np.arange(num_a)] = 0.0
        pairs = num_a * num_a - (w_a ** 2).sum(axis=1)  # ordered pairs of different models in each resample
        keep = pairs > 0
        boot = np.einsum("ra,pab,rb->rp", w_a[keep], off, w_a[keep], optimize=True) / pairs[keep, None]
    else:
        w_b = resample_weights(num_b, n_boot, rng).astype(np.float64)
        boot = np.einsum("ra,pab,rb->rp", w_a, k, w_b, optimize=True) / (num_a * num_b)
    low, high = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    return low, high


def cka_rows(pop: Population, ref: Population, device, stats: dict, probes: str, log: list) -> list[dict]:
    """tables/cka.csv rows of one population, one per probe: the mean (and std) of the linear CKA over every pair
    (model of pop, model of its dense reference) and its 95% bootstrap interval (`cka_intervals`). With ref = pop
    (a dense population): the pairs of its different models, the seed-to-seed baseline."""
    within = ref is pop
    k = cka_matrices(pop, ref, device)
    num_probes, num_a, num_b = k.shape
    upper = np.triu_indices(num_a, 1)
    pairs = k[:, upper[0], upper[1]] if within else k.reshape(num_probes, -1)
    low, high = cka_intervals(k, within, int(stats.get("n_boot", 0)), stats.get("level", CI_LEVEL),
                              stats.get("seed", STATS_SEED))
    undefined = [str(p + 1) for p in range(num_probes) if np.isnan(pairs[p]).any()]
    if undefined:
        warn(f"population {pop.key.label} ({pop.key.group}): linear CKA undefined (NaN) at probe(s) "
              f"{', '.join(undefined)}: a model's representation there is constant over the test images or not "
              "finite", log)
    key = pop.key
    rows = []
    for p in range(num_probes):
        mean, std = mean_std(torch.from_numpy(pairs[p]))
        rows.append(dict(group=key.group, dataset=key.dataset, model=key.model, loss=key.loss, method=key.method,
                         sparsity=key.sparsity, population=key.label, reference=ref.key.label, probes=probes,
                         probe=p + 1, probe_dim=int(pop.outputs[0]["probes"][p].shape[1]),
                         n_samples=int(pop.outputs[0]["probes"][p].shape[0]), n_models=num_a, n_reference_models=num_b,
                         n_pairs=pairs.shape[1], cka_mean=mean, cka_std=std, cka_ci_low=float(low[p]),
                         cka_ci_high=float(high[p])))
    return rows


def cka_step(pops: dict, scored: dict, visited: set, done: set, rows: list, device, stats: dict, probes: str,
             log: list, final: bool = False):
    """The CKA rows that can be computed now (called after each population is scored, and once at the end with
    `final`): each pruned population against its dense reference once that is scored, each dense population's
    seed-to-seed baseline (2+ models). Then drops the probe representations nothing still waits for, so that only
    the dense populations of the current loss and one pruned population are held at a time (populations are scored
    dense first). visited: the populations whose scoring was tried; done: those whose CKA is settled."""
    for key, pop in scored.items():
        if key in done:
            continue
        if pop.is_dense:
            if len(pop.outputs) >= 2:
                rows += cka_rows(pop, pop, device, stats, probes, log)
        elif pop.reference in scored:
            rows += cka_rows(pop, scored[pop.reference], device, stats, probes, log)
        elif pop.reference is not None and pop.reference not in visited and not final:
            continue  # its dense reference is still to be scored
        elif pop.reference is not None:
            warn(f"population {key.label} ({key.group}): its dense reference {pop.reference.label} could not be "
                  "scored: no CKA", log)
        done.add(key)
    waiting = {p.reference for k, p in pops.items()
               if not p.is_dense and k not in done and (k not in visited or k in scored)}
    for key, pop in scored.items():
        if key in done and key not in waiting:
            for o in pop.outputs:
                o.pop("probes", None)


def write_cka(out: Path, rows: list):
    """tables/cka.csv (header only when no population could be compared)."""
    pd.DataFrame(rows, columns=CKA_COLUMNS).to_csv(out / "tables" / "cka.csv", index=False, float_format="%.6g")
