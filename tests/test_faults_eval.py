"""Faults a user can cause in whatislost-eval, whatislost-report and whatislost-export.

Each row of FAULTS is one mistake: the command must answer with one line on stderr and exit code
2, and every file and folder that was there before (the tiny populations' runs and the test's
folder) must be exactly as it was: same tree, same bytes. Below the table: --debug, and the
values the eval must never hide (float64 accuracies, NaN representations).
"""
import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from whatislost import evalfolder, export, report
from whatislost import eval as whatislost_eval
from whatislost.cli import UserError, run_cli

MAINS = {"eval": whatislost_eval.main, "report": report.main, "export": export.main}
RUN = "ce-gmp50-seed0"


@pytest.fixture(scope="module")
def eval_dir(tiny_populations, tmp_path_factory):
    """A real eval folder (no report: figures cost seconds) of the tiny populations."""
    out = tmp_path_factory.mktemp("faults") / "eval"
    whatislost_eval.run_eval(tiny_populations, out, metrics=("acc", "pie", "qscore"), report=False)
    return out


def snapshot(*roots) -> dict:
    """{path: sha256 of the bytes, or 'dir'} of everything under roots."""
    tree = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            tree[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


class Workspace:
    """What a fault row sets up, in the test's tmp folder: copies of a finished run and of an eval folder."""

    def __init__(self, tmp: Path, runs: Path, eval_dir: Path, monkeypatch):
        self.tmp, self.runs, self._eval_dir, self.monkeypatch = tmp, runs, eval_dir, monkeypatch

    def run(self) -> Path:
        """A copy of one finished run (its eval cache left out)."""
        run = self.tmp / "run"
        if not run.exists():
            shutil.copytree(self.runs / RUN, run, ignore=shutil.ignore_patterns("eval_cache.pt"))
        return run

    def eval_copy(self) -> Path:
        out = self.tmp / "E"
        if not out.exists():
            shutil.copytree(self._eval_dir, out)
        return out

    def file(self, rel: str, content) -> Path:
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def checkpoint(self, change) -> Path:
        """The run copy with its model.pt replaced by change(checkpoint dict) (an object to torch.save)."""
        run = self.run()
        ckpt = torch.load(run / "model.pt", weights_only=True)
        torch.save(change(ckpt), run / "model.pt")
        return run


def put(path: Path, content) -> Path:
    """Overwrite path with content (bytes or text); return it."""
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def reshaped(ckpt: dict) -> dict:
    name = next(k for k, v in ckpt["state_dict"].items() if v.dim() == 4)
    ckpt["state_dict"][name] = torch.zeros(3, 3, 3, 3)
    return ckpt


def not_writable(module, attr, folder_of):
    """Patch a writability probe so that the folder `folder_of(w)` reads as read-only."""
    def setup(w):
        bad = folder_of(w).absolute()
        real = getattr(module, attr)
        w.monkeypatch.setattr(module, attr, lambda folder: Path(folder).absolute() != bad and real(folder))
    return setup


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available")

# (id, command, setup: Workspace -> argv, message the one line must contain)
FAULTS = [
    # ------------------------------------------------------------ whatislost-eval
    ("eval-knn-k-zero", "eval", lambda w: [w.runs, "--out", w.tmp / "E", "--knn-k", "0"], "must be a whole number >= 1; got 0"),
    ("eval-knn-k-negative", "eval", lambda w: [w.runs, "--out", w.tmp / "E", "--knn-k", "-3"], "must be a whole number >= 1; got -3"),
    ("eval-knn-k-above-training-set", "eval", lambda w: [w.runs, "--out", w.tmp / "E", "--knn-k", "5000"],
     "larger than the training set of digits (1347 images)"),
    ("eval-depth-models-negative", "eval", lambda w: [w.runs, "--out", w.tmp / "E", "--depth-models", "-1"],
     "must be a whole number >= 0; got -1"),
    ("eval-n-boot-negative", "eval", lambda w: [w.runs, "--out", w.tmp / "E", "--n-boot", "-1"],
     "n_boot must be a whole number >= 0; got -1"),
    ("eval-n-perm-zero", "eval", lambda w: [w.runs, "--out", w.tmp / "E", "--n-perm", "0"],
     "n_perm must be a whole number >= 1; got 0"),
    ("eval-alpha-out-of-range", "eval", lambda w: [w.runs, "--out", w.tmp / "E", "--alpha", "1.5"],
     "alpha must be a number between 0 and 1; got 1.5"),
    ("eval-unknown-metric", "eval", lambda w: [w.runs, "--out", w.tmp / "E", "--metrics", "acc,bogus"], "unknown metric(s) bogus"),
    ("eval-runs-folder-missing", "eval", lambda w: [w.tmp / "nope"], "runs folder not found"),
    ("eval-no-finished-runs", "eval", lambda w: [(w.tmp / "empty").mkdir() or w.tmp / "empty"], "no finished runs"),
    ("eval-out-foreign-folder", "eval", lambda w: [w.runs, "--out", w.file("E/notes.txt", "mine").parent],
     "is not empty and is not a whatislost-eval folder"),
    ("eval-out-foreign-summary", "eval", lambda w: [w.runs, "--out", w.file("E/summary.json", '{"a": 1}').parent],
     "is not empty and is not a whatislost-eval folder"),
    ("eval-out-truncated-summary-no-marker", "eval",
     lambda w: [w.runs, "--out", truncate(w.file("E/summary.json", (w._eval_dir / "summary.json").read_text())).parent],
     "is not a whatislost-eval folder"),
    ("eval-out-is-a-file", "eval", lambda w: [w.runs, "--out", w.file("E", "mine")], "is a file, not a folder"),
    ("eval-out-under-a-file", "eval", lambda w: [w.runs, "--out", w.file("f", "mine") / "E"], "is a file, not a folder"),
    ("eval-out-unwritable-path", "eval", lambda w: [w.runs, "--out", "/proc/self/whatislost-eval-test"], "is not writable"),
    ("eval-out-read-only", "eval",
     lambda w: not_writable(evalfolder, "writable", lambda w: w.tmp)(w) or [w.runs, "--out", w.tmp / "E"], "is not writable"),
    ("eval-cuda-without-gpu", "eval", lambda w: [w.runs, "--out", w.tmp / "E", "--device", "cuda"], "no CUDA GPU"),
    # ------------------------------------------------------------ whatislost-report
    ("report-not-an-eval-folder", "report", lambda w: [(w.tmp / "D").mkdir() or w.tmp / "D"], "no summary.json"),
    ("report-path-is-a-file", "report", lambda w: [w.file("D", "mine")], "no summary.json"),
    ("report-truncated-summary", "report", lambda w: [truncate(w.eval_copy() / "summary.json").parent],
     "is not valid JSON (truncated or damaged"),
    ("report-summary-not-a-mapping", "report", lambda w: [w.file("D/summary.json", "[1, 2]").parent],
     "is not a whatislost-eval summary"),
    ("report-summary-malformed-population", "report",
     lambda w: [w.file("D/summary.json", json.dumps(dict(runs_dir="r", settings={}, populations=[{"x": 1}]))).parent],
     "settings or populations malformed"),
    ("report-empty-populations-table", "report",
     lambda w: [put(w.eval_copy() / "tables" / "populations.csv", "").parents[1]],
     "populations.csv cannot be read"),
    ("report-populations-table-missing", "report",
     lambda w: [(w.eval_copy() / "tables" / "populations.csv").unlink() or w.eval_copy()],
     "no tables/populations.csv"),
    ("report-scatter-sparsity-not-in-eval", "report", lambda w: [w.eval_copy(), "--scatter-sparsity", "90"],
     "sparsity 90% not in this eval; available: 50"),
    ("report-eval-folder-read-only", "report",
     lambda w: not_writable(report, "writable", lambda w: w.eval_copy())(w) or [w.eval_copy()], "is not writable"),
    ("report-gallery-sparsity-not-in-eval", "report", lambda w: [w.eval_copy(), "--gallery-sparsity", "7"],
     "sparsity 7% not in this eval"),
    # ------------------------------------------------------------ whatislost-export
    ("export-random-bytes-checkpoint", "export",
     lambda w: [put(w.run() / "model.pt", os.urandom(4096)).parent], "cannot be read"),
    ("export-truncated-checkpoint", "export", lambda w: [truncate(w.run() / "model.pt").parent], "cannot be read"),
    ("export-foreign-torch-file", "export", lambda w: [w.checkpoint(lambda c: {"weights": torch.zeros(3)})],
     "is not a whatislost checkpoint"),
    ("export-tensor-torch-file", "export", lambda w: [w.checkpoint(lambda c: torch.zeros(3))], "is not a whatislost checkpoint"),
    ("export-checkpoint-without-metadata", "export", lambda w: [w.checkpoint(lambda c: without(c, "layer_sparsity"))],
     "not a whatislost checkpoint of a finished run (no layer_sparsity)"),
    ("export-checkpoint-wrong-shapes", "export", lambda w: [w.checkpoint(reshaped)], "does not fit its architecture"),
    ("export-out-exists-not-ours", "export", lambda w: [w.run(), "--out", w.file("m.onnx", b"my model")],
     "exists and is not an earlier whatislost-export output (no m.onnx.json record"),
    ("export-default-out-exists-not-ours", "export",
     lambda w: [put(w.run() / "model.onnx", b"mine").parent], "model.onnx exists and is not"),
    ("export-out-is-a-folder", "export", lambda w: [w.run(), "--out", w.file("m.onnx/keep.txt", "x").parent],
     "is a folder; name a .onnx file"),
    ("export-out-record-not-ours", "export",
     lambda w: [w.run(), "--out", w.file("m.onnx.json", '{"mine": 1}').with_name("m.onnx")],
     "m.onnx.json exists and is not a whatislost-export record"),
    ("export-out-under-a-file", "export", lambda w: [w.run(), "--out", w.file("f", "mine") / "m.onnx"],
     "is a file, not a folder"),
    ("export-out-unwritable-path", "export", lambda w: [w.run(), "--out", "/proc/self/whatislost-test.onnx"],
     "is not writable"),
    ("export-read-only-run-dir", "export",
     lambda w: not_writable(export, "writable", lambda w: w.run())(w) or [w.run()],
     "is read-only; pass --out FILE.onnx to export elsewhere"),
    ("export-out-not-onnx", "export", lambda w: [w.run(), "--out", w.tmp / "m.txt"], "--out must name a .onnx file"),
]


@pytest.mark.parametrize("name,command,setup,message", [
    pytest.param(*case, id=case[0], marks=[no_cuda] if "cuda" in case[0] else []) for case in FAULTS])
def test_fault_is_one_line_exit_2_and_touches_nothing(name, command, setup, message, tiny_populations, eval_dir,
                                                      tmp_path, monkeypatch, capsys):
    w = Workspace(tmp_path, tiny_populations, eval_dir, monkeypatch)
    argv = [str(a) for a in setup(w)]
    before = snapshot(tmp_path, tiny_populations)
    capsys.readouterr()
    code = run_cli(MAINS[command], argv, prog=f"whatislost-{command}")
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"whatislost-{command}: error: "), err
    assert message in err, err
    assert snapshot(tmp_path, tiny_populations) == before


