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

# Two workers (pytest-xdist): the vLLM tests run one after another on one, the rest beside them
# (tests/conftest.py groups them); TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2

test: setup
	.venv/bin/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --no-loadscope-reorder)

bench: setup
	.venv/bin/python bench/stage.py
