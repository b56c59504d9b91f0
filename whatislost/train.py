"""Train stage: one trainer, `loss: ce | supcon`, pruned by a SparseML recipe around a plain loop.

    ce       encoder + classifier with cross-entropy, recipe applied throughout (Sup).
    supcon   stage 1: encoder + projection head with the SupCon loss, recipe applied (SCL);
             stage 2: linear classifier on the frozen encoder's features with cross-entropy.
    --init   One-Shot: start from a finished dense run, fine-tune encoder + classifier with
             cross-entropy under the recipe (which cuts to the target at the first step).

The recipe is applied exactly as SparseML intends: `manager.modify(module, optimizer,
steps_per_epoch=len(loader))` before the loop, `manager.finalize(module)` after it.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import whatislost  # noqa: F401  (sets NM_DISABLE_ANALYTICS before sparseml loads)

from .config import TrainConfig, UserError, first_line, load_config, parse_overrides, resolve_recipe, run_cli, save_config, validate
from .data import BatchLoader, ImageData, load_data, make_augment
from .losses import supcon_loss
from .models import WideResNet
from .rundir import is_finished, load_checkpoint, prepare_run_dir, save_checkpoint, write_done

log = logging.getLogger("whatislost")

# what a dense recipe is measured over: the tensors every pruning recipe here prunes
PRUNABLE = ["re:^(encoder\\..*conv.*|classifier)\\.weight$"]


# ---------------------------------------------------------------- recipes and sparsity
def load_manager(cfg: TrainConfig, num_epochs: int):
    """The recipe as a ScheduledModifierManager with its variables set; UserError if SparseML rejects it."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    path = resolve_recipe(cfg.recipe)
    declared = set(re.findall(r"^(\w+)\s*:", path.read_text(), flags=re.M)) - {"modifiers", "version"}
    variables = {"num_epochs": num_epochs, "target_sparsity": cfg.sparsity, **cfg.recipe_vars}
    unknown = sorted(set(cfg.recipe_vars) - declared)
    if unknown:
        raise UserError(f"recipe {path.name} has no variable {unknown[0]!r} (it declares: {', '.join(sorted(declared))})")
    try:
        manager = ScheduledModifierManager.from_yaml(str(path), recipe_variables={k: v for k, v in variables.items() if k in declared})
    except Exception as err:  # SparseML raises assorted types for bad recipes
        raise UserError(f"SparseML rejected recipe {path}: {first_line(err)}") from None
    if pruning_patterns(manager) and "target_sparsity" not in declared:
        raise UserError(f"recipe {path.name} prunes but declares no target_sparsity variable")
    if not pruning_patterns(manager) and cfg.sparsity > 0:
        raise UserError(f"recipe {path.name} does not prune, but target sparsity {cfg.sparsity} was asked for")
    return manager


def pruning_patterns(manager) -> list:
    """Parameter names / regexes of every pruning modifier in the recipe."""
    from sparseml.pytorch.sparsification.pruning.modifier_pruning_base import BasePruningModifier

    patterns = []
    for mod in manager.modifiers:
        if isinstance(mod, BasePruningModifier):
            patterns += list(mod.params)
    return patterns


def named_tensors(module: nn.Module, patterns: list) -> dict:
    """{full name: parameter} of `module` matched by SparseML's own name/regex rules."""
    from sparseml.pytorch.utils import get_named_layers_and_params_by_regex

    found = get_named_layers_and_params_by_regex(module, patterns)
    return {f"{f.layer_name}.{f.param_name}": f.param for f in found}


def sparsity_report(tensors: dict) -> tuple[float, dict]:
    """(overall fraction of exact zeros, {name: fraction}) over the given tensors."""
    layers = {name: float((p == 0).float().mean()) for name, p in tensors.items()}
    zeros = sum(int((p == 0).sum()) for p in tensors.values())
    total = sum(p.numel() for p in tensors.values())
    return (zeros / total if total else 0.0), layers


def sparseml_loggers(run_dir: Path):
    """Route SparseML's modifier logs into RUN_DIR/sparse_logs/ instead of ./sparse_logs/."""
    from sparseml.pytorch.utils import LoggerManager, PythonLogger

    (run_dir / "sparse_logs").mkdir(exist_ok=True)
    logger = logging.getLogger(f"whatislost.sparseml.{run_dir.resolve()}")
    logger.handlers.clear()
    logger.addHandler(logging.FileHandler(run_dir / "sparse_logs" / "sparseml.log"))
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return LoggerManager([PythonLogger(logger=logger)])


