"""Eval stage: score populations of finished runs. `whatislost-eval RUNS_DIR`.

Finished run directories (done.json present) anywhere under RUNS_DIR are grouped into
populations by (dataset, model, loss, method, sparsity); each pruned population is
matched with the dense population of the same dataset, model and loss. One forward pass
per model over the test set gives predicted labels and the representation h; models
used for prediction depth also pass the training set once for the kNN probes. Per-model
results are cached next to the checkpoint (keyed by its SHA-1), so reruns skip them.

Metrics (Corti et al. 2022): accuracy, PIEs (Hooker et al. 2019), Q-Score (Kalibhat et
al. 2022), prediction depth (Baldock et al. 2021), UMAP of h. Output, default RUNS_DIR/eval:

    summary.json                      every population's numbers, warnings, eval settings
    tables/populations.csv            one row per population (all metrics, mean and std)
    tables/table1|4|5|6.{csv,md}      the paper's tables (whatislost.tables)
    tables/per_sample_<group>.csv     sample id, true label, per population: modal label, PIE, Q, PD
    tables/pie_per_class.csv, pie_overlap.csv   PIE counts by true class; Sup vs SCL PIE sets
    figdata/umap_<group>.csv          UMAP coordinates (first model and population mean)
    figdata/pie_images_<group>.npz    the test images of every PIE (for the gallery figure)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import whatislost  # noqa: F401

from .config import UserError, first_line, run_cli
from .data import ImageData, load_data
from .metrics import mean_std, modal_labels, pie_mask, prediction_depth, q_score
from .rundir import CHECKPOINT, find_runs, load_checkpoint, load_model
from .tables import LOSS_NAMES, METHOD_NAMES, write_tables

ALL_METRICS = ("acc", "pie", "qscore", "depth", "umap")
CACHE_VERSION = 1


@dataclass(frozen=True)
class PopKey:
    dataset: str
    model: str
    loss: str
    method: str
    sparsity: int  # target sparsity in percent

    @property
    def group(self) -> str:
        return f"{self.dataset}-{self.model}"

    @property
    def label(self) -> str:
        """'Sup/GMP/90', 'SCL/Dense/0': the population's column name in per-sample tables."""
        return f"{LOSS_NAMES.get(self.loss, self.loss)}/{METHOD_NAMES.get(self.method, self.method)}/{self.sparsity}"


@dataclass
class Population:
    key: PopKey
    runs: list = field(default_factory=list)  # (seed, run dir, config), sorted by seed
    outputs: list = field(default_factory=list)  # per scored model: dict(preds (N,), h (N, D), acc, depth (N,)?)
    data: ImageData | None = None
    modal: torch.Tensor | None = None  # (N,) modal predicted label
    modal_tied: int = 0
    q: dict | None = None  # q, z, l1: (N,) each, averaged over models
    depth: torch.Tensor | None = None  # (N,) prediction depth averaged over up to depth_models models
    n_depth: int = 0


