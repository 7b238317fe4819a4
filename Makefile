# The two commands a new user runs (see README.md):
#   make run    set up .venv if missing, then run the main job on the bundled default
#   make test   set up .venv if missing, then run the test suite
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: run test setup clean

# CPU machines get the CPU build pinned to torch==2.13.0 (an unpinned `torch` pulls a multi-GB CUDA
# build); a machine with an NVIDIA driver may use any torch >= 2.6.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	if nvidia-smi >/dev/null 2>&1; then $(VENV)/bin/pip install -q "torch>=2.6"; \
	else $(VENV)/bin/pip install -q torch==2.13.0; fi
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/ember pretrain

test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
