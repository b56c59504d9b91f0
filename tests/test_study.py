"""The study runner: grid expansion, dense-run reuse, resume after a kill, failures, local vs Ray."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml

from whatislost import study as study_mod
from whatislost import train as trainer
from whatislost.cli import run_cli
from whatislost.rundir import load_checkpoint, read_done

REPO = Path(__file__).resolve().parent.parent
REAL_TRAIN = trainer.train

# A WRN-10-1 on digits: every run trains in about a second.
TINY = {
    "name": "tiny",
    "train": {"dataset": "digits", "depth": 10, "widen": 1, "crop_padding": 1, "hflip": False, "eval_every": 0,
              "epochs": 2, "batch_size": 128, "finetune_epochs": 1, "finetune_lr": 0.01},
    "losses": {"ce": {}, "supcon": {"batch_size": 256, "linear_epochs": 2}},
    "methods": {
        "gmp": {"recipe": "recipes/gmp.yaml", "train": {"recipe_vars": {"prune_start": 0, "prune_end": 1,
                                                                        "update_frequency": 0.5}}},
        "delta_gmp": {"recipe": "recipes/delta_gmp.yaml", "losses": {"supcon": {"recipe_vars": {
            "prune_start": 1, "prune_end": 1.5, "update_frequency": 0.5}}}},
        "oneshot": {"recipe": "recipes/oneshot.yaml", "losses": ["ce", "supcon"]},
    },
    "sparsities": [0, 0.5],
    "seeds": 1,
}


def write_study(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**TINY, **changes}, sort_keys=False))
    return path


def run_study(argv, monkeypatch, fail=None) -> tuple[int, list]:
    """main(argv) in this process: (exit code, names of the runs trained here). fail(cfg) may raise, to inject a bug."""
    trained = []

    def recording_train(cfg, *a, **kw):
        trained.append(str(Path(cfg.out).relative_to(Path(cfg.out).parents[3])))
        if fail is not None:
            fail(cfg)
        return REAL_TRAIN(cfg, *a, **kw)

    monkeypatch.setattr(trainer, "train", recording_train)
    # in this process, one torch thread: tiny models gain nothing from more, and a busy machine makes them crawl
    in_process = [] if "--backend" in argv else ["--workers", "1", "--threads", "1"]
    return run_cli(study_mod.main, [*map(str, argv), *in_process], prog="whatislost-study"), trained


def model_mtimes(out: Path) -> dict:
    return {str(p.parent.relative_to(out / "runs")): p.stat().st_mtime_ns for p in (out / "runs").rglob("model.pt")}


def read_table(out: Path) -> dict:
    with open(out / "runs.csv") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


# ---------------------------------------------------------------- the grid, without training
def test_paper_grid_expands_to_660_runs_with_the_papers_settings(tmp_path):
    study, _ = study_mod.load_study(REPO / "examples" / "cifar10_paper.yaml")
    runs = study_mod.expand(study, tmp_path)
    assert len(runs) == 660
    by_population = {}
    for run in runs:
        by_population.setdefault(run.population, []).append(run)
    assert set(by_population) == {"ce/dense/s0", "supcon/dense/s0"} | {
        f"{loss}/{method}/s{s}" for s in (30, 50, 70, 90)
        for loss, method in [("ce", "gmp"), ("ce", "oneshot"), ("supcon", "gmp"), ("supcon", "delta_gmp"),
                             ("supcon", "oneshot")]}
    assert all(len(pop) == 30 for pop in by_population.values())
    cfg = {run.name: run.config for run in runs}
    sup, scl = cfg["ce/gmp/s90/seed7"], cfg["supcon/delta_gmp/s50/seed0"]
    # Table 2 and the authors' code (README, "Paper fidelity")
    assert (sup.epochs, sup.batch_size, sup.lr, sup.sparsity, sup.seed) == (205, 128, 1.0, 0.9, 7)
    assert (sup.lr_schedule, sup.lr_milestones, sup.lr_gamma, sup.lr_step, sup.vflip) == (
        "multistep", [5, 30, 50, 80], 0.1, "epoch", True)
    assert sup.recipe_vars == {"prune_start": 2.5575, "prune_end": 51.15, "update_frequency": 1.2788}
    assert round(sup.recipe_vars["prune_start"] * 391) == 1000 and round(sup.recipe_vars["prune_end"] * 391) == 20000
    assert (scl.epochs, scl.batch_size, scl.temperature, scl.base_temperature, scl.lr_schedule, scl.lr_min) == (
        500, 1024, 0.5, 0.07, "cosine", 5e-5)
    assert round(scl.recipe_vars["prune_start"] * 49) == 2440 and scl.recipe == "recipes/delta_gmp.yaml"
    assert (scl.linear_epochs, scl.linear_batch_size, scl.linear_augment, scl.linear_recipe) == (
        100, 256, True, "recipes/gmp.yaml")
    one_shot = cfg["supcon/oneshot/s70/seed3"]
    assert (one_shot.finetune_epochs, one_shot.finetune_lr, one_shot.finetune_nesterov, one_shot.finetune_batch_size,
            one_shot.finetune_weight_decay, one_shot.finetune_lr_schedule) == (30, 1e-3, True, 128, 0.0, "constant")
    assert Path(one_shot.init).resolve() == (tmp_path / "runs/supcon/dense/s0/seed3").resolve()
    assert cfg["ce/dense/s0/seed0"].init == "" and cfg["ce/gmp/s30/seed0"].init == ""
    # seed by seed, dense first: every One-Shot run comes after the dense run it starts from
    order = [run.name for run in runs]
    assert all(order.index(run.dense) < order.index(run.name) for run in runs if run.dense)
    # the appendix's extra levels are one override away
    study, _ = study_mod.load_study(REPO / "examples" / "cifar10_paper.yaml",
                                    {"sparsities": "[0, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99]"})
    assert len(study_mod.expand(study, tmp_path)) == 960


def test_quickstart_shows_the_whole_structure(tmp_path):
    study, _ = study_mod.load_study(REPO / "examples" / "quickstart.yaml")
    runs = study_mod.expand(study, tmp_path)
    populations = {}
    for run in runs:
        populations.setdefault((run.loss, run.method, run.sparsity), set()).add(run.seed)
    assert {loss for loss, _, _ in populations} == {"ce", "supcon"}
    assert {m for _, m, _ in populations} >= {"dense", "oneshot", "gmp", "delta_gmp"}
    assert ("supcon", "delta_gmp", 0.9) in populations
    assert len({s for _, _, s in populations if s > 0}) >= 2
    assert all(len(seeds) >= 3 for seeds in populations.values())


@pytest.mark.parametrize("change,message", [
    ({"seed": 3}, "unknown key 'seed' in"),
    ({"losses": {"ce": {"epoch": 3}}}, "did you mean 'epochs'"),
    ({"train": {"seed": 1}}, "'seed' in"),
    ({"losses": {"sup": {}}}, "'sup' is not a loss"),
    ({"sparsities": [0, 90]}, "did you mean 0.9"),
    ({"seeds": 0}, "number of seeds must be >= 1"),
    ({"methods": {"gmp": {"recipe": "recipes/nope.yaml"}}}, "recipe file not found"),
    ({"methods": {"os": {"recipe": "recipes/oneshot.yaml", "from_dense": False}}}, "from_dense cannot be false"),
    ({"methods": {"dense": {"recipe": "recipes/dense.yaml"}}}, "dense population is built in"),
    ({"methods": {"gmp": {"recipe": "recipes/gmp.yaml", "losses": ["mse"]}}}, "'mse' is not one of the study's"),
    ({"methods": {"gmp": {"recipe": "recipes/gmp.yaml", "train": {"recipe_vars": {"bogus": 1}}}}},
     "has no variable 'bogus'"),
    ({"eval": {"knn": 3}}, "did you mean 'knn_k'"),
    ({"eval": {"metrics": ["pies"]}}, "unknown metric"),
    ({"eval": {"probes": "all"}}, "probes must be"),
    ({"methods": {"gmp": {"recipe": "recipes/gmp.yaml", "train": {"lr": "nan"}}}}, "lr must be a finite number"),
])
def test_study_file_mistakes_are_one_line_and_exit_2(tmp_path, capsys, change, message):
    code = run_cli(study_mod.main, [str(write_study(tmp_path / "s.yaml", **change)), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- a tiny study, killed and resumed
@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """The tiny study (ce and supcon; dense, GMP, ΔGMP, One-Shot; 50%; 1 seed) trained the hard way: by
    `whatislost-study --workers 2` in a subprocess, killed (SIGKILL) once a run has finished and another is
    in flight, then started again in this process."""
    root = tmp_path_factory.mktemp("study")
    config, out = write_study(root / "tiny.yaml"), root / "out"
    for attempt in range(3):  # on a loaded machine the run in flight may finish between the look and the kill
        with open(root / "stderr", "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "whatislost.study", str(config), "--out", str(out),
                                     "--no-eval", "--workers", "2", "--threads", "1"], cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            finished = {p.parent for p in out.rglob("done.json")}
            if finished and {p.parent for p in out.rglob("config.yaml")} - finished:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        assert proc.wait(timeout=30) == -signal.SIGKILL, (root / "stderr").read_text()[-2000:]
        # the CLI takes seconds to start; this process restarts at once, so give the orphaned workers their
        # moment to notice that their study is gone and exit
        time.sleep(1.0)
        finished = {name: t for name, t in model_mtimes(out).items() if (out / "runs" / name / "done.json").exists()}
        # in flight: every run a worker had started (its log header is written before anything else) and not
        # finished; run directories alone would miss a run still loading its data when the kill came
        started = set(attempts(out)) | {str(p.parent.relative_to(out / "runs")) for p in out.rglob("config.yaml")}
        in_flight = started - set(finished)
        if in_flight:
            break
    with pytest.MonkeyPatch.context() as mp:
        code, resumed = run_study([config, "--out", out, "--no-eval"], mp)
    assert code == 0
    return types.SimpleNamespace(config=config, out=out, finished=finished, in_flight=in_flight, resumed=resumed)


ALL_TINY_RUNS = {"ce/dense/s0/seed0", "supcon/dense/s0/seed0", "ce/gmp/s50/seed0", "supcon/gmp/s50/seed0",
                 "supcon/delta_gmp/s50/seed0", "ce/oneshot/s50/seed0", "supcon/oneshot/s50/seed0"}


def attempts(out: Path) -> dict:
    """{run name: [(start time, pid) of every attempt]} from the header lines of OUT/logs/*.log."""
    found = {}
    for log in (out / "logs").glob("*.log"):
        heads = [line.split() for line in log.read_text().splitlines() if line.startswith("--- ")]
        found[heads[0][3]] = [(f"{h[1]}T{h[2]}", int(h[7])) for h in heads]
    return found


def test_killed_study_resumes_and_loses_only_the_runs_in_flight(tiny_study):
    assert tiny_study.finished and tiny_study.in_flight  # the kill came mid-study
    table = read_table(tiny_study.out)
    assert set(table) == ALL_TINY_RUNS and all(row["status"] in ("done", "skipped") for row in table.values())
    assert {name for name, row in table.items() if row["status"] == "skipped"} == set(tiny_study.finished)
    assert tiny_study.in_flight <= set(tiny_study.resumed)  # the runs in flight were trained again ...
    assert not set(tiny_study.resumed) & set(tiny_study.finished)  # ... the finished ones were not
    assert all(model_mtimes(tiny_study.out)[name] == t for name, t in tiny_study.finished.items())


def test_dense_runs_are_trained_once_and_reused_by_one_shot(tiny_study):
    out, tried = tiny_study.out, attempts(tiny_study.out)
    assert set(tried) == ALL_TINY_RUNS and set(model_mtimes(out)) == ALL_TINY_RUNS
    assert {pid for a in tried.values() for _, pid in a} - {os.getpid()}  # worker processes trained some
    for loss in ("ce", "supcon"):
        dense, one_shot = f"{loss}/dense/s0/seed0", f"{loss}/oneshot/s50/seed0"
        assert len(tried[dense]) == 1 + (dense in tiny_study.in_flight)  # once, unless the kill interrupted it
        assert tried[one_shot][0][0] >= read_done(out / "runs" / dense)["finished_at"]  # it waited for the dense run
        ckpt = load_checkpoint(out / "runs" / one_shot)
        assert Path(ckpt["init"]).resolve() == (out / "runs" / dense).resolve()
        # pruned from the dense weights: the kept ones moved only by the one short fine-tune epoch
        before, after = load_checkpoint(out / "runs" / dense)["state_dict"]["encoder.conv.weight"], \
            ckpt["state_dict"]["encoder.conv.weight"]
        kept = after != 0
        assert (after[kept] - before[kept]).abs().max() < 0.1 * before.abs().max()
    assert (out / "study.yaml").is_file()


def test_second_start_skips_every_finished_run(tiny_study, monkeypatch, capsys):
    before = model_mtimes(tiny_study.out)
    code, trained = run_study([tiny_study.config, "--out", tiny_study.out, "--no-eval"], monkeypatch)
    assert code == 0 and trained == []
    assert model_mtimes(tiny_study.out) == before
    assert "0 trained, 7 skipped" in capsys.readouterr().out


def test_changed_settings_are_refused_then_retrained_with_their_dependents(tiny_study, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_study.out, copy)  # a moved study folder is still finished
    argv = [tiny_study.config, "--out", copy, "--no-eval", "losses.ce.epochs=3"]
    code, trained = run_study(argv, monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "epochs 2 -> 3" in err and "--rerun-changed" in err and trained == []
    code, trained = run_study([*argv, "--rerun-changed"], monkeypatch)
    # the One-Shot run starts from the retrained dense run, so it is retrained too; supcon runs are untouched
    assert code == 0 and sorted(trained) == ["ce/dense/s0/seed0", "ce/gmp/s50/seed0", "ce/oneshot/s50/seed0"]


def test_local_and_ray_backends_give_identical_runs(tiny_study, tmp_path, monkeypatch):
    # the local runs had 1 thread each (--threads 1), so do the Ray tasks (1 CPU each by default)
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'whatislost[ray]' (make test does)")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        code, trained_here = run_study([tiny_study.config, "--out", tmp_path / "ray", "--no-eval", "--backend", "ray"],
                                       monkeypatch)
    finally:
        ray.shutdown()
    assert code == 0 and trained_here == []  # every run was a Ray task, none ran in this process
    local, remote = read_table(tiny_study.out), read_table(tmp_path / "ray")
    assert set(remote) == ALL_TINY_RUNS
    for name in local:
        assert remote[name]["status"] == "done" and remote[name]["test_acc"] == local[name]["test_acc"], name
        a = load_checkpoint(tiny_study.out / "runs" / name)["state_dict"]
        b = load_checkpoint(tmp_path / "ray" / "runs" / name)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_eval_gets_the_studys_settings_and_the_report_path_is_printed(tiny_study, monkeypatch, capsys):
    calls = []

    def fake_run_eval(runs_dir, out=None, device="cpu", metrics=None, depth_models=5, knn_k=30, **settings):
        calls.append(dict(runs_dir=runs_dir, out=out, device=device, metrics=metrics, depth_models=depth_models,
                          knn_k=knn_k, **settings))
        return Path(out)

    import whatislost.eval as real_eval

    monkeypatch.setattr(real_eval, "run_eval", fake_run_eval)
    out = tiny_study.out
    code, _ = run_study([tiny_study.config, "--out", out, "eval.knn_k=7", "eval.metrics=[pie]",
                         "eval.probes=blocks"], monkeypatch)
    assert code == 0
    assert calls == [dict(runs_dir=out / "runs", out=out / "eval", device="cpu", metrics=["pie"], depth_models=5,
                          knn_k=7, tie_break="min", depth_reference="label", probes="blocks", depth_train="clean",
                          n_boot=1000, n_perm=10000, alpha=0.05, correction="bh", cka_samples=10000)]
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "eval" / "report" / "index.html")


# ---------------------------------------------------------------- failures
def test_failed_runs_are_recorded_and_the_rest_complete(tmp_path, monkeypatch, capsys):
    config = write_study(tmp_path / "s.yaml", losses={"ce": {}}, seeds=2, methods={
        "late": {"recipe": "recipes/gmp.yaml",
                 "train": {"epochs": 1, "recipe_vars": {"prune_start": 0, "prune_end": 50}}},  # cannot reach 50%
        "oneshot": {"recipe": "recipes/oneshot.yaml"}})
    out = tmp_path / "out"

    def crash_dense_seed1(cfg):
        if cfg.method == "dense" and cfg.seed == 1:
            raise RuntimeError("simulated crash")

    code, trained = run_study([config, "--out", out, "--no-eval"], monkeypatch, fail=crash_dense_seed1)
    assert code == 1
    status = {name: row["status"] for name, row in read_table(out).items()}
    assert status == {"ce/dense/s0/seed0": "done", "ce/dense/s0/seed1": "failed", "ce/late/s50/seed0": "failed",
                      "ce/late/s50/seed1": "failed", "ce/oneshot/s50/seed0": "done", "ce/oneshot/s50/seed1": "failed"}
    assert "ce/oneshot/s50/seed1" not in trained  # blocked by its dense run, never started
    printed = capsys.readouterr()
    assert "not the target" in printed.out and "RuntimeError: simulated crash" in printed.out
    assert "its dense run ce/dense/s0/seed1 failed" in printed.out and "eval skipped" in printed.err
    assert "Traceback" in (out / "logs" / "ce-dense-s0-seed1.log").read_text()
    # the next start retries exactly the failed runs
    code, trained = run_study([config, "--out", out, "--no-eval"], monkeypatch)
    assert code == 1 and sorted(trained) == ["ce/dense/s0/seed1", "ce/late/s50/seed0", "ce/late/s50/seed1",
                                             "ce/oneshot/s50/seed1"]


# ---------------------------------------------------------------- killed three times (slow; the fast variant is tiny_study)
def start_study(config, out, extra=()):
    return subprocess.Popen([sys.executable, "-m", "whatislost.study", str(config), "--out", str(out), "--workers", "2",
                             "--threads", "1", *extra], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_study_killed_three_times_completes_every_run_once_and_matches_an_uninterrupted_one(tmp_path):
    config = write_study(tmp_path / "s.yaml", seeds=2, eval={"metrics": ["acc", "pie", "qscore"]},
                         train={**TINY["train"], "epochs": 3, "save_every": 1})
    whole = tmp_path / "whole"
    assert start_study(config, whole).wait(timeout=600) == 0
    total = len(list((whole / "runs").rglob("done.json")))
    out, kept = tmp_path / "killed", {}
    for fraction in (0.2, 0.5, 0.8):
        proc = start_study(config, out)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if len(list(out.rglob("done.json"))) >= fraction * total:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=30)
        time.sleep(1.0)  # orphaned workers notice their study is gone
        finished = {str(p.parent): p.stat().st_mtime_ns for p in out.rglob("done.json")}
        # a run finished before a kill is never trained again (its done.json is the same file, same time)
        assert all(finished.get(run) == t for run, t in kept.items())
        kept = finished
    assert start_study(config, out).wait(timeout=600) == 0
    assert all((Path(run) / "done.json").stat().st_mtime_ns == t for run, t in kept.items())
    assert len(list((out / "runs").rglob("done.json"))) == total
    for table in ("populations.csv", "table1.csv", "table4.csv", "table5.csv"):
        assert (whole / "eval" / "tables" / table).read_text() == (out / "eval" / "tables" / table).read_text(), table
