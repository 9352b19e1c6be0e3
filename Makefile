# star-serve developer targets. `make serve` and `make test` each set up what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# The CPU wheel of torch for development and CI; GPU machines install from pyproject's range instead.
CONSTRAINTS ?= constraints-cpu.txt

.PHONY: setup serve demo test bench lint typecheck clean

$(BIN)/star-serve: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	@touch $@

setup: $(BIN)/star-serve

serve: setup
	$(BIN)/star-serve serve

demo: setup
	$(BIN)/star-serve demo

# The programs the suite runs for real (redis-server, prometheus, promtool), from Debian's packages.
.PHONY: test-deps
test-deps:
	@scripts/install-test-deps

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: setup test-deps
	$(BIN)/python -m pytest -q || [ $$? -eq 5 ]

# Unit tests only: no server process, nothing slow (about a minute).
.PHONY: test-fast
test-fast: setup
	$(BIN)/python -m pytest -q -m 'not e2e and not slow and not chaos and not large and not image' || [ $$? -eq 5 ]

bench: setup
	$(BIN)/star-serve bench serving --out bench-results

.PHONY: chaos
chaos: setup test-deps
	$(BIN)/python -m pytest -q -m chaos tests/e2e/test_e2e_chaos.py

# A reference-shaped Megatron checkpoint of the star-182m shape (random weights), converted and served.
.PHONY: test-large
test-large: setup test-deps
	$(BIN)/python -m pytest -q -m large tests/e2e/test_e2e_megatron.py

# The container image built and run, and the compose stack started (podman here; ENGINE=docker and
# COMPOSE='docker compose' where a Docker engine runs). Minutes; the base image is made once and kept.
ENGINE ?= podman
.PHONY: image-test
image-test: setup test-deps
	@ENGINE=$(ENGINE) scripts/install-image-deps
	$(PIP) install -q 'podman-compose>=1.2'
	CONTAINERS_CONF=$${CONTAINERS_CONF:-$(CURDIR)/tests/image/containers.conf} ENGINE=$(ENGINE) \
		PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -s -m image tests/image

.PHONY: bench-prefix
bench-prefix: setup
	$(BIN)/star-serve bench prefix --out bench-results

.PHONY: bench-calibration
bench-calibration: setup
	$(BIN)/star-serve bench calibration --out bench-results

.PHONY: bench-adaptation
bench-adaptation: setup
	$(BIN)/star-serve bench adaptation --out bench-results

.PHONY: bench-domains
bench-domains: setup
	$(BIN)/star-serve bench domains --out bench-results

.PHONY: bench-lm-eval
bench-lm-eval: setup
	$(BIN)/star-serve bench lm-eval --out bench-results

.PHONY: bench-synthetic
bench-synthetic: setup
	$(BIN)/star-serve bench synthetic --out bench-results

# vLLM's CPU build in .peers/vllm (left out with the reason where it cannot install), then the peers side by side.
.PHONY: bench-peers
bench-peers: setup
	bench/peers/install-vllm
	$(BIN)/star-serve bench peers --out bench-results

lint: setup
	$(BIN)/ruff check star_serve tests
	$(BIN)/ruff format --check star_serve tests

typecheck: setup
	$(BIN)/mypy star_serve

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

# Load and soak runs start a server of their own (the demo models) on a free port; see load_tests/README.md.
.PHONY: load soak
load: setup
	$(BIN)/python -m load_tests.run --users 32 --duration 60 --out load-results

soak: setup
	$(BIN)/python -m load_tests.soak --tokens 1000000 --out soak-results
