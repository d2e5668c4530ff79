"""Cancelable face biometrics backend (FaceAnonyMixer): engine, storage, keys and Celery tasks."""
