"""Run directory stage: what one training run leaves on disk, and how later stages read it.

    RUN_DIR/
      .whatislost-run     written first: this folder was made by whatislost (nothing else is ever deleted)
      config.yaml         resolved TrainConfig
      recipe.yaml         the SparseML recipe as applied (variables resolved)
      metrics.csv         one row per epoch: stage, epoch, loss, train_acc, test_acc, sparsity, lr, seconds
      layer_sparsity.csv  one row per epoch: sparsity of every pruned tensor
      state.pt            resumable state (model, optimiser, SparseML masks, RNG), every `save_every` epochs
      model.pt            checkpoint (torch.load(..., weights_only=True))
      train.log, sparse_logs/
      done.json           written last, holds the checkpoint's SHA-256: a run without a valid one is unfinished

Guarantees (README, "Reliability"): a folder is only ever cleared when it carries the mark
(or is a run folder of an older version: config.yaml + metrics.csv/done.json), and then only
of the files whatislost writes; a folder holding anything else is refused. `--overwrite`
trains beside a finished run and swaps the two only once the new one has finished. Two
trainers cannot share a run directory (an flock on RUN_DIR/.whatislost-lock). Every file is
written to a temporary name and renamed.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from .cli import UserError, first_line
from .pruning import measure, sparsity_report
from .models import SplitNetwork, build_model

log = logging.getLogger("whatislost")

MARK = ".whatislost-run"
LOCK = ".whatislost-lock"
DONE = "done.json"
CHECKPOINT = "model.pt"
STATE = "state.pt"
# what whatislost itself writes into a run directory (train, eval cache, export); nothing else is ever removed
OWN_NAMES = {MARK, LOCK, DONE, CHECKPOINT, STATE, "config.yaml", "recipe.yaml", "metrics.csv", "layer_sparsity.csv",
             "train.log", "sparse_logs", "tensorboard", "wandb", "eval_cache.pt", "model.onnx", "model.onnx.json",
             "encoder.onnx", "encoder.onnx.json"}


def _own(name: str) -> bool:
    return (name in OWN_NAMES or name.endswith(".tmp") or is_temp_name(name)
            or name.startswith((".tmp-", ".whatislost-export-")))


def is_temp_name(name: str) -> bool:
    """A temporary file of atomic_path ('.model.1234-9f3a2c1d.tmp.pt'), left behind only by a crash."""
    return name.startswith(".") and ".tmp" in name


# ---------------------------------------------------------------- atomic files
@contextmanager
def atomic_path(path):
    """A temporary path beside `path` (hidden, same suffix) to write to; renamed onto `path` when the block
    succeeds, removed when it fails. Readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes):
    """Write through a temporary file in the same folder, fsynced, then renamed onto `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str):
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj, path: Path) -> str:
    """torch.save through a temporary file; returns the file's SHA-256."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def writable(folder: Path) -> bool:
    """Whether a file can be created in folder (tried: permissions say nothing for root or read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".whatislost-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- finished or not
def read_done(run_dir: str | Path) -> dict | None:
    """done.json as a dict, or None when it is missing, truncated or not ours."""
    try:
        done = json.loads((Path(run_dir) / DONE).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return done if isinstance(done, dict) and "config_hash" in done else None


def is_finished(run_dir: str | Path, verify: bool = False) -> bool:
    """A valid done.json; with verify, also a checkpoint whose SHA-256 matches the one it records
    (a done.json of an older version, without a hash, is verified by loading the checkpoint once)."""
    run_dir = Path(run_dir)
    done = read_done(run_dir)
    if done is None:
        return False
    if not verify:
        return True
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return False
    if "checkpoint_sha256" in done:
        return file_sha256(path) == done["checkpoint_sha256"]
    try:  # older version: load once, then record the hash so the next check is cheap
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(ckpt, dict) and "state_dict" in ckpt and all(torch.isfinite(v).all()
                                                                     for v in ckpt["state_dict"].values()
                                                                     if v.is_floating_point())
    except Exception:
        return False
    if ok:
        try:
            atomic_write_text(run_dir / DONE, json.dumps({**done, "checkpoint_sha256": file_sha256(path)}, indent=2))
        except OSError:
            pass  # read-only: verified again next time
    return ok


def write_done(run_dir: Path, info: dict):
    """The done marker, written atomically and last."""
    atomic_write_text(run_dir / DONE, json.dumps({**info, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))


def find_runs(root: str | Path) -> tuple[list[Path], list[Path]]:
    """(finished, unfinished) run directories at any depth under root, sorted."""
    root = Path(root)
    finished = sorted(p.parent for p in root.rglob(DONE) if read_done(p.parent) is not None)
    unfinished = sorted(p.parent for p in root.rglob("config.yaml") if read_done(p.parent) is None)
    return finished, unfinished


# ---------------------------------------------------------------- claiming a run directory
def is_ours(run_dir: Path) -> bool:
    """Made by whatislost: the mark, or (older versions) config.yaml beside metrics.csv or done.json."""
    return (run_dir / MARK).is_file() or ((run_dir / "config.yaml").is_file()
                                         and ((run_dir / "metrics.csv").is_file() or (run_dir / DONE).is_file()))


def foreign_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if not _own(p.name))


def clear_own_files(run_dir: Path):
    """Remove what whatislost wrote into run_dir (never anything else; the mark and lock stay)."""
    for p in run_dir.iterdir():
        if _own(p.name) and p.name not in (MARK, LOCK):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def check_out_dir(run_dir: Path, overwrite: bool = False) -> str:
    """Whether run_dir may be written, checked before anything is: 'new', 'unfinished', 'finished'
    (only with overwrite). UserError for everything else, nothing touched."""
    run_dir = Path(run_dir)
    resolved, cwd = run_dir.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UserError(f"--out {run_dir} is the current folder or holds it; give a new folder for the run")
    for parent in resolved.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out {run_dir}: {parent} is a file, not a folder")
    if not run_dir.exists():
        return "new"
    if not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder")
    if not any(run_dir.iterdir()):
        return "new"
    if not is_ours(run_dir):
        raise UserError(f"--out {run_dir} is a folder whatislost did not make and it is not empty; "
                        f"give a new or empty folder (nothing was changed)")
    foreign = foreign_files(run_dir)
    if foreign:
        raise UserError(f"run directory {run_dir} holds files whatislost did not write ({', '.join(foreign[:3])}); "
                        f"move them away first (nothing was changed)")
    if is_finished(run_dir, verify=True):
        if not overwrite:
            raise UserError(f"run directory {run_dir} already holds a finished run; pass another --out or --overwrite")
        return "finished"
    return "unfinished"


class RunClaim:
    """A run directory held by this process: `work_dir` is where the run writes (the run directory
    itself, or for --overwrite of a finished run a staging folder beside it); `commit()` makes the
    finished run current; `release()` (always) drops the lock and any unfinished staging folder."""

    def __init__(self, run_dir: Path, overwrite: bool = False):
        self.run_dir = Path(run_dir)
        state = check_out_dir(self.run_dir, overwrite)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / MARK).touch()
        self._lock = open(self.run_dir / LOCK, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise UserError(f"another whatislost-train is writing to {self.run_dir} (it holds "
                            f"{self.run_dir / LOCK})") from None
        self.staging = None
        if state == "finished":  # train beside it; the finished run stays until the new one has finished
            self.staging = self.run_dir.parent / f".{self.run_dir.name}.new-{os.getpid()}"
            if self.staging.exists():
                shutil.rmtree(self.staging)
            self.staging.mkdir()
            (self.staging / MARK).touch()
        self.work_dir = self.staging or self.run_dir
        self.state = state

    def commit(self):
        """Make the finished run in work_dir the run directory's content."""
        if self.staging is None:
            return
        old = self.run_dir.parent / f".{self.run_dir.name}.old-{os.getpid()}"
        os.replace(self.run_dir, old)
        os.replace(self.staging, self.run_dir)
        shutil.rmtree(old, ignore_errors=True)
        self.staging = None
        self.work_dir = self.run_dir

    def release(self):
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir: Path, model: SplitNetwork, **meta) -> str:
    """State dict (projection head dropped) + model arch + metadata, weights_only-loadable; returns its SHA-256."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    return atomic_torch_save({"state_dict": state, "arch": dict(model.arch), **meta}, Path(run_dir) / CHECKPOINT)


def load_checkpoint(run_dir: str | Path) -> dict:
    """The checkpoint dict; UserError naming the file when it is missing, truncated or not a whatislost checkpoint."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise UserError(f"no checkpoint {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"checkpoint {path} cannot be read (truncated or not a torch file): {first_line(err)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or not isinstance(ckpt.get("arch"), dict):
        raise UserError(f"checkpoint {path} is not a whatislost checkpoint (no state_dict/arch)")
    return ckpt


def load_model(run_dir: str | Path) -> tuple[SplitNetwork, dict]:
    """(model in eval mode, checkpoint dict) of a run directory."""
    ckpt = load_checkpoint(run_dir)
    try:
        model = build_model(ckpt["arch"])
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError, ValueError) as err:
        raise UserError(f"checkpoint {Path(run_dir) / CHECKPOINT} does not fit its architecture: {first_line(err)}") from None
    return model.eval(), ckpt


