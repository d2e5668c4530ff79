"""Evaluation harness: independent judge, metrics, protocols and the report (``cancelable-eval``)."""
