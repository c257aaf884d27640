# The two commands a new user needs: `make serve` and `make test`.
# Both create .venv with the first Python 3.11+ found and install the project
# into it (with uv when it is installed, else with pip).

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3 python; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve test lint bench clean mutate

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "mlx-gateway needs Python 3.11 or newer on PATH (or PYTHON=...)"; exit 1; }
	@if command -v uv >/dev/null 2>&1; then \
		uv venv --quiet --allow-existing --python "$(PYTHON)" $(VENV) && \
		uv pip install --quiet --python $(BIN)/python -e '.[test]'; \
	else \
		"$(PYTHON)" -m venv $(VENV) && \
		$(BIN)/python -m pip install --quiet --upgrade pip && \
		$(BIN)/python -m pip install --quiet -e '.[test]'; \
	fi
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/mlx-gateway serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gateway worker tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Not part of `make test`: breaks each promised behaviour in a copy of the
# tree and runs the tests meant to notice (tests/mutations/run.py).
mutate: $(STAMP)
	$(BIN)/python tests/mutations/run.py $(MUTATE_ARGS)
