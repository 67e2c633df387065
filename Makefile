# Two commands from a fresh clone (see README):  make demo   |   make test
# Each creates .venv when missing and installs the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sceneparse-installed

.PHONY: setup demo test test-fast clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# CSAIL's own implementation, used only by tests as the independent reference for checkpoint
	@# conversion. --no-deps: its model code needs nothing but torch (its other deps are for its scripts).
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps mit-semseg==1.0.0
	@touch $(STAMP)

setup: $(STAMP)

# The main job on a built-in default: synthetic scenes -> train -> evaluate -> predictions.
demo: setup
	$(BIN)/sceneparse quickstart --output quickstart_output

# The whole test suite (CPU only, < 10 minutes on 2 cores). One torch thread per xdist worker.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) quickstart_output .pytest_cache
