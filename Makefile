# Main commands: `make bench` (the main job), `make test`, `make lint`. Each installs what is missing first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is installed only when none is importable, with the torchvision built for it (the
# `train` extra's mosaicml-streaming imports torchvision, and a torchvision of another torch
# build fails to import), from PyPI by default: there, Linux x86-64 wheels are CUDA builds
# (large; they run on CPU); `make test TORCH_CPU=1` takes the CPU builds from PyTorch's CPU
# index instead. Any other build:
#   make test TORCH_SPEC="torch torchvision" TORCH_INDEX=https://download.pytorch.org/whl/rocm6.4
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_CPU ?=
TORCH_INDEX ?= $(if $(TORCH_CPU),https://download.pytorch.org/whl/cpu,)
PYTEST_ARGS ?=
# `make bench` writes to the untracked bench/out/; `make bench UPDATE_RESULTS=1` updates the
# committed bench/results/ (as `make gpu-check` does).
UPDATE_RESULTS ?=
BENCH_OUT = $(if $(UPDATE_RESULTS),bench/results,bench/out)

.PHONY: install lint test bench gpu-check clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || \
		$(PIP) install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	@# Triton only when no Triton is importable: ROCm torch brings pytorch-triton-rocm, which a
	@# plain `triton` requirement would overwrite with a CUDA build. The extras install under a
	@# constraint pinning the torch already there: a dependency (e.g. torchvision, pulled in by
	@# mosaicml-streaming) must never replace it with another build.
	@$(PYTHON) -c "import triton" 2>/dev/null && extras="dev,pipeline,train" || extras="triton,dev,pipeline,train"; \
		$(PYTHON) -c "import nitro_ar.kernels, pytest, hypothesis, pytest_benchmark, diffusers, accelerate, yaml, streaming, huggingface_hub, ruff" 2>/dev/null || \
		{ $(PYTHON) -c "from importlib.metadata import version; print('torch==' + version('torch'))" > .torch-pin.txt && \
		  $(PIP) install -q -c .torch-pin.txt -e ".[$$extras]"; status=$$?; rm -f .torch-pin.txt; exit $$status; }
	@# PyPI's torchvision is built for PyPI's torch: beside another build (e.g. a +cpu torch) it
	@# fails to import, and so does mosaicml-streaming. Say so, rather than fail in the tests.
	@$(PYTHON) -c "import torchvision" 2>/dev/null || { echo "make install: torchvision does not import beside \
	this torch build; install the torchvision made for it (e.g. pip install torchvision --index-url \
	https://download.pytorch.org/whl/cpu for a +cpu torch), or start without torch (default: $(TORCH_SPEC))" >&2; exit 1; }

lint: install
	$(PYTHON) -m ruff check .

test: install
	TRITON_INTERPRET=1 $(PYTHON) -m pytest tests $(PYTEST_ARGS)

bench: install
	NITRO_AR_BENCH_RESULTS=$(BENCH_OUT) $(PYTHON) -m pytest bench --benchmark-only $(PYTEST_ARGS)

# On a CUDA or ROCm machine: compiled kernels (bf16/fp16/fp32 parity), the benchmarks
# (bench/results/<device>.json + .png, to commit) and an autotune pass persisted to the tuning cache.
gpu-check: install
	TRITON_INTERPRET=0 $(PYTHON) -m pytest tests $(PYTEST_ARGS)
	NITRO_AR_BENCH_RESULTS=bench/results $(PYTHON) -m pytest bench --benchmark-only $(PYTEST_ARGS)
	$(PYTHON) -m nitro_ar.cli autotune --shapes all

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks .hypothesis bench/out
