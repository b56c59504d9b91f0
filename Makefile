# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export NM_DISABLE_ANALYTICS := 1

.PHONY: install demo test bench clean

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

clean:
	rm -rf $(VENV) runs sparse_logs .pytest_cache
