"""The plugin's core: SparseML recipes, the modifiers the loop can honour, and measured sparsity.

Everything whatislost asks of SparseML goes through here: finding a recipe, reading the
variables it declares, building its `ScheduledModifierManager` with those variables set,
refusing modifiers the plain training loop cannot honour, naming the tensors it prunes,
and measuring sparsity on the weights (never taken from the recipe).

Recipes may declare variables of their own that whatislost reads:
    from_dense: true      the recipe prunes a trained dense model (One-Shot style); the
                          run needs `init` = a finished dense run
    target_sparsity       the level the run is checked against (set by `--sparsity`)
    sparsity_unit         what the target counts: `weights` (default: exact zeros over the pruned
                          tensors) or `filters` / `channels` (structured recipes: whole output filters
                          / input channels that are all zero, each pruned tensor within one of target)
    finetune_loss         (from_dense recipes) the fine-tuning loss the recipe is written for, ce or
                          supcon; the run's `finetune_loss` must agree

Modifiers that score weights by gradients sampled outside the training step (OBS, M-FAC, RigL)
get a gradient sampler from the trainer (`grad_sampler` in `manager.modify`; see train.grad_sampler).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .cli import UserError, first_line

# the recipes shipped with the project (top-level recipes/ beside the package)
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

# what a dense recipe is measured over: the tensors every shipped pruning recipe prunes
PRUNABLE = ["re:^(encoder\\..*conv.*|classifier)\\.weight$"]

# modifier families the loop honours: every pruning modifier (those in GRAD_SAMPLED with the gradient sampler the
# trainer passes), epoch range, learning rate and weight decay; anything else (quantization, distillation, layer
# removal, and TopKAST, whose forward mask lives in hooks while the stored weights stay dense until finalize, which
# the loop's per-epoch measurement and resumable state do not see) is refused before a run folder is written
_HONOURED = ("EpochRangeModifier", "SetWeightDecayModifier", "SetLearningRateModifier",
             "LearningRateFunctionModifier", "LearningRateModifier")
_NEEDS_MORE = ("TopKASTPruningModifier",)
# pruning modifiers that take `grad_sampler` (data_loader_builder + loss_function) in manager.modify
GRAD_SAMPLED = ("OBSPruningModifier", "MFACPruningModifier", "RigLPruningModifier")
# pruning modifiers whose masks must be in the default (contiguous) memory format: SparseML's M-FAC views them flat
CONTIGUOUS_ONLY = ("MFACPruningModifier",)
LR_MODIFIERS = ("SetLearningRateModifier", "LearningRateFunctionModifier", "LearningRateModifier")
UNITS = ("weights", "filters", "channels")
FINETUNE_LOSSES = ("ce", "supcon")


def resolve_recipe(name: str) -> Path:
    """A recipe path as given, else a shipped recipe by file or stem name ('gmp', 'recipes/gmp.yaml')."""
    path = Path(name)
    if path.is_file():
        return path
    for cand in (RECIPES_DIR / path.name, RECIPES_DIR / f"{path.name}.yaml"):
        if cand.is_file():
            return cand
    raise UserError(f"recipe file not found: {name} (shipped recipes: "
                    f"{', '.join(sorted(p.stem for p in RECIPES_DIR.glob('*.yaml')))})")


def recipe_text(name: str) -> str:
    path = resolve_recipe(name)
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"recipe {path} cannot be read as text: {first_line(err)}") from None


def recipe_sha(name: str) -> str:
    """Content hash of a recipe file: what identifies it, not its file name."""
    return hashlib.sha256(recipe_text(name).encode()).hexdigest()[:16]


def recipe_variables(name: str) -> dict:
    """{variable: value} the recipe declares at its top level, read by SparseML's own parser."""
    from sparseml.optim.helpers import load_global_recipe_variables_from_yaml

    text = recipe_text(name)
    try:
        declared = load_global_recipe_variables_from_yaml(text)
    except Exception as err:  # yaml errors and SparseML's own, of assorted types
        raise UserError(f"recipe {resolve_recipe(name)} is not a valid SparseML recipe: {first_line(err)}") from None
    if not isinstance(declared, dict):
        raise UserError(f"recipe {resolve_recipe(name)} is not a mapping of variables and modifiers")
    return {k: v for k, v in declared.items() if k not in ("version", "metadata")}


