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
import math
import sys
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cli import UserError, first_line, run_cli
from .config import resolve_device
from .data import ImageData, load_data, load_run_data, make_augment
from .identity import DENSE, population_id, population_label, reference_id, run_identity
from .metrics import linear_cka_matrix, mean_std, modal_labels, pie_mask, prediction_depth, q_score
from .models import model_label, num_probes
from .rundir import CHECKPOINT, atomic_torch_save, file_sha256, find_runs, load_checkpoint, load_model
from .stats import (adjust_p_values, bootstrap_ci, class_recall_tests, permutation_test_more_pies, pie_count_ci,
                    pie_difference_ci, population_mean_ci, resample_weights, tie_report, ties_could_flip)
from .tables import write_tables

ALL_METRICS = ("acc", "pie", "qscore", "depth", "umap", "cka")
DEFAULT_METRICS = ("acc", "pie", "qscore", "depth", "umap")  # cka: asked for by name (beyond the paper)
CKA_SAMPLES = 10000  # default --cka-samples: test images CKA is computed on (0: all); CIFAR's whole test set
CACHE_VERSION = 2
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


@dataclass(frozen=True)
class PopKey:
    dataset: str  # the data set's name (with its fingerprint when two data sets share a name)
    model: str
    loss: str
    method: str  # 'dense' for every population whose recipe prunes nothing; '<method> [id]' for a variant
    sparsity: float  # exact target sparsity in percent
    population: str = ""  # identity.population_id

    @property
    def group(self) -> str:
        return f"{self.dataset}-{self.model}"

    @property
    def label(self) -> str:
        """'Sup/GMP/90', 'SCL/Dense/0': the population's column name in per-sample tables."""
        return population_label(self.loss, self.method, self.sparsity / 100)


@dataclass
class Population:
    key: PopKey
    identity: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)  # (seed, run dir, config), sorted by seed
    outputs: list = field(default_factory=list)  # per scored model: dict(preds (N,), h (N, D), acc, depth (N,)?,
    #                                                probes [P x (n, D_p)]? with cka, dropped once its CKA is computed)
    data: ImageData | None = None
    modal: torch.Tensor | None = None  # (N,) modal predicted label
    modal_tied: int = 0
    q: dict | None = None  # q, z, l1: (N,) each, averaged over models
    depth: torch.Tensor | None = None  # (N,) prediction depth averaged over up to depth_models models
    n_depth: int = 0
    reference: PopKey | None = None  # the dense population this one is compared with

    @property
    def is_dense(self) -> bool:
        return self.key.method == DENSE


def _warn(msg: str, log: list):
    log.append(msg)
    print(f"whatislost-eval: warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- per-model outputs (cached)
@torch.no_grad()
def forward_pass(model, x: torch.Tensor, data: ImageData, device, hidden: bool, probes: str = "authors",
                 augment=None, batch_size: int = 1000):
    """x (N, C, H, W) uint8 -> dict(preds (N,), h (N, D) on CPU, finite (bool: logits and h all finite);
    hidden [P x (N, D_p)] on `device` if asked). `augment` (float images in [0, 1] -> same) is applied
    before normalising, e.g. for fitting the depth kNN on augmented training images as the authors did."""
    preds, hs, probe_batches, finite = [], [], [], True
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device).float().div_(255)
        if augment is not None:
            xb = augment(xb)
        xb = data.normalize_unit(xb).contiguous(memory_format=torch.channels_last)
        if hidden:
            h, hid = model.encoder(xb, return_hidden=True, probes=probes)
            probe_batches.append([t.float() for t in hid])  # stay on the device: the kNN probes run there next
        else:
            h = model.encoder(xb)
        logits = model.classifier(h)
        finite = finite and bool(torch.isfinite(logits).all() & torch.isfinite(h).all())
        preds.append(logits.argmax(1).cpu())
        hs.append(h.float().cpu())
    out = {"preds": torch.cat(preds), "h": torch.cat(hs), "finite": finite}
    if hidden:
        out["hidden"] = [torch.cat(p) for p in zip(*probe_batches)]
    return out


