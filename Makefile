# The two commands of the README: `make demo` and `make test` (both set up first).
.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" dora run dataflows/voice.yml
	@echo; echo "== out/voice/transcript.txt"; cat out/voice/transcript.txt; ls out/voice/*.wav

test: setup
	.venv/bin/python -m pytest -q

# ruff: pyflakes (undefined names, unused imports), import order, pycodestyle errors.
lint: setup
	.venv/bin/ruff check .

bench: setup
	.venv/bin/python benchmarks/models.py
