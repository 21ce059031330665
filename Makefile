# Two commands from a fresh clone: `make tour` and `make test`. Each sets up .venv first, once.
#
# The venv is (re)installed only when it is missing or pyproject.toml is newer than its stamp, so a second
# `make tour` starts the tour at once. On a GPU box whose system Python already has a CUDA build of torch, the
# venv sees it (--system-site-packages) and keeps it; everywhere else it gets the pinned CPU build (an unpinned
# torch would pull a multi-GB CUDA build). Extra options for the tour go in ARGS: make tour ARGS="-S mask=random".

PYTHON ?= python3
VENV ?= .venv
CPU_TORCH := torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.moola-installed

# SkyPilot (sky/train.yaml, python -m moola.skyjobs) gets a venv of its own, $(CLOUD_VENV): it pins click<8.2,
# which DVC's celery and gto refuse. `make cloud` makes it (about 560 MB); the tests load the task through it.
CLOUD_VENV ?= .venv-cloud
CLOUD_STAMP := $(CLOUD_VENV)/.moola-installed

.PHONY: setup tour study deep test test-fast cloud

# The stamp alone cannot tell that the venv's python was deleted, or points at a Python that is gone (a system
# upgrade): then every target would fall through to the system Python. Checked on every call (one python start).
VENV_PYTHON_RUNS := $(shell "$(BIN)/python" -c "" >/dev/null 2>&1 && echo yes)
ifneq ($(VENV_PYTHON_RUNS),yes)
ifneq ($(wildcard $(STAMP)),)
$(info make: $(BIN)/python is missing or broken: rebuilding $(VENV))
.PHONY: $(STAMP)
endif
endif

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if [ -e "$(VENV)" ] && ! "$(BIN)/python" -c "" >/dev/null 2>&1; then \
	  echo "make: $(BIN)/python is missing or broken: removing $(VENV) to rebuild it"; rm -rf "$(VENV)"; \
	fi
	@if [ ! -x "$(BIN)/python" ]; then \
	  if $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	    echo "make: the system Python has a CUDA torch: $(VENV) will use it"; \
	    $(PYTHON) -m venv --system-site-packages "$(VENV)"; \
	  else \
	    $(PYTHON) -m venv "$(VENV)"; \
	  fi; \
	fi
	$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || { echo "$(BIN)/python -m pip install --quiet $(CPU_TORCH)"; \
	  $(BIN)/python -m pip install --quiet "$(CPU_TORCH)"; }
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch "$(STAMP)"

cloud: $(CLOUD_STAMP)

$(CLOUD_STAMP): sky/requirements.txt
	@test -x "$(CLOUD_VENV)/bin/python" || $(PYTHON) -m venv "$(CLOUD_VENV)"
	$(CLOUD_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CLOUD_VENV)/bin/python -m pip install --quiet -r sky/requirements.txt
	@touch "$(CLOUD_STAMP)"

# The venv's bin goes first on PATH: moola calls dvc, and dvc's stages call python.
tour: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" moola tour $(ARGS)

# The CPU study (README "Results"): under an hour on 2 cores, setup included; it pretrains in bf16 where the CPU
# runs it (docs/precision.md); make study ARGS="-S pretrain.precision=fp32" for fp32's bytes, slower.
study: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" moola study $(ARGS)

# The answer at the spec's depth (README "Results"): exp1_baseline for 75 epochs and the budget curve to epoch 75;
# hours on a CPU, minutes on a GPU box. Interrupted, `make deep` again resumes.
deep: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" moola deep $(ARGS)

# The README's test command: two worker processes (pytest-xdist), each test file whole in one of them (--dist
# loadfile: a file's module fixtures are built once). The tests' pipelines train with one torch thread (conftest.TINY),
# so two workers fill two cores without oversubscribing them; a session fixture (the reference run) is built once per
# worker that needs it. TEST_WORKERS=1 runs the suite in one process, as `python -m pytest` does.
TEST_WORKERS ?= 2
test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# The unit tests alone (no DVC run, no repository copy): the loop to run while editing.
test-fast: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -q -m "not integration and not slow" $(ARGS)
