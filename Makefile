# Two commands do everything on a fresh machine (each installs what it needs, safe to rerun):
#   make bench   the main job: verify against PyTorch, then time one or two cases of every op
#                family (lookup and its gradients, bags, the fused optimizer step, the
#                tensor-parallel step) against PyTorch and FBGEMM's CPU kernels; one summary
#                table and a plot in bench/out/. Builds the CPU kernels only where no GPU is
#                visible (the CUDA kernels are compiled by `make test` and CI).
#   make test    the test suite (builds the CUDA kernels too wherever torch is a CUDA build
#                and nvcc exists; installs TorchRec and FBGEMM's CPU kernels for the tests that
#                compare the many-table collection with TorchRec's)
# Extra:
#   make bench-full       the full sweeps: presets quick and bag at 1 and 2 threads, every
#                         fused rule and shape, both tensor-parallel plans, the many-table
#                         collection's cases (about 20 minutes)
#   make bench-results    the main job and the full sweeps, written to the committed
#                         bench/results/
#   make test-cpu-torch   build and test against the CPU-only torch==2.13.0 (CI runs it)
#   make test-gpu-torch   build (CUDA kernels included) and test against torch==2.11.0, the
#                         version the GPU machines run (CI runs it)
#   make gpu-dry-run      bench/gpu_suite.sh --dry-run: the GPU check's steps, without a GPU
#   make wheel            a binary wheel in dist/ (pip wheel --no-build-isolation): requires
#                         exactly this venv's torch; CUDA kernels for A100, H100/H200 + PTX
#   make package-check    the wheel installed into a fresh venv and self-checked there, pip's
#                         refusal next to another torch, plain `pip install .` stopping (CI)
#   make build            (re)build the extension in place
SHELL := /bin/bash
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?= --preset quick,bag
# No GPU visible: in-place builds compile the CUDA kernels for the H100/H200 only (the GPU
# machines build their own; wheels take WHEEL_CUDA_ARCH), and the main job skips them.
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAVE_GPU),)
export TORCH_CUDA_ARCH_LIST ?= 9.0
BENCH_BUILD := build-cpu
else
BENCH_BUILD := build
endif
# FBGEMM's CPU table-batched kernels, the bag preset's third column: installed for the
# benchmark only (it pins no torch and is built against torch 2.14; the bench skips the
# column where it does not import).
FBGEMM_SPEC ?= fbgemm-gpu-cpu==1.9.0
export MAX_JOBS ?= 2

.PHONY: all setup build build-cpu test bench bench-full bench-results test-cpu-torch test-gpu-torch gpu-dry-run wheel package-check clean

all: test

$(VENV)/.installed: requirements-dev.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

# An in-place build (ninja recompiles only what changed; one build folder per venv, so the
# in-place _C module always matches $(VENV)'s torch), and a .pth that puts this checkout on
# the venv's path.
BUILD_IN_PLACE = $(PY) setup.py -q build_ext --inplace --build-temp build/$(notdir $(VENV)) \
	&& echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/embedding_ext_checkout.pth" \
	&& $(PY) -c "import embedding_ext as ee; print('embedding_ext build:', ee.build_info())"

build: setup
	$(BUILD_IN_PLACE)

# The CPU kernels only (embedding_ext._C); a later `make build` compiles just the CUDA files.
build-cpu: setup
	EMBEDDING_EXT_FORCE_CPU=1 $(BUILD_IN_PLACE)

# TorchRec, for the tests that run the collection next to TorchRec's (installed without its
# dependencies, which name the GPU FBGEMM wheel: the CPU one above stands in). In the default
# venv only: both are built against its torch; elsewhere those tests skip.
TORCHREC_SPEC ?= torchrec==1.9.2
$(VENV)/.torchrec: $(VENV)/.fbgemm
	$(PY) -m pip install -q --no-deps "$(TORCHREC_SPEC)" && $(PY) -m pip install -q tensordict "torchmetrics==1.0.3" pyre-extensions "$(TORCH_SPEC)" || echo "$(TORCHREC_SPEC) not installed: the TorchRec comparison tests skip"
	touch $@
ifeq ($(VENV),.venv)
TEST_PEERS := $(VENV)/.torchrec
endif

test: build $(TEST_PEERS)
	$(PY) -m pytest $(PYTEST_ARGS)

$(VENV)/.fbgemm: $(VENV)/.installed
	$(PY) -m pip install -q "$(FBGEMM_SPEC)" || echo "$(FBGEMM_SPEC) not installed: the bag preset runs without its FBGEMM column"
	touch $@

bench: $(BENCH_BUILD) $(VENV)/.fbgemm
	$(PY) -m bench.main

bench-full: build $(VENV)/.fbgemm
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) -m bench.fused_step --threads 1 --rounds 5
	$(PY) -m bench.sharded --world 2
	$(PY) -m bench.collection --threads 1

bench-results: build $(VENV)/.fbgemm
	$(PY) -m bench.main --out bench/results
	$(PY) -m bench.run $(BENCH_ARGS) --out bench/results
	$(PY) -m bench.fused_step --threads 1 --rounds 5 --out bench/results
	$(PY) -m bench.sharded --world 2 --out bench/results
	$(PY) -m bench.collection --threads 1 --json bench/results/collection-cpu.json

test-cpu-torch:
	$(MAKE) test VENV=.venv-cpu TORCH_SPEC=torch==2.13.0 PYTEST_ARGS="$(PYTEST_ARGS)"

test-gpu-torch:
	$(MAKE) test VENV=.venv-gpu TORCH_SPEC=torch==2.11.0 PYTEST_ARGS="$(PYTEST_ARGS)"

gpu-dry-run: build
	PYTHON=$(PY) bash bench/gpu_suite.sh --dry-run bench/out/gpu-dry-run

WHEEL_DIR ?= dist
WHEEL_CUDA_ARCH ?= 8.0;9.0+PTX
wheel: setup
	rm -f $(WHEEL_DIR)/embedding_ext-*.whl
	TORCH_CUDA_ARCH_LIST="$(WHEEL_CUDA_ARCH)" EMBEDDING_EXT_BUILD_TEMP=build/$(notdir $(VENV)) \
		$(PY) -m pip wheel -q --no-build-isolation --no-deps -w $(WHEEL_DIR) .
	ls $(WHEEL_DIR)/embedding_ext-*.whl

package-check:
	$(MAKE) setup VENV=.venv-cpu TORCH_SPEC=torch==2.13.0
	bash .ci/check_packaging.sh

clean:
	rm -rf build dist embedding_ext/*.so
