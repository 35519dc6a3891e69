# negalign — set-up, tests and the demo. Every target sets itself up on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.negalign-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=
# make test runs the suite on every core (pytest-xdist, --dist loadfile: a test file stays on one worker, so its module fixtures are built once; --no-loadscope-reorder: files in the order tests/conftest.py gives, the long real runs first): TEST_JOBS=0 runs it in one process
TEST_JOBS ?= logical
# make test-ci: one worker more than cores by default; its tests wait on processes, SLURM and a browser much of the time (3 workers: 2 min 40 s against 3 min 13 s with 2, on 2 cores)
CI_TEST_JOBS ?= 3
# the marker expression of make test; CI runs both sets in one session (`make test TEST_MARKS= TEST_JOBS=3`):
# the short tests fill the time the long real runs spend waiting (7 min 02 s against 7 min 48 s for the two sets one after the other, on 2 cores)
TEST_MARKS ?= not ci

.PHONY: install test test-ci test-fast lint format demo clean help

help:
	@echo "make demo      set up and run the pipeline on the bundled tiny model (writes $(DEMO_OUT)/)"
	@echo "make test      set up and run the test suite (slow end-to-end tests included, not those marked ci)"
	@echo "make test-ci   only the long real runs marked ci (example scripts, SLURM launches); CI runs every test: make test TEST_MARKS= TEST_JOBS=3"
	@echo "make test-fast the tests without the slow end-to-end ones"
	@echo "make lint      ruff (check + format) and mypy (strict on negalign_cli/compute)"
	@echo "make install   create $(VENV) with torch pinned and negalign in editable mode"
	@echo "make waterbirds WATERBIRDS=DIR PLACESBG=DIR   the WaterBirds experiment (pipelines.mk)"
	@echo "make imagenet IMAGENET=DIR OOD=\"name=DIR ...\"  ImageNet-1K against OOD sets (make pipelines-help)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@bash scripts/install.sh $(BIN) "$(TORCH_PINS)"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder -m "$(TEST_MARKS)" $(PYTEST_ARGS)

test-ci: $(STAMP)
	$(BIN)/python -m pytest -q -n $(CI_TEST_JOBS) --dist loadfile --no-loadscope-reorder -m ci $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder -m "not slow and not ci" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: $(STAMP)
	@bash scripts/demo.sh "$(BIN)/negalign" "$(DEMO_OUT)"

clean:
	rm -rf $(DEMO_OUT) .negalign-cache .pytest_cache .ruff_cache

# The method's experiments as Make pipelines: make waterbirds, make imagenet (see pipelines.mk).
include pipelines.mk
