"""The parsers of the settings table (backend/common/config.py): each takes a
variable's text and returns its value, or raises ValueError, which the loader turns
into a ConfigError naming the variable and the values it accepts. None of them reads
the environment."""

from __future__ import annotations

import os
import re
from pathlib import Path

from backend.common.units import parse_size

DTYPES = ("auto", "float16", "bfloat16", "float32")

BOOL_ACCEPTED = "1/0, true/false, yes/no, on/off"
"""What a boolean setting accepts, as its error message says."""


def boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


def fraction(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError(raw)
    return value


def positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError(raw)
    return value


def positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(raw)
    return value


def non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(raw)
    return value


def dtype(raw: str) -> str:
    value = raw.strip().lower()
    if value not in DTYPES:
        raise ValueError(raw)
    return value


def workers(raw: str) -> int | tuple[str, ...] | None:
    """None (auto), a count, or GPU groups: '0,1;2' = a worker on GPUs 0 and 1, one on 2."""
    value = raw.strip().lower()
    if value in ("", "auto"):
        return None
    if "," in value or ";" in value:
        groups = tuple(",".join(e.strip() for e in g.split(",")) for g in value.split(";"))
        if any(not re.fullmatch(r"\d+(,\d+)*", g) for g in groups):
            raise ValueError(raw)
        return groups
    count = int(value)
    if count < 0:
        raise ValueError(raw)
    return count


def sizes(raw: str) -> tuple[int, ...]:
    sizes = tuple(parse_size(part) for part in raw.split(",") if part.strip())
    if any(size <= 0 for size in sizes):
        raise ValueError(raw)
    return sizes


def size(raw: str) -> int:
    return parse_size(raw)  # the pattern admits no sign: never negative


def labels(raw: str) -> tuple[str, ...]:
    labels = tuple(label.strip() for label in raw.split(",") if label.strip())
    if any(not re.fullmatch(r"[\w.:@-]{1,255}", label) for label in labels):
        raise ValueError(raw)
    return labels


def url(raw: str) -> str:
    value = raw.strip()
    if value and not re.fullmatch(r"https?://\S+", value):
        raise ValueError(raw)
    return value.rstrip("/")


def non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(raw)
    return value


def text(raw: str) -> str:
    return raw.strip()


def server_url(raw: str) -> str:
    return raw.strip().rstrip("/")


def path(raw: str) -> Path:
    return Path(raw.strip()).expanduser().resolve()


def optional_path(raw: str) -> Path | None:
    return path(raw) if raw.strip() else None



def path_list(raw: str) -> tuple[str, ...]:
    return tuple(d for d in raw.strip().split(os.pathsep) if d)


def comma_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def hosts(raw: str) -> tuple[str, ...]:
    hosts = tuple(h.strip().lower() for h in raw.split(",") if h.strip())
    if any(not re.fullmatch(r"\*|\[[0-9a-f:.]+\](:\d+)?|[\w.-]+(:\d+)?|[0-9a-f:]+", h)
           for h in hosts):
        raise ValueError(raw)
    return hosts
