"""whatislost.compat: what SparseML 1.8 needs and newer onnx / setuptools dropped, restored only where missing.

onnx >= 1.19 is simulated on the installed onnx by hiding its mapping.py: the package's __path__ is
pointed at a folder of links to every file of onnx except mapping.py, so the regular import machinery
finds no onnx.mapping, exactly as with a newer onnx.
"""
import importlib
import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest

import whatislost
from whatislost import compat
from whatislost.compat import FallbackFinder, build_onnx_mapping, build_pkg_resources, ensure_compat

REPO = Path(__file__).resolve().parents[1]
TABLES = ["TENSOR_TYPE_TO_NP_TYPE", "NP_TYPE_TO_TENSOR_TYPE", "TENSOR_TYPE_TO_STORAGE_TENSOR_TYPE",
          "STORAGE_TENSOR_TYPE_TO_FIELD", "STORAGE_ELEMENT_TYPE_TO_FIELD", "OPTIONAL_ELEMENT_TYPE_TO_FIELD"]


def real_onnx_mapping():
    """The installed onnx's own mapping module, or None (onnx >= 1.19)."""
    module = sys.modules.get("onnx.mapping")
    if module is not None and not getattr(module, "__whatislost_compat__", False):
        return module
    spec = importlib.machinery.PathFinder.find_spec("onnx.mapping", onnx.__path__)
    return importlib.import_module("onnx.mapping") if spec is not None else None


def onnx_without_mapping_dir(tmp_path) -> str:
    """A folder that holds links to everything in the onnx package except mapping.py."""
    src = Path(onnx.__file__).parent
    dst = tmp_path / "onnx_without_mapping"
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name not in ("mapping.py", "__pycache__"):
            (dst / entry.name).symlink_to(entry)
    return str(dst)


@pytest.fixture
def onnx_without_mapping(tmp_path, monkeypatch):
    """The imported onnx as onnx >= 1.19 has it: no onnx.mapping. Everything is put back afterwards."""
    monkeypatch.setattr(onnx, "__path__", [onnx_without_mapping_dir(tmp_path)])
    if "onnx.mapping" in sys.modules:
        monkeypatch.delitem(sys.modules, "onnx.mapping")
    if hasattr(onnx, "mapping"):
        monkeypatch.delattr(onnx, "mapping")
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, FallbackFinder)])
    importlib.invalidate_caches()
    return onnx


