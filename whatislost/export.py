"""Export stage: a finished run's pruned model to ONNX through SparseML's ModuleExporter, checked.

    whatislost-export RUN_DIR [--out FILE.onnx] [--part classifier|encoder] [--opset N] [--data-root DIR]
    whatislost-export --all RUNS_DIR [--part classifier|encoder] [--opset N]

Writes FILE.onnx (default RUN_DIR/model.onnx, or RUN_DIR/encoder.onnx for --part encoder),
input `images` (batch, C, H, W) normalised as (uint8 / 255 - mean) / std, output `logits`
(batch, classes) or `h` (batch, dim); the batch axis is dynamic. The file is written to a
temporary folder beside FILE.onnx and moved into place only after two checks pass:

    sparsity  every pruned tensor of the checkpoint is found among the ONNX initializers with
              the same values, so each keeps exactly the checkpoint's zeros (and sparsity);
    parity    onnxruntime vs PyTorch on up to 256 real test images of the run's data set:
              max |difference| <= 1e-4 and identical predicted labels.

FILE.onnx.json, moved into place last, records the source run, recipe, per-layer and overall
sparsity, test accuracy, preprocessing and the parity result. An existing FILE.onnx is replaced
only when it is an earlier export of this tool (its FILE.onnx.json record is there); any other
file, a folder, an unwritable or read-only destination is refused before the model is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


from .cli import UserError, first_line, run_cli
from .data import load_data
from .rundir import CHECKPOINT, find_runs, is_finished, load_model, writable

PARTS = ("classifier", "encoder")
OUTPUT_NAME = {"classifier": "logits", "encoder": "h"}
PARITY_IMAGES = 256
PARITY_ATOL = 1e-4
DEFAULT_OPSET = 14  # SparseML's default for torch >= 1.10 (sparseml.pytorch.opset)
# below 9 ONNX wants initializers as graph inputs, which SparseML's exporter switches off
MIN_OPSET = 9


class CheckFailed(UserError):
    """The exported file lost zeros or disagrees with PyTorch; it is not kept. One line, exit code 2."""


class Representation(nn.Module):
    """images (B, C, H, W) -> h (B, dim). Holds the encoder as `encoder` so ONNX names match the checkpoint's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.encoder

    def forward(self, images):
        return self.encoder(images)


def max_opset() -> int:
    """The newest opset the installed onnx (pinned by SparseML) can check."""
    import onnx

    return onnx.defs.onnx_opset_version()


# ---------------------------------------------------------------- inputs for the parity check
@lru_cache(maxsize=4)  # --all: runs of one data set load it once
def first_test_images(dataset: str, data_root: str, train_per_class: int = 0, test_per_class: int = 0,
                      n: int = PARITY_IMAGES) -> tuple[torch.Tensor, list, list]:
    """(first n test images (n, C, H, W) normalised as in training (ImageData.normalize), mean (C,), std (C,))."""
    try:
        data = load_data(dataset, data_root, train_per_class, test_per_class)
    except UserError as err:
        raise UserError(f"the parity check needs the run's test images, but {err} "
                        f"(point --data-root at them)") from None
    return data.normalize(data.test_x[:n]), data.mean.tolist(), data.std.tolist()


def parity_images(ckpt: dict, data_root: str | None) -> tuple[torch.Tensor, list, list]:
    """first_test_images() of the run's data set (data_root: the config's unless given); UserError if they don't fit."""
    cfg = ckpt["config"]
    root = data_root or cfg["data_root"]
    x, mean, std = first_test_images(cfg["dataset"], root, int(cfg.get("train_per_class") or 0),
                                     int(cfg.get("test_per_class") or 0))
    if x.shape[1] != ckpt["arch"]["in_channels"]:
        raise UserError(f"test images at {root} have {x.shape[1]} channels, "
                        f"the model expects {ckpt['arch']['in_channels']}")
    return x, mean, std


# ---------------------------------------------------------------- the checks
def match_initializers(onnx_model, tensors: dict) -> dict:
    """{torch name: ONNX initializer name} for each tensor in {torch name: array}.

    With BN fusing off (SparseML's default) the exporter keeps parameter names; should a name
    change (constant folding, a transposed Gemm weight), the initializer with the same values is used.
    Tensors found nowhere are left out.
    """
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx_model.graph.initializer}
    found = {}
    for name, w in tensors.items():
        if name in inits and inits[name].shape == w.shape and np.array_equal(inits[name], w):
            found[name] = name
            continue
        for init_name, a in inits.items():
            same = a.shape == w.shape and np.array_equal(a, w)
            transposed = w.ndim == 2 and a.shape == w.T.shape and np.array_equal(a, w.T)
            if same or transposed:
                found[name] = init_name
                break
    return found


