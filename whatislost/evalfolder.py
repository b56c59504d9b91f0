"""Eval folder bookkeeping: which files of an eval folder whatislost wrote, and writing them safely.

whatislost-eval and whatislost-report write only these files (paths inside the eval folder):

    summary.json                                  report/index.html
    tables/populations.csv, pie_per_class.csv, pie_overlap.csv, per_sample_<group>.csv
    tables/class_recall_tests.csv, pie_comparison.csv, cka.csv
    tables/table1|4|5|6.{csv,md}                  figdata/umap_<group>.csv, pie_images_<group>.npz
    figdata/training_<group>.csv, layer_sparsity_<group>.csv
    figures/<figure>_<group>.{png,pdf}            (figure: whatislost.figures.FIGURES)

and list the ones the folder's current eval and report wrote in EVAL_DIR/.whatislost-eval
(JSON). A new eval into the same folder removes every listed file it does not write again
(an earlier eval's Table 6 when the new one has no depth, its figures, its report), so nothing
stale looks current. A file that is not listed (in an eval folder of an older version, without
the marker: not of those names) is never touched, and an eval into a non-empty folder that is
not an eval folder is refused before anything is loaded or written.

Every file is written under a temporary name and renamed into place: the eval's outputs are
written into a staging folder inside the eval folder (EVAL_DIR/.whatislost-eval-tmp-*) and
moved into place only when all of them are written, summary.json last.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from fnmatch import fnmatchcase
from pathlib import Path

from .cli import UserError, first_line
from .rundir import atomic_write_text, writable

MARKER = ".whatislost-eval"
STAGING_PREFIX = ".whatislost-eval-tmp-"
SUMMARY = "summary.json"
INDEX = "report/index.html"
SUMMARY_KEYS = ("runs_dir", "settings", "populations")
POPULATION_KEYS = ("dataset", "model", "loss", "method", "sparsity", "population", "n_models", "runs")


@lru_cache(maxsize=1)
def own_patterns() -> tuple[str, ...]:
    """Path patterns (relative, '/'-separated) of every file whatislost-eval and whatislost-report write."""
    from .figures import FIGURES
    from .tables import TABLES

    patterns = [SUMMARY, INDEX, "tables/populations.csv", "tables/pie_per_class.csv", "tables/pie_overlap.csv",
                "tables/per_sample_*.csv", "tables/class_recall_tests.csv", "tables/pie_comparison.csv",
                "tables/cka.csv", "figdata/umap_*.csv", "figdata/pie_images_*.npz", "figdata/training_*.csv", "figdata/layer_sparsity_*.csv"]
    patterns += [f"tables/{name}.{ext}" for name in TABLES for ext in ("csv", "md")]
    patterns += [f"figures/{name}_*.{ext}" for name, *_ in FIGURES for ext in ("png", "pdf")]
    return tuple(patterns)


def is_own_name(rel: str) -> bool:
    """Whether a path inside an eval folder ('tables/table6.csv') is one whatislost writes."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return False
    for pattern in own_patterns():
        want = pattern.split("/")
        if len(want) == len(parts) and all(fnmatchcase(p, w) for p, w in zip(parts, want)):
            return True
    return False


# ---------------------------------------------------------------- reading an eval folder
def load_summary(eval_dir) -> dict:
    """EVAL_DIR/summary.json; UserError when it is missing, truncated or not a whatislost-eval summary."""
    eval_dir = Path(eval_dir)
    path = eval_dir / SUMMARY
    if not path.is_file():
        raise UserError(f"not an eval folder (no summary.json): {eval_dir}; run whatislost-eval first")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON (truncated or damaged: {first_line(err)}); "
                        f"rerun whatislost-eval") from None
    except OSError as err:
        raise UserError(f"{path} cannot be read: {first_line(err)}") from None
    if not isinstance(summary, dict) or not all(k in summary for k in SUMMARY_KEYS):
        raise UserError(f"{path} is not a whatislost-eval summary (no {'/'.join(SUMMARY_KEYS)})")
    pops = summary["populations"]
    if not isinstance(summary["settings"], dict) or not isinstance(pops, list) or not all(
            isinstance(p, dict) and all(k in p for k in POPULATION_KEYS) and isinstance(p["runs"], list) for p in pops):
        raise UserError(f"{path} is not a whatislost-eval summary (settings or populations malformed)")
    return summary


