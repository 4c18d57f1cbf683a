# Two commands that work on a fresh machine (each sets itself up):
#   make demo   -- create .venv, install props-ray with the tested pins, run jobs/demo.yaml
#   make test   -- create .venv, install props-ray with the tested pins, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test ui clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/props-ray run jobs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

ui: $(STAMP)
	$(BIN)/props-ray ui

clean:
	rm -rf $(VENV) runs mlflow.db
