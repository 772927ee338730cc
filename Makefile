# Two commands: `make demo` and `make test`. Both create .venv when missing and
# install the project (CPU torch pinned for dev/CI, see requirements-dev.txt).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rectrain-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -c constraints-dev.txt -e .
	touch $(STAMP)

demo: setup
	$(PY) -m rectrain model

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
