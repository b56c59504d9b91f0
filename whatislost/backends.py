"""Study backends: where and how the study's runs train.

A `Job` is one run as plain data (it crosses process and Ray boundaries); `execute_run`
trains it wherever it lands and never raises: a failure comes back with its reason and
its traceback goes to the run's log. `LocalBackend` runs `workers` jobs at a time in
spawned processes, K of them per GPU (`--runs-per-gpu`); `RayBackend` makes every job a
Ray task with fractional GPUs. `run_jobs` schedules jobs on either, a One-Shot job only
after the dense run it starts from.
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import socket
import sys
import threading
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from . import train as trainer
from .cli import UserError, first_line
from .config import TrainConfig
from .data import load_run_data
from .rundir import read_done

# small WRN-16-2 steps leave a GPU mostly idle; 4 runs sharing one gave 2.8x one run's throughput
# (bare bf16 b128 steps on an H100: 19.3k images/s alone, 54.0k summed over 4 processes, 54.8k over 8)
DEFAULT_RUNS_PER_GPU = 4


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
            key = (cfg.dataset, cfg.data_root, cfg.train_per_class, cfg.test_per_class)
            if key not in _DATA_CACHE:  # workers train many runs on the same data
                _DATA_CACHE[key] = load_run_data(cfg)
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
    worker i on GPU i % gpus when there are GPUs (so `workers / gpus` runs share each GPU)."""

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
