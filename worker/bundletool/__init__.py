"""``cancelable-bundle``: what an operator does to a model bundle (calibrate its verify threshold, fit its key
target center, re-hash its manifest). Each command changes only the bundle's ``manifest.json``."""
