"""The dataset plugin interface.

A dataset is one subclass of `Dataset`, registered under a name (see
`registry.py`). It turns validated parameters into `Item`s (prompts), scores
each prediction, and aggregates the scores. It never sees devices, dtypes, the
model manager, SQL or Flask: it talks to the model only through the
`PromptTokenizer` it is handed, so that prompts can be built in the model's own
tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.common.paths import InvalidPath, OutsideAllowedFolders, check_path_text, confine
from backend.common.stats import Spread, macro_spread, mean_spread
from backend.engine.contracts import (
    BatchPlan,
    BatchRun,
    CacheMode,
    DatasetAnswer,
    LoadedModel,
    ModelInfo,
    ParamError,
    PathRefused,
    PromptTokenizer,
)

if TYPE_CHECKING:
    from backend.common.config import Settings
    from backend.datasets.hub import DataAccess, HubSource

TEMPLATE_TOKENS = 128
"""Tokens a chat template and special tokens may add around one user message (Llama
3.1's default system block and headers take ~30, Qwen2.5's ~30): the slack that
`token_bound` adds."""


def token_bound(text: str) -> int:
    """An upper bound of the tokens `text` takes once rendered: its UTF-8 bytes plus
    TEMPLATE_TOKENS. Byte-level BPE tokenizers (Llama 3, Qwen2, GPT-2) never make a
    token of less than one byte, and SentencePiece ones (Mistral, Llama 2) at most one
    more (the leading space marker); byte fallback is one token per byte."""
    return len(text.encode("utf-8")) + TEMPLATE_TOKENS


@dataclass(frozen=True)
class LengthAxis:
    """The x axis of a dataset's memory-against-length chart (see Dataset.length_axis)."""

    x: Literal["context_length", "prompt_tokens"]
    """`context_length`: the length each item was built to (a sample's `context_length`
    field, as NIAH's cells have); `prompt_tokens`: the prompt's own tokens."""
    series: bool
    """Whether a model's points form a series (a grid of lengths, drawn as a line) rather
    than standing alone (prompts of whatever length the data has)."""


def batch_rows(params: DatasetParams) -> int:
    """Rows of the job's batches as admission counts them: its batch_size, 1 for "auto"
    (which takes the fastest batch that fits the memory the job is given)."""
    return 1 if params.batch_size == "auto" else params.batch_size


def check_known(values: list[str] | None, known: Any, what: str) -> list[str] | None:
    """For parameter validators: refuse names (subjects, subsets…) that do not exist."""
    unknown = [v for v in values or [] if v not in known]
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(unknown)}")
    return values


class DatasetParams(BaseModel):
    """Base of every dataset's parameter model: unknown fields are refused.

    The two fields here are the evaluation loop's, not the dataset's: every job has them.
    """

    model_config = ConfigDict(extra="forbid")

    batch_size: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        1, title="Batch size",
        description="prompts generated (or multiple-choice questions scored) together; "
                    "\"auto\": the fastest batch that fits, timed on the first items "
                    "(each answered once); unset, a job of 64 items or more on a local "
                    "model runs as \"auto\", a smaller one at 1; halved automatically on "
                    "out-of-memory")
    on_oom: Literal["fail_sample", "fail_job"] = Field(
        "fail_sample", title="On out of memory",
        description="when one prompt alone does not fit in memory: record it as a failed "
                    "sample (scored 0) and go on, or fail the job")
    methods: list[Literal["basic", "optimized"]] | None = Field(
        None, min_length=1, max_length=2, title="Inference methods",
        description="compare inference methods on the same prompts, one after the other "
                    "(the model released in between): basic = eager attention; optimized = "
                    "SDPA attention and a static KV cache, plus torch.compile on CUDA")

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("each method at most once")
        return value