def test_table_covers_every_command():
    assert {case[1] for case in FAULTS} == set(MAINS)
    assert len(FAULTS) >= 15


def test_debug_shows_the_traceback(tiny_populations, tmp_path):
    with pytest.raises(UserError, match="must be a whole number >= 1"):
        run_cli(whatislost_eval.main, [str(tiny_populations), "--out", str(tmp_path / "E"), "--knn-k", "0", "--debug"],
                prog="whatislost-eval")
    with pytest.raises(UserError, match="no summary.json"):
        run_cli(report.main, [str(tmp_path), "--debug"], prog="whatislost-report")


# ---------------------------------------------------------------- values the eval must not hide
def accuracy_row(correct: list, total: int = 10000) -> dict:
    from whatislost.eval import population_row
    from whatislost.populations import PopKey, Population

    y = torch.zeros(total, dtype=torch.long)
    outputs = []
    for right in correct:
        preds = torch.ones(total, dtype=torch.long)
        preds[:right] = 0
        outputs.append(dict(preds=preds, h=torch.ones(total, 2), acc=float((preds == y).float().mean())))
    pop = Population(PopKey("digits", "wrn10-1", "ce", "gmp", 50), outputs=outputs,
                     data=SimpleNamespace(test_y=y, num_classes=2))
    return population_row(pop, None, None)


