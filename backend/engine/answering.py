"""Answering a batch of items with a runner: multiple choice by log-likelihood,
generation with its second turns, a dataset's own `answer`; in batches that halve on
out-of-memory (`Backoff`), in the order that batches best (`order_for_batching`), of
the size the runner finds for "auto" (`auto_batch_size`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from backend.datasets.base import Dataset
from backend.engine.contracts import (
    BatchPlan,
    GenerationRequest,
    LoglikelihoodRequest,
    OomFailure,
    is_out_of_memory,
    move_trailing_whitespace,
)
from backend.runners.base import PromptView, Runner

log = logging.getLogger(__name__)


def choose_many(runner: Any, items: list[Any], chat_template: bool = True
                ) -> list[tuple[str, int, int, dict[str, Any]]]:
    """Multiple choice by log-likelihood, `items` scored together (one batch of
    questions): per item the label of the likeliest continuation, the prompt's token
    count, 0 generated tokens, and the fields with each choice's log-prob (full
    precision: differences below 1e-4 are real differences). `chat_template` says how
    the items' prompts were rendered."""
    requests = [LoglikelihoodRequest(item.prompt, c, chat_template)
                for item in items for c in item.choices]
    scored = runner.loglikelihood(requests, batch_size=len(items))
    out, at = [], 0
    for item in items:
        mine, at = scored[at:at + len(item.choices)], at + len(item.choices)
        labels = item.labels or item.choices
        best = max(range(len(mine)), key=lambda i: mine[i].logprob)
        fields = {**item.fields, "logprobs": {label: s.logprob
                                              for label, s in zip(labels, mine, strict=True)}}
        out.append((labels[best], runner.count_prompt(item.prompt, chat_template), 0, fields))
    return out


def choose(runner: Any, item: Any, chat_template: bool = True
           ) -> tuple[str, int, int, dict[str, Any]]:
    """`choose_many` for one item."""
    return choose_many(runner, [item], chat_template)[0]


def is_cuda_failure(exc: BaseException) -> bool:
    """A CUDA error other than out-of-memory: torch.AcceleratorError (raised by its
    C10_CUDA_CHECK, e.g. "CUDA error: an illegal memory access was encountered") or
    a RuntimeError from its cuBLAS/cuDNN checks ("CUDA error: ...", "cuDNN error:
    ..."). Such errors are sticky: the process's CUDA context is unusable after one,
    so the worker gives its job back and exits (see worker.py)."""
    if is_out_of_memory(exc) or not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return (type(exc).__name__ == "AcceleratorError" or "CUDA error:" in text
            or "cuDNN error:" in text)


