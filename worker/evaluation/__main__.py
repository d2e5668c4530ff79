"""``python -m worker.evaluation`` = ``cancelable-eval``."""

import sys

from worker.evaluation.cli import main

sys.exit(main())
