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

Every run is idempotent: it is skipped when its done.json holds the configuration hash the study
asks for now, so a study killed at any moment and started again loses at most the runs in flight.
A run that fails is recorded with its reason and the study goes on; the next start retries it.

Backends: local (default) runs `--workers` runs at a time in spawned worker processes (1: in this
process), the CPU's cores split between them, spread over the GPUs when there are any;
`--backend ray` makes every run a Ray task. Runs with the same torch thread count give the same
numbers on either backend.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import logging
import multiprocessing
import os
import re
import socket
import sys
import threading
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

import whatislost  # noqa: F401  (sets NM_DISABLE_ANALYTICS before sparseml loads)

from . import train as trainer
from .config import (CHOICES, TrainConfig, UserError, apply_overrides, parse_overrides, read_yaml, resolve_recipe,
                     run_cli, unknown_key, validate, first_line)
from .data import load_data
from .metrics import mean_std
from .rundir import is_finished, read_done

DENSE = "dense"
DENSE_RECIPE = "recipes/dense.yaml"
STUDY_KEYS = ("name", "train", "losses", "methods", "sparsities", "seeds", "eval")
METHOD_KEYS = ("recipe", "losses", "train", "from_dense")
# TrainConfig keys the grid sets for every run; a study file must not set them
GRID_KEYS = {"loss": "losses", "recipe": "methods.<name>.recipe", "sparsity": "sparsities", "seed": "seeds",
             "init": "methods.<name>.from_dense", "out": "--out", "threads": "--threads", "method": "methods.<name>"}


# ---------------------------------------------------------------- the study file
@dataclass
class Method:
    """A pruning method: a SparseML recipe, the losses it applies to, and TrainConfig settings."""

    recipe: str
    losses: dict  # loss -> TrainConfig settings for this method and loss (flat, 'recipe_vars.x' keys)
    train: dict  # TrainConfig settings for every loss of this method
    from_dense: bool  # One-Shot: start from the finished dense run of the same loss and seed


@dataclass
class EvalSettings:
    """Arguments of whatislost.eval.run_eval."""

    metrics: list | None = None  # None: every metric
    depth_models: int = 5
    knn_k: int = 30
    device: str = "cpu"


@dataclass
class Study:
    name: str
    train: dict  # TrainConfig settings of every run: dataset, model, ...
    losses: dict  # loss -> TrainConfig settings of every run with that loss (per-stage epochs, optimiser)
    methods: dict  # method name -> Method
    sparsities: list  # pruned levels, fractions in (0, 1); sparsity 0 is the dense population, always trained
    seeds: list
    eval: EvalSettings = field(default_factory=EvalSettings)


def reject_unknown(values: dict, allowed, where: str):
    for key in values:
        if key not in allowed:
            raise unknown_key(key, allowed, where)


def mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping of keys to values, got {value!r}")
    return value


def settings(values, where: str) -> dict:
    """TrainConfig settings of one layer, checked against TrainConfig, flattened so layers merge
    key by key ({'recipe_vars': {'prune_end': 5}} -> {'recipe_vars.prune_end': 5})."""
    values = mapping(values, where)
    for key in values:
        if key in GRID_KEYS:
            raise UserError(f"'{key}' in {where} is set by the study grid; use {GRID_KEYS[key]} instead")
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[key] = value
    apply_overrides(TrainConfig(), flat, where)  # unknown keys and wrong types fail here, naming the nearest key
    return flat


