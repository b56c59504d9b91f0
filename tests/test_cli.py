"""Bad input to whatislost-train: one line on stderr, exit code 2, no run directory that looks finished."""
import pytest

from whatislost.config import load_config
from whatislost.cli import UserError
from whatislost.cli import run_cli
from whatislost.train import main

TINY = ["depth=10", "widen=1", "epochs=1", "linear_epochs=1", "eval_every=0"]


def run(argv, capsys):
    code = run_cli(main, argv, prog="whatislost-train")
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv,message", [
    (["--loss", "mse"], "loss must be one of ce, supcon"),
    (["--recipe", "recipes/nope.yaml"], "recipe file not found"),
    (["--recipe", "recipes/gmp.yaml", "--sparsity", "1.0"], "target sparsity must be in [0, 1)"),
    (["--recipe", "recipes/gmp.yaml", "--sparsity", "-0.1"], "target sparsity must be in [0, 1)"),
    (["--dataset", "imagefolder", "--data-root", "/nonexistent/data"], "does not exist"),
    (["--recipe", "recipes/oneshot.yaml", "--sparsity", "0.5"], "pass --init"),
    (["--recipe", "recipes/dense.yaml", "--sparsity", "0.5"], "does not prune"),
    (["lrr=0.1"], "did you mean 'lr'"),
    (["recipe_vars.bogus=1", "--recipe", "recipes/gmp.yaml", "--sparsity", "0.5"], "has no variable 'bogus'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    code, err = run([*argv, "--out", str(out), *TINY], capsys)
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_recipe_sparseml_rejects(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_epochs: 1\ntarget_sparsity: 0.5\nmodifiers:\n  - !GlobalMagnitudePruningModifier\n"
                   "    final_sparsity: eval(target_sparsity)\n")
    code, err = run(["--recipe", str(bad), "--sparsity", "0.5", "--out", str(tmp_path / "r"), *TINY], capsys)
    assert code == 2 and "SparseML rejected recipe" in err
    assert not (tmp_path / "r").exists()


def test_init_must_be_a_finished_dense_run(tmp_path, capsys, dense_ce_run):
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text("{}")
    code, err = run(["--recipe", "recipes/oneshot.yaml", "--sparsity", "0.5", "--init", str(half),
                     "--out", str(tmp_path / "r"), *TINY], capsys)
    assert code == 2 and "not a finished run" in err
    code, err = run(["--recipe", "recipes/oneshot.yaml", "--sparsity", "0.5", "--init", str(dense_ce_run),
                     "--loss", "supcon", "--out", str(tmp_path / "r"), *TINY], capsys)
    assert code == 2 and "was trained with loss 'ce'" in err
    assert not (tmp_path / "r").exists()


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.1\nrecipe_vars: {prune_start: 2}\n")
    cfg = load_config(str(path), {"lr": "0.2", "recipe_vars.prune_end": "5", "hflip": "false"})
    assert (cfg.epochs, cfg.lr, cfg.hflip) == (7, 0.2, False)
    assert cfg.recipe_vars == {"prune_start": 2, "prune_end": 5}
    path.write_text("epoch: 7\n")
    with pytest.raises(UserError, match="did you mean 'epochs'"):
        load_config(str(path))
    with pytest.raises(UserError, match="expects int"):
        load_config(None, {"epochs": "many"})


def test_cli_trains_and_saves_resolved_config(tmp_path, capsys):
    import yaml

    out = tmp_path / "ok"
    code, _ = run(["--recipe", "recipes/gmp.yaml", "--sparsity", "0.5", "--seed", "2", "--out", str(out), *TINY,
                   "epochs=2"], capsys)
    assert code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["seed"] == 2 and saved["sparsity"] == 0.5 and saved["epochs"] == 2
    code, err = run(["--recipe", "recipes/gmp.yaml", "--sparsity", "0.5", "--out", str(out), *TINY], capsys)
    assert code == 2 and "already holds a finished run" in err


def test_help_lists_every_config_key_with_its_default_and_meaning(capsys):
    import dataclasses

    from whatislost.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        line = next((l for l in text.splitlines() if l.split()[:1] == [f.name]), None)
        assert line is not None and len(line.split()) >= 3, f.name  # name, default, a word of meaning
