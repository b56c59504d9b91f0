"""One typed configuration for a training run: YAML file + overrides -> `TrainConfig`.

Config flows one way: defaults, then the YAML file, then command-line flags and
`key=value` overrides. The resolved object is saved into the run directory.
Unknown keys are errors that name the nearest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_type_hints

import yaml

from .cli import UserError, first_line


@dataclass
class TrainConfig:
    # data
    dataset: str = "digits"  # digits | cifar10 | imagefolder
    data_root: str = ""  # folder (or .tar.gz for imagefolder); unused for digits
    train_per_class: int = 0  # 0: every training image; else the first N of each class (a fixed subset)
    test_per_class: int = 0  # 0: every test image; else the first N of each class
    crop_padding: int = 4  # Sup augmentation: random crop with this zero padding
    hflip: bool = True  # horizontal flips (off for digits, which are not mirror-symmetric)
    vflip: bool = False  # vertical flips in the crop augmentation (the authors' code has them; the paper does not list them)
    # model
    arch: str = "wrn"  # wrn (WideResNet-depth-widen, the paper's) | resnet18 (CIFAR stem; depth and widen unused)
    depth: int = 16  # WideResNet depth, 6n+4 (paper: 16)
    widen: int = 2  # WideResNet width factor k (paper: 2)
    # training: one trainer, `loss` picks cross-entropy (Sup) or SupCon (SCL)
    loss: str = "ce"  # ce | supcon
    epochs: int = 30  # ce: whole run; supcon: contrastive stage 1
    batch_size: int = 128  # images per step (SCL: anchors; each brings 2 views)
    lr: float = 0.05  # SGD learning rate of the main stage
    momentum: float = 0.9  # SGD momentum of every stage
    nesterov: bool = False  # Nesterov momentum in the main stage
    weight_decay: float = 5e-4  # L2 weight decay of the main stage
    lr_schedule: str = "cosine"  # cosine | constant | multistep | multistep+cosine
    lr_milestones: list = field(default_factory=list)  # multistep: epochs at which the rate is multiplied by lr_gamma (fractions: lr_step step)
    lr_gamma: float = 0.1  # multistep: factor at each milestone
    lr_min: float = 0.0  # cosine floor (eta_min)
    lr_step: str = "step"  # step | epoch: when the schedule advances (the authors step per epoch)
    label_smoothing: float = 0.0  # cross-entropy label smoothing (paper: none)
    temperature: float = 0.5  # SupCon temperature (paper: 0.5)
    base_temperature: Optional[float] = None  # SupCon loss x temperature/base_temperature (authors: 0.07); null: no factor
    # SCL stage 2: linear classifier on the frozen encoder
    linear_epochs: int = 10  # SCL stage 2 (linear classifier on the frozen encoder): epochs
    linear_lr: float = 0.1  # SCL stage 2: learning rate
    linear_batch_size: int = 128  # SCL stage 2: batch size
    linear_weight_decay: float = 0.0  # SCL stage 2: weight decay
    linear_lr_schedule: str = "cosine"  # SCL stage 2: cosine | constant | multistep | multistep+cosine
    linear_lr_milestones: list = field(default_factory=list)  # SCL stage 2: multistep milestones (epochs)
    linear_lr_gamma: float = 0.1  # SCL stage 2: multistep factor
    linear_lr_min: float = 0.0  # SCL stage 2: cosine floor
    linear_augment: bool = False  # true: augmented images through the frozen encoder every epoch (authors); false: features once
    linear_recipe: str = ""  # SparseML recipe pruning the classifier in this stage (authors: GMP to the run's sparsity)
    linear_recipe_vars: dict = field(default_factory=dict)  # variables of linear_recipe, e.g. prune_start
    # One-Shot fine-tuning (used when `init` names a dense run)
    init: str = ""  # a finished dense run to start from (One-Shot: recipes declaring from_dense)
    finetune_epochs: int = 30  # One-Shot fine-tuning: epochs
    finetune_lr: float = 1e-3  # One-Shot fine-tuning: learning rate
    finetune_nesterov: bool = True  # One-Shot fine-tuning: Nesterov momentum
    finetune_batch_size: int = 0  # One-Shot fine-tuning: batch size (0: batch_size)
    finetune_weight_decay: Optional[float] = None  # One-Shot fine-tuning: weight decay (null: weight_decay)
    finetune_lr_schedule: str = "cosine"  # One-Shot fine-tuning: learning-rate schedule
    finetune_loss: str = "ce"  # One-Shot fine-tuning loss: ce (encoder + classifier, the paper's) | supcon (SCL: encoder + head with SupCon, then the linear stage)
    # pruning: a SparseML recipe and its variables
    recipe: str = "recipes/dense.yaml"  # SparseML recipe file, or a shipped recipe's name (gmp, delta_gmp, oneshot, ...)
    method: str = ""  # population name of the schedule; empty: the recipe file's stem (see method_name)
    sparsity: float = 0.0  # passed to the recipe as `target_sparsity`
    recipe_vars: dict = field(default_factory=dict)  # extra recipe variables, e.g. prune_start
    sparsity_tolerance: float = 0.005  # fail the run if achieved sparsity is further off
    # run
    seed: int = 0  # seed of initialisation, data order and augmentation (>= 0)
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 0  # torch CPU threads, 0 = torch's default
    channels_last: bool = True  # channels_last memory format (faster convolutions)
    bf16: bool = False  # bf16 autocast for forward/backward
    compile: bool = False  # torch.compile the forward/backward of each step (SparseML's masks stay eager)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    eval_every: int = 1  # test accuracy every N epochs (0: only at the end)
    save_every: int = 10  # resumable state every N epochs (0: never); a rerun continues from it
    loggers: list = field(default_factory=list)  # extra SparseML loggers: tensorboard, wandb (opt-in; sends data away)
    out: str = ""  # run directory; default runs/<name>

    @property
    def method_name(self) -> str:
        """The population's method: `method` when set (a study's name), else the recipe's stem (gmp, oneshot, ...)."""
        return self.method or Path(self.recipe).stem

    @property
    def model_name(self) -> str:
        from .models import model_label

        return model_label(self)

    def run_name(self) -> str:
        from .identity import sparsity_label

        return f"{self.dataset}-{self.model_name}-{self.loss}-{self.method_name}-s{sparsity_label(self.sparsity)}-seed{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SCHEDULES = ("cosine", "constant", "multistep", "multistep+cosine")