def parse_method(name: str, spec, losses: dict, where: str) -> Method:
    if name == DENSE:
        raise UserError(f"{where}: the dense population is built in (recipes/dense.yaml, one run per loss and "
                        f"seed, sparsity 0); remove methods.dense and put its settings under losses")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", str(name)):
        raise UserError(f"{where}: method name '{name}' must be letters, digits, '_', '-' or '.' (it names folders)")
    spec = mapping(spec, where)
    reject_unknown(spec, METHOD_KEYS, where)
    if not spec.get("recipe"):
        raise UserError(f"{where} needs a recipe (e.g. recipe: recipes/gmp.yaml)")
    recipe = str(spec["recipe"])
    resolve_recipe(recipe)
    applies = spec.get("losses", list(losses))
    if isinstance(applies, (list, tuple)):
        applies = {loss: {} for loss in applies}
    applies = mapping(applies, f"{where}.losses")
    for loss in applies:
        if loss not in losses:
            raise UserError(f"{where}.losses: '{loss}' is not one of the study's losses ({', '.join(losses)})")
    from_dense = spec.get("from_dense", Path(recipe).stem == "oneshot")
    if not isinstance(from_dense, bool):
        raise UserError(f"{where}.from_dense must be true or false, got {from_dense!r}")
    if Path(recipe).stem == "oneshot" and not from_dense:
        raise UserError(f"{where}: the One-Shot recipe prunes a trained dense model; from_dense cannot be false")
    return Method(recipe, {loss: settings(v, f"{where}.losses.{loss}") for loss, v in applies.items()},
                  settings(spec.get("train"), f"{where}.train"), from_dense)


def parse_sparsities(value, where: str) -> list:
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"{where}: sparsity levels are numbers, got {v!r}")
        if not 0 <= v < 1:
            hint = f" (did you mean {v / 100:g}?)" if 1 <= v < 100 else ""
            raise UserError(f"{where}: sparsity levels are fractions in [0, 1), got {v}{hint}")
        if v in out:
            raise UserError(f"{where}: sparsity {v} is listed twice")
        out.append(float(v))
    return sorted(v for v in out if v > 0)  # 0 is the dense population, which is always trained


def parse_seeds(value, where: str) -> list:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise UserError(f"{where}: number of seeds must be >= 1, got {value}")
        return list(range(value))
    if isinstance(value, list) and value and all(type(s) is int and s >= 0 for s in value):  # bool is no seed
        if len(set(value)) != len(value):
            raise UserError(f"{where}: a seed is listed twice in {value}")
        return list(value)
    raise UserError(f"{where}: seeds is a number of seeds (30) or a list of seeds ([0, 1, 2]), got {value!r}")


def parse_eval(value, where: str) -> EvalSettings:
    values = dict(mapping(value, where))
    metrics = values.pop("metrics", None)
    if isinstance(metrics, str):
        metrics = [metrics]
    if metrics is not None and not (isinstance(metrics, list) and all(isinstance(m, str) for m in metrics)):
        raise UserError(f"{where}.metrics must be a list of metric names, got {metrics!r}")
    ev = apply_overrides(EvalSettings(metrics=metrics), values, where)
    if ev.device not in CHOICES["device"]:
        raise UserError(f"{where}.device must be one of {', '.join(CHOICES['device'])}; got '{ev.device}'")
    return ev


def parse_study(raw: dict, source: str) -> Study:
    """The study file as typed objects; every mistake is a one-line UserError naming where it is."""
    reject_unknown(raw, STUDY_KEYS, source)
    losses = mapping(raw.get("losses"), f"{source}: losses")
    if not losses:
        raise UserError(f"{source} names no losses (e.g. losses: {{ce: {{}}, supcon: {{}}}})")
    for loss in losses:
        if loss not in CHOICES["loss"]:
            raise UserError(f"{source}: losses: '{loss}' is not a loss ({', '.join(CHOICES['loss'])})")
    losses = {loss: settings(v, f"{source}: losses.{loss}") for loss, v in losses.items()}
    methods = {name: parse_method(name, spec, losses, f"{source}: methods.{name}")
               for name, spec in mapping(raw.get("methods"), f"{source}: methods").items()}
    return Study(name=str(raw.get("name") or Path(source).stem),
                 train=settings(raw.get("train"), f"{source}: train"), losses=losses, methods=methods,
                 sparsities=parse_sparsities(raw.get("sparsities", [0]), f"{source}: sparsities"),
                 seeds=parse_seeds(raw.get("seeds", 1), f"{source}: seeds"),
                 eval=parse_eval(raw.get("eval"), f"{source}: eval"))


def set_dotted(raw: dict, key: str, text: str):
    """Command-line override 'losses.ce.epochs=3' into the raw study dict (value parsed as YAML)."""
    try:
        value = yaml.safe_load(text) if isinstance(text, str) else text
    except yaml.YAMLError:
        value = text
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if isinstance(child, list) and all(isinstance(x, str) for x in child):
            child = {x: {} for x in child}  # 'losses: [ce]' of a method, so that losses.ce.x=... can be set
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise UserError(f"override '{key}': '{part}' holds {child!r}, not a mapping")
        node[part] = child
        node = child
    node[last] = value