def check_sparsity(onnx_model, module: nn.Module, ckpt: dict) -> dict:
    """{torch name: {initializer, shape, zeros, sparsity}} of every pruned tensor the module holds, measured on
    the ONNX initializers; CheckFailed unless each is exported with the checkpoint's values and sparsity."""
    from onnx import numpy_helper

    state = module.state_dict()
    pruned = {k: state[k].numpy() for k in ckpt["layer_sparsity"] if k in state}
    names = match_initializers(onnx_model, pruned)
    inits = {i.name: i for i in onnx_model.graph.initializer}
    layers = {}
    for name, w in pruned.items():
        if name not in names:
            raise CheckFailed(f"pruned tensor {name} {list(w.shape)} is not among the exported initializers "
                              f"with its values")
        a = numpy_helper.to_array(inits[names[name]])
        zeros = int((a == 0).sum())
        sparsity = zeros / a.size
        if abs(sparsity - ckpt["layer_sparsity"][name]) > 1e-6:  # recorded as a float32 mean
            raise CheckFailed(f"{name} has sparsity {sparsity:.6f} in ONNX, "
                              f"{ckpt['layer_sparsity'][name]:.6f} in the checkpoint")
        layers[name] = dict(initializer=names[name], shape=list(a.shape), zeros=zeros, sparsity=sparsity)
    return layers


def check_parity(onnx_path: Path, module: nn.Module, x: torch.Tensor, classifier: nn.Module | None) -> dict:
    """onnxruntime vs PyTorch on images x (B, C, H, W): max |diff| of the outputs and whether predicted
    labels agree (for the encoder: the run's classifier applied to both representations). CheckFailed if not."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = module(x)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        max_diff = float((got - expected).abs().max())
        head = classifier if classifier is not None else nn.Identity()
        labels_identical = bool(torch.equal(head(got).argmax(1), head(expected).argmax(1)))
    result = dict(images=len(x), max_abs_diff=max_diff, tolerance=PARITY_ATOL, labels_identical=labels_identical,
                  passed=max_diff <= PARITY_ATOL and labels_identical)
    if not result["passed"]:
        raise CheckFailed(f"onnxruntime disagrees with PyTorch on {len(x)} test images: max |diff| {max_diff:.2e} "
                          f"(tolerance {PARITY_ATOL:.0e}), labels {'identical' if labels_identical else 'differ'}")
    return result


# ---------------------------------------------------------------- one run
def default_out(run_dir: Path, part: str) -> Path:
    return run_dir / ("model.onnx" if part == "classifier" else "encoder.onnx")


def record_path(onnx_path: Path) -> Path:
    """model.onnx -> model.onnx.json: the record belongs to the file beside it, not to model.pt."""
    return onnx_path.with_name(onnx_path.name + ".json")


def check_args(part: str, opset: int, out: Path | None):
    if part not in PARTS:
        raise UserError(f"part must be one of {', '.join(PARTS)}; got '{part}'")
    if not MIN_OPSET <= opset <= max_opset():
        raise UserError(f"opset must be in {MIN_OPSET}..{max_opset()} (the TorchScript exporter and the installed "
                        f"onnx); got {opset}")
    if out is not None and out.suffix != ".onnx":
        raise UserError(f"--out must name a .onnx file; got {out}")


def is_export_record(path: Path) -> bool:
    """Whether path is a JSON record this tool wrote beside an exported file (FILE.onnx.json)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and all(k in record for k in ("onnx", "source_run", "part", "parity"))