# ---------------------------------------------------------------- logging to the run dir
class EpochLog:
    """Appends one CSV row per epoch to metrics.csv and layer_sparsity.csv, flushed at once."""

    FIELDS = ["stage", "epoch", "loss", "train_acc", "test_acc", "sparsity", "lr", "seconds"]

    def __init__(self, run_dir: Path, tensors: dict):
        self.tensors = tensors
        self.metrics = open(run_dir / "metrics.csv", "w", newline="")
        self.layers = open(run_dir / "layer_sparsity.csv", "w", newline="")
        csv.writer(self.metrics).writerow(self.FIELDS)
        csv.writer(self.layers).writerow(["stage", "epoch", *tensors])

    def write(self, stage, epoch, loss, train_acc, test_acc, lr, seconds):
        overall, layers = sparsity_report(self.tensors)
        row = [stage, epoch, f"{loss:.5f}", _fmt(train_acc), _fmt(test_acc), f"{overall:.5f}", f"{lr:.6g}", f"{seconds:.2f}"]
        csv.writer(self.metrics).writerow(row)
        csv.writer(self.layers).writerow([stage, epoch, *(f"{v:.5f}" for v in layers.values())])
        self.metrics.flush()
        self.layers.flush()
        log.info("%s epoch %d: loss %.4f train_acc %s test_acc %s sparsity %.4f lr %.4g (%.1fs)",
                 stage, epoch, loss, _fmt(train_acc), _fmt(test_acc), overall, lr, seconds)

    def close(self):
        self.metrics.close()
        self.layers.close()


def _fmt(x):
    return "" if x is None else f"{x:.4f}"


# ---------------------------------------------------------------- the loop
def cosine_or_constant(optimizer, schedule: str, total_steps: int):
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))


@torch.no_grad()
def accuracy(model: nn.Module, loader: BatchLoader, bf16: bool = False) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for (x,), y in loader:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def run_stage(stage: str, cfg: TrainConfig, *, module: nn.Module, params, loader: BatchLoader, step_loss,
              epochs: int, lr: float, nesterov: bool, epoch_log: EpochLog, manager=None, run_dir=None,
              evaluate=None):
    """One training stage: SGD + cosine schedule, optionally wrapped by a SparseML recipe manager.

    step_loss(views, y) -> (loss, n_correct or None). evaluate() -> test accuracy or None.
    """
    optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=nesterov, weight_decay=cfg.weight_decay)
    scheduler = cosine_or_constant(optimizer, cfg.lr_schedule, epochs * len(loader))
    stepper = optimizer
    if manager is not None:
        stepper = manager.modify(module, optimizer, steps_per_epoch=len(loader), loggers=sparseml_loggers(run_dir))
    module.train()
    show_bar = sys.stderr.isatty()
    for epoch in range(epochs):
        # running sums stay on the device: a float() per step would sync the GPU every step
        t0, total_loss, correct, seen = time.perf_counter(), torch.zeros(()), torch.zeros(()), 0
        batches = tqdm(loader, desc=f"{stage} {epoch + 1}/{epochs}", leave=False, disable=not show_bar)
        for views, y in batches:
            with torch.autocast(y.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, n_correct = step_loss(views, y)
            stepper.zero_grad(set_to_none=True)
            loss.backward()
            stepper.step()
            scheduler.step()
            total_loss = total_loss.to(loss.device) + loss.detach().float() * len(y)
            correct = correct.to(y.device) + (n_correct if n_correct is not None else 0)
            seen += len(y)
        seconds = time.perf_counter() - t0
        test_acc = None
        if evaluate is not None and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == epochs):
            test_acc = evaluate()
        train_acc = float(correct) / seen if stage != "supcon" else None
        epoch_log.write(stage, epoch + 1, float(total_loss) / seen, train_acc, test_acc, optimizer.param_groups[0]["lr"], seconds)
    if manager is not None:
        manager.finalize(module)


