# Every target creates .venv on first use, so a fresh clone needs only `make demo` / `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test soak lint bench bench-probes bench-verify bench-spool schemas mutate clean host-tools

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

# The deploy tests lint the Prometheus rules with promtool. Debian's prometheus package has
# it, but installing that package would also start a Prometheus server: only the binary is
# taken out of it, into the venv.
$(BIN)/promtool: | $(STAMP)
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cd "$$tmp" && \
	  { apt-get download -q prometheus 2>/dev/null || \
	    { apt-get update -q && apt-get download -q prometheus; }; } && \
	  dpkg-deb -x prometheus_*.deb root && \
	  install -m 0755 root/usr/bin/promtool "$(abspath $(BIN))/promtool"

test: $(STAMP) host-tools $(BIN)/promtool
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

bench-probes: $(STAMP) host-tools
	$(BIN)/python bench/probe_cost.py $(ARGS)

bench-verify: $(STAMP)
	$(BIN)/python bench/verify.py $(ARGS)

bench-spool: $(STAMP)
	$(BIN)/python bench/spool.py $(ARGS)

# Mutation testing of the pure modules (docs/testing.md); survivors are listed at the end.
mutate: $(STAMP)
	$(BIN)/mutmut run $(ARGS)
	$(BIN)/mutmut results

schemas: $(STAMP)
	$(BIN)/python -m schemas.generate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache mutants
