# Two commands: `make demo` (the whole stack end to end with tiny models) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint
venv:
	@scripts/setup_venv.sh

demo: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m jobs.demo --output demo_out

# Two pytest processes: the suite, then the Triton kernels on the CPU under Triton's interpreter (the variable
# must be set before triton is imported, so it gets a process of its own; on a GPU machine `pytest tests/kernels`
# runs the same tests at real shapes).
test: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q tests --ignore=tests/kernels
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels

lint: venv
	$(VENV)/bin/ruff check .
