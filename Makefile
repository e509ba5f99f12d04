# kvjax: `make demo` sets up and runs the default job; `make test` sets up and runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= torch,test

.PHONY: setup demo test plan train-tiny clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "error: kvjax needs Python 3.11 (found " + sys.version.split()[0] + "); set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	@echo "installing kvjax[$(EXTRAS)] and its dependencies into $(VENV) (2-3 min, quiet) ..."
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m kvjax.launch --method=softprune_int4

test: setup
	$(PY) -m pytest -q -n 2

# Retrains the world model shipped in kvjax/world/weights (about 15 min on 2 CPU cores).
train-tiny: setup
	$(PY) -m launch.train_tiny --export=kvjax/world/weights

plan: setup
	$(PY) -m kvjax.launch --config=configs/self_forcing.py:wan2.1_t2v_1.3b --method=bf16 --plan

clean:
	rm -rf $(VENV) runs .pytest_cache
