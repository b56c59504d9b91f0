#!/usr/bin/env bash
# Install whatislost on Python 3.12 (e.g. a CUDA image) beside the torch / numpy / onnx it already has.
#
#   scripts/install_py312.sh                      # into the environment of $PYTHON (default: python3)
#   PYTHON=.venv312/bin/python scripts/install_py312.sh
#   WHEELS=.gpu/device-kit/wheels scripts/install_py312.sh   # offline: --no-index --find-links WHEELS
#
# What it does (docs/INSTALL.md has the why):
#   1. the dependencies, named explicitly: whatislost's own (read from setup.cfg) plus SparseML's and
#      SparseZoo's runtime dependencies (below), resolved by pip with every distribution already
#      installed pinned to its installed version, so nothing there (torch above all) is replaced;
#   2. sparseml==1.8.0 and sparsezoo==1.8.1 with --no-deps --ignore-requires-python (SparseML 1.8
#      declares Python <3.12, and both declare numpy<2 / onnx<1.15, which whatislost.compat makes
#      unnecessary);
#   3. whatislost itself, editable, --no-deps (console scripts included);
#   4. a check: the compat-patched import chain loads.
#
# Environment:
#   PYTHON    interpreter whose environment receives the packages (default python3)
#   PIP_PYTHON  interpreter whose pip installs into PYTHON's environment when that has no pip
#   WHEELS    folder of wheels: install offline from it (no index at all)
#   OPTIONAL  packages tried one by one and skipped with a warning when they cannot be had
#             (default: "onnxruntime pytest"; onnxruntime is needed only by `whatislost-export`'s
#             parity check, pytest only by the tests)
#   PIP_ARGS  extra arguments for every pip install (e.g. --user)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac  # the check runs elsewhere
OPTIONAL="${OPTIONAL-onnxruntime pytest}"
export NM_DISABLE_ANALYTICS=1 PIP_DISABLE_PIP_VERSION_CHECK=1

SPARSEML="sparseml==1.8.0"
SPARSEZOO="sparsezoo==1.8.1"
# Runtime Requires-Dist of sparseml 1.8.0 and sparsezoo 1.8.1 (their extras are not used by whatislost)
# and those of their small pure-Python dependencies, minus three caps that do not hold on this path:
# numpy<2 and onnx<1.15 (whatislost.compat restores what they miss) and protobuf<=3.20.3 (newer
# onnx needs a newer protobuf; SparseML uses protobuf only through onnx).
SPARSE_DEPS=(
    "numpy>=1.17" "onnx>=1.5" "protobuf>=3.12.2"
    "pyyaml>=5.1" "matplotlib>=3.0" "pandas>1.3" "packaging>=20.0" "psutil>=5.0" "requests>=2.0"
    "scikit-learn>=0.24.2" "scipy>=1.0" "tqdm>=4.0" "click>=7.1.2,!=8.0.0"
    "pydantic>=2.0,<2.8"        # sparseml caps pydantic below 2.8; 2.7.4 (+ pydantic-core 2.18.4) has cp312 wheels
    "merge-args>=0.1.0" "toposort>=1.0" "GPUtil>=1.4.0"      # sparseml
    "py-machineid>=0.3.0" "geocoder>=1.38.0"                  # sparsezoo
    "future" "ratelim" "decorator" "six"                      # geocoder, ratelim
)

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "install_py312: $PYTHON is not a Python >= 3.10 interpreter" >&2
    exit 1
fi
# pip of the target environment, or (a venv made --without-pip where ensurepip is missing) the pip
# of PIP_PYTHON pointed at it (pip >= 22.3)
if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    PIP=("$PYTHON" -m pip)
else
    PIP=("${PIP_PYTHON:-python3}" -m pip --python "$PYTHON")
fi
PIP_INSTALL=("${PIP[@]}" install --disable-pip-version-check)
if [ -n "${WHEELS:-}" ]; then
    [ -d "$WHEELS" ] || { echo "install_py312: WHEELS=$WHEELS is not a folder" >&2; exit 1; }
    PIP_INSTALL+=(--no-index --find-links "$WHEELS")
fi
# shellcheck disable=SC2206
PIP_INSTALL+=(${PIP_ARGS:-})

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# whatislost's own requirements, as setup.cfg declares them, less sparseml/sparsezoo (step 2)
"$PYTHON" - "$work/requirements.txt" <<'PY'
import configparser, re, sys
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines()]
reqs = [r for r in reqs if r and not r.startswith("#") and re.split(r"[\s<>=!~;\[]", r)[0].lower() not in ("sparseml", "sparsezoo")]
open(sys.argv[1], "w").write("\n".join(reqs) + "\n")
PY
printf '%s\n' "${SPARSE_DEPS[@]}" >> "$work/requirements.txt"

# every installed distribution pinned to its installed version: pip may add, never replace
"$PYTHON" - "$work/installed.txt" <<'PY'
import re, sys
from importlib import metadata
try:
    from packaging.version import Version, InvalidVersion
except ImportError:
    from pip._vendor.packaging.version import Version, InvalidVersion
pins = {}
for dist in metadata.distributions():
    name, version = dist.metadata["Name"], dist.version
    if not name or not version:
        continue
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in ("whatislost", "sparseml", "sparsezoo", "pip"):
        continue
    try:
        Version(version)
    except InvalidVersion:
        continue
    pins.setdefault(key, f"{key}=={version}")  # the first on sys.path is the one that imports
open(sys.argv[1], "w").write("\n".join(sorted(pins.values())) + "\n")
PY

echo "install_py312: python $("$PYTHON" -c 'import platform; print(platform.python_version())'), keeping:" \
     "$(grep -iE '^(torch|torchvision|numpy|onnx)==' "$work/installed.txt" | tr '\n' ' ')"
if ! grep -q '^torch==' "$work/installed.txt"; then
    echo "install_py312: no torch in $PYTHON's environment: one is installed from the index / wheel folder" \
         "(to use an existing torch, point PYTHON at the environment that has it)" >&2
fi

echo "install_py312: 1/3 dependencies"
"${PIP_INSTALL[@]}" -c "$work/installed.txt" -r "$work/requirements.txt"
for pkg in $OPTIONAL; do
    "${PIP_INSTALL[@]}" -c "$work/installed.txt" "$pkg" \
        || echo "install_py312: optional $pkg not installed (not in the index / wheel folder, or it conflicts)" >&2
done

echo "install_py312: 2/3 $SPARSEML $SPARSEZOO (--no-deps --ignore-requires-python)"
"${PIP_INSTALL[@]}" --no-deps --ignore-requires-python "$SPARSEML" "$SPARSEZOO"

echo "install_py312: 3/3 whatislost (editable, --no-deps)"
# no build isolation: offline there is no index to fetch setuptools from; the environment's is used
"${PIP_INSTALL[@]}" --no-deps --no-build-isolation -e .

cd "$work"  # the installed whatislost, not the checkout by accident
"$PYTHON" - <<'PY'
from importlib.metadata import version
import whatislost, torch, numpy, onnx
from sparseml.pytorch.optim import ScheduledModifierManager  # noqa: F401
from sparseml.pytorch.utils import LoggerManager, ModuleExporter  # noqa: F401
print(f"install_py312: ok: whatislost {whatislost.__version__}, sparseml {version('sparseml')}, "
      f"sparsezoo {version('sparsezoo')}, torch {torch.__version__}, numpy {numpy.__version__}, onnx {onnx.__version__}")
PY
