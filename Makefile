# Two entry points (see README): `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev,hf,deepspeed,azure
# Keep every run's state inside the checkout's ignored folders, never in the user's home.
export PREFECT_HOME ?= $(CURDIR)/.apt_home/prefect
export MPLCONFIGDIR ?= $(CURDIR)/.apt_home/matplotlib
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.apt_home/torch_extensions

.PHONY: run test lint format setup clean stack-up stack-down

$(BIN)/apt: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

setup: $(BIN)/apt

# The main job on the embedded default: no server to start by hand.
run: $(BIN)/apt
	mkdir -p "$(PREFECT_HOME)" "$(MPLCONFIGDIR)"
	$(BIN)/apt pipeline run --preset tiny --param lr=0.003 --output-root runs/default

# Two xdist workers on CI's 2 cores each start training processes (DeepSpeed and torchrun ranks among them); with
# torch's default of one intra-op thread per core they oversubscribe the cores and spin against each other. One
# thread each (tiny models lose nothing): the suite's wall time on the 2-core development machine fell by a third.
test: export OMP_NUM_THREADS ?= 1
test: $(BIN)/apt
	mkdir -p "$(PREFECT_HOME)" "$(MPLCONFIGDIR)" "$(TORCH_EXTENSIONS_DIR)"
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

lint: $(BIN)/apt
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(BIN)/apt
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

stack-up: $(BIN)/apt
	$(BIN)/python -m deployments.local_stack up

stack-down: $(BIN)/apt
	$(BIN)/python -m deployments.local_stack down

clean:
	rm -rf $(VENV) .apt_home runs .pytest_cache .ruff_cache
