# One command each: `make demo` runs the main job on built-in demo checkpoints, `make test` runs the tests.
# Both create the virtual environment on first use (torch==2.13.0 first, then the package and its extras).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: venv demo test fuzz bench bench-speed bench-quality bench-collection bench-load clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mergekit_lite.demo build $(DEMO)
	$(BIN)/mergekit-lite run recipes/task_arithmetic.yml $(DEMO)/merged --force
	$(BIN)/python -m mergekit_lite.demo load $(DEMO)/merged

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Seeded robustness fuzzer (tests/robustness/fuzz.py): a few minutes; prints a table per input kind, fails on any FAILED.
fuzz: $(STAMP)
	$(BIN)/python tests/robustness/fuzz.py --seed 0 --examples 1500

bench: bench-speed bench-quality bench-collection bench-load

bench-speed: $(STAMP)
	$(BIN)/python benchmarks/bench_speed.py

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality/run.py

bench-collection: $(STAMP)
	$(BIN)/python benchmarks/bench_collection.py

bench-load: $(STAMP)
	$(BIN)/python benchmarks/bench_load.py

clean:
	rm -rf $(DEMO) .pytest_cache build *.egg-info