def load_study(path, overrides: dict | None = None) -> tuple[Study, dict]:
    """(Study, the raw dict it came from) of a study file with command-line overrides applied."""
    raw = read_yaml(path)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return parse_study(raw, str(path)), raw


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


def run_name(loss: str, method: str, sparsity: float, seed: int) -> str:
    return f"{loss}/{method}/s{100 * sparsity:g}/seed{seed}"


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


def check_runs(runs: list[Run]):
    """What would make runs fail, found before any of them starts: missing data, recipes SparseML rejects."""
    seen = set()
    for run in runs:
        cfg = run.config
        if cfg.dataset != "digits" and not Path(cfg.data_root).exists():
            raise UserError(f"data_root {cfg.data_root} does not exist (relative to {os.getcwd()})")
        key = (cfg.recipe, repr(sorted(cfg.recipe_vars.items())), cfg.sparsity, cfg.epochs, cfg.finetune_epochs)
        if key not in seen:
            seen.add(key)
            try:
                trainer.load_manager(cfg, cfg.finetune_epochs if run.dense else cfg.epochs)
            except UserError as err:
                raise UserError(f"{run.population}: {err}") from None


def saved_config(run: Run) -> dict:
    """The config.yaml a finished run was trained with ({} if unreadable)."""
    try:
        saved = yaml.safe_load((Path(run.config.out) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def config_change(run: Run) -> str:
    """What differs between a finished run's saved config and what the study asks for now."""
    saved = saved_config(run)
    changes = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in run.config.to_dict().items()
               if k not in ("out", "threads", "init") and saved.get(k) != v]
    return ", ".join(changes) or "configuration hash differs"


def run_states(runs: list[Run]) -> dict:
    """{name: (state, detail)}: 'done' (finished with this configuration), 'todo', or 'changed'
    (finished, but with another configuration, or before the dense run it started from)."""
    states, by_name = {}, {run.name: run for run in runs}
    for run in runs:  # a dense run comes before the runs that start from it
        path = Path(run.config.out)
        if not is_finished(path):
            states[run.name] = ("todo", "")
            continue
        done, expected = read_done(path), run.config
        if run.dense:
            # which dense run a One-Shot run starts from is fixed by the grid (same loss and seed) and checked
            # below; its path is not, so a study folder that was moved or copied keeps its One-Shot runs
            expected = dataclasses.replace(run.config, init=saved_config(run).get("init", run.config.init))
        if done.get("config_hash") != expected.hash():
            states[run.name] = ("changed", config_change(run))
        elif run.dense and states[run.dense][0] != "done":
            states[run.name] = ("changed", "its dense run is to be trained again")
        elif run.dense and read_done(by_name[run.dense].config.out)["finished_at"] > done.get("finished_at", ""):
            states[run.name] = ("changed", "its dense run was trained again after it")
        else:
            states[run.name] = ("done", "")
    return states


# ---------------------------------------------------------------- one run, in whatever process runs it
@dataclass
class Job:
    """What a worker needs to train one run: plain data, it crosses process and Ray boundaries."""

    name: str
    config: dict  # TrainConfig as a dict
    overwrite: bool  # replace a finished run trained with another configuration
    threads: int  # torch CPU threads
    log: str  # the run's console log (appended)
    cwd: str  # where the study runs: relative paths in the config are relative to it
    after: str = ""  # the dense run this One-Shot job waits for, when it is in the same batch


_DATA_CACHE: dict = {}


def quiet_trainer_console():
    """Per-epoch lines go to each run's train.log; the study's console keeps only its bar and status lines."""
    log = logging.getLogger("whatislost")
    consoles = [h for h in log.handlers if type(h) is logging.StreamHandler]
    if not consoles:
        consoles = [logging.StreamHandler(sys.stderr)]  # bound now, outside any redirect
        log.addHandler(consoles[0])
    for handler in consoles:
        handler.setLevel(logging.WARNING)


def execute_run(job: Job) -> dict:
    """Train one run here (the study's process, a worker process or a Ray task). Never raises:
    a failure is returned with its reason, and its traceback goes to the run's log."""
    t0 = time.perf_counter()
    quiet_trainer_console()
    if os.getcwd() != job.cwd and Path(job.cwd).is_dir():
        os.chdir(job.cwd)  # Ray workers start elsewhere
    cfg = TrainConfig(**job.config)
    cfg.threads = job.threads
    Path(job.log).parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as log, redirect_stdout(log), redirect_stderr(log):
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {job.name} on {socket.gethostname()} pid {os.getpid()} "
              f"threads {cfg.threads}", flush=True)
        try:
            key = (cfg.dataset, cfg.data_root)
            if key not in _DATA_CACHE:  # workers train many runs on the same data
                _DATA_CACHE[key] = load_data(cfg.dataset, cfg.data_root)
            run_dir = trainer.train(cfg, data=_DATA_CACHE[key], overwrite=job.overwrite)
            done = read_done(run_dir)
            return dict(name=job.name, status="done", test_acc=done["test_acc"], sparsity=done["sparsity"],
                        seconds=time.perf_counter() - t0, reason="")
        except UserError as err:
            print(f"error: {err}")
            reason = str(err)
        except Exception as err:  # a crash inside one run must not stop the study
            traceback.print_exc()
            reason = f"{type(err).__name__}: {first_line(err)} (traceback in {job.log})"
    return dict(name=job.name, status="failed", reason=reason, seconds=time.perf_counter() - t0)


