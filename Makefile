# Set-up and everyday commands. Every target creates .venv on first use and
# installs through constraints.txt, which pins the CPU build of torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed-$(shell cat setup.cfg constraints.txt | cksum | cut -d' ' -f1)
DEMO_OUT ?= runs/demo
# pytest-xdist workers for `make test`: one per core (the suite is CPU-bound, one torch
# thread per test); TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= auto

.PHONY: install demo test test-random test-fast lint docs bench clean

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel -c constraints.txt
	$(PIP) install --quiet -c constraints.txt torch
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pyro_genext.demo --out $(DEMO_OUT)

# CI's order: pytest-randomly (a dev dependency) is off; `make test-random` turns it on,
# shuffling the order (it prints the seed; `--randomly-seed=N` repeats an order)
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:randomly -n $(TEST_WORKERS)

test-random: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:randomly -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check pyro_genext tests tutorials benchmarks
	$(BIN)/mypy pyro_genext

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

bench: $(STAMP)
	$(PIP) install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) docs/_build build *.egg-info
