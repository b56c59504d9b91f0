"""Significance: intervals and tests over populations (whatislost.stats does the arithmetic).

Per pruned population: per-class Welch tests of its models' class recall against its dense
reference's (Hooker et al. 2019); per (method, sparsity): a permutation test of "SCL has more
PIEs than Sup" with a bootstrap interval of the difference; warnings where the tie rule of the
modal labels could change a conclusion. Every interval is a 95% bootstrap interval, every
resample drawn from numpy's default_rng(STATS_SEED): reproducible.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cli import UserError, warn
from .metrics import pie_mask
from .populations import reference_preds
from .stats import (adjust_p_values, class_recall_tests, permutation_test_more_pies, pie_difference_ci,
                    ties_could_flip)


CI_LEVEL = 0.95  # every interval the eval writes is a 95% bootstrap interval


STATS_SEED = 0  # bootstrap resamples and permutations are drawn from numpy's default_rng(STATS_SEED): reproducible


CORRECTIONS = ("bh", "holm", "bonferroni", "none")


def check_stats(n_boot: int = 1000, n_perm: int = 10000, alpha: float = 0.05, correction: str = "bh"):
    """UserError (one line) for statistics settings that cannot work; run_eval checks them before any model is loaded."""
    for name, value, least in (("n_boot", n_boot, 0), ("n_perm", n_perm, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"{name} must be a whole number >= {least}; got {value}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise UserError(f"alpha must be a number between 0 and 1; got {alpha}")
    if correction not in CORRECTIONS:
        raise UserError(f"correction must be one of {', '.join(CORRECTIONS)}; got '{correction}'")


def other_rule(tie_break: str) -> str:
    return "max" if tie_break == "min" else "min"


RECALL_KEYS = ["dataset", "model", "population", "reference", "loss", "method", "sparsity"]


def class_tests(scored: dict, pies: dict, stats: dict) -> pd.DataFrame:
    """Per pruned population with PIEs and per class: Welch's t-test of its models' class recall against its dense
    reference's (Hooker et al. 2019, each population's mean accuracy subtracted first, as their code does), p-values
    corrected over the classes of the population (stats.class_recall_tests)."""
    frames = []
    for key in pies:
        pop = scored[key]
        dense_preds, pruned_preds = reference_preds(scored, key)
        table = class_recall_tests(dense_preds, pruned_preds, pop.data.test_y, pop.data.num_classes, normalize=True,
                                   alpha=stats["alpha"], correction=stats["correction"],
                                   class_names=[str(c) for c in pop.data.classes])
        table = table.rename(columns={"class": "cls"})
        table.insert(2, "support", torch.bincount(pop.data.test_y, minlength=pop.data.num_classes).numpy())
        for i, (name, value) in enumerate(zip(RECALL_KEYS, (key.dataset, key.model, key.label, pop.reference.label,
                                                            key.loss, key.method, key.sparsity))):
            table.insert(i, name, value)
        frames.append(table)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def add_recall_counts(rows: list, tests: pd.DataFrame):
    """recall_classes_down / _up in each pruned population's row: classes whose recall changed significantly."""
    if tests.empty:
        return
    for row in rows:
        mine = tests[(tests.dataset == row["dataset"]) & (tests.model == row["model"])
                     & (tests.population == row["population"])]
        if not mine.empty:
            row["recall_classes_down"] = int((mine.significant & (mine.norm_diff < 0)).sum())
            row["recall_classes_up"] = int((mine.significant & (mine.norm_diff > 0)).sum())


