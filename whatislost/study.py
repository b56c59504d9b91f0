"""Study stage: the paper's grid of training runs from one YAML file, run to the end, then evaluated.

    whatislost-study examples/quickstart.yaml --out runs/quickstart [--workers N | --backend ray] [key=value ...]

A study (Corti et al. 2022, Section 3) trains populations of models that differ only in their
seed. For every loss (Sup = `ce`, SCL = `supcon`) there is one dense population, and for every
pruning method that applies to the loss and every sparsity level one pruned population. Dense
runs are trained once per (loss, seed); One-Shot runs start from them.

    OUT/study.yaml                                    the study as resolved (file + overrides)
    OUT/runs/<loss>/<method>/s<sparsity %>/seed<k>/   one run directory each (rundir.py); dense: <loss>/dense/s0/
    OUT/logs/<loss>-<method>-s<sparsity %>-seed<k>.log  console output of every attempt: warnings, tracebacks
    OUT/runs.csv                                      one row per run: status, accuracy, sparsity, seconds, reason
    OUT/eval/report/index.html                        the evaluation (whatislost.eval.run_eval)

Every run is idempotent: it is skipped when its done.json holds the run hash the study asks for
now (identity.py: the population's identity, the seed and the method's name) and its checkpoint
matches the hash recorded beside it, so a study killed at any moment and started again loses at
most the epochs since the runs in flight last saved their state (they continue from it). A run
that fails is recorded with its reason and the study goes on; the next start retries it.

The study file's schema is in studyfile.py; where runs train (local workers, Ray) in backends.py.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from .backends import DEFAULT_RUNS_PER_GPU, Job, LocalBackend, RayBackend, cpu_count, run_jobs
from .cli import UserError, run_cli
from .config import TrainConfig, apply_overrides, describe_keys, parse_overrides, resolve_device, validate
from .data import load_run_data
from .identity import DENSE, population_id, run_hash, run_identity, study_run_name
from .metrics import mean_std
from .pruning import load_manager
from .train import prunes_linear_stage, pruned_stage_epochs
from .rundir import atomic_write_text, is_finished, read_done
from .studyfile import EvalSettings, Study, load_study

DENSE_RECIPE = "recipes/dense.yaml"


# ---------------------------------------------------------------- the grid
@dataclass
class Run:
    """One cell of the grid."""

    name: str  # '<loss>/<method>/s<sparsity %>/seed<k>': its folder under OUT/runs, and its label
    loss: str
    method: str
    sparsity: float
    seed: int
    config: TrainConfig  # out and init filled in
    dense: str = ""  # name of the dense run it starts from (One-Shot), else ""

    @property
    def population(self) -> str:
        return self.name.rsplit("/", 1)[0]


run_name = study_run_name


def run_config(study: Study, out: Path, loss: str, method: str, sparsity: float, seed: int) -> TrainConfig:
    """defaults <- study train <- losses.<loss> <- methods.<method>.train <- its losses.<loss> <- the grid cell."""
    cfg = TrainConfig()
    apply_overrides(cfg, study.train, "train")
    apply_overrides(cfg, study.losses[loss], f"losses.{loss}")
    recipe, spec = DENSE_RECIPE, study.methods.get(method)
    if spec is not None:
        apply_overrides(cfg, spec.train, f"methods.{method}.train")
        apply_overrides(cfg, spec.losses[loss], f"methods.{method}.losses.{loss}")
        recipe = spec.recipe
        if spec.from_dense:
            # relative to where the study runs, so the hash does not change with how --out is spelled
            cfg.init = os.path.relpath(out / "runs" / run_name(loss, DENSE, 0.0, seed))
    # the study's method name labels the population, so two methods may share one recipe file
    cfg.loss, cfg.recipe, cfg.sparsity, cfg.seed, cfg.method = loss, recipe, sparsity, seed, method
    cfg.out = str(out / "runs" / run_name(loss, method, sparsity, seed))
    try:
        return validate(cfg)
    except UserError as err:
        raise UserError(f"{run_name(loss, method, sparsity, seed)}: {err}") from None


def expand(study: Study, out: Path) -> list[Run]:
    """Every run of the study, seed by seed (so every population grows together), dense runs first."""
    runs = []
    for seed in study.seeds:
        for loss in study.losses:
            runs.append(Run(run_name(loss, DENSE, 0.0, seed), loss, DENSE, 0.0, seed,
                            run_config(study, out, loss, DENSE, 0.0, seed)))
        for loss in study.losses:
            for method, spec in study.methods.items():
                if loss not in spec.losses:
                    continue
                for sparsity in study.sparsities:
                    dense = run_name(loss, DENSE, 0.0, seed) if spec.from_dense else ""
                    runs.append(Run(run_name(loss, method, sparsity, seed), loss, method, sparsity, seed,
                                    run_config(study, out, loss, method, sparsity, seed), dense))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError("two sparsity levels give the same run folder; use levels that differ by at least 0.00001")
    return runs


@dataclass
class Expected:
    """What a finished run must hold to count as done now."""

    key: str  # run hash (done.json's config_hash)
    population: str  # population id


def plan_runs(runs: list[Run]) -> dict:
    """{run name: Expected}, computed the way the trainer computes it, which also finds before any run starts
    what would make runs fail: missing data, recipes SparseML rejects or the loop cannot honour."""
    data, managers, planned = {}, {}, {}

    def applied(recipe, epochs, sparsity, variables, where):
        key = (recipe, epochs, sparsity, repr(sorted(variables.items())))
        if key not in managers:
            try:
                managers[key] = str(load_manager(recipe, epochs, sparsity, variables))
            except UserError as err:
                raise UserError(f"{where}: {err}") from None
        return managers[key]

    for run in runs:  # a dense run comes before the runs that start from it
        cfg = run.config
        source = (cfg.dataset, cfg.data_root, cfg.train_per_class, cfg.test_per_class)
        if source not in data:
            if cfg.dataset != "digits" and not Path(cfg.data_root).exists():
                raise UserError(f"data_root {cfg.data_root} does not exist (relative to {os.getcwd()})")
            data[source] = load_run_data(cfg).fingerprint
        recipe = applied(cfg.recipe, pruned_stage_epochs(cfg), cfg.sparsity, cfg.recipe_vars, run.population)
        linear = ""
        if prunes_linear_stage(cfg):
            linear = applied(cfg.linear_recipe, cfg.linear_epochs, cfg.sparsity, cfg.linear_recipe_vars, run.population)
        init_population = planned[run.dense].population if run.dense else ""
        identity = run_identity(cfg.to_dict(), recipe, data[source], linear, init_population)
        planned[run.name] = Expected(run_hash(identity, cfg.seed, cfg.method_name), population_id(identity))
    return planned


def saved_config(run: Run) -> dict:
    """The config.yaml a finished run was trained with ({} if unreadable)."""
    try:
        saved = yaml.safe_load((Path(run.config.out) / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def config_change(run: Run) -> str:
    """What differs between a finished run's saved config and what the study asks for now."""
    saved = saved_config(run)
    changes = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in run.config.to_dict().items()
               if k not in ("out", "threads", "init") and saved.get(k) != v]
    return ", ".join(changes) or "its recipe, data or dense run differs"


