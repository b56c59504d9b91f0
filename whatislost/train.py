"""Train stage: one trainer, `loss: ce | supcon`, pruned by a SparseML recipe around a plain loop.

    ce       encoder + classifier with cross-entropy, recipe applied throughout (Sup).
    supcon   stage 1: encoder + projection head with the SupCon loss, recipe applied (SCL);
             stage 2: linear classifier on the frozen encoder with cross-entropy, either on
             features computed once or on augmented images every epoch (the authors'), and
             optionally pruned by its own recipe (`linear_recipe`; the authors prune it by GMP).
    --init   One-Shot: start from a finished dense run, fine-tune encoder + classifier with
             cross-entropy under the recipe (which cuts to the target at the first step); with
             `finetune_loss: supcon` (SCL) fine-tune encoder + projection head with the SupCon
             loss instead, then retrain the classifier on the frozen pruned encoder (stage linear).

Each stage is a `Stage` run by `run_stage`: SGD, the stage's learning-rate schedule, and the
recipe applied exactly as SparseML intends (`manager.modify(module, optimizer,
steps_per_epoch=len(loader))` before the loop, `manager.finalize(module)` after it). Every
`save_every` epochs the whole state (model, optimiser, schedule, SparseML masks and schedule
position, RNG, data order, logs) is saved; running the same command again continues from it.
A non-finite loss or weight stops the run at the next epoch end; a run is only marked done
(done.json with the checkpoint's hash) when its weights are finite and its measured
sparsity is on target.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .cli import UserError, first_line, run_cli
from .config import TrainConfig, config_text, describe_keys, load_config, parse_overrides, resolve_device, validate
from .augment import make_augment
from .data import BatchLoader, FeatureLoader, ImageData, load_run_data
from .identity import population_id, run_hash, run_identity, sparsity_label
from .losses import supcon_loss
from .models import EncoderHead, arch_for, model_for
from .pruning import (PRUNABLE, check_loggers, grad_sampler, load_manager, load_manager_state, manager_state, measure,
                      named_tensors, needs_contiguous, needs_grad_sampler, off_target, pruning_patterns,
                      recipe_from_dense, recipe_unit, resolve_recipe, run_loggers, sets_learning_rate, sparsity_report,
                      structure_report)
from .rundir import (STATE, EpochLog, RunClaim, atomic_torch_save, atomic_write_text, clear_own_files, is_finished,
                     load_checkpoint, save_checkpoint, write_done)

log = logging.getLogger("whatislost")


# ---------------------------------------------------------------- learning-rate schedules
class LRSchedule:
    """A stage's learning-rate schedule from torch's schedulers, advanced per step or per epoch.

    cosine: CosineAnnealingLR down to lr_min; multistep: MultiStepLR(milestones in epochs, gamma);
    multistep+cosine: both, chained (the authors' linear classifier); constant: none (also what
    run_stage asks for when the recipe schedules the learning rate itself).
    """

    def __init__(self, optimizer, kind: str, epochs: int, steps_per_epoch: int, per: str = "step",
                 milestones=(), gamma: float = 0.1, lr_min: float = 0.0):
        self.per = per
        unit = steps_per_epoch if per == "step" else 1
        self.schedulers = []
        if "multistep" in kind:
            self.schedulers.append(torch.optim.lr_scheduler.MultiStepLR(optimizer, [round(m * unit) for m in milestones],
                                                                        gamma))
        if "cosine" in kind:
            self.schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs * unit, 1), lr_min))

    def after_step(self):
        if self.per == "step":
            for s in self.schedulers:
                s.step()

    def after_epoch(self):
        if self.per == "epoch":
            for s in self.schedulers:
                s.step()

    def state_dict(self):
        return [s.state_dict() for s in self.schedulers]

    def load_state_dict(self, states):
        for s, state in zip(self.schedulers, states):
            s.load_state_dict(state)


# ---------------------------------------------------------------- the loop
@dataclass
class Stage:
    """One training stage. step_loss(views, y) -> (loss, n_correct or None); evaluate() -> test accuracy."""

    name: str  # ce | supcon | linear | finetune
    module: nn.Module  # what SparseML's recipe sees
    params: list
    loader: object  # BatchLoader-like: len() = optimizer steps per epoch, iter -> (views, y), .generator
    step_loss: Callable
    epochs: int
    lr: float
    nesterov: bool
    weight_decay: float
    schedule: dict  # LRSchedule keyword arguments: kind, per, milestones, gamma, lr_min
    manager: object = None
    evaluate: Callable | None = None
    train_mode: Callable | None = None  # called at every epoch start (e.g. keep a frozen encoder in eval mode)
    logs_train_acc: bool = True
    grad_sampler: dict | None = None  # SparseML's grad_sampler for OBS, M-FAC and RigL (see grad_sampler())


class Checkpointer:
    """Writes RUN_DIR/state.pt every `every` epochs (atomically) and holds what a resume restores."""

    def __init__(self, run_dir: Path, every: int, key: str, model: nn.Module, epoch_log: EpochLog, resume: dict | None):
        self.path, self.every, self.key, self.model, self.epoch_log = run_dir / STATE, every, key, model, epoch_log
        self.resume = resume

    def due(self, epoch: int, epochs: int) -> bool:
        return self.every > 0 and (epoch + 1) % self.every == 0 and epoch + 1 < epochs

    def save(self, stage_index: int, epoch: int, stage: Stage, optimizer, schedule: LRSchedule):
        state = dict(key=self.key, stage=stage_index, epoch=epoch + 1, model=self.model.state_dict(),
                     optimizer=optimizer.state_dict(), schedule=schedule.state_dict(),
                     manager=manager_state(stage.manager) if stage.manager is not None else None,
                     rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                     loader_rng=stage.loader.generator.get_state(), rows=self.epoch_log.rows)
        atomic_torch_save(state, self.path)

    def restore(self, stage_index: int, stage: Stage, optimizer, schedule: LRSchedule) -> tuple[int, dict | None]:
        """(first epoch to run, SparseML state to load once the recipe is applied) of this stage:
        (0, None) unless the saved state is inside it."""
        r = self.resume
        if r is None or r["stage"] != stage_index:
            return 0, None
        optimizer.load_state_dict(r["optimizer"])
        schedule.load_state_dict(r["schedule"])
        torch.set_rng_state(r["rng"])
        if r["cuda_rng"]:
            torch.cuda.set_rng_state_all(r["cuda_rng"])
        stage.loader.generator.set_state(r["loader_rng"])
        self.resume = None
        return r["epoch"], r["manager"]


def all_finite(tensors) -> bool:
    """One host sync for many tensors (None skipped): are all their values finite?"""
    checks = [t.detach().isfinite().all() for t in tensors if t is not None and t.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def run_stage(stage: Stage, cfg: TrainConfig, epoch_log: EpochLog, run_dir: Path, index: int = 0,
              checkpointer: Checkpointer | None = None, loggers=None):
    """Train one stage: SGD + its schedule, wrapped by its SparseML recipe when it has one.

    No host synchronisation inside an epoch: the loss sum and correct counts stay on the device and
    are read once at the epoch's end, where the epoch is logged (and checked to be finite).
    """
    optimizer = torch.optim.SGD(stage.params, lr=stage.lr, momentum=cfg.momentum, nesterov=stage.nesterov,
                                weight_decay=stage.weight_decay)
    recipe_lr = stage.manager is not None and sets_learning_rate(stage.manager)
    schedule = LRSchedule(optimizer, "constant" if recipe_lr else stage.schedule["kind"], stage.epochs,
                          len(stage.loader), **{k: v for k, v in stage.schedule.items() if k != "kind"})
    start, saved_masks = checkpointer.restore(index, stage, optimizer, schedule) if checkpointer else (0, None)
    stepper = optimizer
    if stage.manager is not None:
        extra = {"grad_sampler": stage.grad_sampler} if needs_grad_sampler(stage.manager) else {}
        stepper = stage.manager.modify(stage.module, optimizer, steps_per_epoch=len(stage.loader),
                                       loggers=loggers or run_loggers(run_dir), epoch=float(start), **extra)
        if saved_masks is not None:
            load_manager_state(stage.manager, saved_masks)
    show_bar = sys.stderr.isatty()
    for epoch in range(start, stage.epochs):
        (stage.train_mode or stage.module.train)()
        t0 = time.perf_counter()
        total_loss = correct = None
        seen, lr_applied = 0, optimizer.param_groups[0]["lr"]
        batches = tqdm(stage.loader, desc=f"{stage.name} {epoch + 1}/{stage.epochs}", leave=False, disable=not show_bar)
        for views, y in batches:
            with torch.autocast(y.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, n_correct = stage.step_loss(views, y)
            stepper.zero_grad(set_to_none=True)
            loss.backward()
            stepper.step()
            lr_applied = optimizer.param_groups[0]["lr"]  # as applied by this step (a recipe may set it)
            schedule.after_step()
            loss = loss.detach().float()
            total_loss = loss * len(y) if total_loss is None else total_loss + loss * len(y)
            if n_correct is not None:
                correct = n_correct if correct is None else correct + n_correct
            seen += len(y)
        schedule.after_epoch()
        seconds = time.perf_counter() - t0
        steps = len(stage.loader)
        # the running loss sum is non-finite iff some step's loss was: one flag, read here, not per step
        if not all_finite([total_loss, *stage.module.parameters()]):
            raise UserError(f"run {cfg.out}: the loss or the weights became non-finite in {stage.name} epoch {epoch + 1} "
                            f"(steps {epoch * steps + 1}-{(epoch + 1) * steps}); lower the learning rate (lr "
                            f"{stage.lr:g}) or check the data")
        test_acc = None
        if stage.evaluate is not None and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == stage.epochs):
            test_acc = stage.evaluate()
        train_acc = float(correct) / seen if stage.logs_train_acc and correct is not None else None
        epoch_log.write(stage.name, epoch + 1, float(total_loss) / max(seen, 1), train_acc, test_acc, lr_applied, seconds)
        if checkpointer is not None and checkpointer.due(epoch, stage.epochs):
            checkpointer.save(index, epoch, stage, optimizer, schedule)
    if stage.manager is not None:
        stage.manager.finalize(stage.module)


def ce_and_correct(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float):
    """logits (B, C), y (B,) -> (cross-entropy loss, number correct), both on the device (a step_loss's result)."""
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing), (logits.argmax(1) == y).sum()


