"""whatislost: what magnitude pruning does to supervised and contrastive representations.

A SparseML plugin reproducing Corti, Entezari, Hooker, Bacciu, Saukh (2022),
"Studying the impact of magnitude pruning on contrastive learning methods".
"""
import os
import warnings

# SparseML phones home on import unless told not to; set before any sparseml import.
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
# SparseML 1.8 imports pkg_resources; its deprecation notice is noise on every command
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

# Before any sparseml/sparsezoo import: put back what SparseML 1.8 needs and newer onnx and
# setuptools dropped (a no-op on the tested Python 3.11 set; see whatislost/compat.py). Cheap: no imports.
from .compat import ensure_compat  # noqa: E402

ensure_compat()

__version__ = "0.1.0"
