# Everything a fresh machine (Python 3.10+, pip, a C compiler) needs. The first install builds
# llama-cpp-python from source (~15 min on 2 cores); pip's wheel cache makes later ones fast.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Main job: chat in the terminal with the embedded demo MoE model, live expert-cache statistics beside it.
run: setup
	$(VENV)/bin/edgemoe chat

# The whole test suite (slow tests included); exits non-zero if no test ran.
test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
