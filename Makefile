# One command each: `make demo` runs the main job on built-in demo checkpoints, `make test` runs the tests.
# Both create the virtual environment on first use (torch==2.13.0 first, then the package and its extras; a C compiler,
# where there is one, builds the native kernel mergekit_lite/native/fused.c: without one everything runs on torch).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo
# mergekit 0.1.5 (LGPL-3.0) in a venv of its own: tests/compat only *runs* it, to compare outputs.
MK_VENV  ?= .venv-mergekit
MK_STAMP := $(MK_VENV)/.installed

.PHONY: venv mergekit-venv demo test compat-report fuzz bench bench-speed bench-memory bench-quality bench-quality-text bench-collection bench-load bench-ray clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py mergekit_lite/native/fused.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build. If pip cannot install
# (offline), $(MK_VENV)/.unavailable says so and tests/compat skip with that reason; to retry,
# delete $(MK_VENV).
mergekit-venv: $(MK_STAMP)

$(MK_STAMP):
	@rm -f $(MK_VENV)/.unavailable
	@if $(PYTHON) -m venv $(MK_VENV) \
	    && $(MK_VENV)/bin/pip install --quiet torch==2.13.0 \
	    && $(MK_VENV)/bin/pip install --quiet mergekit==0.1.5; then \
	  touch $(MK_STAMP); \
	else \
	  mkdir -p $(MK_VENV); \
	  echo "pip could not install torch==2.13.0 and mergekit==0.1.5 (offline?)" > $(MK_VENV)/.unavailable; \
	  touch $(MK_STAMP); \
	  echo "warning: no mergekit venv; tests/compat will be skipped (delete $(MK_VENV) to retry)" >&2; \
	fi

demo: $(STAMP)
	$(BIN)/python -m mergekit_lite.demo build $(DEMO)
	$(BIN)/mergekit-lite run recipes/task_arithmetic.yml $(DEMO)/merged --force
	$(BIN)/python -m mergekit_lite.demo load $(DEMO)/merged

test: $(STAMP) $(MK_STAMP)
	$(BIN)/python -m pytest -q tests

# mergekit vs mergekit-lite on the published configs of tests/compat/configs, as a markdown table.
compat-report: $(STAMP) $(MK_STAMP)
	$(BIN)/python tests/compat/corpus_report.py

# Seeded robustness fuzzer (tests/robustness/fuzz.py): a few minutes; prints a table per input kind, fails on any FAILED.
fuzz: $(STAMP)
	$(BIN)/python tests/robustness/fuzz.py --seed 0 --examples 1500

bench: bench-speed bench-memory bench-quality bench-quality-text bench-collection bench-load bench-ray

bench-speed: $(STAMP)
	$(BIN)/python benchmarks/bench_speed.py

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality/run.py

# merge quality on all-MiniLM-L6-v2 (8 generated text tasks), then the compression frontier (add --write to record)
bench-quality-text: $(STAMP)
	$(BIN)/python benchmarks/quality_text/run.py
	$(BIN)/python benchmarks/quality_text/frontier.py

bench-collection: $(STAMP)
	$(BIN)/python benchmarks/bench_collection.py

bench-load: $(STAMP)
	$(BIN)/python benchmarks/bench_load.py

# The Ray executor on 1 and 2 local workers, and its scale on paper (benchmarks/bench_ray.py).
bench-ray: $(STAMP)
	$(BIN)/python benchmarks/bench_ray.py

# Each method's declared working copies of the largest tensor against its measured peak RSS (exit 1 if it holds more).
bench-memory: $(STAMP)
	$(BIN)/python benchmarks/bench_memory.py

clean:
	rm -rf $(DEMO) .pytest_cache build *.egg-info
