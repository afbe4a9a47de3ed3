"""Byte amounts in one unit everywhere: a KB, MB, GB, TB is 2**10, 2**20, 2**30, 2**40
bytes (what nvidia-smi, torch and the product brief count: its
MAX_MEMORY_USAGE=8589934592 is "8.00 GB"). `parse_size` reads them ("24GB", "24GiB",
"24G" are the same) and `format_bytes` writes them, as GiB/MiB/KiB."""

from __future__ import annotations

import re

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
"""The byte units. "KB", "MB", "GB", "TB" mean the same amounts (see the module doc)."""

_SIZE_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB,
               "mib": MiB, "g": GiB, "gb": GiB, "gib": GiB, "t": TiB, "tb": TiB, "tib": TiB}


def parse_size(raw: str) -> int:
    """'24GB', '24GiB', '24G', '512MB' or a number of bytes -> bytes (ValueError otherwise).

    A GB is 2**30 bytes whichever way it is spelled (accelerate's
    `convert_file_size_to_int` reads "GB" as 10**9, so it is not used here)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", raw.lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise ValueError(raw)
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def format_bytes(n: float, digits: int = 2, brief_labels: bool = False) -> str:
    """Bytes as text in the one unit: '1.50 GiB', '12.00 MiB', '3.00 KiB', '12 B'.

    `brief_labels` writes the same amounts as the product brief's memory API does
    ('8.00 GB' for 8589934592 bytes): its `formatted_*` fields keep that shape."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            label = unit.replace("i", "") if brief_labels else unit
            return f"{n / size:.{digits}f} {label}"
    return f"{int(n)} B"