@torch.no_grad()
def accuracy(model: nn.Module, loader, bf16: bool = False) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for (x,), y in loader:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


# ---------------------------------------------------------------- one run, end to end
def check_init(cfg: TrainConfig, data: ImageData) -> dict:
    """The checkpoint One-Shot starts from; UserError unless it is a finished dense run that fits."""
    if not Path(cfg.init).is_dir() or not is_finished(cfg.init, verify=True):
        raise UserError(f"--init {cfg.init} is not a finished run directory (no valid done.json and model.pt)")
    ckpt = load_checkpoint(cfg.init)
    # dense = its recipe pruned nothing and it did not itself start from a trained model
    prunes = ckpt.get("prunes", ckpt.get("method") != "dense")
    if prunes or ckpt.get("sparsity", 0) > 0 or ckpt.get("init"):
        raise UserError(f"--init {cfg.init} is not a dense run (method {ckpt.get('method')}, sparsity {ckpt.get('sparsity')})")
    if ckpt.get("loss") != cfg.loss:
        raise UserError(f"--init {cfg.init} was trained with loss '{ckpt.get('loss')}', but loss is '{cfg.loss}'")
    if cfg.finetune_loss == "supcon" and not isinstance(ckpt.get("head_state_dict"), dict):
        raise UserError(f"--init {cfg.init} holds no projection head (a dense SCL run trained before checkpoints kept "
                        f"it): finetune_loss supcon fine-tunes the dense run's head; retrain the dense run (--overwrite)")
    want = arch_for(cfg, data.in_channels, data.num_classes)
    if ckpt["arch"] != want or ckpt.get("dataset") != data.name:
        raise UserError(f"--init {cfg.init} is a {ckpt.get('dataset')} {ckpt['arch']} model, not {data.name} {want}")
    if ckpt.get("data_fingerprint") not in (None, data.fingerprint):
        raise UserError(f"--init {cfg.init} was trained on other data than {cfg.data_root or cfg.dataset} holds now")
    return ckpt


