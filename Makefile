# The README's two commands: `make demo` and `make test`. Both set up what they need first
# (the demo only the two Python environments; the tests also the image-build tools and
# BFCL's checker as the validation suite's oracle).
.PHONY: setup setup-demo demo test bench

setup:
	bash scripts/setup.sh

setup-demo:
	bash scripts/setup.sh demo

demo: setup-demo
	.venv/bin/python -m embedded.demo

test: setup
	.venv/bin/python -m pytest

bench: setup
	.venv/bin/python bench/stage.py
