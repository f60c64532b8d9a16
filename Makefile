# The README's two commands: `make demo` and `make test`. Both set up what they need first.
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python -m flows.demo

test: setup
	.venv/bin/python -m pytest

bench: setup
	.venv/bin/python bench/stage.py
