# Everything a fresh machine (Python 3.10+, pip, a C compiler) needs. The first install builds
# llama-cpp-python from source (~15 min on 2 cores); pip's wheel cache makes later ones fast.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, on its own, so its build can be chosen. With TORCH_INDEX unset it comes
# from pip's configured index: on Linux, PyPI's torch wheel is the CUDA build (several GB of nvidia-*
# packages; it runs on CPU too). `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`
# installs the CPU build instead; macOS and Windows wheels on PyPI are CPU builds already.
TORCH_INDEX ?=
TORCH := $(shell grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')

.PHONY: setup run test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
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
