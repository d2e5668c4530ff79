"""Unit tests mirror the package (``tests/unit/<layer>/``); the tiny seeded models they share live here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_models.py, for tests in the layer folders