def train_linear_probe(cfg: TrainConfig, model: WideResNet, train_loader, test_loader, epoch_log: EpochLog):
    """SCL stage 2: the classifier on frozen, un-augmented encoder features (computed once)."""

    @torch.no_grad()
    def features(loader):
        model.encoder.eval()
        hs, ys = zip(*[(model.encoder(x).float(), y) for (x,), y in loader])
        return torch.cat(hs), torch.cat(ys)

    h_train, y_train = features(train_loader)
    h_test, y_test = features(test_loader)
    n, bs = len(h_train), cfg.linear_batch_size
    steps = max(n // bs, 1)
    optimizer = torch.optim.SGD(model.classifier.parameters(), lr=cfg.linear_lr, momentum=cfg.momentum, weight_decay=0.0)
    scheduler = cosine_or_constant(optimizer, cfg.lr_schedule, cfg.linear_epochs * steps)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    for epoch in range(cfg.linear_epochs):
        t0, total_loss, correct = time.perf_counter(), 0.0, 0
        order = torch.randperm(n, generator=generator).to(h_train.device)
        for b in range(steps):
            idx = order[b * bs:(b + 1) * bs] if b < steps - 1 else order[b * bs:]
            logits = model.classifier(h_train[idx])
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y_train[idx]).sum())
        with torch.no_grad():
            test_acc = float((model.classifier(h_test).argmax(1) == y_test).float().mean())
        epoch_log.write("linear", epoch + 1, total_loss / n, correct / n, test_acc,
                        optimizer.param_groups[0]["lr"], time.perf_counter() - t0)


# ---------------------------------------------------------------- one run, end to end
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for, but no CUDA GPU is available")
    return torch.device(name)


def check_init(cfg: TrainConfig, data: ImageData) -> dict:
    """The checkpoint One-Shot starts from; UserError unless it is a finished dense run that fits."""
    if not Path(cfg.init).is_dir() or not is_finished(cfg.init):
        raise UserError(f"--init {cfg.init} is not a finished run directory (no done.json)")
    ckpt = load_checkpoint(cfg.init)
    if ckpt.get("method") != "dense" or ckpt.get("sparsity", 0) > 0:
        raise UserError(f"--init {cfg.init} is not a dense run (method {ckpt.get('method')}, sparsity {ckpt.get('sparsity')})")
    if ckpt.get("loss") != cfg.loss:
        raise UserError(f"--init {cfg.init} was trained with loss '{ckpt.get('loss')}', but loss is '{cfg.loss}'")
    want = dict(depth=cfg.depth, widen=cfg.widen, in_channels=data.in_channels, num_classes=data.num_classes)
    if ckpt["arch"] != want or ckpt.get("dataset") != data.name:
        raise UserError(f"--init {cfg.init} is a {ckpt.get('dataset')} {ckpt['arch']} model, not {data.name} {want}")
    return ckpt


def setup_logging(run_dir: Path | None = None):
    log.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in log.handlers):
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(stream)
    for h in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(h)
        h.close()
    if run_dir is not None:
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(file)