def test_accuracy_is_float64_from_counts():
    """The mean accuracy is 100 * (all correct answers) / (models * samples), rounded once to float64; the
    cell formats that float64 with 2 decimals. Built from float32 accuracies it drifts: 8300 and 8299 of
    10000 right have the exact mean 82.995, whose float64 is 82.99500000000000455 (cell 83.00, the
    exact decimal rounded half-even or half-up), while the float32 path gave 82.99499512 (82.99)."""
    from whatislost.tables import cell

    row = accuracy_row([8300, 8299])
    assert type(row["acc_mean"]) is float and row["acc_mean"] == 100 * 16599 / 20000
    float32_path = float(torch.tensor([100 * float(torch.tensor(c / 10000)) for c in (8300, 8299)]).double().mean())
    assert float32_path != row["acc_mean"]
    assert cell(row["acc_mean"], row["acc_std"]) == f"{100 * 16599 / 20000:.2f}±0.01" == "83.00±0.01"
    assert row["acc_std"] == pytest.approx(0.005, abs=1e-12)
    row = accuracy_row([8300, 8299, 8299])  # 82.99333...: not a tie
    assert row["acc_mean"] == 100 * 24898 / 30000 and cell(row["acc_mean"], row["acc_std"]) == "82.99±0.00"


def poison(run: Path):
    """NaN in the last batch norm's weights of a run's checkpoint: its representation h is NaN."""
    ckpt = torch.load(run / "model.pt", weights_only=True)
    weight = ckpt["state_dict"]["encoder.bn.weight"]  # the batch norm before pooling
    ckpt["state_dict"]["encoder.bn.weight"] = torch.full_like(weight, float("nan"))
    torch.save(ckpt, run / "model.pt")
    done = json.loads((run / "done.json").read_text())
    if "checkpoint_sha256" in done:  # keep the run finished: the fault here is its numbers, not its file
        done["checkpoint_sha256"] = hashlib.sha256((run / "model.pt").read_bytes()).hexdigest()
        (run / "done.json").write_text(json.dumps(done))


