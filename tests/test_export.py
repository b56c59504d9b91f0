"""Sparse ONNX export: zeros kept, onnxruntime agrees with PyTorch, bad input is one line and exit 2."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from conftest import tiny_config
from whatislost import export
from whatislost.cli import run_cli
from whatislost.export import CheckFailed, check_parity, check_sparsity, export_run, parity_images
from whatislost.rundir import load_model
from whatislost.train import train


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, digits):
    """A finished GMP run of a WRN-10-1 on digits at 70% sparsity."""
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test thread limit
    cfg = tiny_config(tmp_path_factory.mktemp("export") / "gmp70", recipe="recipes/gmp.yaml", sparsity=0.7, epochs=2)
    return train(cfg, data=digits)


def run(argv, capsys):
    code = run_cli(export.main, [str(a) for a in argv], prog="whatislost-export")
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def normalise(images, record):
    """uint8 images (B, C, H, W) -> the ONNX input, using only what the JSON record says."""
    mean = torch.tensor(record["input"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(record["input"]["std"]).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def onnx_run(path, output, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([output], {"images": x.numpy()})[0]


def test_export_keeps_zeros_and_matches_pytorch(pruned_run, digits, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may land in the current folder
    code, out, err = run([pruned_run], capsys)
    assert code == 0, err
    assert "parity on 256 test images" in out and "labels identical" in out
    record = json.loads((pruned_run / "model.onnx.json").read_text())
    model, ckpt = load_model(pruned_run)
    # zeros counted on the file itself, tensor by tensor, against the checkpoint's
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(pruned_run / "model.onnx")).graph.initializer}
    assert set(record["layers"]) == set(ckpt["layer_sparsity"])
    for name, layer in record["layers"].items():
        assert (inits[layer["initializer"]] == 0).sum() == (ckpt["state_dict"][name] == 0).sum() > 0
        assert layer["sparsity"] == pytest.approx(ckpt["layer_sparsity"][name])
    assert record["sparsity"] == pytest.approx(ckpt["sparsity"]) == pytest.approx(0.7, abs=0.005)
    parity = record["parity"]
    assert parity["passed"] and parity["labels_identical"] and parity["images"] == 256
    assert parity["max_abs_diff"] <= 1e-4
    assert record["source_run"] == str(pruned_run.resolve()) and record["recipe"] == ckpt["recipe"]
    assert record["test_acc"] == ckpt["test_acc"] and record["classes"] == ckpt["classes"]
    # dynamic batch axis (exported with a batch of 2), and the record's preprocessing is the training's
    x = normalise(digits.test_x[:5], record)
    np.testing.assert_allclose(onnx_run(pruned_run / "model.onnx", "logits", x), model(x).detach().numpy(), atol=1e-4)
    assert list(tmp_path.iterdir()) == []
    assert not list(pruned_run.glob(".whatislost-export-*"))


def test_encoder_part_gives_the_representation(pruned_run, digits, tmp_path, capsys):
    out = tmp_path / "deploy" / "enc.onnx"
    code, _, err = run([pruned_run, "--part", "encoder", "--out", out, "--opset", 17], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "deploy" / "enc.onnx.json").read_text())
    model, ckpt = load_model(pruned_run)
    assert record["output"] == {"name": "h", "shape": ["batch", model.encoder.dim]} and record["opset"] == 17
    assert set(record["layers"]) == {k for k in ckpt["layer_sparsity"] if k.startswith("encoder.")}
    x = normalise(digits.test_x[:7], record)
    h = onnx_run(out, "h", x)
    assert h.shape == (7, model.encoder.dim)
    np.testing.assert_allclose(h, model.encoder(x).detach().numpy(), atol=1e-4)


def test_checks_find_renamed_weights_and_catch_lost_zeros_and_wrong_outputs(pruned_run, tmp_path):
    path = tmp_path / "m.onnx"
    export_run(pruned_run, path)
    model, ckpt = load_model(pruned_run)

    def edited(name, change):
        graph = onnx.load(str(path))
        init = next(i for i in graph.graph.initializer if i.name == name)
        new_name, array = change(numpy_helper.to_array(init).copy())
        init.CopyFrom(numpy_helper.from_array(array, new_name))
        return graph

    # a folded / transposed weight under another name is still found by its values
    moved = edited("classifier.weight", lambda w: ("onnx::Gemm_7", w.T.copy()))
    assert check_sparsity(moved, model, ckpt)["classifier.weight"]["initializer"] == "onnx::Gemm_7"

    def fill_one_zero(w):
        w.flat[np.flatnonzero(w == 0)[0]] = 1e-3
        return "encoder.blocks.2.conv1.weight", w

    with pytest.raises(CheckFailed, match="encoder.blocks.2.conv1.weight"):
        check_sparsity(edited("encoder.blocks.2.conv1.weight", fill_one_zero), model, ckpt)

    shifted = edited("encoder.bn.bias", lambda b: ("encoder.bn.bias", b + 0.5))
    onnx.save(shifted, str(tmp_path / "shifted.onnx"))
    with pytest.raises(CheckFailed, match="disagrees with PyTorch"):
        check_parity(tmp_path / "shifted.onnx", model, parity_images(ckpt, None)[0], None)


def test_failed_check_leaves_no_file(pruned_run, tmp_path, monkeypatch, capsys):
    def fail(*args):
        raise CheckFailed("onnxruntime disagrees with PyTorch (simulated)")

    monkeypatch.setattr(export, "check_parity", fail)
    code, _, err = run([pruned_run, "--out", tmp_path / "m.onnx"], capsys)
    assert code == 2 and "simulated" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["{tmp}/nope"], "does not exist"),
    (["{tmp}/unfinished"], "not a finished run (no done.json)"),
    (["{tmp}/no_checkpoint"], "no checkpoint"),
    (["{run}", "--out", "{tmp}/m.txt"], "must name a .onnx file"),
    (["{run}", "--opset", "99"], "opset must be in"),
    (["{run}", "--part", "head"], "part must be one of classifier, encoder"),
    ([], "give either RUN_DIR or --all"),
    (["{run}", "--all", "{tmp}"], "give either RUN_DIR or --all"),
    (["--all", "{tmp}", "--out", "{tmp}/m.onnx"], "--out names one file"),
    (["--all", "{tmp}/unfinished"], "no finished runs"),
])
def test_bad_input_is_one_line_and_exit_2(pruned_run, tmp_path, capsys, argv, message):
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("{}")
    (tmp_path / "no_checkpoint").mkdir()
    (tmp_path / "no_checkpoint" / "done.json").write_text('{"config_hash": "x"}')
    code, _, err = run([a.format(tmp=tmp_path, run=pruned_run) for a in argv], capsys)
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.rglob("*.onnx"))


def test_missing_data_is_named(pruned_run, tmp_path, capsys):
    moved = shutil.copytree(pruned_run, tmp_path / "run")
    ckpt = torch.load(moved / "model.pt", weights_only=True)
    ckpt["config"].update(dataset="imagefolder", data_root=str(tmp_path / "gone.tar.gz"))
    torch.save(ckpt, moved / "model.pt")
    code, _, err = run([moved, "--out", tmp_path / "m.onnx"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "needs the run's test images" in err and "gone.tar.gz" in err and "--data-root" in err


def test_export_all_goes_on_past_a_broken_run(pruned_run, tmp_path, capsys):
    root = tmp_path / "runs"
    shutil.copytree(pruned_run, root / "a")
    (root / "b").mkdir()
    (root / "b" / "done.json").write_text('{"config_hash": "x"}')  # finished, but its checkpoint is gone
    (root / "c").mkdir()
    (root / "c" / "config.yaml").write_text("{}")  # still training
    code, out, err = run(["--all", root, "--part", "encoder"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(str(root / "a" / "encoder.onnx")) and "labels identical" in lines[0]
    assert lines[1].startswith(str(root / "b")) and "FAILED" in lines[1] and "no checkpoint" in lines[1]
    assert "exported 1 of 2 finished runs" in lines[2] and "1 unfinished" in lines[2]
    assert (root / "a" / "encoder.onnx.json").is_file()

    shutil.rmtree(root / "a")
    code, _, err = run(["--all", root], capsys)
    assert code == 2 and "nothing under" in err and len(err.splitlines()) == 1


def test_an_earlier_export_is_replaced_whole_and_a_foreign_file_is_not(pruned_run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    export_run(pruned_run, out)
    before = out.stat().st_ino, export.record_path(out).stat().st_ino
    code, _, err = run([pruned_run, "--out", out], capsys)  # its record is there: an earlier export of ours
    assert code == 0, err
    assert (out.stat().st_ino, export.record_path(out).stat().st_ino) != before  # new files renamed into place
    assert export.is_export_record(export.record_path(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]
    export.record_path(out).unlink()  # without its record the file is not known to be ours
    code, _, err = run([pruned_run, "--out", out], capsys)
    assert code == 2 and "not an earlier whatislost-export output" in err and out.is_file()


def test_an_export_into_new_folders_that_fails_leaves_none(pruned_run, tmp_path, monkeypatch, capsys):
    def fail(*args):
        raise CheckFailed("simulated")

    monkeypatch.setattr(export, "check_parity", fail)
    code, _, err = run([pruned_run, "--out", tmp_path / "a" / "b" / "m.onnx"], capsys)
    assert code == 2 and "simulated" in err
    assert list(tmp_path.iterdir()) == []
