# The two commands of README.md. Both do all set-up first (idempotent; minutes the first time).
.PHONY: setup demo test test-fast lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/labelloop demo

test: setup lint
	.venv/bin/python -m pytest -q --durations=12

# daily work: lint + the unit tier (pure logic, no servers), well under a minute
test-fast: setup lint
	.venv/bin/python -m pytest -q -m unit

lint:
	.venv/bin/ruff check backend tasks fiftyone_plugins tests bench docker scripts
	.venv/bin/mypy

bench: setup
	.venv/bin/python bench/predict_overhead.py
