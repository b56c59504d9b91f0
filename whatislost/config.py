"""One typed configuration for a training run: YAML file + overrides -> `TrainConfig`.

Config flows one way: defaults, then the YAML file, then command-line flags and
`key=value` overrides. The resolved object is saved into the run directory.
Unknown keys are errors that name the nearest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file). Printed as one line, exit code 2."""


# the recipes shipped with the project (top-level recipes/ beside the package)
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


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


def first_line(err: Exception) -> str:
    """An exception as one line: the first line of its message, else its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_cli(main, argv=None, prog: str = "whatislost") -> int:
    """Run `main(argv)`; turn `UserError` into one line on stderr and exit code 2."""
    try:
        return main(argv) or 0
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


@dataclass
class TrainConfig:
    # data
    dataset: str = "digits"  # digits | cifar10 | imagefolder
    data_root: str = ""  # folder (or .tar.gz for imagefolder); unused for digits
    crop_padding: int = 4  # Sup augmentation: random crop with this zero padding
    hflip: bool = True  # horizontal flips (off for digits, which are not mirror-symmetric)
    # model
    depth: int = 16
    widen: int = 2
    # training: one trainer, `loss` picks cross-entropy (Sup) or SupCon (SCL)
    loss: str = "ce"  # ce | supcon
    epochs: int = 30  # ce: whole run; supcon: contrastive stage 1
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # cosine | constant
    label_smoothing: float = 0.0
    temperature: float = 0.5  # SupCon temperature (paper: 0.5)
    # SCL stage 2: linear classifier on the frozen encoder
    linear_epochs: int = 10
    linear_lr: float = 0.1
    linear_batch_size: int = 128
    # One-Shot fine-tuning (used when `init` names a dense run)
    init: str = ""
    finetune_epochs: int = 30
    finetune_lr: float = 1e-3
    finetune_nesterov: bool = True
    # pruning: a SparseML recipe and its variables
    recipe: str = "recipes/dense.yaml"
    method: str = ""  # population name of the schedule; empty: the recipe file's stem (see method_name)
    sparsity: float = 0.0  # passed to the recipe as `target_sparsity`
    recipe_vars: dict = field(default_factory=dict)  # extra recipe variables, e.g. prune_start
    sparsity_tolerance: float = 0.005  # fail the run if achieved sparsity is further off
    # run
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 0  # torch CPU threads, 0 = torch's default
    channels_last: bool = True
    bf16: bool = False  # bf16 autocast for forward/backward
    eval_every: int = 1  # test accuracy every N epochs (0: only at the end)
    out: str = ""  # run directory; default runs/<name>

    @property
    def method_name(self) -> str:
        """The population's method: `method` when set (a study's name), else the recipe's stem (gmp, oneshot, ...)."""
        return self.method or Path(self.recipe).stem

    @property
    def model_name(self) -> str:
        return f"wrn{self.depth}-{self.widen}"

    def run_name(self) -> str:
        return f"{self.dataset}-{self.model_name}-{self.loss}-{self.method_name}-s{round(self.sparsity * 100)}-seed{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable hash of everything that defines the run except where it is written."""
        d = self.to_dict()
        d.pop("out")
        d.pop("threads")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


CHOICES = {
    "dataset": ("digits", "cifar10", "imagefolder"),
    "loss": ("ce", "supcon"),
    "lr_schedule": ("cosine", "constant"),
    "device": ("cpu", "cuda", "auto"),
}


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Turn a YAML value or override string into the field's type, or raise UserError."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif typ is dict:
        if isinstance(value, dict):
            return dict(value)
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


def _parse_scalar(text: str) -> Any:
    """Parse an override's value the YAML way (numbers, booleans), keeping strings as they are."""
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
            getattr(cfg, head)[sub] = _parse_scalar(value) if isinstance(value, str) else value
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


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {first_line(err)}")
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return data


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check values a user can get wrong; raise UserError with one clear line."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}; got '{getattr(cfg, key)}'")
    if not 0.0 <= cfg.sparsity < 1.0:
        raise UserError(f"target sparsity must be in [0, 1); got {cfg.sparsity}")
    if (cfg.depth - 4) % 6 or cfg.depth < 10:
        raise UserError(f"WideResNet depth must be 6n+4 (10, 16, 22, 28, ...); got {cfg.depth}")
    if cfg.widen < 1:
        raise UserError(f"widen must be >= 1; got {cfg.widen}")
    for key in ("epochs", "batch_size", "linear_batch_size"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key} must be >= 1; got {getattr(cfg, key)}")
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


def save_config(cfg, path: Path):
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
