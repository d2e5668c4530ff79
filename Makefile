# The two commands a new user runs (see README.md):
#   make demo   -- the main job end to end on the embedded keymap bundle (starts venv, Redis, SeaweedFS, a worker)
#   make test   -- the test suite
# Developers: make test-fast -- unit tests only, without those marked slow (real data from ../shared, minutes)
.PHONY: demo test test-fast venv lint stack-up stack-down bench

venv:
	@scripts/bootstrap.sh

demo: venv
	infra/stack.sh up --worker
	set -a && . .stack/env && set +a && .venv/bin/python scripts/demo.py

test: venv
	.venv/bin/python -m pytest -q -ra tests

test-fast: venv
	.venv/bin/python -m pytest -q -ra -m "not slow" tests/unit

lint: venv
	.venv/bin/ruff check .
	.venv/bin/mypy

stack-up: venv
	infra/stack.sh up --worker

stack-down:
	infra/stack.sh down

bench: venv
	.venv/bin/python scripts/bench_engine.py
	.venv/bin/python scripts/bench_system.py
	.venv/bin/python scripts/bench_enqueue.py
