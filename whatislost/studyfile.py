"""Study files: the schema of a whatislost-study YAML, parsed into typed objects and checked.

    name, train, losses, methods, sparsities, seeds, eval      (README, "Running a study")

Every mistake is a one-line UserError naming where it is, found before anything trains:
unknown keys (with the nearest valid one), keys the grid sets, recipes that do not exist,
eval metric names and settings. Command-line overrides (`losses.ce.epochs=3`) are applied
to the raw file first, with the same value grammar as whatislost-train's key=value.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .cli import UserError
from .config import CHOICES, TrainConfig, apply_overrides, parse_scalar, read_yaml, unknown_key
from .identity import DENSE
from .pruning import recipe_from_dense, resolve_recipe

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
    """Arguments of whatislost.eval.run_eval (see `whatislost-eval --help`)."""

    metrics: list | None = None  # None: every metric (acc, pie, qscore, depth, umap)
    depth_models: int = 5  # models per population used for prediction depth
    knn_k: int = 30  # k of the prediction-depth kNN probes
    device: str = "cpu"  # cpu | cuda | auto
    probes: str = "authors"  # authors (16 probes on WRN-16-2) | blocks (8)
    depth_train: str = "clean"  # clean | augmented: the training images the depth kNN is fitted on
    tie_break: str = "min"  # min | max: the class a tied modal label goes to
    depth_reference: str = "label"  # label | prediction: what every probe must predict
    n_boot: int = 1000  # bootstrap resamples of each 95% interval (0: none)
    n_perm: int = 10000  # permutations of the Sup-vs-SCL PIE test
    alpha: float = 0.05  # significance level of the tests
    correction: str = "bh"  # multiple-testing correction: bh | holm | bonferroni | none
    cka_samples: int = 10000  # test images of the cka metric (0: all)


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
    declared = recipe_from_dense(recipe)  # what the recipe says it does, not its file name
    from_dense = spec.get("from_dense", declared)
    if not isinstance(from_dense, bool):
        raise UserError(f"{where}.from_dense must be true or false, got {from_dense!r}")
    if declared and not from_dense:
        raise UserError(f"{where}: recipe {recipe} prunes a trained dense model (it declares from_dense); "
                        f"from_dense cannot be false")
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
    from .eval import check_settings, check_stats  # the eval owns its settings' rules; checked before anything trains

    try:
        check_settings(metrics=ev.metrics, depth_models=ev.depth_models, knn_k=ev.knn_k, device=ev.device,
                       probes=ev.probes, depth_train=ev.depth_train, tie_break=ev.tie_break,
                       depth_reference=ev.depth_reference, cka_samples=ev.cka_samples)
        check_stats(ev.n_boot, ev.n_perm, ev.alpha, ev.correction)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
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
    value = parse_scalar(text) if isinstance(text, str) else text
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
    raw = read_yaml(path, what="study file")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return parse_study(raw, str(path)), raw
