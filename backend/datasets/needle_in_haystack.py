"""Needle-in-a-Haystack (NIAH): can the model find one fact hidden in a long text?

For every (context length, depth) cell of a grid the dataset builds one prompt
of `context_length` tokens *in the model's own tokens* (template, instructions
and question included; the whole prompt is within 90-100% of the length),
made of haystack sentences with the needle sentence inserted once, at the
sentence boundary nearest to `depth_percent` of the haystack (0 = start,
100 = end).

Scoring (`score_answer`), RULER-style string match rather than a judge model:
both texts are normalised (lower case, ASCII and all Unicode punctuation -
curly quotes, 「」, «», 。，：… - and the articles a/an/the removed, whitespace
collapsed); the score is 1.0 when the normalised answer occurs in the normalised
reply (as whole words; a Chinese/Japanese/Korean answer anywhere), otherwise the
fraction of the answer's words that occur in the reply (a paraphrase earns partial
credit, a miss 0.0).
"""

from __future__ import annotations

import codecs
import re
import string
import unicodedata
from bisect import bisect_left
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from backend.common.config import Settings
from backend.datasets.base import Dataset, DatasetParams, Item, LengthAxis, ScoreEntry, batch_rows
from backend.datasets.files import note_read
from backend.engine.contracts import BatchPlan, CacheMode, ModelInfo, ParamError, PromptTokenizer

DATA_DIR = Path(__file__).parent / "data"
BUNDLED_HAYSTACKS = {
    "essays": DATA_DIR / "haystack_essays.txt",
}
# RULER's noise haystack: the same five sentences over and over.
NOISE_TEXT = ("The grass is green. The sky is blue. The sun is yellow. "
              "Here we go. There and back again. ")

DEFAULT_NEEDLE = ("The secret ingredient in Aunt Margit's famous goulash is "
                  "a spoonful of smoked paprika.")
DEFAULT_QUESTION = "What is the secret ingredient in Aunt Margit's famous goulash?"
DEFAULT_ANSWER = "a spoonful of smoked paprika"

PROMPT_TEMPLATE = (
    "Below is a long document. One sentence in it answers the question that "
    "follows. Read the document and answer the question using only what it says.\n\n"
    "<document>\n{context}\n</document>\n\n"
    "Question: {question}\n"
    "Answer in one short sentence."
)

MIN_CONTEXT_LENGTH = 128
# How many later sentences to try when the next one does not fit the budget.
FILL_LOOKAHEAD = 64


class LengthRange(BaseModel):
    """Evenly spaced context lengths from `min` to `max` (both included)."""

    model_config = ConfigDict(extra="forbid")
    min: int = Field(1024, ge=MIN_CONTEXT_LENGTH)
    max: int = Field(4096, ge=MIN_CONTEXT_LENGTH)
    count: int = Field(4, ge=1, le=200)

    @model_validator(mode="after")
    def _ordered(self) -> LengthRange:
        if self.max < self.min:
            raise ValueError("max must be at least min")
        return self

    def values(self) -> list[int]:
        if self.count == 1:
            return [self.max]
        step = (self.max - self.min) / (self.count - 1)
        return sorted({round(self.min + i * step) for i in range(self.count)})


class DepthRange(BaseModel):
    """`count` depths evenly spaced from 0 to 100 percent."""

    model_config = ConfigDict(extra="forbid")
    count: int = Field(5, ge=1, le=101)

    def values(self) -> list[float]:
        if self.count == 1:
            return [50.0]
        return [round(100 * i / (self.count - 1), 2) for i in range(self.count)]