CHOICES = {
    "dataset": ("digits", "cifar10", "imagefolder"),
    "loss": ("ce", "supcon"),
    "lr_schedule": SCHEDULES,
    "linear_lr_schedule": SCHEDULES,
    "finetune_lr_schedule": SCHEDULES,
    "finetune_loss": ("ce", "supcon"),
    "arch": ("wrn", "resnet18"),
    "lr_step": ("step", "epoch"),
    "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "device": ("cpu", "cuda", "auto"),
}


def _optional(typ):
    """(inner type, True) for Optional[inner], else (typ, False)."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return typ, False


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Turn a YAML value or override string into the field's type, or raise UserError."""
    typ, optional = _optional(typ)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~", ""))):
        return None
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif typ is dict:
        if isinstance(value, dict):
            return dict(value)
    elif typ is list:
        if isinstance(value, str):
            value = parse_scalar(value)
        if isinstance(value, (list, tuple)):
            return list(value)
    elif typ in (int, float):
        # ints are valid floats; floats and booleans are not valid ints
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (typ is float or isinstance(value, int)):
            return typ(value)
        if isinstance(value, str):
            try:
                return typ(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"config key '{key}' expects {typ.__name__}, got {value!r}")


def parse_scalar(text: str) -> Any:
    """Parse an override's value the YAML way (numbers, booleans, lists), keeping other strings as they are."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def unknown_key(key: str, allowed, where: str, what: str = "key") -> UserError:
    """The error for a key that does not exist, naming the nearest valid one."""
    near = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return UserError(f"unknown {what} '{key}' in {where}{hint}")


def apply_overrides(cfg, values: dict, source: str):
    """Set `values` on the dataclass `cfg`; keys must exist. `a.b=v` sets key b of dict field a."""
    types = get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    for key, value in values.items():
        head, _, sub = key.partition(".")
        if head not in types:
            raise unknown_key(head, names, source, what="config key")
        if sub:
            if types[head] is not dict:
                raise UserError(f"config key '{head}' is not a mapping; '{key}' is invalid")
            getattr(cfg, head)[sub] = parse_scalar(value) if isinstance(value, str) else value
        else:
            setattr(cfg, head, _coerce(head, value, types[head]))
    return cfg


def parse_overrides(items: list[str]) -> dict:
    """['lr=0.1', 'recipe_vars.prune_start=2'] -> {'lr': '0.1', 'recipe_vars.prune_start': '2'}."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"override '{item}' is not of the form key=value")
        out[key.strip()] = value
    return out


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML mapping from a file; UserError for a missing, binary, garbled or non-mapping file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a text file") from None
    except yaml.YAMLError as err:
        raise UserError(f"{what} {path} is not valid YAML: {first_line(err)}") from None
    except OSError as err:
        raise UserError(f"{what} {path} cannot be read: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a mapping of keys to values")
    return data