def setup_logging(run_dir: Path | None = None):
    log.setLevel(logging.INFO)
    consoles = [h for h in log.handlers if type(h) is logging.StreamHandler]
    if not consoles:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(stream)
    for h in consoles:
        if getattr(h.stream, "closed", False):
            h.stream = sys.stderr  # the stderr it was made with is gone (a closed capture, a finished redirect)
    for h in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(h)
        h.close()
    if run_dir is not None:
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(file)


@dataclass
class Plan:
    """Everything a run needs, checked before its folder is touched."""

    cfg: TrainConfig
    data: ImageData
    device: torch.device
    manager: object
    linear_manager: object = None
    init_ckpt: dict | None = None
    identity: dict = field(default_factory=dict)
    key: str = ""
    unit: str = "weights"  # what the recipe's target counts: weights, or filters / channels (structured)


def pruned_stage_epochs(cfg: TrainConfig) -> int:
    """The length of the stage the recipe wraps (its num_epochs): the fine-tune for One-Shot, else the main stage."""
    return cfg.finetune_epochs if cfg.init else cfg.epochs


def prunes_linear_stage(cfg: TrainConfig) -> bool:
    """Whether the SCL linear stage runs under `linear_recipe`: an SCL run trained from scratch, with a
    linear stage and a target sparsity (the authors prune the classifier to the run's sparsity)."""
    return cfg.loss == "supcon" and not cfg.init and bool(cfg.linear_recipe) and cfg.sparsity > 0 and cfg.linear_epochs > 0


