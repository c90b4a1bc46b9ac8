# make demo: the README's main job. make test: the test suite (what CI runs).
# make test-fast: the unit tier minus slow tests (tiers: tests/conftest.py), under 2 minutes.
# Each builds .venv on a fresh machine from the lock (constraints.txt, every package's tested
# version): torch is the local CPU wheel (an unpinned torch would pull a multi-GB CUDA build).
# make test-latest: the newest versions setup.py allows, in .venv-latest, on the fast tier; it
# writes .venv-latest/constraints.txt, the candidate lock (docs/testing.md, "Refreshing the lock").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
LOCK := constraints.txt
STAMP := $(VENV)/.installed
LATEST := .venv-latest
# Every pytest run: offline model loading, the venv's `clicktower` and `accelerate` first on PATH.
PYTEST = HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PATH="$(CURDIR)/$(1)/bin:$$PATH" $(1)/bin/python -m pytest -q

.PHONY: install demo test test-fast test-latest clean

install: $(STAMP)

$(STAMP): setup.py launcher/_rootguard.py $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[test]"
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/clicktower demo --out demo_out

# Two pytest-xdist workers, one test file each at a time (--dist loadfile: a file's module
# fixtures, such as the README walkthrough's copy that its docs test continues, stay in one
# process). Most tests wait on subprocesses that each use one core (imports, launches, servers),
# so two at a time keep both cores busy: docs/testing.md, "How long it takes". TEST_WORKERS=0 runs
# them one after the other in this process.
TEST_WORKERS ?= 2

test: install
	$(call PYTEST,$(VENV)) -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

test-fast: install
	$(call PYTEST,$(VENV)) -m "unit and not slow" tests

# torch stays the local CPU wheel here too: the newest torch on PyPI is a multi-GB CUDA build.
# A fresh venv without the lock gets the newest version of everything else; no --upgrade, which
# would replace the installed torch as well.
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(LATEST)/bin/python -m pip install --quiet -e ".[test]"
	{ grep '^#' $(LOCK) | grep -v '^# Generated'; echo "# Generated $$(date +%F) by make test-latest (pip freeze)."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } \
		> $(LATEST)/constraints.txt
	$(call PYTEST,$(LATEST)) -m "unit and not slow" tests
	@echo "newest allowed versions pass the fast tier: $(LATEST)/constraints.txt is the candidate lock"

clean:
	rm -rf demo_out runs work .pytest_cache