def train(cfg: TrainConfig, data: ImageData | None = None, overwrite: bool = False) -> Path:
    """Train, prune, verify and save one run; returns its run directory (done.json written last).

    Everything a user can get wrong is checked before the run directory is created.
    """
    setup_logging()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    validate(cfg)
    if Path(cfg.recipe).stem == "oneshot" and not cfg.init:
        raise UserError("the One-Shot recipe prunes a trained model: pass --init DENSE_RUN_DIR")
    pruned_stage_epochs = cfg.finetune_epochs if cfg.init else cfg.epochs
    manager = load_manager(cfg, pruned_stage_epochs)
    data = data or load_data(cfg.dataset, cfg.data_root)
    init_ckpt = check_init(cfg, data) if cfg.init else None
    run_dir = Path(cfg.out or Path("runs") / cfg.run_name())
    cfg.out = str(run_dir)

    prepare_run_dir(run_dir, overwrite=overwrite)
    setup_logging(run_dir)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "recipe.yaml").write_text(f"# {resolve_recipe(cfg.recipe)} as applied\n{manager}")
    log.info("run %s: %s/%s/%s target sparsity %.2f on %s, %s", run_dir, cfg.dataset, cfg.loss, cfg.method_name,
             cfg.sparsity, device, cfg.model_name)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    supcon_stage = cfg.loss == "supcon" and not cfg.init
    model = WideResNet(cfg.depth, cfg.widen, data.in_channels, data.num_classes, projection_head=supcon_stage)
    if init_ckpt is not None:
        model.load_state_dict(init_ckpt["state_dict"])
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)

    def loader(split, augment, batch_size, n_views=1, shuffle=True):
        x, y = (data.train_x, data.train_y) if split == "train" else (data.test_x, data.test_y)
        aug = make_augment(augment, data.image_size, data.in_channels, cfg.crop_padding, cfg.hflip)
        return BatchLoader(x, y, data.mean, data.std, batch_size, device, shuffle=shuffle, drop_last=shuffle,
                           augment=aug, n_views=n_views, channels_last=cfg.channels_last, seed=cfg.seed)

    test_loader = loader("test", "none", 512, shuffle=False)

    def evaluate():
        return accuracy(model, test_loader, cfg.bf16)

    def ce_step(views, y):
        logits = model(views[0])
        return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing), (logits.argmax(1) == y).sum()

    def supcon_step(views, y):
        z = model.head(model.encoder(torch.cat(views)))  # (V*B, D), view-major
        return supcon_loss(z.view(len(views), len(y), -1).transpose(0, 1), y, cfg.temperature), None

    # the module SparseML sees: for SCL stage 1 the encoder and head only (the classifier is trained after)
    pruned_module = nn.ModuleDict({"encoder": model.encoder, "head": model.head}) if supcon_stage else model
    patterns = pruning_patterns(manager)
    pruned = named_tensors(pruned_module, patterns or PRUNABLE)
    epoch_log = EpochLog(run_dir, pruned)
    try:
        common = dict(module=pruned_module, epoch_log=epoch_log, manager=manager, run_dir=run_dir)
        if init_ckpt is not None:  # One-Shot fine-tune: encoder + classifier with cross-entropy
            run_stage("finetune", cfg, params=model.parameters(), loader=loader("train", "sup", cfg.batch_size),
                      step_loss=ce_step, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
                      nesterov=cfg.finetune_nesterov, evaluate=evaluate, **common)
        elif cfg.loss == "ce":
            run_stage("ce", cfg, params=model.parameters(), loader=loader("train", "sup", cfg.batch_size),
                      step_loss=ce_step, epochs=cfg.epochs, lr=cfg.lr, nesterov=cfg.nesterov, evaluate=evaluate, **common)
        else:
            run_stage("supcon", cfg, params=pruned_module.parameters(), step_loss=supcon_step,
                      loader=loader("train", "scl", cfg.batch_size, n_views=2), epochs=cfg.epochs, lr=cfg.lr,
                      nesterov=cfg.nesterov, **common)
            train_linear_probe(cfg, model, loader("train", "none", 512, shuffle=False), test_loader, epoch_log)
    finally:
        epoch_log.close()

    sparsity, layer_sparsity = sparsity_report(pruned)
    if patterns and abs(sparsity - cfg.sparsity) > cfg.sparsity_tolerance:
        raise UserError(f"run {run_dir} reached sparsity {sparsity:.4f}, not the target {cfg.sparsity:.4f} "
                        f"(more than {cfg.sparsity_tolerance * 100:.1f} points off): check the recipe's schedule")
    test_acc = evaluate()
    model.head = None
    meta = dict(config=cfg.to_dict(), config_hash=cfg.hash(), recipe=str(manager), method=cfg.method_name, loss=cfg.loss,
                dataset=data.name, classes=list(data.classes), target_sparsity=cfg.sparsity, sparsity=sparsity,
                layer_sparsity=layer_sparsity, test_acc=test_acc, seed=cfg.seed, init=cfg.init)
    save_checkpoint(run_dir, model, **meta)
    write_done(run_dir, dict(config_hash=cfg.hash(), test_acc=test_acc, sparsity=sparsity))
    log.info("done %s: test accuracy %.4f, sparsity %.4f (target %.2f)", run_dir, test_acc, sparsity, cfg.sparsity)
    setup_logging()
    return run_dir


# ---------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="whatislost-train", description=__doc__.split("\n")[0],
                                epilog="Any config key can be set as key=value, e.g. epochs=5 recipe_vars.prune_end=3.")
    p.add_argument("--config", help="YAML file of TrainConfig keys")
    p.add_argument("--recipe", help="SparseML recipe file (recipes/dense.yaml, gmp.yaml, delta_gmp.yaml, oneshot.yaml)")
    p.add_argument("--loss", help="ce | supcon")
    p.add_argument("--sparsity", type=float, help="target sparsity in [0, 1), the recipe's target_sparsity")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run directory (default runs/<dataset>-<model>-<loss>-<method>-s<sparsity>-seed<seed>)")
    p.add_argument("--init", help="finished dense run directory to start from (One-Shot)")
    p.add_argument("--dataset", help="digits | cifar10 | imagefolder")
    p.add_argument("--data-root", dest="data_root", help="data folder or .tar.gz")
    p.add_argument("--device", help="cpu | cuda | auto")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "overrides", "overwrite") and v is not None}
    cfg = load_config(args.config, {**flags, **parse_overrides(args.overrides)})
    run_dir = train(cfg, overwrite=args.overwrite)
    print(run_dir)
    return 0


def cli():
    sys.exit(run_cli(main, prog="whatislost-train"))


if __name__ == "__main__":
    cli()