def plan_run(cfg: TrainConfig, data: ImageData | None = None) -> Plan:
    """Validate a run completely (settings, recipes, data, --init) without writing anything."""
    validate(cfg)
    device = resolve_device(cfg.device)
    check_loggers(cfg.loggers)
    if recipe_from_dense(cfg.recipe) and not cfg.init:
        raise UserError(f"recipe {cfg.recipe} prunes a trained model (it declares from_dense): pass --init DENSE_RUN_DIR")
    manager = load_manager(cfg.recipe, pruned_stage_epochs(cfg), cfg.sparsity, cfg.recipe_vars)
    unit = recipe_unit(cfg.recipe)
    linear_manager = None
    # (the same rule as study.plan_runs: a One-Shot run's classifier, SupCon-fine-tuned or not, has no linear recipe)
    if prunes_linear_stage(cfg):
        linear_manager = load_manager(cfg.linear_recipe, cfg.linear_epochs, cfg.sparsity, cfg.linear_recipe_vars)
        if needs_grad_sampler(linear_manager):
            raise UserError(f"linear_recipe {cfg.linear_recipe} samples gradients (OBS, M-FAC, RigL), which the linear "
                            f"stage does not provide; use a magnitude recipe for the classifier")
        if recipe_unit(cfg.linear_recipe) != unit:
            raise UserError(f"linear_recipe {cfg.linear_recipe} counts sparsity in {recipe_unit(cfg.linear_recipe)}, the "
                            f"recipe in {unit}: one run is checked in one unit")
    data = data or load_run_data(cfg)
    init_ckpt = check_init(cfg, data) if cfg.init else None
    identity = run_identity(cfg.to_dict(), str(manager), data.fingerprint, str(linear_manager or ""),
                            init_ckpt.get("population", "") if init_ckpt else "")
    return Plan(cfg, data, device, manager, linear_manager, init_ckpt, identity,
                run_hash(identity, cfg.seed, cfg.method_name), unit)