def pie_comparisons(scored: dict, pies: dict, ties: dict, tie_break: str, stats: dict) -> pd.DataFrame:
    """'SCL has more PIEs than Sup' at each (group, method, sparsity) with both: a paired permutation test on the
    test samples (stats.permutation_test_more_pies, one-sided), its p-values corrected over the group's
    comparisons, the same under the other tie rule, a bootstrap interval of the difference resampling the models
    of all four populations, and whether the tie rule could reverse which loss has more PIEs."""
    rows = []
    other = other_rule(tie_break)
    for key in sorted(pies, key=lambda k: (k.group, k.method, k.sparsity)):
        partners = [k for k in pies if k.loss == "supcon" and (k.group, k.method, k.sparsity)
                    == (key.group, key.method, key.sparsity)]
        if key.loss != "ce" or len(partners) != 1:
            continue
        scl = partners[0]
        (sup_d, sup_p), (scl_d, scl_p) = reference_preds(scored, key), reference_preds(scored, scl)
        num_classes = scored[key].data.num_classes
        test = permutation_test_more_pies(pies[key]["mask"], pies[scl]["mask"], n_perm=stats["n_perm"],
                                          seed=stats["seed"])
        test_other = permutation_test_more_pies(pie_mask(sup_d, sup_p, num_classes, other)[0],
                                                pie_mask(scl_d, scl_p, num_classes, other)[0], n_perm=stats["n_perm"],
                                                seed=stats["seed"])
        row = dict(dataset=key.dataset, model=key.model, method=key.method, sparsity=key.sparsity,
                   sup_population=key.label, scl_population=scl.label, n_sup=test.n_sup, n_scl=test.n_scl,
                   sup_only=test.sup_only, scl_only=test.scl_only, n_discordant=test.n_discordant,
                   diff=test.observed_diff, p_value=test.p_value, p_exact=test.p_exact, n_perm=test.n_perm)
        if stats["n_boot"]:
            ci = pie_difference_ci(sup_d, sup_p, scl_d, scl_p, num_classes, tie_break, n_boot=stats["n_boot"],
                                   level=stats["level"], seed=stats["seed"])
            row.update(ci.columns("diff"), p_boot_not_greater=ci.extra.get("p_not_greater", math.nan))
        sup_tie, scl_tie = ties[key], ties[scl]
        row.update(n_sup_other=test_other.n_sup, n_scl_other=test_other.n_scl, p_value_other=test_other.p_value,
                   ties_could_flip=ties_could_flip(scl_tie["pie_count_min"], scl_tie["pie_count_max"],
                                                   sup_tie["pie_count_min"], sup_tie["pie_count_max"]),
                   ties_could_flip_any=ties_could_flip(scl_tie["pie_count_lower"], scl_tie["pie_count_upper"],
                                                       sup_tie["pie_count_lower"], sup_tie["pie_count_upper"],
                                                       conservative=True))
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    # one family of tests per (dataset, model): every method and sparsity compared there
    for suffix in ("", "_other"):
        adjusted = pd.Series(np.nan, index=frame.index)
        for _, part in frame.groupby(["dataset", "model"], sort=False):
            adjusted[part.index] = adjust_p_values(part[f"p_value{suffix}"].to_numpy(), stats["correction"])
        frame[f"p_adjusted{suffix}"] = adjusted
        frame[f"significant{suffix}"] = frame[f"p_adjusted{suffix}"] <= stats["alpha"]
    frame["conclusion_depends_on_ties"] = frame.ties_could_flip | (frame.significant != frame.significant_other)
    columns = [c for c in frame.columns if not c.endswith("_other") and c not in ("ties_could_flip", "ties_could_flip_any",
                                                                                  "conclusion_depends_on_ties")]
    return frame[columns + [c for c in frame.columns if c not in columns]]


def warn_ties(scored: dict, ties: dict, comparisons: pd.DataFrame, tie_break: str, log: list):
    """Warn where the rule that breaks tied modal labels (--tie-break) could change a conclusion: a PIE count that
    moves by more than 5% under the other rule, a Sup-vs-SCL comparison whose winner or significance changes."""
    other = other_rule(tie_break)
    by_group = defaultdict(list)
    for key, tie in ties.items():
        if tie["warn"]:
            by_group[key.group].append(f"{key.label} {tie[f'pie_count_{tie_break}']} -> {tie[f'pie_count_{other}']} "
                                       f"({tie['n_tied']} of {len(scored[key].data.test_y)} samples tied)")
    for group, items in by_group.items():
        warn(f"{group}: PIE counts change by more than 5% under --tie-break {other}: {'; '.join(items)}. Tied modal "
              "labels are common with few models per population; more seeds make PIE counts firmer", log)
    if comparisons.empty:
        return
    for r in comparisons[comparisons.conclusion_depends_on_ties].itertuples():
        from .identity import method_name, sparsity_label

        warn(f"{r.dataset}-{r.model}: whether SCL has more PIEs than Sup at {method_name(r.method)} "
              f"{sparsity_label(r.sparsity / 100)}% depends on the tie rule: Sup {r.n_sup} vs SCL {r.n_scl} with "
              f"--tie-break {tie_break} (adjusted permutation p {r.p_adjusted:.3g}), Sup {r.n_sup_other} vs SCL "
              f"{r.n_scl_other} with {other} (p {r.p_adjusted_other:.3g})", log)


def write_significance(out: Path, recall_tests: pd.DataFrame, comparisons: pd.DataFrame):
    """tables/class_recall_tests.csv and tables/pie_comparison.csv (written only when there is something in them)."""
    if not recall_tests.empty:
        recall_tests.to_csv(out / "tables" / "class_recall_tests.csv", index=False, float_format="%.6g")
    if not comparisons.empty:
        comparisons.to_csv(out / "tables" / "pie_comparison.csv", index=False, float_format="%.6g")
