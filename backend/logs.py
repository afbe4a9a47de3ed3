"""Logging set-up shared by the server, the workers and the CLI."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr; messages carry their component in brackets, e.g. `[Runner] …`."""
    logging.basicConfig(level=level, format=FORMAT)
    for noisy in ("urllib3", "filelock", "httpx", "waitress.queue", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