def recipe_from_dense(name: str) -> bool:
    """Whether the recipe declares that it prunes a trained dense model (`from_dense: true`)."""
    return recipe_variables(name).get("from_dense") is True


def recipe_unit(name: str) -> str:
    """What the recipe's target sparsity counts (its `sparsity_unit` variable): weights (default), filters or channels."""
    unit = recipe_variables(name).get("sparsity_unit", "weights")
    if unit not in UNITS:
        raise UserError(f"recipe {resolve_recipe(name).name}: sparsity_unit must be one of {', '.join(UNITS)}; got {unit!r}")
    return unit


def recipe_finetune_loss(name: str) -> str | None:
    """The fine-tuning loss a from_dense recipe declares (`finetune_loss: supcon`), or None."""
    loss = recipe_variables(name).get("finetune_loss")
    if loss is not None and loss not in FINETUNE_LOSSES:
        raise UserError(f"recipe {resolve_recipe(name).name}: finetune_loss must be one of {', '.join(FINETUNE_LOSSES)}; "
                        f"got {loss!r}")
    return loss


def load_manager(recipe: str, num_epochs: float, sparsity: float, overrides: dict | None = None):
    """The recipe as a ScheduledModifierManager with num_epochs, target_sparsity and `overrides` set.

    UserError when the recipe is unreadable, SparseML rejects it, a variable is unknown, it
    prunes without declaring target_sparsity, or it holds a modifier the loop cannot honour.
    """
    from sparseml.pytorch.optim import ScheduledModifierManager

    path = resolve_recipe(recipe)
    declared = recipe_variables(recipe)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise UserError(f"recipe {path.name} has no variable {unknown[0]!r} (it declares: {', '.join(sorted(declared))})")
    values = {"num_epochs": num_epochs, "target_sparsity": sparsity, **overrides}
    try:
        manager = ScheduledModifierManager.from_yaml(str(path), recipe_variables={k: v for k, v in values.items()
                                                                                  if k in declared})
    except Exception as err:  # SparseML raises assorted types for bad recipes
        raise UserError(f"SparseML rejected recipe {path}: {first_line(err)}") from None
    check_honoured(manager, path)
    check_unit(manager, path, recipe_unit(recipe))
    if pruning_patterns(manager) and "target_sparsity" not in declared:
        raise UserError(f"recipe {path.name} prunes but declares no target_sparsity variable")
    if not pruning_patterns(manager) and sparsity > 0:
        raise UserError(f"recipe {path.name} does not prune, but target sparsity {sparsity} was asked for")
    return manager


def check_honoured(manager, path: Path):
    """Refuse, up front, modifiers the plain loop cannot honour (a half-run folder helps nobody)."""
    from sparseml.pytorch.sparsification.pruning.modifier_pruning_base import BasePruningModifier

    for mod in manager.modifiers:
        name = type(mod).__name__
        if name in _NEEDS_MORE or not (isinstance(mod, BasePruningModifier) or name in _HONOURED):
            raise UserError(f"recipe {path.name} uses {name}, which whatislost's training loop does not support "
                            f"(it runs pruning modifiers but TopKAST, epoch-range, learning-rate and weight-decay "
                            f"modifiers)")


def check_unit(manager, path: Path, unit: str):
    """A structured recipe must count what it prunes: every pruning modifier of a `filters` / `channels` recipe is a
    StructuredPruningModifier of that mask type, and a StructuredPruningModifier declares its unit."""
    from sparseml.pytorch.sparsification.pruning import StructuredPruningModifier
    from sparseml.pytorch.sparsification.pruning.modifier_pruning_base import BasePruningModifier

    want = {"filters": "filter", "channels": "channel"}.get(unit)
    for mod in manager.modifiers:
        if not isinstance(mod, BasePruningModifier):
            continue
        structured = mod.mask_type if isinstance(mod, StructuredPruningModifier) else None
        if structured != want:
            if structured:
                raise UserError(f"recipe {path.name} prunes whole {structured}s: declare sparsity_unit: {structured}s "
                                f"(the target counts {structured}s, not single weights)")
            raise UserError(f"recipe {path.name} declares sparsity_unit: {unit}, but {type(mod).__name__} does not prune "
                            f"whole {want}s (use StructuredPruningModifier with mask_type: {want})")


