"""Compatibility with the newer stack of current CUDA images (Python 3.12, numpy 2, onnx >= 1.19, torch 2.11+).

SparseML 1.8 / SparseZoo 1.8 were released against Python <= 3.11, numpy 1.x and onnx 1.14. On a
newer stack a few things they read are gone. `ensure_compat()` puts back exactly those, and only
where they are missing, so on the tested Python 3.11 set (constraints.txt) it changes nothing.

Called from `whatislost/__init__.py`, i.e. before any whatislost module imports sparseml or
sparsezoo. It must stay cheap (the package import takes about 1 ms; `import onnx` alone about 85 ms):
it imports neither onnx nor numpy. Each patch is an import hook at the end of sys.meta_path that does
its work only when something imports the module and no real one exists.

Patches (each names the break it repairs):

* `onnx.mapping`: removed in onnx 1.19. `sparsezoo.utils.node_inference` does
  `from onnx.mapping import TENSOR_TYPE_TO_NP_TYPE` at import time, and it is imported by
  `sparsezoo` -> `sparseml`, so without it `import sparseml` fails. SparseML's ONNX quantizer
  (not used by whatislost) reads `NP_TYPE_TO_TENSOR_TYPE`. The tables are rebuilt from the public
  `onnx.helper` converters of the installed onnx.
* `pkg_resources`: removed in setuptools 82 (torch 2.11 still requires setuptools<82, newer torch
  does not). `sparseml.base` does `import pkg_resources` at import time and calls
  `pkg_resources.get_distribution(name).version` (e.g. `check_torch_install()` when
  `sparseml.pytorch.utils` loads). Where no real pkg_resources can be imported, a stand-in with just
  that call (on `importlib.metadata`) answers the import.

Checked on Python 3.12 / numpy 2.5 / onnx 1.23 / torch 2.11 / onnxruntime 1.32 (docs/INSTALL.md):
nothing else that whatislost reaches in SparseML 1.8 (ScheduledModifierManager, the pruning
modifiers, LoggerManager/PythonLogger, get_named_layers_and_params_by_regex, ModuleExporter with
dynamo=False) uses an API numpy 2 (np.float_, np.NaN, np.product, ...) or torch 2.11 removed, so
there is deliberately no patch for those.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

__all__ = ["ensure_compat", "build_onnx_mapping", "build_pkg_resources", "FallbackFinder"]


def ensure_compat() -> None:
    """Install every compatibility patch the running stack needs. Idempotent and cheap (no imports)."""
    _install_fallback("onnx.mapping", build_onnx_mapping)
    _install_fallback("pkg_resources", build_pkg_resources)
    _restore_onnx_mapping_now()


# ---------------------------------------------------------------- onnx.mapping (removed in onnx 1.19)
def build_onnx_mapping(onnx_module=None) -> types.ModuleType:
    """A stand-in `onnx.mapping` module with the tables onnx <= 1.18 had, built from `onnx.helper`.

    Tables: TENSOR_TYPE_TO_NP_TYPE, NP_TYPE_TO_TENSOR_TYPE, TENSOR_TYPE_TO_STORAGE_TENSOR_TYPE,
    STORAGE_TENSOR_TYPE_TO_FIELD, STORAGE_ELEMENT_TYPE_TO_FIELD, OPTIONAL_ELEMENT_TYPE_TO_FIELD and
    TENSOR_TYPE_MAP ({tensor type: (np_dtype, storage_dtype, name)}). Types the installed numpy /
    onnx cannot express are left out, as old onnx did for types it did not know.
    """
    import collections

    if onnx_module is None:
        import onnx as onnx_module
    helper = onnx_module.helper
    TensorProto = onnx_module.TensorProto

    def call(fn_name, *args):
        fn = getattr(helper, fn_name, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except Exception:  # a data type this onnx/numpy pair has no numpy equivalent for
            return None

    TensorDtypeMap = collections.namedtuple("TensorDtypeMap", ["np_dtype", "storage_dtype", "name"])
    to_np, to_storage, type_map = {}, {}, {}
    for name, value in TensorProto.DataType.items():
        value = int(value)
        if value == int(TensorProto.UNDEFINED):
            continue
        np_dtype = call("tensor_dtype_to_np_dtype", value)
        if np_dtype is None:
            continue
        storage = call("tensor_dtype_to_storage_tensor_dtype", value)
        to_np[value] = np_dtype
        if storage is not None:
            to_storage[value] = int(storage)
        type_map[value] = TensorDtypeMap(np_dtype, None if storage is None else int(storage), f"TensorProto.{name}")

    # numpy dtype -> tensor type: ask onnx which tensor type it writes a dtype as, so that
    # float32 maps to FLOAT even where another type (bfloat16 on old onnx) also decodes to float32
    np_to_tensor = {}
    for np_dtype in to_np.values():
        if np_dtype in np_to_tensor:
            continue
        tensor_type = call("np_dtype_to_tensor_dtype", np_dtype)
        if tensor_type is not None:
            np_to_tensor[np_dtype] = int(tensor_type)

    storage_field = {}
    for storage in set(to_storage.values()):
        field = call("tensor_dtype_to_field", storage)
        if field:
            storage_field[storage] = field
    for tensor_type, storage in to_storage.items():  # old onnx also listed these under their own number
        if storage in storage_field and tensor_type not in storage_field and tensor_type in (
                int(TensorProto.UINT8), int(TensorProto.UINT16), int(TensorProto.UINT32), int(TensorProto.BOOL),
                int(TensorProto.COMPLEX64), int(TensorProto.COMPLEX128)):
            storage_field[tensor_type] = storage_field[storage]

    element_field = {}
    for proto, fields in (("SequenceProto", {"TENSOR": "tensor_values", "SPARSE_TENSOR": "sparse_tensor_values",
                                              "SEQUENCE": "sequence_values", "MAP": "map_values"}),
                          ("OptionalProto", {"OPTIONAL": "optional_value"})):
        cls = getattr(onnx_module, proto, None)
        for const, field in fields.items():
            if cls is not None and hasattr(cls, const):
                element_field[int(getattr(cls, const))] = field
    optional_field = {}
    cls = getattr(onnx_module, "OptionalProto", None)
    for const, field in {"TENSOR": "tensor_value", "SPARSE_TENSOR": "sparse_tensor_value",
                         "SEQUENCE": "sequence_value", "MAP": "map_value", "OPTIONAL": "optional_value"}.items():
        if cls is not None and hasattr(cls, const):
            optional_field[int(getattr(cls, const))] = field

    module = types.ModuleType("onnx.mapping", "onnx.mapping as onnx <= 1.18 had it (restored by whatislost.compat)")
    module.TensorDtypeMap = TensorDtypeMap
    module.TENSOR_TYPE_MAP = type_map
    module.TENSOR_TYPE_TO_NP_TYPE = to_np
    module.NP_TYPE_TO_TENSOR_TYPE = np_to_tensor
    module.TENSOR_TYPE_TO_STORAGE_TENSOR_TYPE = to_storage
    module.STORAGE_TENSOR_TYPE_TO_FIELD = storage_field
    module.STORAGE_ELEMENT_TYPE_TO_FIELD = element_field
    module.OPTIONAL_ELEMENT_TYPE_TO_FIELD = optional_field
    module.__whatislost_compat__ = True
    return module


# ---------------------------------------------------------------- pkg_resources (removed in setuptools 82)
class DistributionNotFound(Exception):
    """pkg_resources.DistributionNotFound of the stand-in."""


class _Distribution:
    def __init__(self, name: str, version: str):
        self.project_name = name
        self.key = name.lower()
        self.version = version

    def __repr__(self):
        return f"{self.project_name} {self.version}"


def _get_distribution(dist) -> _Distribution:
    from importlib import metadata

    name = str(getattr(dist, "name", dist)).strip()  # a str, or a Requirement-like object with .name
    try:
        return _Distribution(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        raise DistributionNotFound(f"The '{name}' distribution was not found and is required by the application") from None


def _fixup_namespace_packages(path_item, parent=None) -> None:
    """pytest's monkeypatch.syspath_prepend calls this when pkg_resources is loaded; nothing to fix here."""