def test_package_import_stays_light():
    # the hook is installed by `import whatislost` and costs no import of onnx or numpy
    code = ("import json, sys, whatislost; print(json.dumps(['onnx' in sys.modules, 'numpy' in sys.modules, "
            "sorted(f.name for f in sys.meta_path if type(f).__name__ == 'FallbackFinder')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert json.loads(out) == [False, False, ["onnx.mapping", "pkg_resources"]]


def test_ensure_compat_is_idempotent():
    before = list(sys.meta_path)
    ensure_compat()
    ensure_compat()
    assert sys.meta_path == before
    ours = [i for i, f in enumerate(sys.meta_path) if isinstance(f, FallbackFinder)]
    assert sorted(sys.meta_path[i].name for i in ours) == ["onnx.mapping", "pkg_resources"]
    # asked only after the regular finders: a real module always wins
    assert min(ours) > sys.meta_path.index(importlib.machinery.PathFinder)


def test_onnx_without_mapping_is_restored(onnx_without_mapping):
    with pytest.raises(ImportError):  # the simulation holds: nothing provides onnx.mapping
        importlib.import_module("onnx.mapping")
    ensure_compat()  # onnx is already imported: restored at once, attribute access included
    restored = onnx_without_mapping.mapping
    assert restored.__whatislost_compat__ and sys.modules["onnx.mapping"] is restored
    from onnx.mapping import NP_TYPE_TO_TENSOR_TYPE, TENSOR_TYPE_TO_NP_TYPE  # what sparsezoo / sparseml import

    TensorProto = onnx.TensorProto
    assert TENSOR_TYPE_TO_NP_TYPE[TensorProto.FLOAT] == np.dtype("float32")
    assert TENSOR_TYPE_TO_NP_TYPE[TensorProto.INT64] == np.dtype("int64")
    assert TENSOR_TYPE_TO_NP_TYPE[TensorProto.BOOL] == np.dtype("bool")
    assert TENSOR_TYPE_TO_NP_TYPE[TensorProto.STRING] == np.dtype("object")
    assert NP_TYPE_TO_TENSOR_TYPE[np.dtype("float32")] == TensorProto.FLOAT  # not BFLOAT16 / FLOAT8*
    assert NP_TYPE_TO_TENSOR_TYPE[np.dtype("uint8")] == TensorProto.UINT8
    assert restored.STORAGE_TENSOR_TYPE_TO_FIELD[TensorProto.FLOAT] == "float_data"
    assert restored.TENSOR_TYPE_MAP[TensorProto.FLOAT].np_dtype == np.dtype("float32")


def test_restored_tables_equal_the_old_onnx_ones():
    real = real_onnx_mapping()
    if real is None:
        pytest.skip(f"onnx {onnx.__version__} has no mapping module to compare with")
    rebuilt = build_onnx_mapping(onnx)
    for table in TABLES:
        assert dict(getattr(rebuilt, table)) == dict(getattr(real, table)), table


def test_import_hook_answers_only_when_onnx_mapping_is_missing(onnx_without_mapping):
    ensure_compat()
    del sys.modules["onnx.mapping"], onnx_without_mapping.mapping
    # `from onnx.mapping import ...` alone (no eager restore): the hook builds it on demand
    assert importlib.import_module("onnx.mapping").__whatislost_compat__


def test_noop_when_onnx_has_mapping(tmp_path, monkeypatch):
    # a fake onnx package that has its own mapping module: the import must get that one
    pkg = tmp_path / "fake" / "onnx"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mapping.py").write_text("SENTINEL = 'real onnx.mapping'\nTENSOR_TYPE_TO_NP_TYPE = {}\n")
    saved = {k: v for k, v in sys.modules.items() if k == "onnx" or k.startswith("onnx.")}
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    try:
        for name in saved:
            del sys.modules[name]
        ensure_compat()
        fake = importlib.import_module("onnx")
        assert fake.__file__.startswith(str(tmp_path))
        ensure_compat()  # onnx imported with a real mapping on disk: nothing is replaced
        assert importlib.import_module("onnx.mapping").SENTINEL == "real onnx.mapping"
        assert not getattr(sys.modules["onnx.mapping"], "__whatislost_compat__", False)
    finally:  # the real onnx back, the fake one gone
        for name in [k for k in sys.modules if k == "onnx" or k.startswith("onnx.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_real_onnx_mapping_is_left_alone():
    real = real_onnx_mapping()
    if real is None:
        pytest.skip(f"onnx {onnx.__version__} has no mapping module")
    ensure_compat()
    assert importlib.import_module("onnx.mapping") is real
    assert not getattr(real, "__whatislost_compat__", False)


def test_fallback_finder_defers_to_real_modules(tmp_path, monkeypatch):
    name = "whatislost_compat_probe"
    monkeypatch.setattr(sys, "meta_path", sys.meta_path + [FallbackFinder(name, lambda: _probe("stand-in"))])
    monkeypatch.delitem(sys.modules, name, raising=False)
    assert importlib.import_module(name).KIND == "stand-in"  # nothing real: the stand-in answers
    del sys.modules[name]
    (tmp_path / f"{name}.py").write_text("KIND = 'real'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.import_module(name).KIND == "real"  # a real module exists: it wins
    del sys.modules[name]


def _probe(kind):
    module = compat.types.ModuleType("whatislost_compat_probe")
    module.KIND = kind
    return module


def test_pkg_resources_stand_in():
    stand_in = build_pkg_resources()
    assert stand_in.get_distribution("numpy").version == metadata.version("numpy")
    assert stand_in.get_distribution("torch").version == metadata.version("torch")  # sparseml's check_torch_install
    with pytest.raises(stand_in.DistributionNotFound):
        stand_in.get_distribution("no-such-distribution-whatislost")
    stand_in.fixup_namespace_packages("/somewhere")  # pytest's monkeypatch may call it
    with pytest.raises(AttributeError, match="setuptools<82"):
        stand_in.iter_entry_points  # noqa: B018


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_sparseml_loads_on_onnx_without_mapping(tmp_path):
    """The import chain whatislost uses, in a fresh interpreter whose onnx has no mapping module."""
    hidden = onnx_without_mapping_dir(tmp_path)
    code = textwrap.dedent(f"""
        import sys
        import onnx
        sys.modules.pop("onnx.mapping", None)
        if hasattr(onnx, "mapping"):
            del onnx.mapping
        onnx.__path__ = [{hidden!r}]
        try:
            import onnx.mapping
        except ImportError:
            pass
        else:
            raise SystemExit("simulation failed: onnx.mapping still importable")
        import whatislost  # the compat hook, before sparseml
        from sparseml.pytorch.optim import ScheduledModifierManager
        from sparseml.pytorch.utils import ModuleExporter, LoggerManager, PythonLogger
        from sparsezoo.utils import node_inference
        assert onnx.mapping.__whatislost_compat__
        assert node_inference.TENSOR_TYPE_TO_NP_TYPE[onnx.TensorProto.FLOAT] == "float32"
        print("ok")
    """)
    env = dict(os.environ, NM_DISABLE_ANALYTICS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