def run_states(runs: list[Run], planned: dict) -> dict:
    """{name: (state, detail)}: 'done' (finished with this configuration, checkpoint intact), 'todo', or
    'changed' (finished, but with another configuration, or before the dense run it started from).
    A truncated done.json or model.pt makes a run 'todo': it is trained again, never skipped forever."""
    states, by_name = {}, {run.name: run for run in runs}
    for run in runs:  # a dense run comes before the runs that start from it
        path = Path(run.config.out)
        if not is_finished(path, verify=True):
            states[run.name] = ("todo", "")
            continue
        done = read_done(path)
        # a One-Shot run's identity holds its dense population, not the dense run's path, so a study
        # folder that was moved or copied keeps its runs
        if done.get("config_hash") != planned[run.name].key:
            states[run.name] = ("changed", config_change(run))
        elif run.dense and states[run.dense][0] != "done":
            states[run.name] = ("changed", "its dense run is to be trained again")
        elif run.dense and read_done(by_name[run.dense].config.out).get("finished_at", "") > done.get("finished_at", ""):
            states[run.name] = ("changed", "its dense run was trained again after it")
        else:
            states[run.name] = ("done", "")
    return states


# ---------------------------------------------------------------- the study, end to end
def lock_study(out: Path):
    """OUT/.lock, held until the returned file is closed (or this process ends, however it ends):
    two studies must not train into one folder."""
    import fcntl

    handle = open(out / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"another whatislost-study is running on {out} (it holds {out / '.lock'})") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def check_study_dir(out: Path):
    """A study folder is new, empty, or one of ours (study.yaml, runs/): never a user's folder."""
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UserError(f"--out {out} is the current folder or holds it; give a folder for the study")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not ((out / "study.yaml").is_file() or (out / "runs").is_dir()):
        raise UserError(f"--out {out} is a folder whatislost-study did not make and it is not empty; give a new folder")


