"""The worker's business logic as plain typed functions over a ``Runtime`` (``worker.service.runtime``): enrol,
verify, reissue on revocation, fan-out bookkeeping. No Celery here: the tasks (``worker.tasks``) parse messages and
call these functions; anything else (scripts, tests) can call them with its own runtime."""
