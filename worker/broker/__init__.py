"""What producers and workers share about the queue: queue and task names, the Celery config and app factory, client
factories (``config``), and pipelined publishing (``publish``). Imports no task module and no torch."""
