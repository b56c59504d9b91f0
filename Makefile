# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export NM_DISABLE_ANALYTICS := 1

.PHONY: install demo test bench clean install-py312 test-py312 reduced-gpu reduced-cpu

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt "setuptools<81" wheel
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/whatislost-study examples/quickstart.yaml --out runs/quickstart
	@echo "report: $(CURDIR)/runs/quickstart/eval/report/index.html"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_train.py

# The paper's findings on real CIFAR-10 (../shared/data/cifar10-jpeg.tar.gz), docs/RESULTS.md
REDUCED_CPU := train.train_per_class=300 train.test_per_class=200 train.bf16=false losses.supcon.batch_size=256 \
	losses.supcon.epochs=10 losses.supcon.linear_epochs=5 eval.device=cpu

reduced-gpu: $(STAMP)
	$(BIN)/whatislost-study examples/cifar10_reduced.yaml --out runs/cifar10_reduced

reduced-cpu: $(STAMP)
	$(BIN)/whatislost-study examples/cifar10_reduced.yaml --out runs/cifar10_reduced_cpu --workers 2 $(REDUCED_CPU)

clean:
	rm -rf $(VENV) runs sparse_logs .pytest_cache

# Python 3.12 beside a preinstalled torch / numpy 2 / onnx >= 1.19 (CUDA images); docs/INSTALL.md.
# A venv that sees the system's packages, so torch is used from there, never replaced.
# Offline from a wheel folder: make install-py312 WHEELS=.gpu/wheels
PY312 ?= python3.12
VENV312 ?= .venv312
WHEELS ?=

install-py312:
	test -x $(VENV312)/bin/python || $(PY312) -m venv --system-site-packages $(VENV312) \
		|| $(PY312) -m venv --system-site-packages --without-pip $(VENV312)
	PYTHON=$(VENV312)/bin/python PIP_PYTHON=$(PY312) WHEELS="$(WHEELS)" bash scripts/install_py312.sh

test-py312:
	$(VENV312)/bin/python -m pytest -q