# ---------------------------------------------------------------- the per-epoch log
class EpochLog:
    """One CSV row per epoch in metrics.csv and layer_sparsity.csv, flushed at once, and the same figures
    through the run's SparseML LoggerManager (its log file, TensorBoard or W&B when asked for); the rows
    are kept so that a resumed run rewrites exactly the epochs it keeps."""

    FIELDS = ["stage", "epoch", "loss", "train_acc", "test_acc", "sparsity", "lr", "seconds"]

    def __init__(self, run_dir: Path, tensors: dict, rows: dict | None = None, loggers=None, unit: str = "weights"):
        self.tensors, self.loggers, self.unit = tensors, loggers, unit
        self.rows = rows or {"metrics": [], "layers": []}
        self.files = {"metrics": open(run_dir / "metrics.csv", "w", newline=""),
                      "layers": open(run_dir / "layer_sparsity.csv", "w", newline="")}
        csv.writer(self.files["metrics"]).writerows([self.FIELDS, *self.rows["metrics"]])
        csv.writer(self.files["layers"]).writerows([["stage", "epoch", *tensors], *self.rows["layers"]])
        self.flush()

    def write(self, stage, epoch, loss, train_acc, test_acc, lr, seconds):
        overall, layers = sparsity_report(self.tensors)
        if self.unit != "weights":  # a structured recipe's overall figure counts its own unit (filters)
            overall = measure(self.tensors, self.unit)
        row = [stage, epoch, f"{loss:.5f}", _fmt(train_acc), _fmt(test_acc), f"{overall:.5f}", f"{lr:.6g}", f"{seconds:.2f}"]
        layer_row = [stage, epoch, *(f"{v:.5f}" for v in layers.values())]
        for name, r in (("metrics", row), ("layers", layer_row)):
            self.rows[name].append(r)
            csv.writer(self.files[name]).writerow(r)
        self.flush()
        if self.loggers is not None:
            step = len(self.rows["metrics"])  # epochs so far, over all stages
            values = {"loss": loss, "sparsity": overall, "lr": lr, "seconds": seconds}
            values.update({k: v for k, v in (("train_acc", train_acc), ("test_acc", test_acc)) if v is not None})
            self.loggers.log_scalars(f"whatislost/{stage}", values, step=step)
            self.loggers.log_scalars("whatislost/layer_sparsity", layers, step=step)
        log.info("%s epoch %d: loss %.4f train_acc %s test_acc %s sparsity %.4f lr %.4g (%.1fs)",
                 stage, epoch, loss, _fmt(train_acc), _fmt(test_acc), overall, lr, seconds)

    def flush(self):
        for f in self.files.values():
            f.flush()

    def close(self):
        for f in self.files.values():
            f.close()


def _fmt(x):
    return "" if x is None else f"{x:.4f}"