def depth_augment(cfg: dict, data: ImageData, seed: int = 0):
    """The run's own Sup augmentation (crop with padding, flips) with a fixed seed, so that the augmented
    training set the depth kNN is fitted on is the same every time (and the cache stays valid)."""
    generator = torch.Generator().manual_seed(seed)
    return make_augment("sup", data.image_size, data.in_channels, int(cfg.get("crop_padding", 4)),
                        bool(cfg.get("hflip", True)), bool(cfg.get("vflip", False)), generator=generator)


def cka_subset(n_test: int, n: int) -> torch.Tensor:
    """Indices (sorted) of the test images CKA is computed on: every one when n is 0 or >= n_test, else n of them
    drawn once with seed 0 (the same images for every model and population of a data set)."""
    if n <= 0 or n >= n_test:
        return torch.arange(n_test)
    return torch.randperm(n_test, generator=torch.Generator().manual_seed(0))[:n].sort().values


def model_outputs(run_dir: Path, data: ImageData, device, depth_key: str | None, knn_k: int, reference: str,
                  probes: str = "authors", depth_train: str = "clean", cfg: dict | None = None,
                  cka_index: torch.Tensor | None = None):
    """Test predictions and h of one model, plus its per-sample prediction depth when depth_key is given, and
    with cka_index (test-sample indices, `cka_subset`) its probe representations of those test images
    (`probes`: P tensors (n, D_p), float32, on CPU).

    Cached in RUN_DIR/eval_cache.pt, keyed by the checkpoint's SHA-256 and the data's fingerprint; depth is
    cached per (k, reference, probes, training images) and the CKA probes per (probe layout, subset size), so
    changing one recomputes only that. A cache of an earlier version without CKA probes gains them.
    """
    sha = file_sha256(run_dir / CHECKPOINT)
    cache_path = run_dir / "eval_cache.pt"
    cache = {}
    if cache_path.exists():
        try:
            cache = torch.load(cache_path, weights_only=True)
        except Exception:
            cache = {}
        if (not isinstance(cache, dict) or cache.get("checkpoint") != sha or cache.get("version") != CACHE_VERSION
                or cache.get("data") != data.fingerprint):
            cache = {}
    need_test = "preds" not in cache
    need_depth = depth_key is not None and depth_key not in cache.get("depth", {})
    cka_key = f"{probes}-n{len(cka_index)}-seed0" if cka_index is not None else None
    need_cka = cka_key is not None and cka_key not in cache.get("cka", {})
    computed = need_test or need_depth or need_cka
    if need_test or need_depth:
        model = load_model(run_dir)[0].to(device, memory_format=torch.channels_last)
        test = forward_pass(model, data.test_x, data, device, hidden=need_depth or need_cka, probes=probes)
        cache.update(checkpoint=sha, version=CACHE_VERSION, data=data.fingerprint, preds=test["preds"], h=test["h"],
                     finite=test["finite"])
        if need_cka:
            index = cka_index.to(test["hidden"][0].device)
            cache.setdefault("cka", {})[cka_key] = [t[index].cpu() for t in test["hidden"]]
            need_cka = False
        if need_depth:
            augment = depth_augment(cfg or {}, data) if depth_train == "augmented" else None
            train_hidden = forward_pass(model, data.train_x, data, device, hidden=True, probes=probes,
                                        augment=augment)["hidden"]
            ref = data.test_y if reference == "label" else test["preds"]
            depth = prediction_depth(train_hidden, data.train_y, test["hidden"], ref, k=knn_k,
                                     num_classes=data.num_classes, device=device)
            cache.setdefault("depth", {})[depth_key] = depth
    if need_cka:  # the test outputs came from the cache: only the CKA images pass the model
        model = load_model(run_dir)[0].to(device, memory_format=torch.channels_last)
        sub = forward_pass(model, data.test_x[cka_index], data, device, hidden=True, probes=probes)
        cache.setdefault("cka", {})[cka_key] = [t.cpu() for t in sub["hidden"]]
    if computed:
        try:
            atomic_torch_save(cache, cache_path)
        except OSError:
            pass  # a read-only run folder: computed again next time
    out = {"preds": cache["preds"], "h": cache["h"], "finite": cache.get("finite", True), "computed": computed}
    if depth_key is not None:
        out["depth"] = cache["depth"][depth_key].float()
    if cka_key is not None:
        out["probes"] = cache["cka"][cka_key]
    return out