@dataclass
class Backoff:
    """Runs a batch function in batches of `size`, halving `size` on out-of-memory.

    The halved size stays for the rest of the job (the next batch would not fit
    either). A request that fails alone becomes an `OomFailure`; `on_oom` hears of
    every failure, after the failed attempt's frames are gone, so it can free memory.
    """

    size: int
    on_oom: Callable[[int, str], None]

    def run(self, fn: Callable[[list[Any]], list[Any]], requests: list[Any]) -> list[Any]:
        out: list[Any] = []
        i = 0
        while i < len(requests):
            chunk = requests[i:i + self.size]
            try:
                out.extend(fn(chunk))
                i += len(chunk)
                continue
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                message = f"{type(exc).__name__}: {_first_line(exc)}"
            # Outside the except block: the traceback (holding the batch's tensors) is gone.
            self.on_oom(len(chunk), message)
            if len(chunk) == 1:
                out.append(OomFailure(message))
                i += 1
            else:
                self.size = max(1, len(chunk) // 2)
        return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


@dataclass
class _Answer:
    """What the model made of one item, before scoring."""

    item: Any
    text: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def answer_batch(items: list[Any], view: PromptView, dataset: Dataset,
                 backoff: Backoff) -> list[_Answer]:
    """Answers to `items`, in batches of the backoff's size: multiple-choice items
    scored together by log-likelihood, generation items generated together (and their
    second turns, e.g. the answer after a chain of thought, likewise).
    `view` is the runner as the dataset sees it, rendering as the job asked."""
    runner, templated = view.runner, view.chat_template
    if dataset.answers_itself:  # the dataset calls the runner itself
        return [_Answer(item, a.text, a.prompt_tokens, a.output_tokens,
                        a.fields or item.fields, a.error)
                for item, a in zip(items, dataset.answer(items, runner, backoff.run),
                                   strict=True)]
    answers = [_Answer(item, fields=item.fields) for item in items]
    choosing = [a for a in answers if a.item.choices]
    chosen = backoff.run(partial(choose_many, runner, chat_template=templated),
                         [a.item for a in choosing])
    for answer, got in zip(choosing, chosen, strict=True):
        if isinstance(got, OomFailure):
            answer.error = got.message
        else:
            answer.text, answer.prompt_tokens, answer.output_tokens, answer.fields = got
    generating = [a for a in answers if not a.item.choices]
    replies = backoff.run(runner.generate, [GenerationRequest(
        a.item.prompt, a.item.max_new_tokens, templated, a.item.prefix)
        for a in generating])
    second: list[tuple[_Answer, Any]] = []
    for answer, reply in zip(generating, replies, strict=True):
        if isinstance(reply, OomFailure):
            answer.error = reply.message
            continue
        answer.text, answer.prompt_tokens = reply.text, reply.prompt_tokens
        answer.output_tokens = reply.output_tokens
        if reply.extra:  # prefill/decode timing; an API model's usage and attempts
            answer.fields = {**answer.fields, **reply.extra}
        nxt = dataset.second_turn(answer.item, reply.text, view)
        if nxt is not None:
            second.append((answer, nxt))
    replies = backoff.run(runner.generate, [GenerationRequest(n.prompt, n.max_new_tokens,
                                                              templated) for _, n in second])
    for (answer, nxt), reply in zip(second, replies, strict=True):
        if isinstance(reply, OomFailure):
            answer.error = reply.message
            continue
        first = answer.fields.get("timing")
        answer.text = reply.text
        answer.fields = {**answer.fields, **nxt.fields, **(reply.extra or {})}
        if first and reply.extra and "timing" in reply.extra:  # both turns' time and tokens
            answer.fields["timing"] = _add_timings(first, reply.extra["timing"])
        answer.output_tokens += reply.output_tokens
    return answers


def _add_timings(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One answer's share of two batches' timings (each divided by its batch size)."""
    return {"prefill_s": a["prefill_s"] / a["batch"] + b["prefill_s"] / b["batch"],
            "decode_s": a["decode_s"] / a["batch"] + b["decode_s"] / b["batch"],
            "prefill_tokens": a["prefill_tokens"] / a["batch"]
            + b["prefill_tokens"] / b["batch"], "batch": 1}


SHARED_CHARS = 64
"""Prompts sharing a prefix this long (characters) are batched together."""


def _shared_runs(items: list[Any]) -> list[list[Any]]:
    """`items` in runs whose prompts share a prefix of SHARED_CHARS or more, each run
    longest first, the runs by their longest prompt; an item sharing with none is a
    run of its own."""
    runs: list[list[Any]] = []
    for item in sorted(items, key=lambda i: i.prompt):
        if not runs or len(os.path.commonprefix([runs[-1][-1].prompt, item.prompt])) \
                < SHARED_CHARS:
            runs.append([])
        runs[-1].append(item)
    return sorted((sorted(run, key=lambda i: -i.prompt_tokens) for run in runs),
                  key=lambda run: -run[0].prompt_tokens)


def order_for_batching(items: list[Any], longest_first: bool = False) -> list[Any]:
    """Multiple-choice items in the order they batch best, generation items after them
    (samples are stored by idx, so the order does not show).

    Prompts that share a prefix of SHARED_CHARS or more (a few-shot header and
    examples) stay together, so the runner computes that prefix once per batch; each
    such run goes longest first (a batch pads to its longest prompt, so neighbours in
    length waste the least) and the runs by their longest prompt, so an out-of-memory
    shows on the first batch. Generation items go likewise, those that share with no
    other after the runs in the order given, and those that declare their prefix
    (`Item.prefix`: NIAH, whose grid order is its sharing order) first, as given; with
    `longest_first`
    (Dataset.length_sorted: long prompts, where padding costs more than a shared
    header saves) they all go longest first."""
    choosing = [i for run in _shared_runs([i for i in items if i.choices]) for i in run]
    generating = [i for i in items if not i.choices]
    if longest_first:
        return choosing + sorted(generating, key=lambda i: -i.prompt_tokens)
    declared = [i for i in generating if i.prefix]  # ordered for sharing by the dataset
    runs = _shared_runs([i for i in generating if not i.prefix])
    lonely = {id(run[0]) for run in runs if len(run) == 1}
    return (choosing + declared + [i for run in runs if len(run) > 1 for i in run]
            + [i for i in generating if id(i) in lonely])


def auto_batch_size(runner: Any, pending: list[Any]) -> int:
    """The most rows that fit for job parameter batch_size "auto": at most the number
    of items and at most 256, of the job's longest batch (`Runner.find_batch_size`):
    for multiple-choice items the longest context and its longest continuation as
    scored, for generation the longest prompt and the most new tokens any item asks.
    `BatchTrial` then times sizes up to it."""
    if not pending:
        return 1
    rows = min(len(pending), 256)
    longest = max(pending, key=lambda item: item.prompt_tokens)
    if longest.choices:  # the continuation as scored: with the context's trailing space
        lengths = [len(runner.encode(move_trailing_whitespace(longest.prompt, c)[1]))
                   for c in longest.choices]
        plan = BatchPlan("loglikelihood", rows, longest.prompt_tokens, max(lengths),
                         padded=rows > 1, continuations=rows * sum(n > 1 for n in lengths))
    else:
        plan = BatchPlan("generate", rows, longest.prompt_tokens,
                         max(item.max_new_tokens for item in pending), padded=rows > 1)
    started = time.perf_counter()
    size = runner.find_batch_size(plan)
    log.info("[Runner] batch_size auto: %d fit (probed on %d + %d tokens in %.2f s)", size,
             plan.prompt_tokens, plan.new_tokens, time.perf_counter() - started)
    return size


AUTO_BY_DEFAULT_ITEMS = 64
"""A job that leaves batch_size unset, with at least this many items to answer on a
runner that sizes its own batches, runs as batch_size "auto": enough items that the
trial's sizes are timed on its first items and the fastest answers most of the rest."""


def default_batch_size(params: Any, runner: Any, items: list[Any]) -> int | str:
    """The batch size a job runs at: what it set; else its dataset's own default (NIAH's
    number of depths); else "auto" where the base default (1) is in force, the job (or
    its shard) has AUTO_BY_DEFAULT_ITEMS `items` or more, counted with those already
    stored so a resumed job keeps its choice, every item counts its prompt's tokens
    (the memory account plans "auto" from them: an lm-eval document's requests are
    only known to the dataset) and the runner sizes batches itself (a local model:
    `find_batch_size` of its own); else 1. The stored job keeps what was sent."""
    size = params.batch_size
    if ("batch_size" in params.model_fields_set or size != 1
            or type(params).model_fields["batch_size"].default != 1):
        return size
    if (len(items) >= AUTO_BY_DEFAULT_ITEMS and all(i.prompt_tokens for i in items)
            and type(runner).find_batch_size is not Runner.find_batch_size):
        return "auto"
    return size


def trial_sizes(fits: int) -> list[int]:
    """The batch sizes "auto" times: 1, every fourth power of 2 below `fits`, and `fits`."""
    sizes, size = [1], 4
    while size < fits:
        sizes.append(size)
        size *= 4
    return sizes + [fits] if fits > 1 else sizes


@dataclass
class BatchTrial:
    """Job parameter batch_size "auto" by measured speed. Among the sizes the memory
    allows (`fits`, from `auto_batch_size`), the first items are answered at each of
    `trial_sizes` in turn, and the size with the fewest seconds per unit of work is
    kept for the rest of the job. The trial batches are the job's own: every item is
    answered once and its result kept. The job's first batch (one item) is not timed:
    it carries the first-call costs (thread pools, allocations) that would count
    against whichever size came first. A unit of work is a prompt token or a new token
    where the items count their prompts' tokens, else an item.

    `next_size()` is the size of the next batch; `record(size, items, seconds)` notes
    how long a batch took; `note()` is the choice and why, for the job's manifest."""

    fits: int
    by_default: bool = False
    """Whether the job left batch_size unset and runs as "auto" (`default_batch_size`)."""
    seconds: dict[int, float] = field(default_factory=dict)
    settled: bool = False
    chosen: int | None = None

    def __post_init__(self) -> None:
        self.sizes = trial_sizes(self.fits)
        if len(self.sizes) == 1:
            self.chosen = 1

    def cap(self, most: int) -> None:
        """At most `most` rows from now on (a batch ran out of memory and was halved):
        sizes above it are no longer candidates, `most` is."""
        if self.chosen is not None:
            self.chosen = min(self.chosen, most)
        elif most < self.fits:
            self.fits = most
            self.sizes = [s for s in self.sizes if s < most] + [most]

    def next_size(self) -> int:
        if self.chosen is not None:
            return self.chosen
        if not self.settled:
            return 1
        return next(s for s in self.sizes if s not in self.seconds)

    def record(self, size: int, items: list[Any], seconds: float) -> None:
        if self.chosen is not None:
            return
        if not self.settled:
            self.settled = True
            return
        tokens = sum(i.prompt_tokens + i.max_new_tokens for i in items)
        units = tokens if all(i.prompt_tokens for i in items) else len(items)
        self.seconds[size] = seconds / max(1, units)
        if all(s in self.seconds for s in self.sizes):
            self.chosen = min(self.sizes, key=lambda s: self.seconds[s])
            log.info("[Runner] batch_size auto: %d, the fastest of %s (seconds per unit: %s)",
                     self.chosen, sorted(self.seconds), self._timings())

    def _timings(self) -> dict[str, float]:
        return {str(s): round(t, 6) for s, t in sorted(self.seconds.items())}

    def note(self) -> dict[str, Any]:
        """`{"chosen", "fits", "seconds_per_unit", "reason"}` for the job's manifest."""
        if self.chosen is None:
            reason = "the job ended before every size was timed"
        elif not self.seconds:
            reason = "only one row fits"
        else:
            reason = (f"the fastest of sizes {sorted(self.seconds)} timed on the job's first "
                      f"items; {self.fits} fit in memory")
        if self.by_default:
            reason += " (batch_size left unset: \"auto\" by default)"
        return {"chosen": self.chosen, "fits": self.fits,
                "seconds_per_unit": self._timings(), "reason": reason,
                "default": self.by_default}