def check_out(out: Path, run_dir: Path, given: bool):
    """Refuse (UserError, nothing touched) an output path that cannot be written, or that holds a file this
    tool did not export (an existing FILE.onnx is replaced only when its FILE.onnx.json record is ours)."""
    record = record_path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name a .onnx file")
    if out.exists() or out.is_symlink():
        if not is_export_record(record):
            raise UserError(f"{out} exists and is not an earlier whatislost-export output (no {record.name} record "
                            f"beside it); remove it or pass another --out (nothing was changed)")
    elif record.exists() and (record.is_dir() or not is_export_record(record)):
        raise UserError(f"{record} exists and is not a whatislost-export record; remove it or pass another --out "
                        f"(nothing was changed)")
    existing = next(p for p in (out.parent.absolute(), *out.parent.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write {out}: {existing} is a file, not a folder")
    if not writable(existing):
        if not given and existing == run_dir.absolute():
            raise UserError(f"run directory {run_dir} is read-only; pass --out FILE.onnx to export elsewhere")
        raise UserError(f"cannot write {out}: {existing} is not writable; pass --out FILE.onnx elsewhere")


# what the export reads from a checkpoint, besides state_dict and arch (checked by rundir.load_checkpoint)
CHECKPOINT_KEYS = ("config", "dataset", "classes", "loss", "method", "recipe", "target_sparsity", "sparsity",
                   "layer_sparsity", "test_acc")


def load_run(run_dir: Path):
    """(model, checkpoint) of a finished run; UserError for a checkpoint that is truncated, corrupted or not a
    whatislost checkpoint (a torch file with other keys)."""
    try:
        model, ckpt = load_model(run_dir)
    except UserError:
        raise
    except Exception as err:  # what rundir does not already name: a damaged file is the user's to fix
        raise UserError(f"checkpoint {run_dir / CHECKPOINT} cannot be loaded (corrupted, truncated or not a "
                        f"whatislost checkpoint): {first_line(err)}") from err
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if not missing:
        cfg = ckpt["config"]
        if not (isinstance(cfg, dict) and "dataset" in cfg and "data_root" in cfg):
            missing = ["config.dataset/config.data_root"]
        elif not isinstance(ckpt["layer_sparsity"], dict):
            missing = ["layer_sparsity mapping"]
    if missing:
        raise UserError(f"checkpoint {run_dir / CHECKPOINT} is not a whatislost checkpoint of a finished run "
                        f"(no {', '.join(missing)})")
    return model, ckpt


def export_run(run_dir, out=None, part: str = "classifier", opset: int = DEFAULT_OPSET,
               data_root: str | None = None) -> dict:
    """Export one finished run to ONNX with SparseML, check sparsity and parity, write the JSON record.

    Returns the record. Everything a user can get wrong is checked before anything is written;
    a failed check leaves no file behind. An existing output is replaced (atomically) only when it
    is an earlier export of this tool, i.e. has its JSON record.
    """
    run_dir = Path(run_dir)
    given = out is not None and str(out) != ""
    out = Path(out) if given else default_out(run_dir, part)
    check_args(part, opset, out)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    if not is_finished(run_dir):
        raise UserError(f"{run_dir} is not a finished run (no done.json)")
    check_out(out, run_dir, given)
    model, ckpt = load_run(run_dir)
    x, mean, std = parity_images(ckpt, data_root)
    # imported only now: sparseml's import is slow and warns, and mistakes above should answer fast in one line
    from onnx import load as load_onnx
    from sparseml.pytorch.utils import ModuleExporter

    module = model if part == "classifier" else Representation(model)

    created = [p for p in (out.parent.absolute(), *out.parent.absolute().parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out.parent}: {first_line(err)}") from err
    try:
        # SparseML writes into this folder only; it sits beside `out` so the final moves are atomic
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".whatislost-export-") as tmp:
            with warnings.catch_warnings():
                # the TorchScript exporter is required here (dynamo=False) and warns that it is legacy;
                # the constant-folding hint is about training-mode models, ours is in eval mode
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
                warnings.filterwarnings("ignore", message="It is recommended that constant folding be turned off")
                # an export batch of 2: parity then runs 256 images through the dynamic batch axis
                ModuleExporter(module, tmp).export_onnx(x[:2], name=out.name, opset=opset, dynamo=False,
                                                         input_names=["images"], output_names=[OUTPUT_NAME[part]])
            tmp_onnx = Path(tmp) / out.name
            layers = check_sparsity(load_onnx(str(tmp_onnx)), module, ckpt)
            parity = check_parity(tmp_onnx, module, x, model.classifier if part == "encoder" else None)

            zeros = sum(v["zeros"] for v in layers.values())
            total = sum(int(np.prod(v["shape"])) for v in layers.values())
            out_dim = ckpt["arch"]["num_classes"] if part == "classifier" else model.encoder.dim
            record = dict(
                onnx=str(out), source_run=str(run_dir.resolve()), part=part, opset=opset,
                input=dict(name="images", shape=["batch", *x.shape[1:]],
                           preprocessing="(uint8 / 255 - mean) / std per channel", mean=mean, std=std),
                output=dict(name=OUTPUT_NAME[part], shape=["batch", out_dim]),
                dataset=ckpt["dataset"], classes=ckpt["classes"], loss=ckpt["loss"], method=ckpt["method"],
                recipe=ckpt["recipe"],
                target_sparsity=ckpt["target_sparsity"], run_sparsity=ckpt["sparsity"],
                sparsity=zeros / total if total else 0.0, layers=layers, test_acc=ckpt["test_acc"],
                parity=dict(inputs=f"first {len(x)} test images of {ckpt['dataset']}", **parity),
                versions=versions(), exported_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
            )
            tmp_json = Path(tmp) / "record.json"
            with open(tmp_json, "w", encoding="utf-8") as f:
                f.write(json.dumps(record, indent=2))
                f.flush()
                os.fsync(f.fileno())
            # both files are complete before either moves: an old record must not vouch for the new file,
            # and an .onnx without its record was not checked
            record_path(out).unlink(missing_ok=True)
            os.replace(tmp_onnx, out)
            os.replace(tmp_json, record_path(out))
    except BaseException:
        for folder in created:  # folders this export made for `out` and left empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return record


def versions() -> dict:
    import onnx
    import onnxruntime
    import sparseml

    return dict(torch=torch.__version__, sparseml=sparseml.__version__, onnx=onnx.__version__,
                onnxruntime=onnxruntime.__version__)


def summary(record: dict) -> str:
    """One line: where the file went and what the checks found."""
    p = record["parity"]
    return (f"{record['onnx']}: {record['part']}, opset {record['opset']}; sparsity {record['sparsity']:.4f} kept in "
            f"{len(record['layers'])} pruned tensors; parity on {p['images']} test images: max |diff| "
            f"{p['max_abs_diff']:.1e}, labels identical")


# ---------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="whatislost-export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", nargs="?", help="finished run directory")
    p.add_argument("--all", metavar="RUNS_DIR", help="export every finished run under RUNS_DIR (default file names)")
    p.add_argument("--out", metavar="FILE.onnx",
                   help="output file (default RUN_DIR/model.onnx, or RUN_DIR/encoder.onnx with --part encoder)")
    p.add_argument("--part", default="classifier", metavar="{classifier,encoder}",
                   help="classifier: images -> logits (default); encoder: images -> representation h")
    p.add_argument("--opset", type=int, metavar="N", default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} to the installed onnx's newest (default {DEFAULT_OPSET})")
    p.add_argument("--data-root", dest="data_root", metavar="DIR",
                   help="where the run's data set is now, if it moved since training (parity check)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (for bug reports)")
    return p


def export_all(root: Path, **kw) -> int:
    """Export every finished run under root, one line each, going on past failures; UserError if none worked."""
    if not root.is_dir():
        raise UserError(f"runs directory {root} does not exist")
    finished, unfinished = find_runs(root)
    if not finished:
        raise UserError(f"no finished runs under {root} ({len(unfinished)} unfinished)")
    done = 0
    for run_dir in finished:
        try:
            print(summary(export_run(run_dir, **kw)), flush=True)
            done += 1
        except Exception as err:  # a batch goes on: one run's problem is reported on its line
            kind = "" if isinstance(err, UserError) else f"{type(err).__name__}: "
            print(f"{run_dir}: FAILED: {kind}{err}", flush=True)
    print(f"exported {done} of {len(finished)} finished runs under {root} ({len(unfinished)} unfinished skipped)")
    if not done:
        raise UserError(f"nothing under {root} could be exported")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.run_dir) == bool(args.all):
        raise UserError("give either RUN_DIR or --all RUNS_DIR")
    check_args(args.part, args.opset, Path(args.out) if args.out else None)
    if args.all:
        if args.out:
            raise UserError("--out names one file; with --all each run gets RUN_DIR/model.onnx or encoder.onnx")
        return export_all(Path(args.all), part=args.part, opset=args.opset, data_root=args.data_root)
    print(summary(export_run(args.run_dir, args.out, args.part, args.opset, args.data_root)))
    return 0


def cli():
    sys.exit(run_cli(main, prog="whatislost-export"))


if __name__ == "__main__":
    cli()
