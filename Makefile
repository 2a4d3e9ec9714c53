# Quick start: `make run` (amqplexd in front of the local broker) and
# `make test` (the suite against the local RabbitMQ, started if needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint broker bench clean

$(STAMP): pyproject.toml setup.py amqplex/protocol/_walk.c bench/_cycle.c bench/build.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	cd bench && ../$(BIN)/python build.py
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/amqplexd amqp://127.0.0.1:5672

broker:
	@scripts/ensure-rabbitmq

test: $(STAMP) broker
	$(BIN)/ruff check amqplex tests bench
	$(BIN)/python -m pytest -p no:cacheprovider -q

lint: $(STAMP)
	$(BIN)/ruff check amqplex tests bench
	$(BIN)/ruff format --check amqplex tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The benchmarks: every scenario against the broker and through amqplexd -w 2
# in the same run. `make bench BENCH_ARGS=--quick` for a smoke run,
# BENCH_ARGS="--scenario churn" for one scenario. See bench/README.md.
bench: $(STAMP) broker
	$(BIN)/python -m bench $(BENCH_ARGS)
