# Every target creates .venv on first use, so a fresh clone needs only `make demo` / `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test soak lint bench bench-spool schemas clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cellos-producer demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

# The long variants of the durability scenarios (about ten minutes on 2 cores); `make test` skips them.
soak: $(STAMP)
	$(BIN)/python -m pytest -q -m soak $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/e2e.py $(ARGS)

bench-spool: $(STAMP)
	$(BIN)/python bench/spool.py $(ARGS)

schemas: $(STAMP)
	$(BIN)/python -m schemas.generate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