def failure(job: Job, reason: str) -> dict:
    return dict(name=job.name, status="failed", reason=reason, seconds=0.0)


# ---------------------------------------------------------------- backends
def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _exit_with_parent(parent_pid: int):
    # a worker whose study was killed must not go on writing into a run the next study retrains
    while os.getppid() == parent_pid:
        time.sleep(0.2)
    os._exit(1)


def _init_worker(gpu_slots, parent_pid: int):
    gpu = gpu_slots.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before CUDA starts in this process
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


class LocalBackend:
    """`workers` runs at a time: in this process when 1, else in spawned worker processes,
    worker i on GPU i % gpus when there are GPUs (so several workers may share one)."""

    def __init__(self, workers: int, gpus: int = 0):
        self.workers, self.gpus, self.pool = workers, gpus, None
        self.capacity = workers

    def submit(self, job: Job):
        if self.workers == 1:
            future = concurrent.futures.Future()
            future.set_result(execute_run(job))
            return future
        if self.pool is None:
            context = multiprocessing.get_context("spawn")  # torch after fork() is fragile
            slots = context.Queue()
            for i in range(self.workers):
                slots.put(i % self.gpus if self.gpus else None)
            self.pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context,
                                                               initializer=_init_worker, initargs=(slots, os.getpid()))
        return self.pool.submit(execute_run, job)

    def wait(self, handles):
        return concurrent.futures.wait(handles, return_when=concurrent.futures.FIRST_COMPLETED).done

    def result(self, handle, job: Job) -> dict:
        try:
            return handle.result()
        except concurrent.futures.process.BrokenProcessPool:
            if self.pool is not None:
                self.pool.shutdown(wait=False)
                self.pool = None  # the next submit starts fresh workers
            return failure(job, f"its worker process died (killed, or out of memory); see {job.log}")

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class RayBackend:
    """Every run is a Ray task with its CPU and GPU needs (fractions of a GPU allowed), on the cluster at
    `address`, or on the Ray already started in this process, or on a local instance started here."""

    def __init__(self, address: str | None, cpus: float, gpus: float):
        try:
            import ray
        except ImportError:
            raise UserError("--backend ray needs Ray: pip install 'whatislost[ray]'") from None
        self.ray, self.started = ray, not ray.is_initialized()
        if self.started:
            try:
                ray.init(address=address, include_dashboard=False)
            except Exception as err:  # ConnectionError, ValueError, ... for a bad or unreachable address
                raise UserError(f"could not start or reach Ray{' at ' + address if address else ''}: "
                                f"{first_line(err)}") from None
        self.task = ray.remote(num_cpus=cpus, num_gpus=gpus)(execute_run)
        self.capacity = float("inf")  # Ray queues tasks until their resources are free

    def submit(self, job: Job):
        return self.task.remote(job)

    def wait(self, handles):
        return self.ray.wait(list(handles), num_returns=1)[0]

    def result(self, handle, job: Job) -> dict:
        try:
            return self.ray.get(handle)
        except Exception as err:  # the task's worker died, the node went away, ...
            return failure(job, f"Ray task failed: {type(err).__name__}: {first_line(err)}")

    def close(self):
        if self.started:
            self.ray.shutdown()