# ---------------------------------------------------------------- populations
def checkpoint_identity(ckpt: dict) -> dict:
    """The identity a checkpoint recorded; for checkpoints of older versions one rebuilt from what they hold
    (their data is known only by name and folder)."""
    if isinstance(ckpt.get("identity"), dict):
        return ckpt["identity"]
    cfg = ckpt["config"]
    return run_identity(cfg, ckpt.get("recipe", ""), f"{cfg.get('dataset')}:{cfg.get('data_root', '')}")


def collect_populations(runs_dir: Path, log: list) -> dict:
    """{PopKey: Population} of the finished runs under runs_dir, pooled by identity; unloadable runs are
    warned about and skipped. Populations that share a label but not an identity get a variant label."""
    finished, unfinished = find_runs(runs_dir)
    if unfinished:
        _warn(f"{len(unfinished)} run(s) without done marker skipped: {', '.join(str(p) for p in unfinished[:5])}"
              + (" ..." if len(unfinished) > 5 else ""), log)
    by_id = {}
    for run_dir in finished:
        try:
            ckpt = load_checkpoint(run_dir)
            cfg, identity = ckpt["config"], checkpoint_identity(ckpt)
            dense = not ckpt.get("prunes", ckpt.get("method") != DENSE) and not ckpt.get("init")
            pop_id = ckpt.get("population") or population_id(identity)
            fields = (ckpt["dataset"], model_label(cfg), ckpt["loss"],
                      DENSE if dense else ckpt["method"], round(100 * float(ckpt["target_sparsity"]), 6))
        except Exception as err:
            _warn(f"cannot load checkpoint of {run_dir}: {first_line(err)}", log)
            continue
        entry = by_id.setdefault(pop_id, (fields, identity, []))
        entry[2].append((ckpt.get("seed", 0), run_dir, cfg))
    # two data sets with one name, or one label with several identities: say so, never pool them
    names = defaultdict(set)
    for fields, identity, _ in by_id.values():
        names[fields[0]].add(identity["data"])
    labels = defaultdict(list)
    for pop_id, (fields, identity, _) in by_id.items():
        labels[fields].append(pop_id)
    pops = {}
    for pop_id, (fields, identity, runs) in by_id.items():
        dataset, model, loss, method, sparsity = fields
        if len(names[dataset]) > 1:
            dataset = f"{dataset}@{identity['data'][:6]}"
        if len(labels[fields]) > 1:
            method = f"{method} [{pop_id[:6]}]"
        key = PopKey(dataset, model, loss, method, sparsity, pop_id)
        pops[key] = Population(key, identity, sorted(runs, key=lambda r: (r[0], str(r[1]))))
    for fields, ids in labels.items():
        if len(ids) > 1:
            first = by_id[ids[0]][1]["settings"]
            diffs = sorted({k for i in ids[1:] for k, v in by_id[i][1]["settings"].items() if first.get(k) != v}
                           | {k for i in ids[1:] for k in ("recipe_sha", "data", "init") if by_id[i][1][k] != by_id[ids[0]][1][k]})
            _warn(f"runs labelled {population_label(fields[2], fields[3], fields[4] / 100)} ({fields[0]}-{fields[1]}) "
                  f"differ in {', '.join(diffs[:5]) or 'their settings'}: scored as {len(ids)} separate populations "
                  f"({', '.join(i[:6] for i in ids)})", log)
    return pops


