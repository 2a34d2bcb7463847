# devagent — build, test, demo, benchmark. `make test` installs what it needs by itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST := $(PY) -m pytest

# Debian 12 / Raspberry Pi OS bookworm packages used by tests and the real peers (shared in README).
APT_PACKAGES := openssl curl iproute2 util-linux python3-venv \
	swtpm swtpm-tools tpm2-tools libtss2-dev libtss2-tcti-swtpm0 tpm2-openssl \
	softhsm2 opensc libcoap3-bin autoconf automake libtool pkg-config gcc faketime \
	build-essential libssl-dev postgresql libpq5

APT_STAMP := $(VENV)/.apt-stamp
DEPS_STAMP := $(VENV)/.deps-stamp
EXTRAS := test,tpm,pkcs11,dtls,mpy,postgres,opcua

.PHONY: all deps apt venv test test-fast soak lint fuzz bench bench-ci demo clean help

all: test

help:
	@echo "make demo      run the main job on this machine: keystore + lab CA on loopback, EST, CMP, CoAP delegated enrollment"
	@echo "make test      install what is needed, run the whole test suite, then the benchmark smoke run"
	@echo "make fuzz      every fuzz target for FUZZ_INPUTS inputs (default 100000; atheris where it installs)"
	@echo "make bench     full benchmarks (figures + benchmarks/REPORT.md)"
	@echo "make bench-ci  benchmark smoke run (few rounds)"
	@echo "make soak      long fault runs: 1,000 kill -9 trials, many processes on one keystore"
	@echo "make lint      ruff"

# ---- dependencies --------------------------------------------------------------------------------
$(APT_STAMP):
	@mkdir -p $(VENV)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
	    echo "error: need root or sudo to install: $$missing (apt-get install -y $$missing)"; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

apt: $(APT_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(DEPS_STAMP): setup.cfg pyproject.toml $(APT_STAMP) | $(PY)
	$(PIP) install -q -e ".[$(EXTRAS)]" --config-settings editable_mode=compat 2>/dev/null || $(PIP) install -q -e ".[$(EXTRAS)]"
	@touch $@

venv: $(DEPS_STAMP)
deps: $(DEPS_STAMP)

# ---- tests ---------------------------------------------------------------------------------------
test: deps
	$(PYTEST) -q tests
	$(MAKE) bench-ci

# Long fault runs (issue 20): 1,000 kill -9 trials of enroll/request/renew/serve/run (800 with software keys, 100 each
# with swtpm and SoftHSM2), and the N = 2/4/10 concurrency test with 5 rounds per process. About 15 min on 2 cores.
soak: deps
	DEVAGENT_KILL_TRIALS=1000 DEVAGENT_SOAK_ROUNDS=5 $(PYTEST) -q --timeout=0 tests/fault/test_kill_pending.py \
	  tests/component/test_keystore_concurrency.py

test-fast: deps
	$(PYTEST) -q -x tests/unit

lint: deps
	$(VENV)/bin/ruff check agent keystore enroll_clients coap_services board_profiles tests benchmarks

# ---- fuzzing (tests/fuzz; `make test` runs its seconds-long smoke run) ------------------------------
FUZZ_INPUTS ?= 100000
FUZZ_ARGS ?=
FUZZ_JSON ?= tests/fuzz/findings/fuzz.json

# atheris (coverage-guided) has manylinux x86_64 wheels up to 3.0.0 for CPython 3.11 (3.1.0 has none for 3.11);
# elsewhere (arm64 boards, other Pythons) the mutation engine runs the same targets.
fuzz: deps
	@if [ "$$(uname -m)" = x86_64 ]; then $(PIP) install -q "atheris>=2.3" || echo "atheris did not install: using the mutation engine"; fi
	@mkdir -p tests/fuzz/findings
	$(PY) -m tests.fuzz --inputs $(FUZZ_INPUTS) --mpy --json $(FUZZ_JSON) $(FUZZ_ARGS)

# ---- benchmarks ----------------------------------------------------------------------------------
BENCH_JSON ?= benchmarks/results/latest.json

bench: deps
	@mkdir -p benchmarks/results
	$(PYTEST) benchmarks -q --timeout=0 --benchmark-only --benchmark-save-data --benchmark-json=$(BENCH_JSON) $(BENCH_ARGS)
	@if [ -f benchmarks/report.py ]; then $(PY) benchmarks/report.py $(BENCH_JSON) --out benchmarks/REPORT.md \
	  --data-out benchmarks/data/bench.json --readme README.md docs/performance.md; fi
	@echo "commit benchmarks/data/bench.json with REPORT.md (and README's Table 1 block): they are generated from it"

# --capture=sys: Python output is still captured, but file descriptor 2 stays the terminal's, so that a crash in C
# code (glibc's "double free"/"corrupted size" line, a C library's assert) is in the log beside faulthandler's
# thread stacks; with pytest's default fd capture that line is lost with the aborted process (docs/cmp.md).
bench-ci: deps
	@mkdir -p benchmarks/results
	DEVAGENT_BENCH_CI=1 $(PYTEST) benchmarks -q --capture=sys --benchmark-only --benchmark-min-rounds=1 --benchmark-max-time=0.05 \
	  --benchmark-warmup=off --benchmark-json=benchmarks/results/ci.json
	@if [ -f benchmarks/report.py ]; then $(PY) benchmarks/report.py benchmarks/results/ci.json --out benchmarks/results/REPORT-ci.md; fi

# ---- demo ----------------------------------------------------------------------------------------
demo: deps
	$(PY) -m agent.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache benchmarks/results demo-state