def write_table(path: Path, runs: list[Run], results: dict):
    """OUT/runs.csv: one row per run of the grid, rewritten (atomically) as runs end."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["run", "loss", "method", "target_sparsity", "seed", "status", "test_acc", "sparsity", "seconds",
                      "reason", "run_dir"])
        for run in runs:
            r = results.get(run.name, {"status": "pending"})
            out.writerow([run.name, run.loss, run.method, run.sparsity, run.seed, r["status"],
                          _fmt(r.get("test_acc")), _fmt(r.get("sparsity")), _fmt(r.get("seconds"), 1),
                          r.get("reason", ""), run.config.out])
    tmp.replace(path)


def _fmt(x, digits=4):
    return "" if x is None else f"{x:.{digits}f}"


def status_line(result: dict) -> str:
    if result["status"] == "failed":
        return f"FAILED {result['name']}: {result['reason']}"
    return (f"done   {result['name']:<28} test acc {result['test_acc']:6.2%}  sparsity {result['sparsity']:6.2%}  "
            f"{result['seconds']:6.1f}s")


def summary(study: Study, runs: list[Run], results: dict, seconds: float) -> str:
    counts = {s: sum(r["status"] == s for r in results.values()) for s in ("done", "skipped", "failed")}
    lines = [f"study {study.name}: {len(runs)} runs: {counts['done']} trained, {counts['skipped']} skipped "
             f"(finished before), {counts['failed']} failed, in {seconds / 60:.1f} min"]
    accs = {run.population: [] for run in runs}  # in grid order
    for run in runs:
        if results.get(run.name, {}).get("test_acc") is not None:
            accs[run.population].append(100 * results[run.name]["test_acc"])
    if any(accs.values()):
        lines.append(f"  {'population':<22} {'runs':>4}  test accuracy %")
        for population, values in accs.items():
            if not values:
                continue
            # the same population std (ddof=0) as the eval's tables, so the two agree
            mean, std = mean_std(torch.tensor(values))
            lines.append(f"  {population:<22} {len(values):>4}  {mean:.2f} ± {std:.2f}")
    failed = [r for r in results.values() if r["status"] == "failed"]
    if failed:
        lines.append("failed runs (no done.json; run the same command again to retry them):")
        lines += [f"  {r['name']}: {r['reason']}" for r in failed]
    return "\n".join(lines)


def evaluate(study: Study, out: Path) -> Path:
    """whatislost.eval over the finished runs; returns the report's path."""
    from .eval import run_eval  # the eval stage, imported only when a study gets that far

    ev = study.eval
    eval_dir = run_eval(out / "runs", out=out / "eval", device=resolve_device(ev.device).type,
                        metrics=ev.metrics, depth_models=ev.depth_models, knn_k=ev.knn_k, tie_break=ev.tie_break,
                        depth_reference=ev.depth_reference, probes=ev.probes, depth_train=ev.depth_train,
                        n_boot=ev.n_boot, n_perm=ev.n_perm, alpha=ev.alpha, correction=ev.correction,
                        cka_samples=ev.cka_samples)
    return Path(eval_dir) / "report" / "index.html"


def training_gpus(runs: list[Run]) -> int:
    devices = {run.config.device for run in runs}
    if "cuda" in devices or "auto" in devices:
        return torch.cuda.device_count()
    return 0