@dataclass
class Item:
    """One prompt to evaluate. `idx` is stable: the same params give the same items."""

    idx: int
    prompt: str
    prompt_tokens: int
    max_new_tokens: int
    reference: Any
    fields: dict[str, Any] = field(default_factory=dict)
    choices: list[str] | None = None
    """Multiple choice scored by log-likelihood: the continuations to compare after
    `prompt`; the prediction is the label of the most likely one (see `labels`)."""
    labels: list[str] | None = None
    prefix: str | None = None
    """A leading part of `prompt` other items share (NIAH: the text before the needle);
    a runner may compute it once (see GenerationRequest.prefix)."""


@dataclass
class ScoreEntry:
    """One aggregated score: `overall`, or an entry of a breakdown named `name`, with
    its standard error and 95% interval where the dataset can say (None: not a mean of
    items, e.g. a version record)."""

    name: str
    value: float
    count: int
    labels: dict[str, Any] = field(default_factory=dict)
    stderr: float | None = None
    ci95: tuple[float, float] | None = None

    @classmethod
    def spread(cls, name: str, value: float, count: int, spread: Spread | None,
               labels: dict[str, Any] | None = None) -> ScoreEntry:
        return cls(name, value, count, labels or {},
                   spread.stderr if spread else None, spread.ci95 if spread else None)

    @classmethod
    def mean(cls, name: str, values: list[float],
             labels: dict[str, Any] | None = None) -> ScoreEntry:
        """The mean of items' scores: a binomial error for 0-1 scores, else bootstrap."""
        return cls.spread(name, sum(values) / len(values) if values else 0.0, len(values),
                          mean_spread(values), labels)

    @classmethod
    def macro(cls, name: str, groups: list[list[float]], count: int,
              labels: dict[str, Any] | None = None) -> ScoreEntry:
        """The mean of groups' means (C-Eval over subjects, LongBench over subsets)."""
        means = [sum(g) / len(g) for g in groups if g]
        return cls.spread(name, sum(means) / len(means) if means else 0.0, count,
                          macro_spread(groups), labels)


@dataclass(frozen=True)
class DataContext:
    """Where a job's data is found and what it may read, given when the dataset is made
    (`registry.get_dataset(name, context)`) and never changed after."""

    settings: Settings | None = None
    """The server's settings; the dataset reads what it needs of them (`configure`)."""
    datasets_dir: Path | None = None
    """LBS_DATASETS_DIR: where `<datasets dir>/<name>/` data folders are looked for
    when a job gives no `data_dir`."""
    access: DataAccess | None = None
    """Whether missing data may be fetched here, offline mode, the progress callback."""
    confine: bool = False
    """A job from the API: paths in parameters must lie under `datasets_dir`, and every
    file read must resolve under `read_roots()`."""

    @classmethod
    def of(cls, settings: Settings, access: DataAccess | None = None,
           confine: bool = False) -> DataContext:
        return cls(settings, settings.datasets_dir, access, confine)

    def read_roots(self) -> tuple[Path, ...] | None:
        """The folders a confined job's files must resolve under: LBS_DATASETS_DIR and
        the Hugging Face hub cache (a `hub:` snapshot's files link to its blobs there;
        an archive is unpacked beside them); None when reads are not confined (the
        command line, run by the machine's own user)."""
        if not self.confine:
            return None
        from huggingface_hub import constants

        return (*([self.datasets_dir] if self.datasets_dir is not None else []),
                Path(constants.HF_HUB_CACHE))


