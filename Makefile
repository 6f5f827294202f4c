# Everything a fresh machine (Python 3.10+, pip, a C compiler) needs. The first install builds
# llama-cpp-python from source (~15 min on 2 cores) into a wheel kept under ~/.cache/edgemoe-wheels,
# so later installs take seconds.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, on its own, so its build can be chosen. With TORCH_INDEX unset it comes
# from pip's configured index: on Linux, PyPI's torch wheel is the CUDA build (several GB of nvidia-*
# packages; it runs on CPU too). `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`
# installs the CPU build instead; macOS and Windows wheels on PyPI are CPU builds already.
TORCH_INDEX ?=
TORCH := $(shell grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
LLAMA := $(shell grep -o '"llama-cpp-python==[^"]*"' pyproject.toml | tr -d '"')
# llama.cpp builds for the build machine's CPU (-march=native). On x86-64 that includes Intel AMX
# where the CPU reports it, and on this project's Xeon VMs the AMX kernels crash (SIGSEGV at
# ldtilecfg in ggml_backend_amx_mul_mat on the first q8_0 matmul), taking every default llama.cpp
# run with them. Laptops have no AMX, so the build leaves it out everywhere; LLAMA_CFLAGS= (empty)
# builds it in. The flags name the wheel's folder: pip's own wheel cache does not key on them.
ifeq ($(shell uname -m),x86_64)
LLAMA_CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
# outside EDGEMOE_CACHE (CI points that into its clone): one build serves every checkout
WHEEL_DIR ?= $(HOME)/.cache/edgemoe-wheels
LLAMA_WHEELS := $(WHEEL_DIR)/$(subst ==,-,$(LLAMA))$(if $(strip $(LLAMA_CFLAGS)),-$(shell echo '$(LLAMA_CFLAGS)' | cksum | cut -d' ' -f1))

.PHONY: setup run test clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@# the wheel is built into a temporary folder and renamed when complete: an interrupted build leaves nothing
	ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1 || { rm -rf $(LLAMA_WHEELS) $(LLAMA_WHEELS).part && \
	  CFLAGS='$(LLAMA_CFLAGS)' CXXFLAGS='$(LLAMA_CFLAGS)' $(PY) -m pip wheel --no-deps --no-cache-dir \
	    -w $(LLAMA_WHEELS).part '$(LLAMA)' && mv $(LLAMA_WHEELS).part $(LLAMA_WHEELS); }
	$(PY) -m pip install --force-reinstall --no-deps $(LLAMA_WHEELS)/*.whl
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
