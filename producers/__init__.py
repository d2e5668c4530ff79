"""Producers: CLI and Python client. Sends tasks by name; never imports torch."""
