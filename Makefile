# make demo: the README's main job. make test: the test suite (what CI runs).
# make test-fast: the unit tier minus slow tests (tiers: tests/conftest.py), under 2 minutes.
# Each builds .venv on a fresh machine: torch is pinned to the local CPU wheel (an unpinned
# torch would pull a multi-GB CUDA build), the rest comes from setup.py.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/clicktower demo --out demo_out

test: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
		$(PY) -m pytest -q tests

test-fast: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
		$(PY) -m pytest -q -m "unit and not slow" tests

clean:
	rm -rf demo_out runs .pytest_cache