@pytest.fixture(scope="module")
def nan_eval(tiny_populations, tmp_path_factory):
    """Two dense Sup runs, the second with NaN weights, evaluated with acc and qscore."""
    runs = tmp_path_factory.mktemp("nan") / "runs"
    for name in ("ce-dense-seed0", "ce-dense-seed1"):
        shutil.copytree(tiny_populations / name, runs / name, ignore=shutil.ignore_patterns("eval_cache.pt"))
    poison(runs / "ce-dense-seed1")
    out = whatislost_eval.run_eval(runs, metrics=("acc", "qscore"), report=False)
    return out, json.loads((out / "summary.json").read_text())


def test_nan_representation_is_warned_not_hidden(nan_eval):
    out, summary = nan_eval
    warnings = " ".join(summary["warnings"])
    assert "Sup/Dense/0" in warnings and "NaN" in warnings
    (row,) = summary["populations"]
    if row["n_models"] == 2:  # the NaN model was scored: its NaN must show, not turn into Q = 0
        assert "Q-Score is NaN" in warnings and row["q_nan"] > 0
        samples = pd.read_csv(out / "tables" / "per_sample_digits-wrn10-1.csv", keep_default_na=False)
        assert (samples["Sup/Dense/0:q"] == "nan").any()


def test_nan_model_is_left_out(nan_eval):
    out, summary = nan_eval
    (row,) = summary["populations"]
    assert row["n_models"] == 1 and row["q_nan"] == 0
