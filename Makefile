# Every target creates .venv on first use, so a fresh clone needs only `make demo` / `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-probes schemas clean host-tools

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cellos-producer demo $(ARGS)

# The probe tests and bench build real namespaces, TAPs and nftables tables: they need
# Debian's nft and ip (and run as root, as CI does).
host-tools:
	command -v nft >/dev/null && command -v ip >/dev/null || { apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables iproute2; }

test: $(STAMP) host-tools
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/e2e.py $(ARGS)

bench-probes: $(STAMP) host-tools
	$(BIN)/python bench/probe_cost.py $(ARGS)

schemas: $(STAMP)
	$(BIN)/python -m schemas.generate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
