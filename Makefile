# One command each: `make demo` runs the main job on built-in demo checkpoints, `make test` runs the tests.
# Both create the virtual environment on first use (torch==2.13.0 first, then the package and its extras).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: venv demo test bench bench-speed bench-quality bench-collection bench-load clean

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