class Dataset:
    """Base class of dataset plugins.

    Subclasses set the class attributes and implement `build_items`, `score`
    and, when the plain mean is not enough, `aggregate`. An instance serves one job
    (or one data status): its `context` is given when it is made.
    """

    def __init__(self, context: DataContext | None = None):
        self.context = context or DataContext()
        if self.context.settings is not None:
            self.configure(self.context.settings)

    @property
    def datasets_dir(self) -> Path | None:
        return self.context.datasets_dir

    @property
    def data_access(self) -> DataAccess | None:
        return self.context.access

    @property
    def confine_paths(self) -> bool:
        return self.context.confine

    def read_all(self, paths: list[Path]) -> list[dict[str, Any]]:
        """Every record of the files (files.read_all), confined as the job's reads are."""
        from backend.datasets.files import read_all

        return read_all(paths, self.context.read_roots())

    def read_records(self, path: Path) -> list[dict[str, Any]]:
        """Every record of one file (files.read_records), confined as the job's reads are."""
        from backend.datasets.files import read_records

        return read_records(path, self.context.read_roots())

    name: ClassVar[str]
    description: ClassVar[str]
    cache_mode: ClassVar[CacheMode] = CacheMode.CACHED
    Params: ClassVar[type[DatasetParams]] = DatasetParams
    length_sorted: ClassVar[bool] = False
    """Generate the items longest prompt first, batching neighbours in length (less
    padding; the first batch probes the most memory a batch needs); results are stored
    under each item's idx, so they read back in the original order."""
    cost: ClassVar[str] = ""
    """A rough cost for the UI, e.g. "52 subjects, ~1.3k questions (val)"."""

    hub: ClassVar[HubSource | None] = None
    """Where the official data lives on the Hugging Face hub (a `hub.HubSource`), so
    that it can be fetched and read from the hub cache; None for bundled data."""

    data_per_task: ClassVar[bool] = False
    """Its data depends on the parameters (lm-eval: each task reads its own dataset):
    the data status says so instead of "ready", and `check` refuses what is missing."""

    def local_path(self, given: str, field: str) -> Path:
        """The file or folder a parameter names. For API jobs it must lie under
        LBS_DATASETS_DIR (relative paths are taken from there); raises ParamError."""
        try:
            check_path_text(given)
        except InvalidPath as exc:
            raise ParamError(field, str(exc)) from None
        if not self.confine_paths:
            return Path(given).expanduser()
        roots = [self.datasets_dir] if self.datasets_dir is not None else []
        try:
            return confine(given, roots, "LBS_DATASETS_DIR")
        except OutsideAllowedFolders as exc:
            raise PathRefused(field, f"refused: {exc}") from None

    def data_folder(self, given: str | None, folder_name: str | None = None,
                    parts: list[str] | None = None) -> Path:
        """The folder to read data from; ParamError saying where it looked if missing.

        `given` may be `hub:<org>/<name>`: the snapshot of that dataset repository in
        the local Hugging Face cache (never downloaded here). Without `given`:
        `<datasets dir>/<name>/` when it exists, else the dataset's `hub` source (the
        cache, or a fetch where allowed; `parts` limits what is fetched; see hub.py).
        """
        if given and given.startswith("hub:"):
            return _hub_snapshot(given[4:])
        if given:
            path = self.local_path(given, "data_dir")
        elif self.datasets_dir is not None:
            path = self.datasets_dir / (folder_name or self.name)
            if not path.is_dir() and self.hub is not None:
                from backend.datasets.hub import locate

                return locate(self, parts)
        else:
            raise ParamError("data_dir", "give data_dir or set LBS_DATASETS_DIR")
        if not path.is_dir():
            raise ParamError("data_dir", f"no data folder at {path} (set the job parameter "
                                         f"data_dir or put the files under LBS_DATASETS_DIR/"
                                         f"{folder_name or self.name})")
        return path

    def configure(self, settings: Settings) -> None:
        """Read the server settings the dataset needs (called when it is made with a
        context that carries them); default: none."""

    def parse_params(self, raw: dict[str, Any] | None) -> DatasetParams:
        """Validate raw parameters as JSON, strictly ("7" is not 7, "yes" is not true);
        raises pydantic.ValidationError."""
        import json

        return self.Params.model_validate_json(json.dumps(raw or {}), strict=True)

    def check(self, params: DatasetParams, model: ModelInfo) -> None:
        """Refuse parameters that cannot work with this model, before it loads.

        Runs in the server at submit time and in the worker before loading;
        must not import torch. Raises ParamError.
        """

    def build_items(self, params: DatasetParams, tokenizer: PromptTokenizer) -> list[Item]:
        """Every item of the job, in a stable order. Raises ParamError."""
        raise NotImplementedError

    def worst_batches(self, params: DatasetParams, model_max: int | None) -> list[BatchPlan]:
        """The request batches of the job that may hold the most memory, for the GPU
        memory estimate at submit time (runners/hf/account.py asks the runner what each
        holds, `work_bytes(plan)`, and takes the largest). Each `BatchPlan` says what
        the batch is: generation or log-likelihood, its rows (`batch_rows(params)`),
        the longest prompt and the tokens generated or scored after it, a prefix every
        row shares, whether rows are padded, how many positions' logits are asked for.

        Runs in the server after `check`, without a tokenizer: lengths are upper bounds
        (see `token_bound`), at most `model_max` when that is known. This default, one
        batch of prompts that fill the model's context (none when that is unknown: the
        job is estimated at its weights), suits a dataset whose prompts fill it; a
        dataset of shorter prompts should say how long they are, or its jobs wait for
        a GPU that holds the whole context.
        """
        if model_max is None:
            return []
        rows = batch_rows(params)
        return [BatchPlan("generate", rows, model_max, 0, padded=rows > 1)]

    def chat_template(self, params: DatasetParams) -> bool:
        """Whether the job's prompts are rendered with the model's chat template (a
        rendering option each request carries, see runners.base.GenerationRequest);
        default: yes. A dataset whose parameters let the user choose returns theirs."""
        return True

    def second_turn(self, item: Item, reply: str, tokenizer: PromptTokenizer) -> Item | None:
        """A follow-up prompt to generate after `reply` (e.g. the answer turn after a
        chain of thought), whose reply is then the one scored; None: none (default)."""
        return None

    def grid_size(self, params: DatasetParams) -> int | None:
        """How many items the job has when its parameters alone say (NIAH's context
        lengths x depths grid), for the estimate of a job's duration; None otherwise."""
        return None

    prompt_budget: ClassVar[bool] = False
    """Whether the parameters have `max_length`, a prompt budget in tokens (None: the
    model's context). The default `check_ceilings` then applies LBS_MAX_CONTEXT_LENGTH."""

    def check_ceilings(self, params: DatasetParams, model: ModelInfo,
                       settings: Settings) -> DatasetParams:
        """The server's own limits, on top of the model's (`check`): settings such as
        LBS_MAX_CONTEXT_LENGTH and LBS_MAX_GRID_CELLS. Runs at submit time, after `check`.
        Default: with a `prompt_budget`, a job that names none gets the ceiling as its
        budget when the model takes more (stored with the job), and a larger budget is
        refused. Returns the parameters the job runs with; raises ParamError."""
        ceiling = settings.max_context_length
        if not ceiling or not self.prompt_budget:
            return params
        if params.max_length is None:
            if model.max_length is None or model.max_length > ceiling:
                return params.model_copy(update={"max_length": ceiling})
        elif params.max_length > ceiling:
            raise ParamError("max_length",
                             f"max_length {params.max_length} is above this server's ceiling "
                             f"of {ceiling} tokens (LBS_MAX_CONTEXT_LENGTH)")
        return params

    has_data_parts: ClassVar[bool] = False
    """Whether the data is read from a folder (`<datasets dir>/<name>/` or the `hub`
    snapshot) whose parts `data_parts` lists, so the data status can count them."""

    def data_parts(self, folder: Path) -> list[tuple[str, str, list[Path]]]:
        """(part, split, files) for each part of the data found in `folder`, for the data
        status (GET /api/datasets, `data status`); only with `has_data_parts`."""
        return []

    def runs_by_default(self, part: str, split: str) -> bool:
        """Whether a job with default parameters evaluates the items of this data part
        (the data status counts those as the dataset's items); default: the parts of
        the default `split` when the parameters have one, else every part."""
        field = self.Params.model_fields.get("split")
        return field is None or field.default == split

    def score(self, item: Item, prediction: str) -> float:
        """A 0-1 score of one prediction."""
        raise NotImplementedError

    def score_answer(self, item: Item, prediction: str, fields: dict[str, Any]) -> float:
        """A 0-1 score of one answer, given the answer's fields too (a dataset that
        answers items itself, see `answer`, keeps what it scores with there);
        default: `score(item, prediction)`."""
        return self.score(item, prediction)

    tasks_param: ClassVar[str | None] = None
    """The parameter that names the several tasks one job runs, each scored on its own
    (its `metric` score rows labelled with their task, as lm-eval's are): the leaderboard
    and the lm-eval export give each task its own entry, whose identity leaves this
    parameter out. None (default): a job is one task."""

    answers_itself: ClassVar[bool] = False
    """Whether the dataset answers its items itself (`answer`): items that need more
    than one prompt or choice list each (lm-eval tasks)."""

    def answer(self, items: list[Item], model: LoadedModel,
               run: BatchRun) -> list[DatasetAnswer]:
        """With `answers_itself`: one answer per item, in order, made by calling `model`
        through `run(method, requests)`, which batches and halves batches on
        out-of-memory (an `OomFailure` in place of a result that does not fit alone)."""
        raise NotImplementedError(f"{self.name} does not answer its items itself")

    def aggregate(self, scored: list[tuple[dict[str, Any], float]]) -> list[ScoreEntry]:
        """Scores of the job from (item fields, score) pairs; default: the mean."""
        return [ScoreEntry.mean("overall", [score for _, score in scored])]

    # --- how results explain themselves (read by the web page and the exports) ---
    breakdowns: ClassVar[list[dict[str, Any]]] = []
    """How the job's scores break down, as the page shows them. Each entry points into
    the job's `scores` dict (see apps/api/schemas.scores_dict):

    - {"kind": "table", "key": "subjects", "title": ..., "columns": [{"key", "title"}]}:
      `scores[key]` is a list of rows; the columns name their labels (score and count
      are added by the page), e.g. C-Eval's subject and category;
    - {"kind": "figures", "key": ..., "title": ..., "rows": [{"key", "title", "help"}]}:
      single numbers `scores[row key]` (micro/macro averages, MR-Score terms);
    - {"kind": "heatmap", "key": "cells", "title": ...}: NIAH's context length x depth grid.
    """

    length_axis: ClassVar[LengthAxis | None] = None
    """Whether its samples span lengths, so that the leaderboard charts peak memory against
    length for it (GET /api/leaderboard/memory), and what that chart's x axis is; None
    (default): no such chart."""

    sample_columns: ClassVar[list[dict[str, Any]]] = []
    """The dataset's own columns of a sample, read from its `fields`:
    [{"key", "title", "filter": bool}]; a `filter` column gets a filter on the page."""

    def explain(self, item: Item, prediction: str) -> dict[str, Any]:
        """What a stored sample carries to say why it scored what it did: `reference`
        (the gold answer(s)) and, where the dataset has them, `extracted` (the answer read
        from the reply) and `why` (a short sentence). Merged into the sample's fields
        before they are stored and aggregated; values must be JSON."""
        return {"reference": item.reference}

    def describe(self) -> dict[str, Any]:
        """Name, description, cache mode, the JSON schema of the parameters, and how
        results break down (`breakdowns`, `sample_columns`, `length_axis`)."""
        return {
            "name": type(self).name,
            "description": type(self).description,
            "cache_mode": type(self).cache_mode.value,
            "cost": type(self).cost,
            "params_schema": type(self).Params.model_json_schema(),
            "breakdowns": type(self).breakdowns,
            "sample_columns": type(self).sample_columns,
            "length_axis": asdict(type(self).length_axis) if type(self).length_axis else None,
        }


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
        raise ParamError("data_dir", f"dataset {repo_id!r} is not in the local Hugging Face "
                                     "cache (nothing is downloaded at run time)") from None