# (key, lowest, highest, lowest allowed?) for numeric settings; None: unbounded on that side
RANGES = [
    ("lr", 0, None, False), ("linear_lr", 0, None, False), ("finetune_lr", 0, None, False),
    ("momentum", 0, 1, True), ("weight_decay", 0, None, True), ("linear_weight_decay", 0, None, True),
    ("finetune_weight_decay", 0, None, True), ("lr_gamma", 0, None, False), ("linear_lr_gamma", 0, None, False),
    ("lr_min", 0, None, True), ("linear_lr_min", 0, None, True), ("label_smoothing", 0, 1, True),
    ("temperature", 0, None, False), ("base_temperature", 0, None, False), ("sparsity_tolerance", 0, 1, False),
    ("seed", 0, None, True), ("threads", 0, None, True), ("eval_every", 0, None, True), ("save_every", 0, None, True),
    ("crop_padding", 0, None, True), ("train_per_class", 0, None, True), ("test_per_class", 0, None, True), ("linear_epochs", 0, None, True), ("finetune_batch_size", 0, None, True),
    ("epochs", 1, None, True), ("batch_size", 1, None, True), ("linear_batch_size", 1, None, True),
    ("finetune_epochs", 1, None, True),
]


def _check_number(key: str, value, low, high, low_ok: bool):
    if value is None:
        return
    if not math.isfinite(value):
        raise UserError(f"{key} must be a finite number; got {value}")
    below = value < low if low_ok else value <= low
    if (low is not None and below) or (high is not None and value >= high):
        bounds = f"{'[' if low_ok else '('}{low}, {high if high is not None else 'inf'})"
        raise UserError(f"{key} must be in {bounds}; got {value}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check values a user can get wrong, before anything is written; raise UserError with one clear line."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}; got '{getattr(cfg, key)}'")
    if not (math.isfinite(cfg.sparsity) and 0.0 <= cfg.sparsity < 1.0):
        raise UserError(f"target sparsity must be in [0, 1); got {cfg.sparsity}")
    for key, low, high, low_ok in RANGES:
        _check_number(key, getattr(cfg, key), low, high, low_ok)
    if cfg.arch == "wrn" and ((cfg.depth - 4) % 6 or cfg.depth < 10):
        raise UserError(f"WideResNet depth must be 6n+4 (10, 16, 22, 28, ...); got {cfg.depth}")
    if cfg.arch == "wrn" and cfg.widen < 1:
        raise UserError(f"widen must be >= 1; got {cfg.widen}")
    if cfg.finetune_loss == "supcon" and cfg.loss != "supcon":
        raise UserError("finetune_loss supcon fine-tunes encoder + projection head with the SupCon loss: it needs "
                        f"loss supcon (a {cfg.loss} model has no projection head)")
    if cfg.init:  # a One-Shot run: its recipe may declare the fine-tuning loss it is written for
        from .pruning import recipe_finetune_loss

        declared = recipe_finetune_loss(cfg.recipe)
        if declared and declared != cfg.finetune_loss:
            raise UserError(f"recipe {cfg.recipe} is written for fine-tuning with {declared} (it declares finetune_loss): "
                            f"set finetune_loss={declared}")
        if cfg.finetune_loss == "supcon" and not cfg.linear_epochs:
            raise UserError("finetune_loss supcon retrains the classifier on the pruned encoder: linear_epochs must be >= 1")
    for key in ("lr_milestones", "linear_lr_milestones"):
        values = getattr(cfg, key)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                      for v in values)
        if not numbers or values != sorted(values):
            raise UserError(f"{key} must be increasing epochs > 0 (fractions step per step); got {values}")
    for key in ("recipe_vars", "linear_recipe_vars"):
        for name, value in getattr(cfg, key).items():
            try:
                number = float(value) if not isinstance(value, bool) else 0.0
            except (TypeError, ValueError):
                continue  # a string (an eval expression, a mask type): SparseML checks it
            if not math.isfinite(number):
                raise UserError(f"{key}.{name} must be finite; got {value}")
    if cfg.dataset != "digits" and not cfg.data_root:
        raise UserError(f"dataset '{cfg.dataset}' needs data_root (--data-root or data_root=...)")
    return cfg


def load_config(path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- YAML file <- overrides (flags and key=value), validated."""
    cfg = TrainConfig()
    if path:
        apply_overrides(cfg, read_yaml(path), str(path))
    apply_overrides(cfg, overrides or {}, "command line")
    return validate(cfg)


def describe_keys(cls=None) -> str:
    """Every key of a config dataclass with its default and the comment beside it in the source, one line each
    (what `--help` lists; the dataclass is the one place both are written)."""
    import inspect
    import re

    cls = cls or TrainConfig
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        found = re.match(r"\s+(\w+):[^=#]+=[^#]*#\s*(.*)$", line)
        if found:
            comments[found.group(1)] = found.group(2)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  {f.name:<22} {default!r:<22} {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def resolve_device(name: str):
    """'auto' -> cuda when a GPU is there, else cpu; UserError for cuda without a GPU. A torch.device."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for, but no CUDA GPU is available")
    return torch.device(name)


def config_text(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
