# Quick start: `make demo` runs the lab end to end; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MOTO   ?= .venv-moto

.PHONY: demo test test-all soak lint bench deps venv clean

demo: deps venv
	$(BIN)/dragent demo --seconds $${DEMO_SECONDS:-30}

test: deps venv
	$(BIN)/pytest

test-all: deps venv
	$(BIN)/pytest -m ''

# 30 minutes of chaos on a netns lab (docs/chaos.md): an asynchronous half, a zero-loss half
soak: deps venv
	$(BIN)/dragent lab chaos --minutes 15 --seed $${SOAK_SEED:-101} --dir .lab-soak
	$(BIN)/dragent lab chaos --minutes 15 --seed $${SOAK_SEED:-101} --sync --dir .lab-soak-sync

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# every benchmark against its baselines; writes benchmarks/results/<date>-<machine>.json and .md
# (small sizes: make bench BENCH_ARGS='--quick --note "what else ran"')
bench: deps venv
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

deps:
	@bash deploy/lab/install-system-deps.sh

venv: $(VENV)/.installed $(MOTO)/.installed

# moto's server speaks KMS, Route 53 and SQS for the tests; it pins its own botocore,
# so it lives in a virtualenv of its own
$(MOTO)/.installed:
	test -x $(MOTO)/bin/python || $(PYTHON) -m venv $(MOTO)
	$(MOTO)/bin/python -m pip install -q --disable-pip-version-check 'moto[server]==5.2.6'
	touch $@

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

clean:
	-$(BIN)/dragent lab down --dir .lab-demo 2>/dev/null
	rm -rf $(VENV) $(MOTO) .lab .lab-demo .lab-chaos .lab-soak .lab-soak-sync .pytest_cache .ruff_cache
