"""Populations of finished runs: who belongs together, who is compared with whom, and each model's outputs.

Finished run directories are pooled by identity (identity.py); runs that share a label but not
an identity become separate populations with a variant label. Each pruned population gets its
dense reference: the dense population its runs started from (One-Shot), else the one with the
same data, architecture, loss and training settings. Each population is scored on its own data,
checked against the fingerprint its runs recorded. Per model, one forward pass over the test set
gives predictions and the representation h (plus probe representations for prediction depth and
CKA); the results are cached in RUN_DIR/eval_cache.pt, keyed by the checkpoint's SHA-256 and the
data's fingerprint. A model whose outputs are not finite is left out with a warning.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cli import UserError, first_line, progress, warn
from .augment import make_augment
from .data import ImageData, load_run_data
from .identity import DENSE, population_id, population_label, reference_id, run_identity
from .metrics import mean_std, modal_labels, pie_mask, prediction_depth, q_score
from .models import model_label, num_probes
from .rundir import CHECKPOINT, atomic_torch_save, file_sha256, find_runs, load_checkpoint, load_model

CACHE_VERSION = 2
CKA_SAMPLES = 10000  # default --cka-samples: test images CKA is computed on (0: all); CIFAR's whole test set


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


def depth_augment(cfg: dict, data: ImageData, device, seed: int = 0):
    """The run's own Sup augmentation (crop with padding, flips) with a fixed seed, drawn on `device`, so that the
    augmented training set the depth kNN is fitted on is the same every time (and the cache stays valid)."""
    generator = torch.Generator(device=device).manual_seed(seed)
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
            augment = depth_augment(cfg or {}, data, device) if depth_train == "augmented" else None
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
        warn(f"{len(unfinished)} run(s) without done marker skipped: {', '.join(str(p) for p in unfinished[:5])}"
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
            warn(f"cannot load checkpoint of {run_dir}: {first_line(err)}", log)
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
            warn(f"runs labelled {population_label(fields[2], fields[3], fields[4] / 100)} ({fields[0]}-{fields[1]}) "
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
            warn(f"population {pop.key.label} ({pop.key.group}) has no dense population with the same data and "
                  f"training settings to compare with: no PIEs", log)
            continue
        found.sort(key=lambda d: -len(d.runs))
        pop.reference = found[0].key
        if len(found) > 1 or legacy:
            warn(f"population {pop.key.label} ({pop.key.group}) is compared with dense population "
                  f"{found[0].key.label} ({found[0].key.population[:6]}, {len(found[0].runs)} runs)"
                  + (f", one of {len(found)} that qualify" if len(found) > 1 else ", matched by data set name only"), log)


def cached_run_data(cfg: dict, cache: dict) -> ImageData | UserError:
    """The data a run's saved config names, loaded once per eval (cache: source -> data, or the UserError it gave)."""
    source = (cfg["dataset"], cfg.get("data_root", ""), cfg.get("train_per_class", 0), cfg.get("test_per_class", 0))
    if source not in cache:
        try:
            cache[source] = load_run_data(cfg)
        except UserError as err:
            cache[source] = err
    return cache[source]


def load_population_data(pop: Population, cache: dict, log: list) -> ImageData | None:
    """The population's own data, from where its first run was trained, checked against the fingerprint
    its runs recorded (None, with a warning, when it is missing or has changed since)."""
    cfg = pop.runs[0][2]
    data = cached_run_data(cfg, cache)
    if isinstance(data, UserError):
        warn(f"population {pop.key.label} ({pop.key.group}) skipped: {data}", log)
        return None
    recorded = pop.identity.get("data", "")
    if ":" not in recorded and recorded != data.fingerprint:  # (older versions recorded no fingerprint)
        warn(f"population {pop.key.label} ({pop.key.group}) skipped: the data at {cfg.get('data_root') or cfg['dataset']} has "
              f"changed since its runs were trained (fingerprint {data.fingerprint}, recorded {recorded})", log)
        return None
    return data


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
        except (UserError, OSError) as err:  # one bad checkpoint or unreadable file must not stop the others
            warn(f"run {run_dir} failed to score: {first_line(err)}", log)
            continue
        computed += o.pop("computed")
        if not o.pop("finite"):
            warn(f"run {run_dir} left out of {pop.key.label}: NaN/inf in its logits or representation h", log)
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
            warn(f"population {key.label} ({key.group}): its dense reference {pop.reference.label} could not be "
                  f"scored: no PIEs", log)
        elif len(pop.outputs) < 2 or len(dense.outputs) < 2:
            warn(f"population {key.label} ({key.group}) or its dense counterpart has one model: "
                  "PIEs (a difference of modal labels) are undefined", log)
        else:
            mask, tied = pie_mask(torch.stack([o["preds"] for o in dense.outputs]),
                                  torch.stack([o["preds"] for o in pop.outputs]), pop.data.num_classes, tie_break)
            pies[key] = {"mask": mask, "tied": tied}
    return pies


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
