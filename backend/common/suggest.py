""""Did you mean" for a mistyped name (a model, a dataset)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping


def did_you_mean(name: str, known: Iterable[str] | Mapping[str, str]) -> str:
    """"; did you mean 'gsm8k'?" naming the known name nearest to `name` (case aside),
    or "" when none is near: for the end of a not-found message. A mapping compares
    its keys and names their values (a folder's name, shown as its path)."""
    shown = known if isinstance(known, Mapping) else {k: k for k in known}
    by_lower = {k.lower(): v for k, v in shown.items()}
    close = difflib.get_close_matches(name.strip().lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def listing(names: list[str], most: int = 12) -> str:
    """'a, b, c' with at most `most` names, then how many more there are."""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