def assign_references(pops: dict, log: list):
    """Each pruned population's dense reference: the dense population its runs started from (One-Shot),
    else the dense population with the same data, architecture, loss and training settings."""
    dense = [p for p in pops.values() if p.is_dense]
    for pop in pops.values():
        if pop.is_dense:
            continue
        init = pop.identity.get("init")
        if init:
            found = [d for d in dense if d.key.population == init]
        else:
            found = [d for d in dense if reference_id(d.identity) == reference_id(pop.identity)]
        legacy = not init and not found and str(pop.identity.get("data", "")).count(":")
        if legacy:  # an older version's runs: no identity recorded; the dense population of the same data and loss
            found = [d for d in dense if (d.key.group, d.key.loss) == (pop.key.group, pop.key.loss)]
        if not found:
            _warn(f"population {pop.key.label} ({pop.key.group}) has no dense population with the same data and "
                  f"training settings to compare with: no PIEs", log)
            continue
        found.sort(key=lambda d: -len(d.runs))
        pop.reference = found[0].key
        if len(found) > 1 or legacy:
            _warn(f"population {pop.key.label} ({pop.key.group}) is compared with dense population "
                  f"{found[0].key.label} ({found[0].key.population[:6]}, {len(found[0].runs)} runs)"
                  + (f", one of {len(found)} that qualify" if len(found) > 1 else ", matched by data set name only"), log)


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


def accuracy_mean_std(pop: Population) -> tuple[float, float]:
    """Test accuracy in % (mean, std over the population's models), in float64 from the correct/total counts.

    The mean is 100 * (correct answers of all models) / (models * test samples), rounded once: the float64
    nearest the exact mean (float32 accuracies drifted: 8300 and 8299 of 10000 gave 82.99499512, not 82.995)."""
    test_y = pop.data.test_y if pop.data is not None else None
    if test_y is None or not pop.outputs:
        return mean_std([100.0 * float(o["acc"]) for o in pop.outputs])
    correct = [int((o["preds"] == test_y).sum()) for o in pop.outputs]
    total = len(test_y)
    _, std = mean_std([100.0 * c / total for c in correct])
    return 100.0 * sum(correct) / (len(correct) * total), std


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
def score_population(pop: Population, data: ImageData, device, metrics, depth_models, knn_k, reference,
                     tie_break, log, probes: str = "authors", depth_train: str = "clean",
                     cka_samples: int = CKA_SAMPLES) -> int:
    """Per-model outputs (cached) and per-sample population values of one population; returns how
    many models had to be computed (the rest came from the cache). A model whose logits or h are not
    finite is left out with a warning. With cka in metrics every model's outputs also hold its probe
    representations of the `cka_subset` test images (`probes`)."""
    computed = 0
    cka_index = cka_subset(len(data.test_y), cka_samples) if "cka" in metrics else None
    for i, (_, run_dir, cfg) in enumerate(progress(pop.runs, pop.key.label, "model")):
        depth_key = f"k{knn_k}-{reference}-{probes}-{depth_train}" if "depth" in metrics and i < depth_models else None
        try:
            o = model_outputs(run_dir, data, device, depth_key, knn_k, reference, probes, depth_train, cfg, cka_index)
        except Exception as err:  # one bad checkpoint must not stop the others
            _warn(f"run {run_dir} failed to score: {first_line(err)}", log)
            continue
        computed += o.pop("computed")
        if not o.pop("finite"):
            _warn(f"run {run_dir} left out of {pop.key.label}: NaN/inf in its logits or representation h", log)
            continue
        o["acc"] = int((o["preds"] == data.test_y).sum()) / len(data.test_y)
        pop.outputs.append(o)
    if not pop.outputs:
        return computed
    pop.data = data
    pop.modal, pop.modal_tied = modal_labels(torch.stack([o["preds"] for o in pop.outputs]), data.num_classes, tie_break)
    if "qscore" in metrics:
        per_model = [q_score(o["h"]) for o in pop.outputs]
        # per-sample values averaged over the population's models (paper Tables 4-5)
        pop.q = {name: torch.stack([q[name] for q in per_model]).mean(0) for name in ("q", "z", "l1")}
    depths = [o["depth"] for o in pop.outputs if "depth" in o]
    if depths:
        pop.depth, pop.n_depth = torch.stack(depths).mean(0), len(depths)
    return computed


