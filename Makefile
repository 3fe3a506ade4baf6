# The two commands of the README: `make demo` and `make test` (both set up first).
.PHONY: setup demo test bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/python scripts/demo.py

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python benchmarks/models.py