def needs_grad_sampler(manager) -> bool:
    """Whether a modifier of the recipe scores weights by sampled gradients (OBS, M-FAC, RigL)."""
    return manager is not None and any(type(mod).__name__ in GRAD_SAMPLED for mod in manager.modifiers)


def needs_contiguous(manager) -> bool:
    """Whether the recipe's masks must be contiguous (then the trainer keeps the model out of channels_last)."""
    return manager is not None and any(type(mod).__name__ in CONTIGUOUS_ONLY for mod in manager.modifiers)


def sets_learning_rate(manager) -> bool:
    """Whether the recipe schedules the learning rate itself (then the built-in schedule steps aside)."""
    return any(type(mod).__name__ in LR_MODIFIERS for mod in manager.modifiers)


def pruning_patterns(manager) -> list:
    """Parameter names / regexes of every pruning modifier in the recipe."""
    from sparseml.pytorch.sparsification.pruning.modifier_pruning_base import BasePruningModifier

    patterns = []
    for mod in manager.modifiers:
        if isinstance(mod, BasePruningModifier):
            patterns += [mod.params] if isinstance(mod.params, str) else list(mod.params)
    return patterns


def named_tensors(module: nn.Module, patterns: list) -> dict:
    """{full name: parameter} of `module` matched by SparseML's own name/regex rules."""
    from sparseml.pytorch.utils import get_named_layers_and_params_by_regex

    found = get_named_layers_and_params_by_regex(module, patterns)
    return {f"{f.layer_name}.{f.param_name}": f.param for f in found}


def sparsity_report(tensors: dict) -> tuple[float, dict]:
    """(overall fraction of exact zeros, {name: fraction}) over the given tensors, measured on the weights."""
    layers = {name: float((p == 0).float().mean()) for name, p in tensors.items()}
    zeros = sum(int((p == 0).sum()) for p in tensors.values())
    total = sum(p.numel() for p in tensors.values())
    return (zeros / total if total else 0.0), layers


def structure_report(tensors: dict, unit: str = "filters") -> tuple[float, dict]:
    """(fraction of whole filters / input channels that are all zero over the given tensors,
    {name: [removed, total]}); a filter is an output slice w[i], a channel an input slice w[:, j]."""
    dim = 0 if unit == "filters" else 1
    layers = {}
    for name, p in tensors.items():
        if p.dim() < 2:
            continue  # a bias has no filters
        nonzero = (p.detach() != 0).transpose(0, dim).reshape(p.shape[dim], -1).any(1)
        layers[name] = [int((~nonzero).sum()), int(p.shape[dim])]
    removed = sum(r for r, _ in layers.values())
    total = sum(t for _, t in layers.values())
    return (removed / total if total else 0.0), layers


def measure(tensors: dict, unit: str = "weights") -> float:
    """Overall sparsity of the tensors in the recipe's unit."""
    return sparsity_report(tensors)[0] if unit == "weights" else structure_report(tensors, unit)[0]


def off_target(tensors: dict, unit: str, target: float, tolerance: float) -> str:
    """'' when the tensors reach `target` in `unit`, else what is off. weights: the overall fraction of exact zeros
    within `tolerance`; filters / channels: every tensor within ONE filter (channel) of target x its count, the
    finest a layer of n filters can get (1/n: 6.3 points for a 16-filter layer)."""
    if unit == "weights":
        overall = sparsity_report(tensors)[0]
        return "" if abs(overall - target) <= tolerance else (f"sparsity {overall:.4f}, not the target {target:.4f} "
                                                               f"(more than {tolerance * 100:.1f} points off)")
    _, layers = structure_report(tensors, unit)
    for name, (removed, total) in layers.items():
        if abs(removed - target * total) > 1:
            return f"{removed} of {total} {unit} removed in {name}, not {target * total:g} (more than one off)"
    return ""


LOGGERS = ("tensorboard", "wandb")  # opt-in: nothing is sent off the machine unless asked for


def check_loggers(names: list):
    """UserError, before anything is written, for an unknown logger or one whose package is missing."""
    for name in names:
        if name not in LOGGERS:
            raise UserError(f"loggers: '{name}' is not one of {', '.join(LOGGERS)}")
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"loggers: {name} needs the {module} package (pip install {module})") from None