def make_backend(args, runs: list[Run]):
    """(backend, torch threads per run). Left at their defaults, both backends give every run one CPU
    thread on a CPU machine, so they compute the same numbers (the thread count changes them)."""
    per_gpu = args.runs_per_gpu or DEFAULT_RUNS_PER_GPU
    if args.backend == "ray":
        gpus = args.gpus_per_run if args.gpus_per_run is not None else (1 / per_gpu if training_gpus(runs) else 0)
        cpus = args.cpus_per_run or args.threads or 1
        return RayBackend(args.address, cpus, gpus), args.threads or max(1, int(cpus))
    gpus = training_gpus(runs)
    workers = args.workers or (gpus * per_gpu if gpus else max(1, cpu_count() // (args.threads or 1)))
    return LocalBackend(workers, gpus), args.threads or max(1, cpu_count() // workers)


def dry_run(runs: list[Run], states: dict, out: Path):
    populations = {}
    for run in runs:
        populations.setdefault(run.population, []).append(states[run.name][0])
    for population, values in populations.items():
        counts = ", ".join(f"{values.count(s)} {s}" for s in ("done", "todo", "changed") if values.count(s))
        print(f"{population:<24} {len(values):>4} runs ({counts})")
    print(f"{len(runs)} runs in {len(populations)} populations under {out / 'runs'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="whatislost-study", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any study key can be set as key=value, e.g. seeds=3 losses.ce.epochs=10 "
                                       "sparsities=[0.5,0.9].\n\nstudy keys: name, train, losses, methods, sparsities, "
                                       "seeds, eval (README, 'Running a study').\ntrain / losses.<loss> / "
                                       "methods.<m>.train take these TrainConfig keys (default, meaning):\n"
                                       + describe_keys() + "\neval takes (default, meaning):\n"
                                       + describe_keys(EvalSettings))
    p.add_argument("config", help="study YAML file (examples/quickstart.yaml, examples/cifar10_paper.yaml)")
    p.add_argument("--out", help="study folder (default runs/<study name>)")
    p.add_argument("--workers", type=int, help="local backend: runs at a time, 1 = in this process (default: "
                                               "--runs-per-gpu per GPU when training on GPUs, else one per core)")
    p.add_argument("--runs-per-gpu", dest="runs_per_gpu", type=int,
                   help=f"runs sharing each GPU (default {DEFAULT_RUNS_PER_GPU}, measured: a WRN-16-2 step leaves most "
                        f"of a GPU idle); ray: sets the default --gpus-per-run to 1/K")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--address", help="ray backend: address of an existing Ray cluster (default: start a local one)")
    p.add_argument("--cpus-per-run", dest="cpus_per_run", type=float, help="ray backend (default: --threads, or 1)")
    p.add_argument("--gpus-per-run", dest="gpus_per_run", type=float,
                   help="ray backend, fractions allowed (default 1 when training on GPUs, else 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads per run (default: cores / workers; ray: "
                                               "cpus-per-run); runs match across backends when this matches")
    p.add_argument("--no-eval", dest="no_eval", action="store_true", help="train only; skip eval and report")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="list the grid and what is done; train nothing")
    p.add_argument("--rerun-changed", dest="rerun_changed", action="store_true",
                   help="retrain finished runs whose configuration differs from what the study now asks for")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.backend != "ray" and args.address:
        raise UserError("--address is for --backend ray")
    if args.backend == "ray" and args.workers:
        raise UserError("--workers is for the local backend; Ray places runs by --cpus-per-run/--gpus-per-run")
    for flag in ("workers", "threads", "runs_per_gpu"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    study, raw = load_study(args.config, parse_overrides(args.overrides))
    out = Path(args.out or Path("runs") / study.name)
    runs = expand(study, out)
    states = run_states(runs, plan_runs(runs))
    if args.dry_run:
        dry_run(runs, states, out)
        return 0
    changed = [run for run in runs if states[run.name][0] == "changed"]
    if changed and not args.rerun_changed:
        raise UserError(f"{len(changed)} finished runs under {out / 'runs'} differ from what {args.config} asks for "
                        f"(first: {changed[0].name}: {states[changed[0].name][1]}); pass --rerun-changed to retrain "
                        f"them, or use another --out")

    check_study_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    with lock_study(out):
        atomic_write_text(out / "study.yaml", yaml.safe_dump(raw, sort_keys=False))
        return execute_study(args, study, runs, states, out)


def execute_study(args, study: Study, runs: list[Run], states: dict, out: Path) -> int:
    """Train what is not done yet, print the summary, evaluate; exit code 1 if a run failed."""
    results = {run.name: {"name": run.name, "status": "skipped", **read_done(run.config.out)}
               for run in runs if states[run.name][0] == "done"}
    todo = [run for run in runs if run.name not in results]
    backend, threads = make_backend(args, todo) if todo else (None, 0)
    jobs = [Job(run.name, run.config.to_dict(), overwrite=states[run.name][0] == "changed", threads=threads,
                log=str(out / "logs" / f"{run.name.replace('/', '-')}.log"), cwd=os.getcwd(),
                after=run.dense if run.dense and states[run.dense][0] != "done" else "") for run in todo]

    t0 = time.perf_counter()
    bar = tqdm(total=len(runs), initial=len(results), desc=study.name, unit="run", smoothing=0, file=sys.stderr,
               dynamic_ncols=True)
    if results:
        tqdm.write(f"{len(results)} of {len(runs)} runs already finished with this configuration: skipped")

    def report(result):
        results[result["name"]] = result
        bar.update(1)
        tqdm.write(status_line(result))
        write_table(out / "runs.csv", runs, results)

    write_table(out / "runs.csv", runs, results)
    try:
        if jobs:
            run_jobs(jobs, backend, report)
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: {sum(r['status'] == 'done' for r in results.values())} runs trained; run the same "
              f"command again to finish the other {len(runs) - len(results)}", file=sys.stderr)
        raise
    finally:
        if backend is not None:
            backend.close()
    bar.close()
    print(summary(study, runs, results, time.perf_counter() - t0))
    print(f"table of runs: {out / 'runs.csv'}")
    if any(r["status"] == "failed" for r in results.values()):
        print("eval skipped: some runs failed; run the same command again to retry them", file=sys.stderr)
        return 1
    if args.no_eval:
        print(out)
        return 0
    print(evaluate(study, out))
    return 0


def cli():
    sys.exit(run_cli(main, prog="whatislost-study"))


if __name__ == "__main__":
    cli()