def find_pies(scored: dict, tie_break: str, log: list) -> dict:
    """{pruned PopKey: {mask (N,) bool, tied}}: each pruned population against its dense reference
    (Hooker et al. 2019)."""
    pies = {}
    for key, pop in scored.items():
        if pop.is_dense or pop.reference is None:
            continue
        dense = scored.get(pop.reference)
        if dense is None:
            _warn(f"population {key.label} ({key.group}): its dense reference {pop.reference.label} could not be "
                  f"scored: no PIEs", log)
        elif len(pop.outputs) < 2 or len(dense.outputs) < 2:
            _warn(f"population {key.label} ({key.group}) or its dense counterpart has one model: "
                  "PIEs (a difference of modal labels) are undefined", log)
        else:
            mask, tied = pie_mask(torch.stack([o["preds"] for o in dense.outputs]),
                                  torch.stack([o["preds"] for o in pop.outputs]), pop.data.num_classes, tie_break)
            pies[key] = {"mask": mask, "tied": tied}
    return pies


# ---------------------------------------------------------------- representation similarity (cka)
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
        _warn(f"population {pop.key.label} ({pop.key.group}): linear CKA undefined (NaN) at probe(s) "
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
            _warn(f"population {key.label} ({key.group}): its dense reference {pop.reference.label} could not be "
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


def load_population_data(pop: Population, cache: dict, log: list) -> ImageData | None:
    """The population's own data, from where its first run was trained, checked against the fingerprint
    its runs recorded (None, with a warning, when it is missing or has changed since)."""
    cfg = pop.runs[0][2]
    source = (cfg["dataset"], cfg.get("data_root", ""), cfg.get("train_per_class", 0), cfg.get("test_per_class", 0))
    if source not in cache:
        try:
            cache[source] = load_run_data(cfg)
        except UserError as err:
            cache[source] = err
    data = cache[source]
    if isinstance(data, UserError):
        _warn(f"population {pop.key.label} ({pop.key.group}) skipped: {data}", log)
        return None
    recorded = pop.identity.get("data", "")
    if ":" not in recorded and recorded != data.fingerprint:  # (older versions recorded no fingerprint)
        _warn(f"population {pop.key.label} ({pop.key.group}) skipped: the data at {source[1] or source[0]} has "
              f"changed since its runs were trained (fingerprint {data.fingerprint}, recorded {recorded})", log)
        return None
    return data


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
    if "depth" in metrics and depth_models > 0:
        check_knn_k(runs_dir, knn_k)
    log: list = []
    pops = collect_populations(runs_dir, log)
    if not pops:
        raise UserError(f"no finished runs (done.json) under {runs_dir}")
    assign_references(pops, log)

    data_cache: dict = {}
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
            _warn(f"{out / rel} was not written by whatislost-eval (not in {MARKER}) and is left as it is, "
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
def progress(iterable, desc: str, unit: str = "it", total: int | None = None):
    """A tqdm bar on stderr for one stage of the eval, shown only when stderr is a terminal (tests and logs stay
    clean) and removed when the stage ends."""
    from tqdm import tqdm

    return tqdm(iterable, desc=f"whatislost-eval: {desc}", unit=unit, total=total, file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


@contextmanager
def timed(stage: str, timing: dict):
    """Adds the seconds the block took to timing[stage] (summary.json 'timing')."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[stage] = round(timing.get(stage, 0.0) + time.perf_counter() - start, 3)


# ---------------------------------------------------------------- statistics
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


def reference_preds(scored: dict, key: PopKey) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense predictions (M_d, N), pruned predictions (M_p, N)) of a pruned population and its dense reference."""
    pop = scored[key]
    return (torch.stack([o["preds"] for o in scored[pop.reference].outputs]),
            torch.stack([o["preds"] for o in pop.outputs]))


def probe_count(pop: Population, probes: str) -> int | None:
    """How many prediction-depth probes the population's architecture has (the largest PD-Score possible)."""
    try:
        return num_probes(pop.runs[0][2], probes)
    except Exception:
        return None


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
        _warn(f"{group}: PIE counts change by more than 5% under --tie-break {other}: {'; '.join(items)}. Tied modal "
              "labels are common with few models per population; more seeds make PIE counts firmer", log)
    if comparisons.empty:
        return
    for r in comparisons[comparisons.conclusion_depends_on_ties].itertuples():
        from .identity import method_name, sparsity_label

        _warn(f"{r.dataset}-{r.model}: whether SCL has more PIEs than Sup at {method_name(r.method)} "
              f"{sparsity_label(r.sparsity / 100)}% depends on the tie rule: Sup {r.n_sup} vs SCL {r.n_scl} with "
              f"--tie-break {tie_break} (adjusted permutation p {r.p_adjusted:.3g}), Sup {r.n_sup_other} vs SCL "
              f"{r.n_scl_other} with {other} (p {r.p_adjusted_other:.3g})", log)


def write_significance(out: Path, recall_tests: pd.DataFrame, comparisons: pd.DataFrame):
    """tables/class_recall_tests.csv and tables/pie_comparison.csv (written only when there is something in them)."""
    if not recall_tests.empty:
        recall_tests.to_csv(out / "tables" / "class_recall_tests.csv", index=False, float_format="%.6g")
    if not comparisons.empty:
        comparisons.to_csv(out / "tables" / "pie_comparison.csv", index=False, float_format="%.6g")


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
        _warn(f"{len(unreadable)} training log(s) missing or unreadable, left out of the training curves: "
              f"{', '.join(unreadable[:3])}" + (" ..." if len(unreadable) > 3 else ""), log)
    for name, frames in (("training", curves), ("layer_sparsity", layers)):
        for group, parts in frames.items():
            pd.concat(parts, ignore_index=True).to_csv(out / "figdata" / f"{name}_{group}.csv", index=False)


def warn_bad_values(scored: dict, log: list):
    """Warn about NaN/inf that reached the scores: models whose h is not finite, NaN Q-Scores."""
    for key, pop in scored.items():
        bad = sum(not bool(torch.isfinite(o["h"]).all()) for o in pop.outputs if "h" in o)
        if bad:
            _warn(f"population {key.label} ({key.group}): {bad} of {len(pop.outputs)} model(s) have NaN/inf in "
                  "their representation h", log)
        if pop.q is not None:
            n_nan = int(torch.isnan(pop.q["q"]).sum())
            if n_nan:
                _warn(f"population {key.label} ({key.group}): Q-Score is NaN for {n_nan} of {len(pop.q['q'])} samples "
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


def check_knn_k(runs_dir: Path, knn_k: int):
    """UserError unless k <= the training set size of every data set the finished runs under runs_dir used.

    Read from each run's config.yaml and the data set (not the checkpoints), so that a k the kNN
    probes cannot use is refused before any model is loaded. Runs or data sets that cannot be
    read are left to the scoring, which warns about them."""
    import yaml

    sources = set()
    for run_dir in find_runs(runs_dir)[0]:
        try:
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
            sources.add((str(cfg["dataset"]), str(cfg.get("data_root") or ""), int(cfg.get("train_per_class") or 0)))
        except Exception:
            continue
    for source in sorted(sources):
        try:
            n = len(load_data(source[0], source[1], source[2]).train_y)
        except Exception:
            continue
        if knn_k > n:
            raise UserError(f"--knn-k {knn_k} is larger than the training set of {source[0]}"
                            f"{' at ' + source[1] if source[1] else ''} ({n} images): the prediction-depth kNN "
                            f"probes need k <= {n}")


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
