# Quickstart: `make demo` (synthetic videos -> cache -> heads -> evaluation) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-kernels bench bench-gpu install clean

# the stamp says the project was installed here *with its test extra*: a plain `pip install -e .` into the same
# .venv (the README's other install line) leaves no stamp, so `make test` still installs pytest and pytest-xdist
STAMP := $(VENV)/.installed-with-test-extra

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/mdmf-cache demo

# two pytest workers, a test file each at a time (a file's fixtures built once), each torch process on one thread
# (two workers already fill 2 cores: one thread each ran the suite in 292 s against 331 s with two), OpenMP threads
# that sleep when idle. Subprocesses inherit the one thread, so a test's in-process and subprocess runs agree.
# Bytecode is cached even where the environment says PYTHONDONTWRITEBYTECODE: the tests start dozens of fresh
# interpreters that would otherwise compile the project's modules again each time.
TEST_WORKERS ?= 2
test: install
	PYTHONDONTWRITEBYTECODE= OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# the suite again with the kernels of older x86-64 CPUs (AVX2, then no wide vectors) in place of this CPU's own: a
# float32 assertion that holds only on one CPU's ATen or oneDNN kernels fails here (docs/measurements.md, "Other
# CPUs' kernels", says what it does not cover)
test-kernels: install
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 $(MAKE) test
	ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 $(MAKE) test

bench: install
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/train_fast.py
	$(BIN)/python bench/verify.py
	$(BIN)/python bench/train_full.py

# every GPU path once (< 8 min on one GPU): extraction, fast training bf16 vs float32, 10k test episodes,
# full mode RN50/ViT-B-16 memory, a torchrun of full mode; one JSON line
bench-gpu: install
	$(BIN)/python bench/gpu.py

clean:
	rm -rf demo_out .pytest_cache