def run_jobs(jobs: list[Job], backend, report) -> None:
    """Run every job, `backend.capacity` at a time; a One-Shot job waits for its dense job and
    fails without running if that failed. report(result) is called once per job, as it ends."""
    waiting, in_flight, ok, failed = list(jobs), {}, set(), set()
    while waiting or in_flight:
        for job in list(waiting):
            if job.after in failed:
                waiting.remove(job)
                failed.add(job.name)
                report(failure(job, f"its dense run {job.after} failed"))
            elif (not job.after or job.after in ok) and len(in_flight) < backend.capacity:
                waiting.remove(job)
                in_flight[backend.submit(job)] = job
        if not in_flight:
            for job in waiting:  # cannot happen: every dense run of a waiting job is in flight or finished
                report(failure(job, f"its dense run {job.after} never ran"))
            return
        for handle in backend.wait(list(in_flight)):
            job = in_flight.pop(handle)
            result = backend.result(handle, job)
            (ok if result["status"] == "done" else failed).add(job.name)
            report(result)


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


def write_table(path: Path, runs: list[Run], results: dict):
    """OUT/runs.csv: one row per run of the grid, rewritten as runs end."""
    tmp = path.with_suffix(".tmp")
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
    import torch

    from .eval import run_eval  # the eval stage, imported only when a study gets that far

    device = study.eval.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    eval_dir = run_eval(out / "runs", out=out / "eval", device=device, metrics=study.eval.metrics,
                        depth_models=study.eval.depth_models, knn_k=study.eval.knn_k)
    return Path(eval_dir) / "report" / "index.html"


def training_gpus(runs: list[Run]) -> int:
    devices = {run.config.device for run in runs}
    if "cuda" in devices or "auto" in devices:
        import torch

        return torch.cuda.device_count()
    return 0


def make_backend(args, runs: list[Run]):
    """(backend, torch threads per run). Left at their defaults, both backends give every run one CPU
    thread on a CPU machine, so they compute the same numbers (the thread count changes them)."""
    if args.backend == "ray":
        gpus = args.gpus_per_run if args.gpus_per_run is not None else (1 if training_gpus(runs) else 0)
        cpus = args.cpus_per_run or args.threads or 1
        return RayBackend(args.address, cpus, gpus), args.threads or max(1, int(cpus))
    gpus = training_gpus(runs)
    workers = args.workers or gpus or max(1, cpu_count() // (args.threads or 1))
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
                                epilog="Any study key can be set as key=value, e.g. seeds=3 losses.ce.epochs=10 "
                                       "sparsities=[0.5,0.9].")
    p.add_argument("config", help="study YAML file (examples/quickstart.yaml, examples/cifar10_paper.yaml)")
    p.add_argument("--out", help="study folder (default runs/<study name>)")
    p.add_argument("--workers", type=int, help="local backend: runs at a time, 1 = in this process (default: one "
                                               "per GPU when training on GPUs, else one per core)")
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
    for flag in ("workers", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1; got {getattr(args, flag)}")
    study, raw = load_study(args.config, parse_overrides(args.overrides))
    out = Path(args.out or Path("runs") / study.name)
    runs = expand(study, out)
    check_runs(runs)
    states = run_states(runs)
    if args.dry_run:
        dry_run(runs, states, out)
        return 0
    changed = [run for run in runs if states[run.name][0] == "changed"]
    if changed and not args.rerun_changed:
        raise UserError(f"{len(changed)} finished runs under {out / 'runs'} differ from what {args.config} asks for "
                        f"(first: {changed[0].name}: {states[changed[0].name][1]}); pass --rerun-changed to retrain "
                        f"them, or use another --out")

    out.mkdir(parents=True, exist_ok=True)
    with lock_study(out):
        (out / "study.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
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
