# Two commands set up a fresh machine (only Python 3.11 and pip needed):
#   make demo   installs .venv/ from requirements.lock and runs histo on the generated sample slide
#   make test   installs the same and runs the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLE := sample_data/lymph-node-sample.ome.tif

.PHONY: install demo test lint lock clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml plugins/pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "histo needs Python 3.11, this is " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.13.9
	$(BIN)/uv pip sync --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e . -e plugins
	touch $@

$(SAMPLE): | $(VENV)/.installed
	$(BIN)/histo sample lymph-node $@ --size 4096 --seed 1

demo: install $(SAMPLE)
	$(BIN)/histo run $(SAMPLE) --workflow lymph-node-he --out out
	@echo "bundle: out/lymph-node-sample/ (cells.parquet, labels.ome.zarr, run.json)"

# napari tests run in a process of their own: TensorFlow (loaded by the model tests) and a napari
# viewer in one process segfault (STACK.md). Without Xvfb or a display they skip (tests/conftest.py);
# exit code 5 (no test collected) is not a failure.
test: install
	$(BIN)/python -m pytest -q -ra -m "not gui"
	$(BIN)/python -m pytest -q -ra -m gui || [ $$? -eq 5 ]

# Style: ruff's formatter and linter (settings in pyproject.toml; the same hooks in .pre-commit-config.yaml).
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# Re-resolve the lock after editing requirements.in.
lock:
	$(BIN)/uv pip compile requirements.in --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) out
