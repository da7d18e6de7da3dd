"""Celery tasks: thin. They lease, call the engine with a platform and a target, record."""
