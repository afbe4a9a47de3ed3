"""Logging set-up shared by the server, the workers and the CLI."""

from __future__ import annotations

import logging

from backend.common.redact import MaskPasswords

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr; messages carry their component in brackets, e.g. `[Runner] …`.
    Every handler masks URL passwords (a database URL's) in every line."""
    logging.basicConfig(level=level, format=FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, MaskPasswords) for f in handler.filters):
            handler.addFilter(MaskPasswords())
    for noisy in ("urllib3", "filelock", "httpx", "waitress.queue", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
