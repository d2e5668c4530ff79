# The two commands a new user runs (see README.md):
#   make demo   -- the main job end to end on the embedded keymap bundle (starts venv, Redis, SeaweedFS, a worker)
#   make test   -- the test suite
# Developers: make test-fast -- unit tests only, without those marked slow (real data from ../shared, minutes)
.PHONY: demo test test-fast venv lint stack-up stack-down bench bench-quick bench-lite

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

# the default bundle (keymap) on the CPU: engine vs compute floor, system vs in-process, verify latency under bulk load;
# then the enqueue rate of submit_many
bench: venv
	CANCELABLE_TORCH_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_keymap.py
	.venv/bin/python scripts/bench_enqueue.py

bench-quick: venv
	CANCELABLE_TORCH_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_keymap.py --images 2 --repeats 1 \
		--deep-jobs 8 --verifies 5 --window-s 180 --bulk-rows 200 --revoke-subjects 100

# the lite bundle's engine benchmark and the queueing side (enqueue, bulk streaming, revocation scheduling, batching)
bench-lite: venv
	.venv/bin/python scripts/bench_engine.py
	.venv/bin/python scripts/bench_system.py
