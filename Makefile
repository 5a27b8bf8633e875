# Two commands on a fresh machine: `make demo` (install, then train on the embedded digits task) and
# `make test` (install, then run the test suite). Both create .venv and install torch 2.13.0 first, so that no
# other package pulls a newer torch. This takes the CPU wheel where one lies on the machine (as here); on other
# Linux machines PyPI's torch 2.13.0 is the CUDA build: `make TORCH_INDEX=https://download.pytorch.org/whl/cpu`
# takes the CPU build from PyTorch's own index instead.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One torch thread per process: on a 2-core machine with other work running, torch's default (a thread per core)
# made a training step 23x slower (README, "Threads"). `make demo THREADS=0` restores torch's default.
THREADS ?= 1
ifneq ($(THREADS),0)
export OMP_NUM_THREADS := $(THREADS)
endif

.PHONY: install demo test clean

$(BIN)/flowgrove: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev]"
	# Reference code for the reward parity tests; --no-deps: their torchvision/timm pins would break transformers.
	$(BIN)/pip install -q --no-deps open_clip_torch==3.3.0 image-reward==1.5
	touch $@

install: $(BIN)/flowgrove

demo: install
	$(BIN)/flowgrove train run.threads=$(THREADS)
	@echo "flowgrove is installed in $(VENV): run it as $(BIN)/flowgrove (or: . $(BIN)/activate)"

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