def run_loggers(run_dir: Path, extra: list = (), run_name: str = ""):
    """One SparseML LoggerManager for a run: its modifiers and the trainer's per-epoch figures go through it.

    Always a PythonLogger into RUN_DIR/sparse_logs/sparseml.log (never ./sparse_logs/); on request a
    TensorBoardLogger into RUN_DIR/tensorboard/ and a WANDBLogger (Weights & Biases sends data off the
    machine: strictly opt-in, `loggers: [wandb]`).
    """
    from sparseml.pytorch.utils import LoggerManager, PythonLogger, TensorBoardLogger, WANDBLogger

    (run_dir / "sparse_logs").mkdir(exist_ok=True)
    logger = logging.getLogger(f"whatislost.sparseml.{Path(run_dir).resolve()}")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.addHandler(logging.FileHandler(run_dir / "sparse_logs" / "sparseml.log"))
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    loggers = [PythonLogger(logger=logger)]
    if "tensorboard" in extra:
        loggers.append(TensorBoardLogger(log_path=str(run_dir / "tensorboard")))
    if "wandb" in extra:
        loggers.append(WANDBLogger(init_kwargs={"dir": str(run_dir), "name": run_name or Path(run_dir).name}))
    return LoggerManager(loggers)


# ---------------------------------------------------------------- resumable SparseML state
_SKIP_ATTRS = {"_initialized", "_loggers_initialized", "_enabled"}


def manager_state(manager) -> dict:
    """SparseML's own state (the masks) plus each modifier's schedule position (started, last update,
    applied sparsity, ...), which SparseML does not save, so that a resumed run updates its masks at
    exactly the steps an uninterrupted run would."""
    positions = []
    for mod in manager.modifiers:
        scalars = {k: v for k, v in vars(mod).items() if k.startswith("_") and k not in _SKIP_ATTRS
                   and (v is None or isinstance(v, (bool, int, float)))}
        masks = getattr(mod, "_module_masks", None)
        if masks is not None:
            scalars["__masks_enabled"] = bool(masks.enabled)
        positions.append(scalars)
    return {"masks": manager.state_dict(), "positions": positions}


def load_manager_state(manager, state: dict):
    manager.load_state_dict(state["masks"])
    for mod, scalars in zip(manager.modifiers, state["positions"]):
        for k, v in scalars.items():
            if k == "__masks_enabled":
                mod._module_masks.enabled = v
            else:
                setattr(mod, k, v)


# ---------------------------------------------------------------- the gradient sampler (OBS, M-FAC, RigL)
class SampledBatches:
    """What SparseML's GradSampler iterates: (forward args, forward kwargs, loss target) per batch, the views of a
    batch concatenated (view-major) into one forward. Re-iterable: every pruning step draws afresh."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for views, y in self.loader:
            yield [torch.cat(views) if len(views) > 1 else views[0]], {}, y


def grad_sampler(make_loader: Callable, loss_function: Callable, batch_size: int) -> dict:
    """SparseML's `grad_sampler` for modifiers that score weights by sampled gradients (OBS, M-FAC, RigL), passed as
    `manager.modify(..., grad_sampler=...)`: {data_loader_builder, loss_function}.

    data_loader_builder(kwargs) (OBS, M-FAC: the recipe's grad_sampler_kwargs as one dict; RigL: as keywords)
    gives training batches of the stage's own augmentation, `batch_size` images each unless the recipe's
    grad_sampler_kwargs set batch_size, from a loader with its own shuffling generator (the training order is
    untouched). loss_function(module output, targets) is the stage's loss. GradSampler runs the stage's module
    (in eval mode) on them between the training step's backward and its optimizer step, and zeroes the
    gradients after: on a mask-update step the training batch's own update is skipped, as in SparseML's trainers.
    """
    def data_loader_builder(options=None, **kw):
        options = {**(options or {}), **kw}
        unknown = sorted(set(options) - {"batch_size"})
        if unknown:
            raise UserError(f"grad_sampler_kwargs: whatislost's gradient sampler takes batch_size only, not {unknown[0]!r}")
        return SampledBatches(make_loader(int(options.get("batch_size") or batch_size)))

    return {"data_loader_builder": data_loader_builder, "loss_function": loss_function}