def _warn(msg: str, log: list):
    log.append(msg)
    print(f"whatislost-eval: warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- per-model outputs (cached)
def file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def forward_pass(model, x: torch.Tensor, data: ImageData, device, hidden: bool, batch_size: int = 1000):
    """x (N, C, H, W) uint8 -> dict(preds (N,), h (N, D) on CPU; hidden [P x (N, D_p)] on `device` if asked)."""
    mean, std = data.mean.to(device).view(1, -1, 1, 1), data.std.to(device).view(1, -1, 1, 1)
    preds, hs, probes = [], [], []
    for start in range(0, len(x), batch_size):
        xb = ((x[start:start + batch_size].to(device).float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
        if hidden:
            h, hid = model.encoder(xb, return_hidden=True)
            probes.append([t.float() for t in hid])  # stay on the device: the kNN probes run there next
        else:
            h = model.encoder(xb)
        preds.append(model.classifier(h).argmax(1).cpu())
        hs.append(h.float().cpu())
    out = {"preds": torch.cat(preds), "h": torch.cat(hs)}
    if hidden:
        out["hidden"] = [torch.cat(p) for p in zip(*probes)]
    return out


def model_outputs(run_dir: Path, data: ImageData, device, depth_key: str | None, knn_k: int, reference: str):
    """Test predictions and h of one model, plus its per-sample prediction depth when depth_key is given.

    Cached in RUN_DIR/eval_cache.pt, keyed by the checkpoint's SHA-1; depth is cached per
    (k, reference) so changing either recomputes only that.
    """
    sha = file_sha1(run_dir / CHECKPOINT)
    cache_path = run_dir / "eval_cache.pt"
    cache = {}
    if cache_path.exists():
        try:
            cache = torch.load(cache_path, weights_only=True)
        except Exception:
            cache = {}
        if cache.get("sha1") != sha or cache.get("version") != CACHE_VERSION:
            cache = {}
    need_test = "preds" not in cache
    need_depth = depth_key is not None and depth_key not in cache.get("depth", {})
    computed = need_test or need_depth
    if computed:
        model = load_model(run_dir)[0].to(device, memory_format=torch.channels_last)
        test = forward_pass(model, data.test_x, data, device, hidden=need_depth)
        cache.update(sha1=sha, version=CACHE_VERSION, preds=test["preds"], h=test["h"])
        if need_depth:
            train_hidden = forward_pass(model, data.train_x, data, device, hidden=True)["hidden"]
            ref = data.test_y if reference == "label" else test["preds"]
            depth = prediction_depth(train_hidden, data.train_y, test["hidden"], ref, k=knn_k,
                                     num_classes=data.num_classes, device=device)
            cache.setdefault("depth", {})[depth_key] = depth
        torch.save(cache, cache_path)
    out = {"preds": cache["preds"], "h": cache["h"], "computed": computed}
    if depth_key is not None:
        out["depth"] = cache["depth"][depth_key].float()
    return out


# ---------------------------------------------------------------- populations
def collect_populations(runs_dir: Path, log: list) -> dict:
    """{PopKey: Population} of the finished runs under runs_dir; unloadable runs are warned and skipped."""
    finished, unfinished = find_runs(runs_dir)
    if unfinished:
        _warn(f"{len(unfinished)} run(s) without done marker skipped: {', '.join(str(p) for p in unfinished[:5])}"
              + (" ..." if len(unfinished) > 5 else ""), log)
    pops = {}
    for run_dir in finished:
        try:
            ckpt = load_checkpoint(run_dir)
            cfg = ckpt["config"]
            key = PopKey(ckpt["dataset"], f"wrn{cfg['depth']}-{cfg['widen']}", ckpt["loss"], ckpt["method"],
                         round(100 * ckpt["target_sparsity"]))
        except Exception as err:
            _warn(f"cannot load checkpoint of {run_dir}: {first_line(err)}", log)
            continue
        pop = pops.setdefault(key, Population(key))
        pop.runs.append((ckpt.get("seed", 0), run_dir, cfg))
    for pop in pops.values():
        pop.runs.sort(key=lambda r: (r[0], str(r[1])))
    return pops


def dense_key(key: PopKey) -> PopKey:
    return PopKey(key.dataset, key.model, key.loss, "dense", 0)


def population_row(pop: Population, pie: dict | None, pd_mask: torch.Tensor | None) -> dict:
    """Population-level numbers (mean, std) for populations.csv / summary.json.

    pie: this population's PIE mask and tie count (pruned populations); pd_mask: the PIE set
    that splits its PD-Scores into PIEs and non-PIEs (own PIEs, or for a dense population the
    union of its loss's PIE sets)."""
    k = pop.key
    row = dict(dataset=k.dataset, model=k.model, loss=k.loss, method=k.method, sparsity=k.sparsity,
               population=k.label, n_models=len(pop.outputs), modal_tied=pop.modal_tied,
               runs=[str(r[1]) for r in pop.runs])
    row["acc_mean"], row["acc_std"] = mean_std(torch.tensor([100 * o["acc"] for o in pop.outputs]))
    if pie is not None:
        row["pie_count"], row["pie_tied"] = int(pie["mask"].sum()), pie["tied"]
    if pop.q is not None:
        for name in ("q", "z", "l1"):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(pop.q[name])
    if pop.depth is not None and pd_mask is not None:
        row["depth_models"] = pop.n_depth
        row["pd_pie_mean"], row["pd_pie_std"] = mean_std(pop.depth[pd_mask])
        row["pd_nonpie_mean"], row["pd_nonpie_std"] = mean_std(pop.depth[~pd_mask])
    return row


def umap_coordinates(h: torch.Tensor, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) UMAP embedding (umap-learn; imported here: it costs ~20 s of numba start-up)."""
    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(h.numpy())


# ---------------------------------------------------------------- the whole evaluation
def score_population(pop: Population, data: ImageData, device, metrics, depth_models, knn_k, reference,
                     tie_break, log) -> int:
    """Per-model outputs (cached) and per-sample population values of one population; returns how
    many models had to be computed (the rest came from the cache)."""
    computed = 0
    for i, (_, run_dir, _) in enumerate(pop.runs):
        depth_key = f"k{knn_k}-{reference}" if "depth" in metrics and i < depth_models else None
        try:
            o = model_outputs(run_dir, data, device, depth_key, knn_k, reference)
        except Exception as err:  # one bad checkpoint must not stop the others
            _warn(f"run {run_dir} failed to score: {first_line(err)}", log)
            continue
        computed += o.pop("computed")
        o["acc"] = float((o["preds"] == data.test_y).float().mean())
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
    """{pruned PopKey: {mask (N,) bool, tied}}: each pruned population against the dense population
    of the same data set, model and loss (Hooker et al. 2019)."""
    pies = {}
    for key, pop in scored.items():
        if key.method == "dense":
            continue
        dense = scored.get(dense_key(key))
        if dense is None:
            _warn(f"population {key.label} ({key.group}) has no dense population to compare with: no PIEs", log)
        elif len(pop.outputs) < 2 or len(dense.outputs) < 2:
            _warn(f"population {key.label} ({key.group}) or its dense counterpart has one model: "
                  "PIEs (a difference of modal labels) are undefined", log)
        else:
            mask, tied = pie_mask(torch.stack([o["preds"] for o in dense.outputs]),
                                  torch.stack([o["preds"] for o in pop.outputs]), pop.data.num_classes, tie_break)
            pies[key] = {"mask": mask, "tied": tied}
    return pies


def run_eval(runs_dir, out=None, device="cpu", metrics=ALL_METRICS, depth_models: int = 5, knn_k: int = 30,
             tie_break: str = "min", depth_reference: str = "label", report: bool = True) -> Path:
    """Score every population under runs_dir; write tables, summary.json, figure data and the report;
    return the eval dir."""
    metrics = tuple(metrics or ALL_METRICS)
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_METRICS)}")
    if tie_break not in ("min", "max") or depth_reference not in ("label", "prediction"):
        raise UserError("tie_break must be min|max and depth_reference label|prediction")
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"runs folder not found: {runs_dir}")
    out = Path(out) if out else runs_dir / "eval"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for, but no CUDA GPU is available")
    log: list = []
    pops = collect_populations(runs_dir, log)
    if not pops:
        raise UserError(f"no finished runs (done.json) under {runs_dir}")

    data_by_source: dict = {}
    scored, n_computed = {}, 0
    for key in sorted(pops, key=lambda k: (k.group, k.loss, k.method != "dense", k.method, k.sparsity)):
        pop, cfg = pops[key], pops[key].runs[0][2]
        source = (cfg["dataset"], cfg.get("data_root", ""))
        if source not in data_by_source:
            try:
                data_by_source[source] = load_data(*source)
            except UserError as err:
                data_by_source[source] = err
        data = data_by_source[source]
        if isinstance(data, UserError):
            _warn(f"population {key.label} ({key.group}) skipped: {data}", log)
            continue
        n_computed += score_population(pop, data, device, metrics, depth_models, knn_k, depth_reference, tie_break, log)
        if pop.outputs:
            scored[key] = pop
    if not scored:
        raise UserError(f"nothing could be scored under {runs_dir} (see warnings above)")

    pies = find_pies(scored, tie_break, log) if "pie" in metrics else {}
    # the dense row of Table 6 splits its PD-Scores by the union of its loss's PIE sets (every method, sparsity)
    pd_masks = {key: pie["mask"] for key, pie in pies.items()}
    for key in scored:
        unions = [pie["mask"] for k, pie in pies.items() if key.method == "dense" and dense_key(k) == key]
        if unions:
            pd_masks[key] = torch.stack(unions).any(0)

    rows = [population_row(pop, pies.get(key), pd_masks.get(key)) for key, pop in scored.items()]
    for folder in (out, out / "tables", out / "figdata"):
        folder.mkdir(parents=True, exist_ok=True)
    populations = pd.DataFrame(rows)
    populations.drop(columns=["runs"]).to_csv(out / "tables" / "populations.csv", index=False)
    write_per_sample(out, scored, pies, "depth" in metrics)
    write_pie_breakdowns(out, scored, pies)
    if "umap" in metrics:
        write_umap(out, scored)
    write_tables(populations, out / "tables")

    summary = dict(runs_dir=str(runs_dir), settings=dict(metrics=list(metrics), depth_models=depth_models, knn_k=knn_k,
                                                          tie_break=tie_break, depth_reference=depth_reference, device=device),
                   populations=rows, warnings=log, models_scored=sum(len(p.outputs) for p in scored.values()),
                   models_computed=n_computed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    if report:
        from .report import build_report  # matplotlib is imported only when figures are drawn

        build_report(out)
    print(f"scored {len(scored)} population(s), {summary['models_scored']} model(s) "
          f"({n_computed} computed, {summary['models_scored'] - n_computed} from cache) -> {out}")
    return out


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
        pd.DataFrame(cols).to_csv(out / "tables" / f"per_sample_{group}.csv", index=False, float_format="%.5g")
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
        other = PopKey(key.dataset, key.model, "supcon", key.method, key.sparsity)
        if other not in pies:
            continue
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


def write_umap(out: Path, scored: dict):
    """figdata/umap_<group>.csv: population, which (first model | population mean), sample_id, label, x, y."""
    by_group = defaultdict(list)
    for key, pop in scored.items():
        y = pop.data.test_y.numpy()
        for which, h in (("first", pop.outputs[0]["h"]), ("mean", torch.stack([o["h"] for o in pop.outputs]).mean(0))):
            xy = umap_coordinates(h)
            by_group[key.group].append(pd.DataFrame(dict(population=key.label, loss=key.loss, method=key.method,
                                                         sparsity=key.sparsity, which=which, sample_id=np.arange(len(y)),
                                                         label=y, x=xy[:, 0], y=xy[:, 1])))
    for group, frames in by_group.items():
        pd.concat(frames).to_csv(out / "figdata" / f"umap_{group}.csv", index=False, float_format="%.4f")


# ---------------------------------------------------------------- command line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="whatislost-eval", description="Score populations of finished whatislost runs.")
    p.add_argument("runs_dir")
    p.add_argument("--out", help="output folder (default RUNS_DIR/eval)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--metrics", default=",".join(ALL_METRICS), help=f"comma-separated subset of {','.join(ALL_METRICS)}")
    p.add_argument("--depth-models", type=int, default=5, help="models per population used for prediction depth")
    p.add_argument("--knn-k", type=int, default=30, help="k of the prediction-depth kNN probes")
    p.add_argument("--tie-break", default="min", choices=["min", "max"], help="class picked when the modal label is tied")
    p.add_argument("--depth-reference", default="label", choices=["label", "prediction"],
                   help="label: true label (the paper's code, default); prediction: final prediction (Baldock et al.)")
    p.add_argument("--no-report", action="store_true", help="tables and figure data only")
    args = p.parse_args(argv)
    run_eval(args.runs_dir, args.out, args.device, tuple(m for m in args.metrics.split(",") if m), args.depth_models,
             args.knn_k, args.tie_break, args.depth_reference, report=not args.no_report)
    return 0


def cli():
    sys.exit(run_cli(main, prog="whatislost-eval"))


if __name__ == "__main__":
    cli()
