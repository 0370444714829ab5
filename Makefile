# Two entry points: `make demo` (quickstart) and `make test` (the suite). Both create .venv when missing.
# The CPU build of torch is installed first so that the loose `torch` requirement does not pull a multi-GB
# CUDA build; a venv that already has torch keeps it (point VENV at your own environment to reuse it).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.lit_ft_installed

.PHONY: install demo test assets bench matrix docs clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/lit-ft fit --config configs/quickstart.yaml

# One intra-op thread per process unless the caller says otherwise: the suite's 2-process (gloo) tests would
# otherwise run four busy threads on two cores; the suite's times in the docs are measured this way.
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q tests

assets: install
	$(PY) -m lit_ft.assets fetch --all

# issue 12's studies (one per family), each resuming from its per-row cache in runs/bench/, then their tables in
# docs/benchmarks.md and pictures in docs/img/ regenerated (BENCH_ARGS=--render-only: no training, from
# benchmarks/results/). Kernel timings: python benchmarks/token_ce.py and the other scripts, commands in the docs.
bench: install
	$(PY) -m benchmarks $(BENCH_ARGS)

# issue 18's compatibility matrix: every technique under 2-rank DDP and FSDP2 (gloo CPU) and the single-process
# settings (bf16, accumulation, checkpointing, torch.compile, PEFT-LoRA, mid-epoch and SIGKILL resume, Hypothesis
# fuzzing), cached per cell in runs/matrix/ (MATRIX_ARGS=--force reruns all; MATRIX_ARGS="--settings compile" one
# column), then docs/compatibility.md is regenerated. `make test` runs a fast slice (tests/matrix/test_*.py)
matrix: install
	OMP_NUM_THREADS=1 $(PY) tests/matrix/run_matrix.py $(MATRIX_ARGS)

# the documentation site (mkdocs.yml) into site/; --strict fails on a broken link or #anchor, a page left out of the
# nav and a docstring that does not render. The docs extra is installed once per change of pyproject.toml.
DOCS_STAMP := $(VENV)/.lit_ft_docs_installed

$(DOCS_STAMP): pyproject.toml | $(STAMP)
	$(PY) -m pip install -e '.[docs]'
	@touch $(DOCS_STAMP)

docs: install $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) lit_ft.egg-info .pytest_cache site