def build_pkg_resources() -> types.ModuleType:
    """A stand-in `pkg_resources` with what SparseML 1.8 calls: get_distribution(name).version."""
    module = types.ModuleType("pkg_resources", "pkg_resources stand-in (whatislost.compat): setuptools >= 82 has none")
    module.DistributionNotFound = DistributionNotFound
    module.get_distribution = _get_distribution
    module.fixup_namespace_packages = _fixup_namespace_packages
    module.__whatislost_compat__ = True

    def __getattr__(name):
        raise AttributeError(f"pkg_resources.{name}: whatislost.compat's stand-in has only get_distribution "
                             f"(install setuptools<82 for the real pkg_resources)")

    module.__getattr__ = __getattr__
    return module


# ---------------------------------------------------------------- the import hook
class _BuildLoader:  # the Loader protocol; importlib.abc is not imported (it costs ~6 ms)
    def __init__(self, build):
        self.build = build

    def create_module(self, spec):
        module = self.build()
        module.__spec__ = spec
        module.__loader__ = self
        return module

    def exec_module(self, module):
        pass  # everything is done in create_module


class FallbackFinder:  # the MetaPathFinder protocol
    """Answers `import <name>` with `build()` only after every regular finder found no such module.

    It sits at the end of sys.meta_path: where the real module exists (onnx <= 1.18's onnx/mapping.py,
    setuptools < 82's pkg_resources) it is found first and this finder is never asked. Costs nothing
    until something imports `name`; for a submodule, the parent package is imported first as usual
    (no onnx, no onnx.mapping).
    """

    def __init__(self, name: str, build):
        self.name = name
        self.build = build

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return importlib.machinery.ModuleSpec(fullname, _BuildLoader(self.build), origin="whatislost.compat")

    def __repr__(self):
        return f"<whatislost.compat.FallbackFinder {self.name}>"


def _install_fallback(name: str, build) -> None:
    if not any(isinstance(f, FallbackFinder) and f.name == name for f in sys.meta_path):
        sys.meta_path.append(FallbackFinder(name, build))


def _restore_onnx_mapping_now() -> None:
    """onnx imported before whatislost, without onnx.mapping: restore it now, so that attribute access
    `onnx.mapping.X` works too (the hook alone serves `import onnx.mapping` / `from onnx.mapping import`)."""
    onnx = sys.modules.get("onnx")
    if onnx is not None and "onnx.mapping" not in sys.modules and not hasattr(onnx, "mapping"):
        try:
            importlib.import_module("onnx.mapping")
        except ImportError:  # a stub or half-imported onnx: leave it to the import hook
            pass