def marker_files(eval_dir) -> list[str] | None:
    """The files the marker lists, or None when there is no readable marker."""
    try:
        data = json.loads((Path(eval_dir) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else None


def is_eval_folder(eval_dir) -> bool:
    """A folder whatislost-eval wrote: its marker, or (older versions) a whatislost-eval summary.json."""
    eval_dir = Path(eval_dir)
    if (eval_dir / MARKER).is_file():
        return True
    try:
        load_summary(eval_dir)
    except UserError:
        return False
    return True


def _own_named(eval_dir: Path) -> set[str]:
    """Files in eval_dir with a name whatislost-eval/-report writes, whoever wrote them."""
    found = {SUMMARY, INDEX} | {f"{d}/{p.name}" for d in ("tables", "figdata", "figures") if (eval_dir / d).is_dir()
                                for p in (eval_dir / d).iterdir()}
    return {f for f in found if is_own_name(f) and (eval_dir / f).is_file()}


def owned_files(eval_dir) -> set[str]:
    """Files in eval_dir that whatislost wrote: those its marker lists (and that have one of its names);
    in a marker-less eval folder of an older version, the files with its names; else none."""
    eval_dir = Path(eval_dir)
    listed = marker_files(eval_dir)
    if listed is not None:
        return {f for f in listed if is_own_name(f) and (eval_dir / f).is_file()}
    if not is_eval_folder(eval_dir):
        return set()
    return _own_named(eval_dir)


def lingering_files(eval_dir, staging) -> list[str]:
    """Files in eval_dir with one of whatislost's names that its marker does not list (someone put them
    there) and that the eval staged in `staging` will not replace: never removed, so the caller warns,
    since the report would read them as if this eval had written them."""
    eval_dir, staging = Path(eval_dir), Path(staging)
    if marker_files(eval_dir) is None:
        return []
    new = {p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()}
    return sorted(_own_named(eval_dir) - owned_files(eval_dir) - new)


def write_marker(eval_dir, files):
    import whatislost

    atomic_write_text(Path(eval_dir) / MARKER, json.dumps(
        dict(tool="whatislost-eval", version=whatislost.__version__,
             note="files whatislost-eval/-report wrote here; the next eval removes those it does not write again",
             files=sorted(set(files))), indent=1))


# ---------------------------------------------------------------- writing an eval folder
def check_out_folder(out) -> None:
    """Refuse (UserError, nothing touched) an eval output folder that cannot be written or that is a
    non-empty folder whatislost-eval did not make. Called before any model is loaded."""
    out = Path(out)
    for parent in out.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"eval folder {out}: {parent} is a file, not a folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"eval folder {out} is a file, not a folder; pass --out with a folder")
    if out.is_dir():
        entries = [p for p in out.iterdir() if not p.name.startswith(STAGING_PREFIX)]
        if entries and not is_eval_folder(out):
            raise UserError(f"eval folder {out} is not empty and is not a whatislost-eval folder (no {MARKER} "
                            f"or summary.json); pass --out with a new or empty folder (nothing was changed)")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not writable(existing):
        raise UserError(f"cannot write the eval folder {out}: {existing} is not writable; pass --out elsewhere")


@contextmanager
def staged_outputs(out):
    """A fresh staging folder inside `out` (created if needed) to write the eval's outputs into;
    `commit_outputs` moves them into place. Removed afterwards, whatever happened."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove(eval_dir: Path, rel: str):
    path = eval_dir / rel
    if path.is_file() or path.is_symlink():
        path.unlink()


def _drop_empty_folders(eval_dir: Path, folders):
    for folder in folders:
        path = eval_dir / folder
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()


def commit_outputs(staging, out) -> list[str]:
    """Make the files in `staging` the eval folder's current outputs; return them (relative paths).

    Every file an earlier eval or report wrote into `out` that this eval does not write again is
    removed (its report and figures too: whatislost-report draws them from the new outputs), the old
    summary.json first, the new one last, so at no point does a summary sit beside tables it did
    not describe. The marker lists, at every step, at least every file of ours that is there."""
    staging, out = Path(staging), Path(out)
    new = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    foreign = [f for f in new if not is_own_name(f)]
    if foreign:
        raise RuntimeError(f"eval wrote files outside its own names: {foreign}")  # a bug, not a user error
    old = owned_files(out)
    write_marker(out, old | set(new))
    stale = sorted(old - set(new))
    for rel in [SUMMARY, *stale]:
        _remove(out, rel)
    for rel in new:
        if rel != SUMMARY:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, out / rel)
    if SUMMARY in new:
        os.replace(staging / SUMMARY, out / SUMMARY)
    write_marker(out, new)
    _drop_empty_folders(out, sorted({rel.split("/")[0] for rel in stale if "/" in rel}))
    return new


def record_report(eval_dir, drawn, index=None) -> list[str]:
    """After whatislost-report drew `drawn` (paths) into eval_dir/figures: remove the figures of ours
    it did not draw again (stale), and list the drawn ones (and the index page) in the marker.
    Returns the removed files (relative paths)."""
    eval_dir = Path(eval_dir)
    rel = {Path(os.path.relpath(p, eval_dir)).as_posix() for p in drawn}
    if index is not None:
        rel.add(Path(os.path.relpath(index, eval_dir)).as_posix())
    old = owned_files(eval_dir)
    write_marker(eval_dir, old | rel)  # the new figures are ours before anything else happens
    stale = sorted(f for f in old - rel if f.startswith("figures/"))
    for f in stale:
        _remove(eval_dir, f)
    write_marker(eval_dir, (old | rel) - set(stale))
    return stale
