"""Bad input and faults for whatislost-train and whatislost-study: one line on stderr, exit code 2, and
every file that was there before is untouched (reliability issue: nothing a user owns is lost, nothing
broken is accepted as done). The eval, report and export faults are in test_faults_eval.py."""
import fcntl
import os
from pathlib import Path

import pytest
import torch
import yaml

from whatislost import study as study_mod
from whatislost.cli import run_cli
from whatislost.rundir import LOCK, MARK, is_finished, read_done
from whatislost.train import main as train_main

TINY = ["--dataset", "digits", "depth=10", "widen=1", "epochs=2", "linear_epochs=1", "eval_every=0", "crop_padding=1",
        "hflip=false"]


def snapshot(root: Path) -> dict:
    """{relative path: bytes} of every file under root (the user's files we promise not to touch)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_train(argv, capsys):
    code = run_cli(train_main, [*map(str, argv)], prog="whatislost-train")
    return code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_cli(train_main, [*TINY, "--out", str(out)]) == 0
    return out


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


# each case: (id, setup(tmp) -> argv, message); setup creates whatever the case needs under tmp
CASES = [
    ("out-is-users-folder", lambda t: (write(t / "d" / "thesis.tex", "x"), ["--out", t / "d"])[1], "did not make"),
    ("out-is-cwd", lambda t: ["--out", "."], "current folder"),
    ("out-holds-cwd", lambda t: ["--out", ".."], "current folder"),
    ("out-is-a-file", lambda t: (write(t / "f", "x"), ["--out", t / "f"])[1], "is a file"),
    ("out-parent-is-a-file", lambda t: (write(t / "f", "x"), ["--out", t / "f" / "run"])[1], "is a file"),
    ("negative-seed", lambda t: ["--out", t / "r", "seed=-1"], "seed must be in"),
    ("nan-lr", lambda t: ["--out", t / "r", "lr=nan"], "lr must be a finite number"),
    ("inf-weight-decay", lambda t: ["--out", t / "r", "weight_decay=inf"], "weight_decay must be a finite number"),
    ("zero-lr", lambda t: ["--out", t / "r", "lr=0"], "lr must be in"),
    ("momentum-above-1", lambda t: ["--out", t / "r", "momentum=1.5"], "momentum must be in"),
    ("zero-epochs", lambda t: ["--out", t / "r", "epochs=0"], "epochs must be in"),
    ("nan-sparsity", lambda t: ["--out", t / "r", "--recipe", "gmp", "--sparsity", "nan"], "target sparsity"),
    ("nan-recipe-var", lambda t: ["--out", t / "r", "--recipe", "gmp", "--sparsity", "0.5", "recipe_vars.prune_end=nan"],
     "must be finite"),
    ("bad-milestones", lambda t: ["--out", t / "r", "lr_schedule=multistep", "lr_milestones=[5, 2]"], "increasing epochs"),
    ("binary-config", lambda t: ["--out", t / "r", "--config", write(t / "c.yaml", b"\xff\xfe\x00\x81" * 50)],
     "not a text file"),
    ("garbled-config", lambda t: ["--out", t / "r", "--config", write(t / "c.yaml", "epochs: [1, 2\nlr: {")],
     "not valid YAML"),
    ("config-not-a-mapping", lambda t: ["--out", t / "r", "--config", write(t / "c.yaml", "- 1\n- 2\n")],
     "must hold a mapping"),
    ("binary-recipe", lambda t: ["--out", t / "r", "--recipe", write(t / "r.yaml", b"\x00\xff" * 100)], "recipe"),
    ("garbled-recipe", lambda t: ["--out", t / "r", "--recipe", write(t / "r.yaml", "modifiers: [!Epoch\n  - {")],
     "recipe"),
    ("quantization-recipe", lambda t: ["--out", t / "r", "--recipe", write(
        t / "q.yaml", "num_epochs: 2\nmodifiers:\n  - !QuantizationModifier\n    start_epoch: 0.0\n")],
     "does not support"),
    ("oneshot-without-init", lambda t: ["--out", t / "r", "--recipe", "oneshot", "--sparsity", "0.5"], "--init"),
    ("renamed-from-dense-recipe-without-init", lambda t: ["--out", t / "r", "--recipe", write(
        t / "lw.yaml", (Path(__file__).parent.parent / "recipes" / "oneshot.yaml").read_text()), "--sparsity", "0.5"],
     "--init"),
    ("init-not-a-run", lambda t: ["--out", t / "r", "--recipe", "oneshot", "--sparsity", "0.5", "--init",
                                  (t / "empty").mkdir() or t / "empty"], "not a finished run"),
    ("init-truncated-checkpoint", lambda t: ["--out", t / "r", "--recipe", "oneshot", "--sparsity", "0.5", "--init",
                                             fake_run(t / "trunc", b"PK\x03\x04 truncated")], "cannot be read"),
    ("init-foreign-checkpoint", lambda t: ["--out", t / "r", "--recipe", "oneshot", "--sparsity", "0.5", "--init",
                                           fake_run(t / "foreign", torch_bytes({"weights": torch.zeros(3)}))],
     "not a whatislost checkpoint"),
    ("unknown-key", lambda t: ["--out", t / "r", "lrr=0.1"], "did you mean 'lr'"),
]


def torch_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def fake_run(folder: Path, checkpoint: bytes) -> Path:
    """A run folder whose done.json is fine but whose model.pt is not what it claims."""
    import hashlib
    import json

    write(folder / "model.pt", checkpoint)
    write(folder / "config.yaml", "{}")
    write(folder / "done.json", json.dumps({"config_hash": "x", "checkpoint_sha256": hashlib.sha256(checkpoint).hexdigest()}))
    return folder


@pytest.mark.parametrize("case,setup,message", CASES, ids=[c[0] for c in CASES])
def test_bad_train_input_is_one_line_exit_2_and_touches_nothing(tmp_path, capsys, monkeypatch, case, setup, message):
    assert_refused(tmp_path, monkeypatch, capsys, setup, lambda argv: run_cli(train_main, [*TINY, *map(str, argv)],
                                                                             prog="whatislost-train"), message)
    assert not (tmp_path / "r").exists()


def assert_refused(tmp_path, monkeypatch, capsys, setup, command, message):
    """Run command(setup(tmp_path)) from a folder of its own: exit 2, one line naming `message`, no file touched."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = setup(tmp_path)
    before = snapshot(tmp_path)
    code = command(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def test_failed_overwrite_keeps_the_finished_run(finished_run, capsys):
    before = snapshot(finished_run)
    code, err = run_train([*TINY, "--out", finished_run, "--overwrite", "seed=-1"], capsys)
    assert code == 2 and "seed must be in" in err
    assert snapshot(finished_run) == before
    # and an overwrite that dies mid-run (a non-finite loss) keeps it too
    code, err = run_train([*TINY, "--out", finished_run, "--overwrite", "lr=1e9"], capsys)
    assert code == 2 and "non-finite" in err
    assert snapshot(finished_run) == before and is_finished(finished_run, verify=True)
    assert not [p for p in finished_run.parent.iterdir() if p.name.startswith(".run.")]  # no staging left behind


def test_overwrite_replaces_a_finished_run_only_once_the_new_one_has_finished(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train([*TINY, "--out", out], capsys)[0] == 0
    old = read_done(out)["checkpoint_sha256"]
    code, err = run_train([*TINY, "--out", out, "--overwrite", "seed=5"], capsys)
    assert code == 0, err
    assert read_done(out)["checkpoint_sha256"] != old and yaml.safe_load((out / "config.yaml").read_text())["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_non_finite_run_is_not_done(tmp_path, capsys):
    code, err = run_train([*TINY, "--out", tmp_path / "r", "lr=1e9"], capsys)
    assert code == 2 and "non-finite in ce epoch 1" in err and len(err.splitlines()) == 1
    assert not is_finished(tmp_path / "r")


def test_two_trainers_cannot_share_a_run_directory(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / MARK).touch()
    with open(out / LOCK, "a+") as held:  # another trainer holds the run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = run_train([*TINY, "--out", out], capsys)
    assert code == 2 and "another whatislost-train" in err
    assert sorted(p.name for p in out.iterdir()) == sorted([MARK, LOCK])


def test_unfinished_run_of_ours_with_a_users_file_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    write(out / MARK, "")
    write(out / "metrics.csv", "stage,epoch\n")
    write(out / "notes.txt", "mine")
    before = snapshot(tmp_path)
    code, err = run_train([*TINY, "--out", out], capsys)
    assert code == 2 and "notes.txt" in err
    assert snapshot(tmp_path) == before


def test_a_crashs_leftover_temporary_file_is_cleared_not_refused(tmp_path, capsys):
    out = tmp_path / "r"
    write(out / MARK, "")
    write(out / "metrics.csv", "stage,epoch\n")
    write(out / ".model.4242-9f3a2c1d.tmp.pt", b"half a checkpoint")  # atomic_path's name, killed mid-write
    code, err = run_train([*TINY, "--out", out], capsys)
    assert code == 0, err
    assert is_finished(out, verify=True) and not (out / ".model.4242-9f3a2c1d.tmp.pt").exists()


def test_run_folder_of_an_older_version_is_recognised_and_continued(tmp_path, capsys, finished_run):
    """Before the creation mark existed a run folder held config.yaml/metrics.csv/done.json: still ours."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(finished_run, old)
    (old / MARK).unlink()
    (old / LOCK).unlink()
    done = read_done(old)
    done.pop("checkpoint_sha256")
    (old / "done.json").write_text(__import__("json").dumps(done))
    assert is_finished(old, verify=True)  # verified by loading the checkpoint once ...
    assert "checkpoint_sha256" in read_done(old)  # ... and its hash recorded for next time
    (old / "done.json").unlink()  # an unfinished old-version run: cleared of its own files and trained
    code, err = run_train([*TINY, "--out", old], capsys)
    assert code == 0, err and is_finished(old, verify=True)


def test_truncated_checkpoint_makes_a_run_unfinished_not_skipped(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    data = (run / "model.pt").read_bytes()
    (run / "model.pt").write_bytes(data[: len(data) // 2])
    assert not is_finished(run, verify=True)
    (run / "done.json").write_text('{"config_hash": "abc", "checkp')  # truncated done.json
    assert not is_finished(run)


# ---------------------------------------------------------------- study
def study_file(tmp: Path, **changes) -> Path:
    from test_study import TINY as STUDY

    return write(tmp / "s.yaml", yaml.safe_dump({**STUDY, **changes}, sort_keys=False))


STUDY_CASES = [
    ("binary-study-file", lambda t: [write(t / "s.yaml", b"\x00\xff\xfe" * 64)], "not a text file"),
    ("garbled-study-file", lambda t: [write(t / "s.yaml", "losses: {ce: [\n")], "not valid YAML"),
    ("study-out-is-users-folder", lambda t: [study_file(t), "--out", (write(t / "o" / "data.csv", "1"), t / "o")[1]],
     "did not make"),
    ("study-out-is-cwd", lambda t: [study_file(t), "--out", "."], "current folder"),
    ("study-eval-metric-typo", lambda t: [study_file(t, eval={"metrics": ["acc", "pies"]}), "--out", t / "o"],
     "unknown metric"),
    ("study-eval-knn-k", lambda t: [study_file(t, eval={"knn_k": 0}), "--out", t / "o"], "knn_k must be"),
    ("study-runs-per-gpu", lambda t: [study_file(t), "--out", t / "o", "--runs-per-gpu", "0"], "--runs-per-gpu"),
    ("study-nan-lr", lambda t: [study_file(t), "--out", t / "o", "train.lr=nan"], "lr must be a finite number"),
    ("study-quantization", lambda t: [study_file(t, methods={"q": {"recipe": str(write(
        t / "q.yaml", "num_epochs: 2\ntarget_sparsity: 0.5\nmodifiers:\n  - !QuantizationModifier\n    start_epoch: 0.0\n"))}}),
        "--out", t / "o"], "does not support"),
]


@pytest.mark.parametrize("case,setup,message", STUDY_CASES, ids=[c[0] for c in STUDY_CASES])
def test_bad_study_input_is_one_line_exit_2_and_touches_nothing(tmp_path, capsys, monkeypatch, case, setup, message):
    assert_refused(tmp_path, monkeypatch, capsys, setup, lambda argv: run_cli(
        study_mod.main, [*map(str, argv), "--workers", "1"], prog="whatislost-study"), message)
    assert not (tmp_path / "o" / "runs").exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="lr must be a finite number"):
        run_cli(train_main, [*TINY, "--out", str(tmp_path / "r"), "lr=nan", "--debug"])
    assert not os.path.exists(tmp_path / "r")
