# Two entry points, each works on a fresh machine from a clean clone:
#   make demo   - PTQ of the embedded SmolLM2-135M with the NVFP4 recipe on 2 processes
#   make test   - the test suite (make test-all adds the tests marked slow: larger layouts, long runs)
# Both create .venv and install what they need. On machines without an NVIDIA GPU, torch==2.13.0
# (a CPU wheel) is installed first so that pip never pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
NPROC ?= 2
RECIPE ?= nvfp4

.PHONY: setup demo test test-all bench clean test-nemo

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[dev]'
	# ModelOpt's hf_quant_config reader for tests/export (stdlib-only module); --no-deps keeps
	# its CUDA/solver dependencies (and any torch change) out of the environment
	$(BIN)/pip install -q --no-deps nvidia-modelopt==0.47.0
	touch $(STAMP)

demo: setup
	OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc-per-node=$(NPROC) scripts/ptq.py +recipe=$(RECIPE)

test: setup
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -m "not slow" tests

test-all: setup
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/formats.py

clean:
	rm -rf $(VENV) outputs

# NeMo 2's real ModelTransform callback (tests/integrations/test_nemo_real.py) in a separate venv
# that shares .venv's torch and megatron-core; a few minutes of PyPI installs, so not part of CI.
test-nemo: setup
	test -x .venv-nemo/bin/python || $(PY) -m venv .venv-nemo
	echo "$$(cd $(VENV) && pwd)/lib/python$$($(BIN)/python -c 'import sys;print("%d.%d"%sys.version_info[:2])')/site-packages" > "$$(ls -d .venv-nemo/lib/python3*/site-packages)/megaquant_venv.pth"
	.venv-nemo/bin/pip install -q "nemo-toolkit[lightning]==2.7.3"
	OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR) .venv-nemo/bin/python -m pytest -q -p no:cacheprovider tests/integrations/test_nemo_real.py
