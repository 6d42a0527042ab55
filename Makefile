# The two commands of README.md. Both do all set-up first (idempotent; minutes the first time).
.PHONY: setup demo test bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/labelloop demo

test: setup
	.venv/bin/python -m pytest -q --durations=12

bench: setup
	.venv/bin/python bench/predict_overhead.py