def read_resume(work_dir: Path, key: str) -> dict | None:
    """The saved state of an unfinished run with the same identity, or None (then it starts over)."""
    try:
        state = torch.load(work_dir / STATE, map_location="cpu", weights_only=True)
    except Exception:  # missing, truncated, or from another version
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


def train(cfg: TrainConfig, data: ImageData | None = None, overwrite: bool = False) -> Path:
    """Train, prune, verify and save one run; returns its run directory (done.json written last).

    Everything a user can get wrong is checked before the run directory is touched. An
    unfinished run of the same identity in the run directory is continued from its state.pt.
    """
    setup_logging()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    plan = plan_run(cfg, data)
    run_dir = Path(cfg.out or Path("runs") / cfg.run_name())
    cfg.out = str(run_dir)
    try:
        return _train_into(plan, run_dir, overwrite)
    except OSError as err:  # a read-only folder, a full disk: the user's to fix, not a bug
        raise UserError(f"run {run_dir}: cannot write: {first_line(err)}") from None


def _train_into(plan: Plan, run_dir: Path, overwrite: bool) -> Path:
    cfg = plan.cfg
    with RunClaim(run_dir, overwrite) as claim:
        work = claim.work_dir
        resume = read_resume(work, plan.key) if claim.state == "unfinished" else None
        if claim.state == "unfinished" and resume is None:
            clear_own_files(work)
        setup_logging(work)
        try:
            atomic_write_text(work / "config.yaml", config_text(cfg))
            recipes = f"# {resolve_recipe(cfg.recipe)} as applied\n{plan.manager}"
            if plan.linear_manager is not None:
                recipes += f"\n# linear stage: {resolve_recipe(cfg.linear_recipe)} as applied\n{plan.linear_manager}"
            atomic_write_text(work / "recipe.yaml", recipes)
            if resume is not None:
                log.info("resuming %s from stage %d epoch %d", run_dir, resume["stage"], resume["epoch"])
            info = execute(plan, work, resume)
            claim.commit()
        finally:
            setup_logging()
    log.info("done %s: test accuracy %.4f, sparsity %.4f (target %.2f)", run_dir, info["test_acc"], info["sparsity"],
             cfg.sparsity)
    return run_dir


