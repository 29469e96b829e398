# Two commands: `make bench` (the main job) and `make test`. Each installs what is missing first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# A CPU build of torch when none is installed. Override, e.g.
#   make test TORCH_SPEC=torch TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: install test bench gpu-check clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || \
		$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	@# Triton only when no Triton is importable: ROCm torch brings pytorch-triton-rocm, which a
	@# plain `triton` requirement would overwrite with a CUDA build.
	@$(PYTHON) -c "import triton" 2>/dev/null && extras="dev,pipeline,train" || extras="triton,dev,pipeline,train"; \
		$(PYTHON) -c "import nitro_ar.kernels, pytest, hypothesis, pytest_benchmark, diffusers, accelerate, yaml" 2>/dev/null || \
		$(PIP) install -q -e ".[$$extras]"

test: install
	TRITON_INTERPRET=1 $(PYTHON) -m pytest tests $(PYTEST_ARGS)

bench: install
	$(PYTHON) -m pytest bench --benchmark-only $(PYTEST_ARGS)

# On a CUDA or ROCm machine: compiled kernels (bf16/fp16/fp32 parity), the benchmarks
# (bench/results/<device>.json + .png) and an autotune pass persisted to the tuning cache.
gpu-check: install
	TRITON_INTERPRET=0 $(PYTHON) -m pytest tests $(PYTEST_ARGS)
	$(PYTHON) -m pytest bench --benchmark-only $(PYTEST_ARGS)
	$(PYTHON) -m nitro_ar.cli autotune --shapes all

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks .hypothesis
