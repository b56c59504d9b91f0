"""Population identity: which runs are one experiment up to their seed, and every name derived from it.

A population (Corti et al. 2022, Section 3: models "differing only in their seed") is the
set of finished runs that agree on everything that changes the trained model:

    data content (fingerprint, not the folder's name), architecture, loss, every training
    setting (optimiser, schedules, augmentation, precision, stage lengths, ...), the pruning
    recipe as applied (its text with variables resolved, not its file name), the exact target
    sparsity, and for runs that start from a dense run (One-Shot) that dense population.

Left out: the seed, where the run is written, which dense run of the population a One-Shot
run started from (each seed its own), and what only changes speed or logging (threads,
device, channels_last, compile, eval_every, save_every, sparsity_tolerance). The method's
name labels a population; runs with one label but different identities are never pooled.

This module owns the identity and the names derived from it: run-folder names, population
labels ('Sup/GMP/90'), sparsity labels ('90', '30.4'), eval keys, table rows, figure labels.
"""
from __future__ import annotations

import hashlib
import json

LOSS_NAMES = {"ce": "Sup", "supcon": "SCL"}
METHOD_NAMES = {"dense": "Dense", "gmp": "GMP", "delta_gmp": "ΔGMP", "oneshot": "One-Shot",
                "gmp_global": "GMP (global)", "delta_gmp_global": "ΔGMP (global)",
                "acdc": "AC-DC", "rigl": "RigL", "movement": "Movement", "filter": "Filter", "obs": "OBS",
                "mfac": "M-FAC", "oneshot_supcon": "One-Shot (SupCon FT)"}
DENSE = "dense"

# TrainConfig keys that do not change the trained model (or are replaced by content: recipe, data_root)
NOT_IDENTITY = ("seed", "out", "init", "threads", "device", "channels_last", "compile", "compile_mode", "eval_every",
                "save_every", "loggers", "sparsity_tolerance", "method", "data_root", "recipe", "recipe_vars",
                "linear_recipe", "linear_recipe_vars")
# what a pruned population shares with its dense reference (everything but the pruning itself)
PRUNING_ONLY = ("sparsity", "recipe_sha", "linear_recipe_sha", "init")


def short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text else ""


def run_identity(config: dict, recipe_applied: str, data_fingerprint: str, linear_recipe_applied: str = "",
                 init_population: str = "") -> dict:
    """What makes a run's model what it is, apart from its seed (see module docstring)."""
    settings = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
    return dict(settings=settings, recipe_sha=text_sha(recipe_applied), linear_recipe_sha=text_sha(linear_recipe_applied),
                data=data_fingerprint, init=init_population)


def population_id(identity: dict) -> str:
    """The population a run belongs to: equal ids pool, different ids never do."""
    return short_hash(identity)


def reference_id(identity: dict) -> str:
    """Equal for a pruned population and the dense population it is compared with: all but the pruning."""
    settings = {k: v for k, v in identity["settings"].items() if k not in PRUNING_ONLY}
    return short_hash({**{k: v for k, v in identity.items() if k not in PRUNING_ONLY}, "settings": settings})


def run_hash(identity: dict, seed: int, method: str) -> str:
    """What done.json records and resume compares: the population, the seed and the method's label."""
    return short_hash({"population": population_id(identity), "seed": seed, "method": method})


# ---------------------------------------------------------------- names
def sparsity_label(sparsity: float) -> str:
    """Target sparsity as a percent without rounding distinct levels together: 0.9 -> '90', 0.304 -> '30.4'."""
    return percent_label(100 * float(sparsity))


def percent_label(percent: float) -> str:
    """A sparsity already in percent (the eval's tables hold percents): 90.0 -> '90', 30.4 -> '30.4'."""
    return f"{round(float(percent), 6):g}"


def loss_name(loss: str) -> str:
    return LOSS_NAMES.get(loss, loss)


def split_variant(method: str) -> tuple[str, str]:
    """'gmp [3fa2c1]' -> ('gmp', '3fa2c1'): the eval marks populations that share a label but not an identity."""
    base, _, variant = method.partition(" [")
    return base, variant.rstrip("]")


def method_name(method: str) -> str:
    base, variant = split_variant(method)
    name = METHOD_NAMES.get(base, base)
    return f"{name} [{variant}]" if variant else name


def population_label(loss: str, method: str, sparsity: float, variant: str = "") -> str:
    """'Sup/GMP/90'; with a variant (populations that share a label but not an identity) 'Sup/GMP/90 [3fa2c1]'."""
    base, marked = split_variant(method)
    variant = variant or marked
    label = f"{loss_name(loss)}/{METHOD_NAMES.get(base, base)}/{sparsity_label(sparsity)}"
    return f"{label} [{variant}]" if variant else label


def column_name(loss: str, method: str) -> str:
    """'Sup/GMP': a table column or figure series."""
    return f"{loss_name(loss)}/{method_name(method)}"


def study_run_name(loss: str, method: str, sparsity: float, seed: int) -> str:
    """A study's run folder under OUT/runs and its label: '<loss>/<method>/s<pct>/seed<k>'."""
    return f"{loss}/{method}/s{sparsity_label(sparsity)}/seed{seed}"