def execute(plan: Plan, work: Path, resume: dict | None) -> dict:
    """Build the model and stages, run them, verify, and write model.pt and done.json into `work`."""
    cfg, data, device = plan.cfg, plan.data, plan.device
    log.info("run %s: %s/%s/%s target sparsity %s%% on %s, %s", cfg.out, cfg.dataset, cfg.loss, cfg.method_name,
             sparsity_label(cfg.sparsity), device, cfg.model_name)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    supcon_stage = cfg.loss == "supcon" and not cfg.init
    supcon_finetune = plan.init_ckpt is not None and cfg.finetune_loss == "supcon"
    model = model_for(cfg, data.in_channels, data.num_classes, projection_head=supcon_stage or supcon_finetune)
    if supcon_finetune:
        # the dense encoder and its projection head; the classifier keeps this seed's fresh initialisation and is
        # retrained on the pruned encoder in the linear stage, as an SCL classifier always is
        state = {k: v for k, v in plan.init_ckpt["state_dict"].items() if not k.startswith("classifier.")}
        state.update({f"head.{k}": v for k, v in plan.init_ckpt["head_state_dict"].items()})
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("classifier.") for k in missing):
            raise UserError(f"--init {cfg.init} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    elif plan.init_ckpt is not None:
        model.load_state_dict(plan.init_ckpt["state_dict"])
    channels_last = cfg.channels_last and not needs_contiguous(plan.manager)
    if cfg.channels_last and not channels_last:
        log.info("channels_last off for this run: the recipe's M-FAC masks must be contiguous")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 32x32 shapes: pick the fastest convolution kernels once
    if resume is not None:
        model.load_state_dict(resume["model"])

    def loader(split, augment, batch_size, n_views=1, shuffle=True, vflip=False, seed=None):
        x, y = (data.train_x, data.train_y) if split == "train" else (data.test_x, data.test_y)
        aug = make_augment(augment, data.image_size, data.in_channels, cfg.crop_padding, cfg.hflip, vflip)
        return BatchLoader(x, y, data.normalize_unit, batch_size, device, shuffle=shuffle, drop_last=shuffle,
                           augment=aug, n_views=n_views, channels_last=channels_last,
                           seed=cfg.seed if seed is None else seed)

    test_loader = loader("test", "none", 512, shuffle=False)

    def compiled(fn):
        if not cfg.compile:
            return fn
        # the forward/backward is compiled; SparseML's mask updates and mask application stay eager
        backend = os.environ.get("WHATISLOST_COMPILE_BACKEND", "inductor")
        return torch.compile(fn, backend=backend, mode=cfg.compile_mode if backend == "inductor" else None)

    def ce_step(views, y):
        return ce_and_correct(model(views[0]), y, cfg.label_smoothing)

    def supcon_of(z, y):  # z (V*B, D), view-major
        return supcon_loss(z.view(-1, len(y), z.shape[-1]).transpose(0, 1), y, cfg.temperature, cfg.base_temperature)

    def supcon_step(views, y):
        return supcon_of(model.head(model.encoder(torch.cat(views))), y), None

    # every tensor any stage prunes, named as in the whole model, for logging and the final check; in SCL's
    # contrastive stages the classifier is not there to be pruned (only the linear stage's recipe can prune it)
    stage1 = EncoderHead(model.encoder, model.head) if supcon_stage or supcon_finetune else model
    patterns = pruning_patterns(plan.manager)
    pruned = named_tensors(stage1, patterns or PRUNABLE)
    if plan.linear_manager is not None:
        patterns = patterns + pruning_patterns(plan.linear_manager)
        pruned.update(named_tensors(nn.ModuleDict({"classifier": model.classifier}), pruning_patterns(plan.linear_manager)))
    sup_batches = lambda batch_size: loader("train", "sup", batch_size, vflip=cfg.vflip)  # noqa: E731
    # gradient samplers (OBS, M-FAC, RigL): the stage's augmentation and loss, their own data order
    sampler_seed = cfg.seed + 7919
    ce_sampler = lambda batch_size: grad_sampler(  # noqa: E731
        lambda bs: loader("train", "sup", bs, vflip=cfg.vflip, seed=sampler_seed), F.cross_entropy, batch_size)
    supcon_sampler = lambda batch_size: grad_sampler(  # noqa: E731
        lambda bs: loader("train", "scl", bs, n_views=2, seed=sampler_seed), supcon_of, batch_size)
    schedule = dict(kind=cfg.lr_schedule, per=cfg.lr_step, milestones=cfg.lr_milestones, gamma=cfg.lr_gamma,
                    lr_min=cfg.lr_min)
    evaluate = lambda: accuracy(model, test_loader, cfg.bf16)  # noqa: E731
    # stages are built when they start: the linear stage needs the encoder its predecessor trained
    stages = []
    ft_batch = cfg.finetune_batch_size or cfg.batch_size
    ft_wd = cfg.weight_decay if cfg.finetune_weight_decay is None else cfg.finetune_weight_decay
    if supcon_finetune:  # representation-aware One-Shot: encoder + head with SupCon, then the classifier
        stages.append(lambda: Stage("finetune", stage1, list(stage1.parameters()),
                                    loader("train", "scl", ft_batch, n_views=2), compiled(supcon_step),
                                    cfg.finetune_epochs, cfg.finetune_lr, cfg.finetune_nesterov, ft_wd,
                                    {**schedule, "kind": cfg.finetune_lr_schedule}, plan.manager,
                                    logs_train_acc=False, grad_sampler=supcon_sampler(ft_batch)))
        stages.append(lambda: linear_stage(cfg, model, plan.linear_manager, sup_batches, loader, test_loader, compiled))
    elif plan.init_ckpt is not None:  # One-Shot fine-tune: the whole network with cross-entropy
        stages.append(lambda: Stage("finetune", model, list(model.parameters()), sup_batches(ft_batch), compiled(ce_step),
                                    cfg.finetune_epochs, cfg.finetune_lr, cfg.finetune_nesterov, ft_wd,
                                    {**schedule, "kind": cfg.finetune_lr_schedule}, plan.manager, evaluate,
                                    grad_sampler=ce_sampler(ft_batch)))
    elif cfg.loss == "ce":
        stages.append(lambda: Stage("ce", model, list(model.parameters()), sup_batches(cfg.batch_size), compiled(ce_step),
                                    cfg.epochs, cfg.lr, cfg.nesterov, cfg.weight_decay, schedule, plan.manager, evaluate,
                                    grad_sampler=ce_sampler(cfg.batch_size)))
    else:
        # the module SparseML sees in stage 1: encoder and head (the classifier is trained after)
        stages.append(lambda: Stage("supcon", stage1, list(stage1.parameters()),
                                    loader("train", "scl", cfg.batch_size, n_views=2), compiled(supcon_step), cfg.epochs,
                                    cfg.lr, cfg.nesterov, cfg.weight_decay, schedule, plan.manager,
                                    logs_train_acc=False, grad_sampler=supcon_sampler(cfg.batch_size)))
        if cfg.linear_epochs:
            stages.append(lambda: linear_stage(cfg, model, plan.linear_manager, sup_batches, loader, test_loader,
                                               compiled))

    loggers = run_loggers(work, cfg.loggers, Path(cfg.out).name)
    epoch_log = EpochLog(work, pruned, resume["rows"] if resume else None, loggers, plan.unit)
    checkpointer = Checkpointer(work, cfg.save_every, plan.key, model, epoch_log, resume)
    try:
        for index, build_stage in enumerate(stages):
            if resume is not None and index < resume["stage"]:
                continue  # finished before the state was saved; its result is in the restored weights
            run_stage(build_stage(), cfg, epoch_log, work, index, checkpointer, loggers)
    finally:
        epoch_log.close()

    # SCL checkpoints keep the projection head beside the model's state_dict (which stays encoder + classifier, what
    # load_model, eval and export build): a representation-aware One-Shot run fine-tunes the dense run's head
    head = None if model.head is None else {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    model.head = None
    if not all_finite(model.state_dict().values()):
        raise UserError(f"run {cfg.out}: the trained weights are not finite; lower the learning rate")
    weight_sparsity, layer_sparsity = sparsity_report(pruned)
    sparsity = measure(pruned, plan.unit)  # in the recipe's unit: exact zeros, or whole filters (structured)
    problem = off_target(pruned, plan.unit, cfg.sparsity, cfg.sparsity_tolerance) if patterns else ""
    if problem:
        raise UserError(f"run {cfg.out} reached {problem}: check the recipe's schedule")
    test_acc = accuracy(model, test_loader, cfg.bf16)
    population = population_id(plan.identity)
    meta = dict(config=cfg.to_dict(), config_hash=plan.key, recipe=str(plan.manager), method=cfg.method_name,
                loss=cfg.loss, dataset=data.name, classes=list(data.classes), data_fingerprint=data.fingerprint,
                target_sparsity=cfg.sparsity, sparsity=sparsity, layer_sparsity=layer_sparsity, test_acc=test_acc,
                seed=cfg.seed, init=cfg.init, prunes=bool(patterns), identity=plan.identity, population=population,
                linear_recipe=str(plan.linear_manager or ""), sparsity_unit=plan.unit)
    if plan.unit != "weights":
        meta.update(weight_sparsity=weight_sparsity, **{f"layer_{plan.unit}": structure_report(pruned, plan.unit)[1]})
    if head is not None:
        meta["head_state_dict"] = head
    sha = save_checkpoint(work, model, **meta)
    (work / STATE).unlink(missing_ok=True)
    info = dict(config_hash=plan.key, population=population, test_acc=test_acc, sparsity=sparsity, checkpoint_sha256=sha)
    write_done(work, info)
    return info


def linear_stage(cfg: TrainConfig, model: nn.Module, manager, sup_batches, loader, test_loader, compiled) -> Stage:
    """SCL stage 2: the classifier on the frozen encoder (encoder in eval mode: its batch norms are frozen too).

    linear_augment: augmented training images through the encoder every step (the authors'
    clr_training.py); otherwise features of un-augmented images computed once (fast on a CPU).
    """
    encoder, classifier = model.encoder, model.classifier
    for p in encoder.parameters():
        p.requires_grad_(False)

    @torch.no_grad()
    def features(batches):
        encoder.eval()
        hs, ys = zip(*[(encoder(x).float(), y) for (x,), y in batches])
        return torch.cat(hs), torch.cat(ys)

    module = nn.ModuleDict({"classifier": classifier})

    def train_mode():
        encoder.eval()
        classifier.train()

    if cfg.linear_augment:
        def step(views, y):
            with torch.no_grad():
                h = encoder(views[0])
            return ce_and_correct(classifier(h.float()), y, cfg.label_smoothing)

        batches, step_loss = sup_batches(cfg.linear_batch_size), compiled(step)
        evaluate = lambda: accuracy(model, test_loader, cfg.bf16)  # noqa: E731
    else:
        h_train, y_train = features(loader("train", "none", 512, shuffle=False))
        h_test, y_test = features(test_loader)

        def step_loss(views, y):
            return ce_and_correct(classifier(views[0]), y, cfg.label_smoothing)

        @torch.no_grad()
        def evaluate():
            return float((classifier(h_test).argmax(1) == y_test).double().mean())

        batches = FeatureLoader(h_train, y_train, cfg.linear_batch_size, cfg.seed + 1)
    schedule = dict(kind=cfg.linear_lr_schedule, per=cfg.lr_step, milestones=cfg.linear_lr_milestones,
                    gamma=cfg.linear_lr_gamma, lr_min=cfg.linear_lr_min)
    return Stage("linear", module, list(classifier.parameters()), batches, step_loss, cfg.linear_epochs, cfg.linear_lr,
                 False, cfg.linear_weight_decay, schedule, manager, evaluate, train_mode)


# ---------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="whatislost-train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any config key can be set in --config YAML or as key=value, e.g. epochs=5 "
                                       "recipe_vars.prune_end=3.\nRunning the same command again continues an "
                                       "unfinished run.\n\nconfig keys (default, meaning):\n" + describe_keys())
    p.add_argument("--config", help="YAML file of TrainConfig keys")
    p.add_argument("--recipe", help="SparseML recipe file (recipes/dense.yaml, gmp.yaml, delta_gmp.yaml, oneshot.yaml, ...)")
    p.add_argument("--loss", help="ce | supcon")
    p.add_argument("--sparsity", type=float, help="target sparsity in [0, 1), the recipe's target_sparsity")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run directory (default runs/<dataset>-<model>-<loss>-<method>-s<sparsity>-seed<seed>)")
    p.add_argument("--init", help="finished dense run directory to start from (One-Shot)")
    p.add_argument("--dataset", help="digits | cifar10 | imagefolder")
    p.add_argument("--data-root", dest="data_root", help="data folder or .tar.gz")
    p.add_argument("--device", help="cpu | cuda | auto")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in --out (the old run stays until the new one has finished)")
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
