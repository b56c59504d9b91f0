"""Run directory stage: what one training run leaves on disk, and how later stages read it.

    RUN_DIR/
      config.yaml         resolved TrainConfig
      recipe.yaml         the SparseML recipe as applied (variables resolved)
      metrics.csv         one row per epoch: stage, epoch, loss, train_acc, test_acc, sparsity, lr, seconds
      layer_sparsity.csv  one row per epoch: sparsity of every pruned tensor
      model.pt            checkpoint (torch.load(..., weights_only=True))
      train.log, sparse_logs/
      done.json           written last: a run without it is unfinished
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .config import UserError
from .models import WideResNet, build_model

DONE = "done.json"
CHECKPOINT = "model.pt"


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / DONE).is_file()


def read_done(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / DONE).read_text())


def prepare_run_dir(run_dir: Path, overwrite: bool = False) -> Path:
    """Create an empty run directory. A finished run is never silently replaced;
    leftovers of an unfinished one are cleared so nothing stale looks current."""
    if is_finished(run_dir) and not overwrite:
        raise UserError(f"run directory {run_dir} already holds a finished run; pass another --out or delete it")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def write_done(run_dir: Path, info: dict):
    """The done marker, written atomically and last."""
    tmp = run_dir / (DONE + ".tmp")
    tmp.write_text(json.dumps({**info, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    tmp.replace(run_dir / DONE)


def find_runs(root: str | Path) -> tuple[list[Path], list[Path]]:
    """(finished, unfinished) run directories at any depth under root, sorted."""
    root = Path(root)
    finished = sorted(p.parent for p in root.rglob(DONE))
    unfinished = sorted(p.parent for p in root.rglob("config.yaml") if not (p.parent / DONE).exists())
    return finished, unfinished


def save_checkpoint(run_dir: Path, model: WideResNet, **meta):
    """State dict (projection head dropped) + model arch + metadata, all weights_only-loadable."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    torch.save({"state_dict": state, "arch": dict(model.arch), **meta}, run_dir / CHECKPOINT)


def load_checkpoint(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise UserError(f"no checkpoint {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(run_dir: str | Path) -> tuple[WideResNet, dict]:
    """(model in eval mode, checkpoint dict) of a run directory."""
    ckpt = load_checkpoint(run_dir)
    model = build_model(ckpt["arch"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
