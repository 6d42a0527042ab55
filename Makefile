# The two commands of README.md. Both do all set-up first (idempotent; minutes the first time).
.PHONY: setup demo test test-all test-fast lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/labelloop demo

# CI (.ci/run): everything but the `slow` tier, inside 30 min on 2 cores
test: setup lint
	.venv/bin/python -m pytest -q -m "not slow" --durations=15

# everything: adds the `slow` tier (the --quick demo, quality against baselines over seeds; ~12 more minutes)
test-all: setup lint
	.venv/bin/python -m pytest -q --durations=15

# daily work: lint + the unit tier (pure logic, no servers), well under a minute
test-fast: setup lint
	.venv/bin/python -m pytest -q -m unit

lint:
	.venv/bin/ruff check backend tasks fiftyone_plugins tests bench docker scripts
	.venv/bin/mypy

bench: setup
	.venv/bin/python bench/predict_overhead.py
