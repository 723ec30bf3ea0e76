# Two commands: `make demo` (the whole stack end to end with tiny models) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint
venv:
	@scripts/setup_venv.sh

demo: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m jobs.demo --output demo_out

test: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check .
