"""Eval stage: score populations of finished runs. `whatislost-eval RUNS_DIR`.

Finished run directories (done.json present) anywhere under RUNS_DIR are grouped into
populations by their identity (identity.py: data content, architecture, loss, every training
setting, the recipe as applied, the exact target sparsity; not the seed). Runs that share a
label (Sup/GMP/90) but not an identity are scored as separate, visibly labelled populations.
Each pruned population is compared with its dense reference: the dense population it
started from (One-Shot), else the dense population with the same data, architecture, loss
and training settings. Each population is scored on its own data, checked against the
fingerprint its runs recorded. One forward pass per model over the test set gives predicted
labels and the representation h; models used for prediction depth also pass the training
set once for the kNN probes. Per-model results are cached next to the checkpoint, keyed by
the checkpoint's and the data's content, so reruns skip them. A model whose outputs are not
finite is left out with a warning.

Metrics (Corti et al. 2022): accuracy, PIEs (Hooker et al. 2019), Q-Score (Kalibhat et
al. 2022), prediction depth (Baldock et al. 2021), UMAP of h; beyond the paper (not in the default
metrics): `cka`, linear CKA (Kornblith et al. 2019) per probe between every model of each pruned
population and every model of its dense reference, on a fixed subset of --cka-samples test images
(and within each dense population, the seed-to-seed baseline). Statistics (whatislost.stats):
95% bootstrap intervals resampling each population's models (PIE counts: the models of both
populations), the tied samples and the PIE count under the other tie rule, per-class Welch
tests of dense vs pruned recall (Hooker et al.), and a permutation test of "SCL has more PIEs
than Sup"; warnings where the tie rule could change a conclusion. Output, default RUNS_DIR/eval:

    summary.json                      every population's numbers, warnings, eval and statistics settings, timing
    tables/populations.csv            one row per population (all metrics: mean, std, <metric>_ci_low/_ci_high)
    tables/table1|4|5|6.{csv,md}      the paper's tables (whatislost.tables)
    tables/per_sample_<group>.csv     sample id, true label, per population: modal label, PIE, Q, PD
    tables/pie_per_class.csv, pie_overlap.csv   PIE counts by true class; Sup vs SCL PIE sets
    tables/class_recall_tests.csv     per pruned population and class: Welch t-test, p_value, p_adjusted, significant
    tables/pie_comparison.csv         per (method, sparsity): Sup vs SCL PIE counts, permutation p_value, p_adjusted
    tables/cka.csv                    (cka) per population and probe: linear CKA with its dense reference, 95% CI
    figdata/umap_<group>.csv          UMAP coordinates (first model and population mean), aligned to the dense layout
    figdata/pie_images_<group>.npz    the test images of every PIE (for the gallery figure)
    figdata/training_<group>.csv      every run's metrics.csv; layer_sparsity_<group>.csv: first runs' layer_sparsity.csv
    .whatislost-eval                  the files this eval (and its report) wrote (whatislost.evalfolder)

Outputs are written to a staging folder and moved into place, summary.json last. An eval into a
folder that holds an earlier eval removes that eval's outputs it does not write again (Tables
5-6 without qscore/depth, figures, report), and nothing else; a non-empty folder that is not an
eval folder is refused before any model is loaded.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cka import cka_step, write_cka
from .cli import UserError, progress, run_cli, timed, warn
from .config import resolve_device
from .identity import DENSE
from .metrics import mean_std, q_score
from .populations import (CKA_SAMPLES, Population, accuracy_mean_std, assign_references, cached_run_data,
                          collect_populations, find_pies, load_population_data, probe_count, reference_preds,
                          score_population)
from .rundir import find_runs
from .significance import (CI_LEVEL, CORRECTIONS, STATS_SEED, add_recall_counts, check_stats, class_tests,
                           other_rule, pie_comparisons, warn_ties, write_significance)
from .stats import bootstrap_ci, pie_count_ci, population_mean_ci, tie_report
from .tables import write_tables

ALL_METRICS = ("acc", "pie", "qscore", "depth", "umap", "cka")
DEFAULT_METRICS = ("acc", "pie", "qscore", "depth", "umap")  # cka: asked for by name (beyond the paper)
PROBE_LAYOUTS = ("authors", "blocks")  # models.Encoder.forward(probes=...)
DEPTH_TRAIN = ("clean", "augmented")  # training images the depth kNN is fitted on


def check_settings(metrics=None, depth_models: int = 5, knn_k: int = 30, device: str = "cpu", probes: str = "authors",
                   depth_train: str = "clean", tie_break: str = "min", depth_reference: str = "label",
                   cka_samples: int = CKA_SAMPLES):
    """UserError (one line) for eval settings that cannot work; the study checks its eval block with this before
    anything trains, run_eval before any model is loaded."""
    unknown = sorted(set(metrics or ()) - set(ALL_METRICS))
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}")
    if isinstance(depth_models, bool) or not isinstance(depth_models, int) or depth_models < 0:
        raise UserError(f"depth_models must be a whole number >= 0; got {depth_models}")
    if isinstance(knn_k, bool) or not isinstance(knn_k, int) or knn_k < 1:
        raise UserError(f"knn_k must be a whole number >= 1; got {knn_k}")
    if isinstance(cka_samples, bool) or not isinstance(cka_samples, int) or cka_samples < 0:
        raise UserError(f"cka_samples must be a whole number >= 0 (0: every test image); got {cka_samples}")
    for name, value, allowed in (("device", device, ("cpu", "cuda", "auto")), ("probes", probes, PROBE_LAYOUTS),
                                 ("depth_train", depth_train, DEPTH_TRAIN), ("tie_break", tie_break, ("min", "max")),
                                 ("depth_reference", depth_reference, ("label", "prediction"))):
        if value not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)}; got '{value}'")








# ---------------------------------------------------------------- per-model outputs (cached)








# ---------------------------------------------------------------- populations






def population_row(pop: Population, pie: dict | None, pd_mask: torch.Tensor | None, dense: Population | None = None,
                   tie: dict | None = None, tie_break: str = "min", stats: dict | None = None,
                   probes: str | None = None) -> dict:
    """Population-level numbers for populations.csv / summary.json: means and stds, and with `stats` (n_boot > 0)
    95% bootstrap intervals resampling the population's models (`<metric>_ci_low`, `<metric>_ci_high`).

    pie: this population's PIE mask and tie count (pruned populations), with dense: its dense reference (for the
    PIE count's interval, which resamples the models of both); tie: stats.tie_report of the pair (the count under
    the other tie rule, bounds over any tie resolution); pd_mask: the PIE set that splits its PD-Scores into PIEs
    and non-PIEs (own PIEs, or for a dense population the union of its loss's PIE sets)."""
    k = pop.key
    row = dict(dataset=k.dataset, model=k.model, loss=k.loss, method=k.method, sparsity=k.sparsity,
               population=k.label, population_id=k.population, n_models=len(pop.outputs), modal_tied=pop.modal_tied,
               reference=pop.reference.label if pop.reference else "", runs=[str(r[1]) for r in pop.runs])
    if pop.data is not None:
        row["n_test"] = len(pop.data.test_y)
    n_boot = int((stats or {}).get("n_boot", 0))
    kw = dict(n_boot=n_boot, level=stats.get("level", CI_LEVEL), seed=stats.get("seed", STATS_SEED)) if n_boot else None
    row["acc_mean"], row["acc_std"] = accuracy_mean_std(pop)
    if kw:
        row.update(bootstrap_ci([float(o["acc"]) for o in pop.outputs], **kw).columns("acc", scale=100.0))
    if pie is not None:
        row["pie_count"] = int(pie["mask"].sum())
        if kw and dense is not None:
            dense_preds = torch.stack([o["preds"] for o in dense.outputs])
            pruned_preds = torch.stack([o["preds"] for o in pop.outputs])
            row.update(pie_count_ci(dense_preds, pruned_preds, pop.data.num_classes, tie_break, **kw).columns("pie_count"))
        row["pie_tied"] = pie["tied"]
        if tie is not None:
            row["pie_count_other"] = tie[f"pie_count_{other_rule(tie_break)}"]
            row["pie_count_lower"], row["pie_count_upper"] = tie["pie_count_lower"], tie["pie_count_upper"]
            row["pie_tie_warning"] = bool(tie["warn"])
    if pop.q is not None:
        per_model = [q_score(o["h"]) for o in pop.outputs] if kw else None
        for name in ("q", "z", "l1"):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(pop.q[name])
            if kw:
                row.update(population_mean_ci(torch.stack([q[name] for q in per_model]), **kw).columns(name))
        row["q_nan"] = int(torch.isnan(pop.q["q"]).sum())  # samples whose Q is NaN (a model's h had NaN/inf)
    if pop.depth is not None and pd_mask is not None:
        row["depth_models"] = pop.n_depth
        if probes:
            row["n_probes"] = probe_count(pop, probes)
        per_model_depth = torch.stack([o["depth"] for o in pop.outputs if "depth" in o]) if kw else None
        for part, mask in (("pd_pie", pd_mask), ("pd_nonpie", ~pd_mask)):
            row[f"{part}_mean"], row[f"{part}_std"] = mean_std(pop.depth[mask])
            row[f"{part}_n"] = int(mask.sum())
            if kw:
                row.update(population_mean_ci(per_model_depth, mask, **kw).columns(part))
    return row




def umap_coordinates(h: torch.Tensor, seed: int = 0, init: np.ndarray | None = None) -> np.ndarray:
    """(N, D) -> (N, 2) UMAP embedding (umap-learn; imported here: it costs ~20 s of numba start-up).

    With `init` (an (N, 2) layout of the same samples, e.g. the dense population's), the optimisation starts from
    that layout and the result is then rotated, reflected, scaled and shifted onto it (`procrustes`), so panels of
    one figure share a frame: a sample sits where it sat in the reference unless this representation moved it."""
    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if init is None:
            return umap.UMAP(n_components=2, random_state=seed).fit_transform(h.numpy())
        xy = umap.UMAP(n_components=2, random_state=seed, init=np.asarray(init, dtype=np.float32)).fit_transform(h.numpy())
    return procrustes(xy, init)


def procrustes(xy: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """xy rotated (or reflected), uniformly scaled and shifted to lie as close as possible to ref (least squares)."""
    xy, ref = np.asarray(xy, np.float64), np.asarray(ref, np.float64)
    a, b = xy - xy.mean(0), ref - ref.mean(0)
    u, s, vt = np.linalg.svd(a.T @ b)
    norm = float((a ** 2).sum())
    scale = float(s.sum()) / norm if norm > 0 else 1.0
    return a @ (u @ vt) * scale + ref.mean(0)


# ---------------------------------------------------------------- the whole evaluation




# ---------------------------------------------------------------- representation similarity (cka)














def run_eval(runs_dir, out=None, device="cpu", metrics=DEFAULT_METRICS, depth_models: int = 5, knn_k: int = 30,
             tie_break: str = "min", depth_reference: str = "label", report: bool = True, probes: str = "authors",
             depth_train: str = "clean", n_boot: int = 1000, n_perm: int = 10000, alpha: float = 0.05,
             correction: str = "bh", cka_samples: int = CKA_SAMPLES) -> Path:
    """Score every population under runs_dir; write tables, summary.json, figure data and the report;
    return the eval dir. n_boot: bootstrap resamples of each 95% interval (0: none); n_perm: permutations of the
    Sup-vs-SCL PIE test; alpha, correction: significance level and multiple-testing correction of the tests;
    cka_samples: test images the cka metric uses (0: all)."""
    metrics = tuple(metrics or DEFAULT_METRICS)
    check_settings(metrics, depth_models, knn_k, device, probes, depth_train, tie_break, depth_reference, cka_samples)
    check_stats(n_boot, n_perm, alpha, correction)
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"runs folder not found: {runs_dir}")
    out = Path(out) if out else runs_dir / "eval"
    device = resolve_device(device).type
    from .evalfolder import check_out_folder

    check_out_folder(out)  # a folder that is not ours, or not writable: refused before anything is loaded
    data_cache: dict = {}  # source -> ImageData (or the UserError loading it gave), shared by all that needs data
    if "depth" in metrics and depth_models > 0:
        check_knn_k(runs_dir, knn_k, data_cache)
    log: list = []
    pops = collect_populations(runs_dir, log)
    if not pops:
        raise UserError(f"no finished runs (done.json) under {runs_dir}")
    assign_references(pops, log)

    scored, n_computed = {}, 0
    timing: dict = {}
    stats = dict(n_boot=n_boot, level=CI_LEVEL, seed=STATS_SEED, n_perm=n_perm, alpha=alpha, correction=correction)
    cka, visited, cka_done = [], set(), set()  # tables/cka.csv rows, computed while the populations are scored
    order = sorted(pops, key=lambda k: (k.group, k.loss, k.method != DENSE, k.method, k.sparsity, k.population))
    with timed("scoring", timing):
        for key in progress(order, "scoring", "population"):
            pop = pops[key]
            visited.add(key)
            data = load_population_data(pop, data_cache, log)
            if data is not None:
                n_computed += score_population(pop, data, device, metrics, depth_models, knn_k, depth_reference,
                                               tie_break, log, probes, depth_train, cka_samples)
                if pop.outputs:
                    scored[key] = pop
            if "cka" in metrics:
                with timed("cka", timing):
                    cka_step(pops, scored, visited, cka_done, cka, device, stats, probes, log)
    if "cka" in metrics:  # CKA's forward passes count as scoring, its comparisons as cka
        timing["scoring"] = round(timing["scoring"] - timing.get("cka", 0.0), 3)
        timing["cka"] = timing.pop("cka", 0.0)  # listed after scoring
        with timed("cka", timing):
            cka_step(pops, scored, visited, cka_done, cka, device, stats, probes, log, final=True)
    if not scored:
        raise UserError(f"nothing could be scored under {runs_dir} (see warnings above)")

    pies = find_pies(scored, tie_break, log) if "pie" in metrics else {}
    # the dense row of Table 6 splits its PD-Scores by the union of the PIE sets of every population it is the
    # reference of (every method and sparsity of its loss)
    pd_masks = {key: pie["mask"] for key, pie in pies.items()}
    for key, pop in scored.items():
        unions = [pie["mask"] for k, pie in pies.items() if pop.is_dense and scored[k].reference == key]
        if unions:
            pd_masks[key] = torch.stack(unions).any(0)

    from .evalfolder import MARKER, atomic_write_text, commit_outputs, lingering_files, staged_outputs

    with timed("statistics", timing):
        ties = {key: tie_report(*reference_preds(scored, key), scored[key].data.num_classes) for key in pies}
        rows = [population_row(pop, pies.get(key), pd_masks.get(key), dense=scored.get(pop.reference), tie=ties.get(key),
                               tie_break=tie_break, stats=stats, probes=probes)
                for key, pop in progress(scored.items(), "intervals", "population", total=len(scored))]
        recall_tests = class_tests(scored, pies, stats)
        add_recall_counts(rows, recall_tests)
        comparisons = pie_comparisons(scored, pies, ties, tie_break, stats)
        warn_ties(scored, ties, comparisons, tie_break, log)
    warn_bad_values(scored, log)
    populations = pd.DataFrame(rows, columns=ordered_columns(rows))
    summary = dict(runs_dir=str(runs_dir), settings=dict(metrics=list(metrics), depth_models=depth_models, knn_k=knn_k,
                                                          tie_break=tie_break, depth_reference=depth_reference, device=device,
                                                          probes=probes, depth_train=depth_train,
                                                          **({"cka_samples": cka_samples} if "cka" in metrics else {})),
                   statistics=stats, populations=rows, warnings=log,
                   models_scored=sum(len(p.outputs) for p in scored.values()),
                   models_computed=n_computed, evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S"), timing=timing)
    # everything is written into a staging folder inside `out`, then moved into place (summary.json last);
    # what an earlier eval wrote there and this one does not (its Table 6, figures, report) is removed
    with staged_outputs(out) as stage:
        for folder in (stage / "tables", stage / "figdata"):
            folder.mkdir()
        if "umap" in metrics:
            with timed("umap", timing):
                write_umap(stage, scored, pies)
        with timed("write", timing):
            populations.drop(columns=["runs"]).to_csv(stage / "tables" / "populations.csv", index=False)
            write_per_sample(stage, scored, pies, "depth" in metrics)
            write_pie_breakdowns(stage, scored, pies)
            write_significance(stage, recall_tests, comparisons)
            if "cka" in metrics:
                write_cka(stage, cka)
            write_training(stage, scored, log)
            write_tables(populations, stage / "tables", tie_break)
        for rel in lingering_files(out, stage):
            warn(f"{out / rel} was not written by whatislost-eval (not in {MARKER}) and is left as it is, "
                  "but the report may show it as part of this eval: move it away", log)
        (stage / "summary.json").write_text(json.dumps(summary, indent=2, default=float))  # holds the warnings
        commit_outputs(stage, out)
    if report:
        from .report import build_report  # matplotlib is imported only when figures are drawn

        with timed("report", timing):
            build_report(out)
        summary["timing"] = timing
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float))
    print(f"scored {len(scored)} population(s), {summary['models_scored']} model(s) "
          f"({n_computed} computed, {summary['models_scored'] - n_computed} from cache) -> {out}")
    print("time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timing.items()), file=sys.stderr)
    return out


def ordered_columns(rows: list) -> list:
    """Every key of the rows, each after the key it follows in the rows that have it (a dense population's row lacks
    the PIE columns, which then still sit beside the accuracy, not at the end)."""
    columns: list = []
    for row in rows:
        previous = None
        for key in row:
            if key not in columns:
                columns.insert(columns.index(previous) + 1 if previous is not None else 0, key)
            previous = key
    return columns


# ---------------------------------------------------------------- progress and timing




# ---------------------------------------------------------------- statistics






















TRAINING_COLUMNS = ["population", "seed", "run"]  # then the log's own columns


def write_training(out: Path, scored: dict, log: list):
    """figdata/training_<group>.csv: every run's metrics.csv (one row per stage and epoch: loss, train_acc, test_acc,
    sparsity, lr, seconds) after its population (label, as in populations.csv), seed and run folder name;
    figdata/layer_sparsity_<group>.csv: the layer_sparsity.csv of each population's first run (one column per
    pruned tensor), likewise. The training-curve and layer-sparsity figures are drawn from these (and
    populations.csv), so the report never reads the run folders."""
    curves, layers, unreadable = defaultdict(list), defaultdict(list), []
    for key, pop in scored.items():
        for i, (seed, run_dir, _) in enumerate(pop.runs):
            meta = dict(zip(TRAINING_COLUMNS, (key.label, seed, Path(run_dir).name)))
            for name, into in (("metrics.csv", curves), ("layer_sparsity.csv", layers if i == 0 else None)):
                if into is None:
                    continue
                try:
                    table = pd.read_csv(Path(run_dir) / name)
                except (OSError, ValueError, UnicodeDecodeError):
                    unreadable.append(str(Path(run_dir) / name))
                    continue
                if {"stage", "epoch"} <= set(table.columns) and not table.empty and not set(meta) & set(table.columns):
                    into[key.group].append(pd.concat([pd.DataFrame(meta, index=table.index), table], axis=1))
    if unreadable:
        warn(f"{len(unreadable)} training log(s) missing or unreadable, left out of the training curves: "
              f"{', '.join(unreadable[:3])}" + (" ..." if len(unreadable) > 3 else ""), log)
    for name, frames in (("training", curves), ("layer_sparsity", layers)):
        for group, parts in frames.items():
            pd.concat(parts, ignore_index=True).to_csv(out / "figdata" / f"{name}_{group}.csv", index=False)


def warn_bad_values(scored: dict, log: list):
    """Warn about NaN/inf that reached the scores: models whose h is not finite, NaN Q-Scores."""
    for key, pop in scored.items():
        bad = sum(not bool(torch.isfinite(o["h"]).all()) for o in pop.outputs if "h" in o)
        if bad:
            warn(f"population {key.label} ({key.group}): {bad} of {len(pop.outputs)} model(s) have NaN/inf in "
                  "their representation h", log)
        if pop.q is not None:
            n_nan = int(torch.isnan(pop.q["q"]).sum())
            if n_nan:
                warn(f"population {key.label} ({key.group}): Q-Score is NaN for {n_nan} of {len(pop.q['q'])} samples "
                      "(NaN/inf in a model's h); its Q, Z and L1 means are NaN", log)


def write_per_sample(out: Path, scored: dict, pies: dict, depth_on: bool):
    """tables/per_sample_<group>.csv: sample id, true label, then per population modal/pie/q/pd columns."""
    by_group = defaultdict(list)
    for key, pop in scored.items():
        by_group[key.group].append((key, pop))
    for group, items in by_group.items():
        data = items[0][1].data
        cols = {"sample_id": np.arange(len(data.test_y)), "true_label": data.test_y.numpy()}
        for key, pop in items:
            cols[f"{key.label}:modal"] = pop.modal.numpy()
            if key in pies:
                cols[f"{key.label}:pie"] = pies[key]["mask"].numpy().astype(int)
            if pop.q is not None:
                cols[f"{key.label}:q"] = pop.q["q"].numpy()
            if depth_on and pop.depth is not None:
                cols[f"{key.label}:pd"] = pop.depth.numpy()
        pd.DataFrame(cols).to_csv(out / "tables" / f"per_sample_{group}.csv", index=False, float_format="%.5g",
                                  na_rep="nan")  # a NaN score shows as nan, not as an empty cell
        pie_ids = sorted({int(i) for k, p in pies.items() if k.group == group for i in torch.nonzero(p["mask"]).flatten()})
        np.savez_compressed(out / "figdata" / f"pie_images_{group}.npz", sample_id=np.array(pie_ids, dtype=np.int64),
                            images=data.test_x[pie_ids].numpy() if pie_ids else np.zeros((0, *data.test_x.shape[1:]), np.uint8),
                            classes=np.array(data.classes))


def write_pie_breakdowns(out: Path, scored: dict, pies: dict):
    """PIE counts per true class, and Sup-vs-SCL PIE set overlaps per (method, sparsity) (paper Figs 4, 7)."""
    per_class, overlap = [], []
    for key, pie in pies.items():
        y = scored[key].data.test_y
        counts = torch.bincount(y[pie["mask"]], minlength=scored[key].data.num_classes)
        per_class += [dict(dataset=key.dataset, model=key.model, loss=key.loss, method=key.method, sparsity=key.sparsity,
                           cls=c, class_name=scored[key].data.classes[c], count=int(n)) for c, n in enumerate(counts)]
    for key, pie in pies.items():
        if key.loss != "ce":
            continue
        others = [k for k in pies if (k.group, k.loss, k.method, k.sparsity) == (key.group, "supcon", key.method, key.sparsity)]
        if len(others) != 1:
            continue
        other = others[0]
        y, classes = scored[key].data.test_y, scored[key].data.classes
        sup, scl = pie["mask"], pies[other]["mask"]
        for c in range(len(classes)):
            in_c = y == c
            overlap.append(dict(dataset=key.dataset, model=key.model, method=key.method, sparsity=key.sparsity, cls=c,
                                class_name=classes[c], shared=int((sup & scl & in_c).sum()),
                                sup_only=int((sup & ~scl & in_c).sum()), scl_only=int((scl & ~sup & in_c).sum())))
    cols_pc = ["dataset", "model", "loss", "method", "sparsity", "cls", "class_name", "count"]
    cols_ov = ["dataset", "model", "method", "sparsity", "cls", "class_name", "shared", "sup_only", "scl_only"]
    pd.DataFrame(per_class, columns=cols_pc).to_csv(out / "tables" / "pie_per_class.csv", index=False)
    pd.DataFrame(overlap, columns=cols_ov).to_csv(out / "tables" / "pie_overlap.csv", index=False)


def write_umap(out: Path, scored: dict, pies: dict):
    """figdata/umap_<group>.csv: population, loss, method, sparsity, which (first model | population mean),
    aligned_to (the dense population whose layout it started from and was rotated onto), sample_id, label (true),
    pred (the first model's prediction | the modal label), pie (a PIE of the population; for a dense population
    a PIE of any population compared with it), x, y. Dense populations are fitted first, each pruned population
    from its dense reference's layout (`umap_coordinates`)."""
    order = [k for k in scored if scored[k].is_dense] + [k for k in scored if not scored[k].is_dense]
    unions = defaultdict(list)
    for key, pie in pies.items():
        unions[scored[key].reference].append(pie["mask"])
    layouts, by_group = {}, defaultdict(list)
    for key, which in progress([(k, w) for k in order for w in ("first", "mean")], "UMAP", "fit"):
        pop = scored[key]
        h = pop.outputs[0]["h"] if which == "first" else torch.stack([o["h"] for o in pop.outputs]).mean(0)
        ref = layouts.get((pop.reference, which)) if pop.reference is not None else None
        xy = layouts[key, which] = umap_coordinates(h, init=ref)
        y = pop.data.test_y.numpy()
        if key in pies:
            pie = pies[key]["mask"]
        elif unions.get(key):
            pie = torch.stack(unions[key]).any(0)
        else:
            pie = torch.zeros(len(y), dtype=torch.bool)
        pred = pop.outputs[0]["preds"] if which == "first" else pop.modal
        by_group[key.group].append(pd.DataFrame(dict(
            population=key.label, loss=key.loss, method=key.method, sparsity=key.sparsity, which=which,
            aligned_to=pop.reference.label if ref is not None else "", sample_id=np.arange(len(y)), label=y,
            pred=pred.numpy(), pie=pie.numpy().astype(int), x=xy[:, 0], y=xy[:, 1])))
    for group, frames in by_group.items():
        pd.concat(frames).to_csv(out / "figdata" / f"umap_{group}.csv", index=False, float_format="%.4f")


def check_knn_k(runs_dir: Path, knn_k: int, data_cache: dict):
    """UserError unless k <= the training set size of every data set the finished runs under runs_dir used.

    Read from each run's config.yaml and the data set (not the checkpoints), so that a k the kNN
    probes cannot use is refused before any model is loaded; the data is loaded into the eval's
    data_cache, so scoring does not load it again. Runs or data sets that cannot be read are left
    to the scoring, which warns about them."""
    import yaml

    for run_dir in find_runs(runs_dir)[0]:
        try:
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
            data = cached_run_data(cfg, data_cache)
        except Exception:
            continue
        if isinstance(data, UserError):
            continue
        n = len(data.train_y)
        if knn_k > n:
            raise UserError(f"--knn-k {knn_k} is larger than the training set of {cfg['dataset']}"
                            f"{' at ' + cfg['data_root'] if cfg.get('data_root') else ''} ({n} images): the "
                            f"prediction-depth kNN probes need k <= {n}")


# ---------------------------------------------------------------- command line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="whatislost-eval", description="Score populations of finished whatislost runs.")
    p.add_argument("runs_dir")
    p.add_argument("--out", help="output folder (default RUNS_DIR/eval)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: all but cka)")
    p.add_argument("--depth-models", type=int, default=5, help="models per population used for prediction depth")
    p.add_argument("--knn-k", type=int, default=30, help="k of the prediction-depth kNN probes")
    p.add_argument("--tie-break", default="min", choices=["min", "max"], help="class picked when the modal label is tied")
    p.add_argument("--depth-reference", default="label", choices=["label", "prediction"],
                   help="label: true label (the paper's code, default); prediction: final prediction (Baldock et al.)")
    p.add_argument("--probes", default="authors", choices=PROBE_LAYOUTS,
                   help="prediction-depth probes: authors (the paper's code: 16 inside WRN-16-2) or blocks (stem, every "
                        "block's output, h: 8)")
    p.add_argument("--depth-train", dest="depth_train", default="clean", choices=DEPTH_TRAIN,
                   help="training images the depth kNN is fitted on: clean, or augmented once with the run's Sup "
                        "augmentation (the paper's code)")
    p.add_argument("--cka-samples", dest="cka_samples", type=int, default=CKA_SAMPLES,
                   help="test images the cka metric compares representations on: all when the test set has no more, "
                        "else a fixed subset (seed 0); 0: all")
    p.add_argument("--n-boot", dest="n_boot", type=int, default=1000,
                   help="bootstrap resamples (of models, within each population) for the 95%% intervals of accuracy, "
                        "PIE counts, Q-Score, PD-Score and CKA; 0: no intervals")
    p.add_argument("--n-perm", dest="n_perm", type=int, default=10000,
                   help="random permutations of the test of 'SCL has more PIEs than Sup'")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the tests (after correction)")
    p.add_argument("--correction", default="bh", choices=CORRECTIONS,
                   help="multiple-testing correction: bh (Benjamini-Hochberg), holm, bonferroni, none")
    p.add_argument("--no-report", action="store_true", help="tables and figure data only")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (for bug reports)")
    args = p.parse_args(argv)
    run_eval(args.runs_dir, args.out, args.device, tuple(m for m in args.metrics.split(",") if m), args.depth_models,
             args.knn_k, args.tie_break, args.depth_reference, report=not args.no_report, probes=args.probes,
             depth_train=args.depth_train, n_boot=args.n_boot, n_perm=args.n_perm, alpha=args.alpha,
             correction=args.correction, cka_samples=args.cka_samples)
    return 0


def cli():
    sys.exit(run_cli(main, prog="whatislost-eval"))


if __name__ == "__main__":
    cli()