class NeedleParams(DatasetParams):
    batch_size: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] | None = Field(
        None, title="Batch size",
        description="prompts generated together; default: the number of depths, so each "
                    "context length's depths continue their shared haystack together (the "
                    "fastest setting measured); \"auto\": the fastest batch that fits, "
                    "timed on the first prompts; halved automatically on out-of-memory")
    context_lengths: list[int] | LengthRange = Field(
        default=LengthRange(),
        description="Prompt lengths in tokens: a list, or {min, max, count}.")
    depth_percents: list[float] | DepthRange = Field(
        default=DepthRange(),
        description="Where the needle goes, in percent of the haystack "
                    "(0 = start, 100 = end): a list, or {count}.")
    needle: str = Field(DEFAULT_NEEDLE, min_length=1, max_length=2000,
                        description="The sentence hidden in the haystack.")
    retrieval_question: str = Field(DEFAULT_QUESTION, min_length=1, max_length=2000,
                                    description="The question the needle answers.")
    answer: str | None = Field(
        None, max_length=2000,
        description="What a correct reply must contain; default: the default needle's "
                    "answer, or the needle itself when you give your own needle.")
    haystack: str = Field(
        "essays",
        description="'essays' (bundled original essays), 'noise' (RULER-style repeated "
                    "sentences) or the path of a UTF-8 text file.")
    max_new_tokens: int = Field(48, ge=1, le=4096, description="longest reply, in tokens")
    use_chat_template: bool = Field(
        True, description="Wrap the prompt in the tokenizer's chat template when it has one "
                          "(the runner applies it; false feeds the plain text).")

    @model_validator(mode="after")
    def _depths_together(self) -> NeedleParams:
        if self.batch_size is None:
            # not an assignment: the default stays unset, so the job keeps the
            # parameters it was sent (its effective parameters show the number)
            self.__dict__["batch_size"] = min(len(self.depths()), 256)
        return self

    @field_validator("context_lengths")
    @classmethod
    def _lengths(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one context length")
            if min(value) < MIN_CONTEXT_LENGTH:
                raise ValueError(f"every context length must be at least {MIN_CONTEXT_LENGTH}")
        return value

    @field_validator("depth_percents")
    @classmethod
    def _depths(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one depth")
            if any(not 0 <= d <= 100 for d in value):
                raise ValueError("every depth must be between 0 and 100")
        return value

    def lengths(self) -> list[int]:
        if isinstance(self.context_lengths, LengthRange):
            return self.context_lengths.values()
        return sorted(set(self.context_lengths))

    def depths(self) -> list[float]:
        if isinstance(self.depth_percents, DepthRange):
            return self.depth_percents.values()
        return sorted(set(float(d) for d in self.depth_percents))

    def expected_answer(self) -> str:
        if self.answer:
            return self.answer
        return DEFAULT_ANSWER if self.needle == DEFAULT_NEEDLE else self.needle


# --- scoring ----------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def _is_separator(char: str) -> bool:
    """ASCII punctuation and symbols, and every Unicode punctuation character (category
    P*: curly quotes, 「」, «», 。，：…, dashes)."""
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize(text: str) -> str:
    """Lower case, punctuation (all of Unicode's) and articles removed, whitespace
    collapsed."""
    text = "".join(" " if _is_separator(c) else c for c in text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def score_answer(prediction: str, answer: str) -> float:
    """1.0 when the normalised answer is in the normalised reply, else the share
    of the answer's words found in the reply (0.0 for none). Words are bounded by
    spaces and punctuation; an answer in a script written without spaces (Chinese,
    Japanese, Korean) counts wherever it occurs, as RULER's substring rule does."""
    want, got = normalize(answer), normalize(prediction)
    if not want:
        return 0.0
    if f" {want} " in f" {got} " or (_CJK.search(want) and want in got):
        return 1.0
    words = want.split()
    present = set(got.split())
    return sum(word in present for word in words) / len(words)


# --- prompt construction ----------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])(?=\s+\S)")


def split_sentences(text: str) -> list[str]:
    """Sentences, each with the whitespace that came before it (the first gets one space).

    Joining them gives back the text (with one leading space): every boundary
    between two units is a sentence boundary.
    """
    text = text.strip()
    parts = _SENTENCE_END.split(text)
    units = [(" " + p) if i == 0 else p for i, p in enumerate(parts)]
    return [u for u in units if u.strip()]


HAYSTACK_HEAD_BYTES = 64 * 1024
"""What submission and estimates read of a haystack file: its first 64 KiB."""
DEFAULT_MAX_HAYSTACK_BYTES = 32 * 1024**2
"""LBS_MAX_HAYSTACK_BYTES's default, for a dataset made without settings."""


def check_haystack_file(path: Path, max_bytes: int) -> None:
    """What the server checks of a haystack file without reading it: that it is a file
    of at most `max_bytes` whose first HAYSTACK_HEAD_BYTES are UTF-8 text. Raises
    ParamError on `haystack`."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ParamError("haystack", f"haystack {path.name!r} is not a file")
        with open(path, "rb") as f:
            head = f.read(HAYSTACK_HEAD_BYTES)
    except OSError as exc:
        raise ParamError("haystack", f"cannot read haystack file {str(path)!r}: "
                                     f"{exc.strerror}") from None
    if size > max_bytes:
        raise ParamError("haystack", f"haystack file {path.name!r} has {size} bytes; this "
                                     f"server reads at most {max_bytes} "
                                     "(LBS_MAX_HAYSTACK_BYTES)")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=size <= len(head))
    except UnicodeDecodeError as exc:
        raise ParamError("haystack", f"cannot read haystack file {str(path)!r}: {exc}") from None
    if not text.strip():
        raise ParamError("haystack", f"haystack {str(path)!r} has no sentences")


def _read_text(path: Path, max_bytes: int) -> str:
    """The file's text, read in chunks; refused past `max_bytes` (it may have grown
    since submission)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts, total = [], 0
    with open(path, "rb") as f:
        while chunk := f.read(1024**2):
            total += len(chunk)
            if total > max_bytes:
                raise ParamError("haystack", f"haystack file {path.name!r} has more than "
                                             f"{max_bytes} bytes (LBS_MAX_HAYSTACK_BYTES)")
            parts.append(decoder.decode(chunk))
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


@lru_cache(maxsize=2)
def _read_haystack(source: str, version: tuple[int, int] | None = None,
                   max_bytes: int = DEFAULT_MAX_HAYSTACK_BYTES) -> tuple[str, ...]:
    """The sentences of a haystack, two haystacks kept at most (a file's `version`,
    its modification time and size, makes an edited file read again)."""
    if source == "noise":
        text = NOISE_TEXT
    elif source in BUNDLED_HAYSTACKS:
        text = BUNDLED_HAYSTACKS[source].read_text(encoding="utf-8")
    else:
        text = _read_text(Path(source).expanduser(), max_bytes)
    return tuple(split_sentences(text))


def load_haystack(source: str, max_bytes: int = DEFAULT_MAX_HAYSTACK_BYTES) -> list[str]:
    """The haystack's sentences (the worker's whole read); raises ParamError when it
    cannot be read."""
    try:
        version = None
        if source != "noise" and source not in BUNDLED_HAYSTACKS:
            stat = Path(source).expanduser().stat()
            version = (stat.st_mtime_ns, stat.st_size)
        units = _read_haystack(source, version, max_bytes)
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamError("haystack", f"cannot read haystack file {source!r}: "
                                     f"{exc.strerror if isinstance(exc, OSError) else exc}")
    if not units:
        raise ParamError("haystack", f"haystack {source!r} has no sentences")
    if source != "noise":  # the job's data, for its run manifest
        note_read(BUNDLED_HAYSTACKS.get(source) or Path(source).expanduser())
    return list(units)


PREP_BYTES_PER_TOKEN = 1024
"""RAM building the longest prompt takes per token (the text, its token ids and the
tokenizer's encoding; ~580 bytes measured with the built-in tokenizer), with room for
other tokenizers."""
HELD_BYTES_PER_TOKEN = 16
"""RAM each built prompt keeps per token until the job ends (prompt and prefix text,
~3.8 characters a token)."""
HAYSTACK_RAM_FACTOR = 3
"""RAM a haystack's sentences take per byte of its file."""


class _Builder:
    """Builds the prompts of one job; caches token counts of haystack sentences."""

    def __init__(self, params: NeedleParams, tokenizer: PromptTokenizer, source: str,
                 max_bytes: int = DEFAULT_MAX_HAYSTACK_BYTES):
        self.params = params
        self.tok = tokenizer
        self.units = load_haystack(source, max_bytes)
        self.needle_unit = " " + params.needle.strip()
        if any(params.needle.strip() in u for u in self.units):
            raise ParamError("needle", "the haystack already contains the needle")
        # counted as the prompts need them: a long haystack file is mostly not used
        self.unit_tokens = _TokenCounts(self.units, tokenizer)
        self.needle_tokens = len(tokenizer.encode(self.needle_unit))
        self.overhead = self.count(self.render(""))

    def render(self, context: str) -> str:
        message = PROMPT_TEMPLATE.format(context=context,
                                         question=self.params.retrieval_question.strip())
        return self.tok.render(message)

    def count(self, prompt: str) -> int:
        return self.tok.count_prompt(prompt)

    def fill(self, budget: int) -> list[int]:
        """Indices of haystack sentences (cycling) whose tokens fill `budget`."""
        chosen: list[int] = []
        used, i, misses = 0, 0, 0
        n = len(self.units)
        while misses < FILL_LOOKAHEAD:
            cost = self.unit_tokens[i % n]
            if used + cost <= budget:
                chosen.append(i % n)
                used += cost
                misses = 0
            else:
                misses += 1
            i += 1
            if i > 4 * n + budget:  # a haystack of sentences that never fit
                break
        return chosen

    def assemble(self, chosen: list[int], depth: float) -> tuple[str, int]:
        """Context text with the needle at the boundary nearest to `depth`, and
        the number of haystack tokens before the needle."""
        bounds = [0]
        for idx in chosen:
            bounds.append(bounds[-1] + self.unit_tokens[idx])
        target = depth / 100 * bounds[-1]
        k = bisect_left(bounds, target)
        if k == len(bounds) or (k > 0 and target - bounds[k - 1] <= bounds[k] - target):
            k -= 1
        pieces = [self.units[i] for i in chosen]
        pieces.insert(k, self.needle_unit)
        return "".join(pieces).strip(), bounds[k]

    def build(self, length: int, depth: float) -> tuple[str, int, dict[str, Any]]:
        budget = length - self.overhead - self.needle_tokens
        if budget <= 0:
            raise ParamError("context_lengths",
                             f"{length} tokens cannot hold the instructions, question and "
                             f"needle ({self.overhead + self.needle_tokens} tokens)")
        chosen = self.fill(budget)
        while True:
            context, before = self.assemble(chosen, depth)
            prompt = self.render(context)
            tokens = self.count(prompt)
            if tokens <= length or not chosen:
                break
            # Token counts of lone sentences differ a little from counts in
            # context: drop sentences from the end until the prompt fits.
            chosen = chosen[:-1]
        if tokens > length or tokens < 0.9 * length:
            raise ParamError("context_lengths",
                             f"cannot build a prompt of 90-100% of {length} tokens from this "
                             f"haystack (got {tokens}); use a longer context length")
        if context.count(self.params.needle.strip()) != 1:
            raise ParamError("needle", "the needle does not appear exactly once in the prompt")
        haystack_tokens = sum(self.unit_tokens[i] for i in chosen)
        fields = {
            "context_length": length,
            "depth_percent": depth,
            "needle_depth_percent": round(100 * before / haystack_tokens, 2)
            if haystack_tokens else 0.0,
            "haystack_tokens": haystack_tokens,
        }
        return prompt, tokens, fields


class _TokenCounts:
    """Token counts of haystack sentences by index, each counted on first use."""

    def __init__(self, units: list[str], tokenizer: PromptTokenizer):
        self.units = units
        self.tok = tokenizer
        self.counts: dict[int, int] = {}

    def __getitem__(self, i: int) -> int:
        if i not in self.counts:
            self.counts[i] = len(self.tok.encode(self.units[i]))
        return self.counts[i]


class NeedleInAHaystack(Dataset):
    name = "needle_in_haystack"
    description = ("Needle-in-a-Haystack: one fact hidden at a chosen depth of a long "
                   "text; scores retrieval by context length and depth.")
    cache_mode = CacheMode.UNCACHED
    Params = NeedleParams

    def haystack_source(self, params: NeedleParams) -> str:
        """A bundled haystack's name, `noise`, or the resolved path of a text file."""
        if params.haystack in BUNDLED_HAYSTACKS or params.haystack == "noise":
            return params.haystack
        return str(self.local_path(params.haystack, "haystack"))

    max_haystack_bytes: int = DEFAULT_MAX_HAYSTACK_BYTES
    """LBS_MAX_HAYSTACK_BYTES (set by `configure`)."""

    def configure(self, settings: Settings) -> None:
        self.max_haystack_bytes = settings.max_haystack_bytes

    def check(self, params: NeedleParams, model: ModelInfo) -> None:
        """The haystack file's size and first bytes (not the whole file: submission and
        estimates stay quick and keep nothing), then the model's maximum."""
        source = self.haystack_source(params)
        if source not in BUNDLED_HAYSTACKS and source != "noise":
            check_haystack_file(Path(source), self.max_haystack_bytes)
        if model.max_length is None:
            return
        longest = max(params.lengths())
        if longest + params.max_new_tokens > model.max_length:
            raise ParamError(
                "context_lengths",
                f"context length {longest} plus max_new_tokens {params.max_new_tokens} is "
                f"beyond the maximum of {model.name} ({model.max_length} tokens)")

    def worst_batches(self, params: NeedleParams, model_max: int | None) -> list[BatchPlan]:
        """A batch of prompts of the largest context length (each is built to at most
        its length, chat template included), then max_new_tokens generated. Its rows
        share the haystack before their needles (`Item.prefix`): a runner may keep
        that prefix and continue each row from it; at the shallowest depth almost the
        whole prompt is the row's own."""
        rows = min(batch_rows(params), self.grid_size(params))
        return [BatchPlan("generate", rows, max(params.lengths()), params.max_new_tokens,
                          shared_prefix=1, padded=rows > 1)]

    def chat_template(self, params: NeedleParams) -> bool:
        return params.use_chat_template

    def grid_size(self, params: NeedleParams) -> int:
        """One item per cell of the context length x depth grid."""
        return len(params.lengths()) * len(params.depths())

    def check_ceilings(self, params: NeedleParams, model: ModelInfo,
                       settings: Settings) -> NeedleParams:
        """LBS_MAX_GRID_CELLS on the grid, LBS_MAX_CONTEXT_LENGTH on its longest context."""
        cells = self.grid_size(params)
        if cells > settings.max_grid_cells:
            raise ParamError("context_lengths",
                             f"the grid has {cells} cells (context lengths x depths); this "
                             f"server allows at most {settings.max_grid_cells} "
                             "(LBS_MAX_GRID_CELLS)")
        ceiling = settings.max_context_length
        longest = max(params.lengths())
        if longest > ceiling:
            raise ParamError("context_lengths",
                             f"context length {longest} is above this server's ceiling of "
                             f"{ceiling} tokens (LBS_MAX_CONTEXT_LENGTH)")
        self.check_ram(params, psutil.virtual_memory().total, "has")
        return params

    def preparation_bytes(self, params: NeedleParams) -> int:
        """RAM the worker needs to build the job's prompts: the longest being built, all
        of them held, and the haystack's sentences."""
        lengths = params.lengths()
        source = self.haystack_source(params)
        path = BUNDLED_HAYSTACKS.get(source) or (None if source == "noise" else Path(source))
        haystack = path.stat().st_size if path is not None and path.exists() else 0
        return (PREP_BYTES_PER_TOKEN * max(lengths)
                + HELD_BYTES_PER_TOKEN * sum(lengths) * len(params.depths())
                + HAYSTACK_RAM_FACTOR * haystack)

    def check_ram(self, params: NeedleParams, ram: int, verb: str) -> None:
        """Refuse a job whose prompts need more RAM than `ram` (the machine's, at
        submission; what is available, in the worker before building)."""
        need = self.preparation_bytes(params)
        if need > ram:
            raise ParamError("context_lengths",
                             f"building these prompts needs about {need / 2**30:.1f} GiB of "
                             f"RAM (about {PREP_BYTES_PER_TOKEN} bytes per token of the "
                             f"longest context); this machine {verb} {ram / 2**30:.1f} GiB")

    def build_items(self, params: NeedleParams, tokenizer: PromptTokenizer) -> list[Item]:
        self.check(params, ModelInfo("the model", tokenizer.max_length))
        self.check_ram(params, psutil.virtual_memory().available, "has available")
        builder = _Builder(params, tokenizer, self.haystack_source(params),
                           self.max_haystack_bytes)
        answer = params.expected_answer()
        items = []
        for length in params.lengths():
            for depth in params.depths():
                prompt, tokens, fields = builder.build(length, depth)
                # Everything before the needle is the same at every deeper depth (and,
                # as far as the sentences chosen agree, at other lengths): a runner may
                # compute it once (GenerationRequest.prefix).
                prefix = prompt[:prompt.index(params.needle.strip())]
                items.append(Item(idx=len(items), prompt=prompt, prompt_tokens=tokens,
                                  max_new_tokens=params.max_new_tokens, reference=answer,
                                  fields=fields, prefix=prefix))
        return items

    breakdowns = [{"kind": "heatmap", "key": "cells", "title": "Score by context length x depth"}]
    length_axis = LengthAxis("context_length", series=True)  # its grid's lengths
    sample_columns = [{"key": "context_length", "title": "Context length", "filter": True},
                      {"key": "depth_percent", "title": "Depth %", "filter": True}]

    def explain(self, item: Item, prediction: str) -> dict[str, Any]:
        words = normalize(item.reference).split()
        found = round(score_answer(prediction, item.reference) * len(words))
        why = ("the answer is in the reply" if found == len(words) and words else
               f"{found} of the answer's {len(words)} words are in the reply")
        return {"reference": item.reference, "why": why}

    def score(self, item: Item, prediction: str) -> float:
        return score_answer(prediction, item.reference)

    def aggregate(self, scored: list[tuple[dict[str, Any], float]]) -> list[ScoreEntry]:
        cells: dict[tuple[int, float], list[float]] = {}
        for fields, value in scored:
            cells.setdefault((fields["context_length"], fields["depth_percent"]), []).append(value)
        entries = super().aggregate(scored)
        for (length, depth), values in sorted(cells.items()):
            entries.append(ScoreEntry.mean("cell", values, {"context_length": length,
                                                            "depth_percent": depth}))
        return entries


