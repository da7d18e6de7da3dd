"""Hamal: an agentless sync proxy that replicates VM disks into a restorable store."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # `celery -A hamal_workers` looks for `app`; import it only then, so the CLI and
    # the engine stay importable without a config file.
    if name in ("app", "celery"):
        from hamal_workers.celery_app import app

        return app
    raise AttributeError(name)
