"""Secrets that jobs carry (the API key of an `openai:` model) kept encrypted at rest.

A job waits in the database, possibly for hours, and its worker may run on
another machine, so the key has to be stored; it is stored only as a Fernet
token (AES-128-CBC + HMAC-SHA256, `cryptography`), never in clear, and never
returned by the API. The encryption key is LBS_SECRET_KEY (any text; hashed to
a Fernet key) or, when that is empty, a random key created once in
`<data dir>/secret.key` with mode 0600. Workers on other machines need the same
LBS_SECRET_KEY as the server; a worker that cannot decrypt fails the job with a
message that says so (and not the key).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from backend.common.config import Settings

log = logging.getLogger(__name__)

KEY_FILE = "secret.key"


class SecretUnreadable(RuntimeError):
    """A stored secret cannot be decrypted with this process's key."""


def _file_key(data_dir: Path) -> bytes:
    path = data_dir / KEY_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    log.info("[Secrets] created %s (mode 0600) to encrypt the API keys jobs carry", path)
    return key


def _fernet(settings: Settings) -> Fernet:
    if settings.secret_key:
        digest = hashlib.sha256(settings.secret_key.encode()).digest()
        return Fernet(base64.urlsafe_b64encode(digest))
    return Fernet(_file_key(settings.data_dir))


def encrypt(settings: Settings, secret: str) -> str:
    """`secret` as a token that only a holder of the key can read."""
    return _fernet(settings).encrypt(secret.encode()).decode("ascii")


def decrypt(settings: Settings, token: str) -> str:
    """The secret in `token`; SecretUnreadable when this process holds another key."""
    try:
        return _fernet(settings).decrypt(token.encode("ascii")).decode()
    except (InvalidToken, ValueError):
        raise SecretUnreadable(
            "the job's API key cannot be decrypted here: give this worker the same "
            "LBS_SECRET_KEY as the server that took the job") from None
