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
    _one_handler_for_hugging_face()


def _one_handler_for_hugging_face() -> None:
    """huggingface_hub (and `datasets`, the same way) gives its logger a stderr handler
    of its own at import and leaves it propagating, so each warning (a download's
    retries) was written twice. Its documented remedy: remove that handler, so its
    records reach ours once, formatted and masked. Importing its logging module here
    (light: no network, no torch) makes the handler exist before we remove it."""
    import sys

    try:
        import huggingface_hub.utils.logging  # noqa: F401 - adds the handler to remove
    except ImportError:
        return
    for name in ("huggingface_hub", "datasets"):
        if name == "datasets" and "datasets.utils.logging" not in sys.modules:
            continue  # heavy to import only for this: handled once it is loaded
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            if type(handler) is logging.StreamHandler and library.propagate:
                library.removeHandler(handler)
