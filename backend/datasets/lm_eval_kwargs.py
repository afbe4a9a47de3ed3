"""lm-eval's generation kwargs read as its HF backend reads them (`normalize_gen_kwargs`,
`handle_stop_sequences`): the budget of new tokens and the stop strings. No torch: the
server checks a job's `gen_kwargs` with these at submit time."""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_GEN_TOKS = 256
"""lm-eval's default `max_gen_toks` when a task's generation_kwargs name none."""

BUDGET_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
"""The names of the generation budget, in lm-eval's order of priority."""


def named_max_gen_toks(gen_kwargs: dict[str, Any]) -> int | None:
    """The budget of new tokens `gen_kwargs` names, None when it names none."""
    for key in BUDGET_KEYS:
        if gen_kwargs.get(key) is not None:
            return int(gen_kwargs[key])
    return None


def max_gen_toks(gen_kwargs: dict[str, Any]) -> int:
    """The budget of new tokens of a request: the one named, else lm-eval's default."""
    named = named_max_gen_toks(gen_kwargs)
    return DEFAULT_MAX_GEN_TOKS if named is None else named


def stop_strings(gen_kwargs: dict[str, Any]) -> tuple[str, ...]:
    until = gen_kwargs.get("until") or []
    return (until,) if isinstance(until, str) else tuple(until)


def sampling_keys(gen_kwargs: dict[str, Any]) -> list[str]:
    """The keys of `gen_kwargs` that ask for sampling (`do_sample` true, a positive
    `temperature`): decoding here is greedy, so they are refused, never ignored."""
    keys = ["do_sample"] if gen_kwargs.get("do_sample") else []
    try:
        if float(gen_kwargs.get("temperature") or 0) > 0:
            keys.append("temperature")
    except (TypeError, ValueError):
        keys.append("temperature")
    return keys
