"""Pydantic models of the HTTP API: they validate requests, shape responses and
generate /openapi.json, so the three never disagree."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from backend.common.stats import FEW_ITEMS
from backend.queue.db import Job, JobState, Sample
from backend.runners.openai.options import ApiOptions

MB = 1024 * 1024
MAX_JOBS_PER_REQUEST = 500


MAX_PARAMS_BYTES = 64 * 1024
"""Largest `params` object (as JSON) a job may carry: it is stored and shown with the
job, so a megabyte of it would travel with every read of the job."""


class _Strict(BaseModel):
    """A request body: unknown fields refused, and no coercion ("7" is not 7, "yes" is
    not true): what a JSON client sends is what the API takes."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)


_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
MIN_TIMEOUT_S = 1.0
"""Shortest timeout a request may set: a smaller one means nothing a worker can keep
(1e-300 s) and turns a timer into a busy loop."""


class Query(BaseModel):
    """Query-string parameters: they arrive as text, so numbers are parsed from it, and
    only plain decimal numbers are numbers ("1_000", " 2", "0x10", "nan" are refused,
    though Python's float() would read them)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = str(cls.model_fields[info.field_name].annotation)
        if isinstance(value, str) and ("int" in annotation or "float" in annotation) \
                and not _PLAIN_NUMBER.fullmatch(value):
            raise ValueError(f"must be a plain decimal number, not {value[:40]!r}")
        return value


class JobRequest(_Strict):
    """One evaluation: a model on a dataset with the dataset's parameters."""

    model: str = Field(min_length=1, max_length=1024, examples=["builtin:tiny"],
                       description="builtin:<name>, a checkpoint folder, or a cached hub id")
    dataset: str = Field(min_length=1, max_length=128, examples=["needle_in_haystack"])
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="the dataset's parameters (see GET /api/datasets)")
    timeout_s: float | None = Field(None, ge=MIN_TIMEOUT_S, le=30 * 24 * 3600,
                                    description="fail the job after this many seconds of "
                                                "running (default: LBS_JOB_TIMEOUT)")
    priority: int = Field(0, ge=-1000, le=1000,
                          description="higher runs first; equal priorities take turns "
                                      "between submitters, then go oldest first")
    submitter: str | None = Field(None, min_length=1, max_length=128,
                                  pattern=r"^[\w.@+-][\w.@+ -]*$",
                                  description="who submits: jobs of different submitters "
                                              "take turns (default: anonymous)")
    worker_label: str | None = Field(None, min_length=1, max_length=255,
                                     pattern=r"^[\w.:@-]+$",
                                     description="run only on a worker with this label "
                                                 "(LBS_WORKER_LABELS, its host name or id)")
    num_gpus: int = Field(1, ge=1, le=64,
                          description="GPUs the job needs on one worker (a worker without "
                                      "GPUs runs 1-GPU jobs on the CPU)")
    data_parallel: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        1, description="spread the job's samples over this many workers (shards, one worker "
                    "each, each loading the model once; one progress and one result), or "
                    '"auto": every worker idle now that could run it (at least 1)')
    api: ApiOptions | None = Field(
        None, description="for openai:<name> models: the server's base URL, key, endpoint "
                          "and limits (LBS_OPENAI_BASE_URL / LBS_OPENAI_API_KEY fill what "
                          "it leaves out); the key is stored encrypted and never returned")

    @field_validator("params")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value, ensure_ascii=False).encode())
        if size > MAX_PARAMS_BYTES:
            raise ValueError(f"params is {size} bytes as JSON; at most {MAX_PARAMS_BYTES} "
                             "(put long texts in a file under LBS_DATASETS_DIR)")
        return value


class JobBatchRequest(_Strict):
    """Several evaluations submitted together (all are queued, or none)."""

    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_JOBS_PER_REQUEST)


class JobListQuery(Query):
    state: JobState | None = None
    submitter: str | None = Field(None, max_length=128)
    model: str | None = Field(None, max_length=1024)
    dataset: str | None = Field(None, max_length=128)
    page: int = Field(1, ge=1, le=1_000_000)
    per_page: int = Field(50, ge=1, le=500)


class SampleListQuery(Query):
    page: int = Field(1, ge=1, le=1_000_000)
    per_page: int = Field(1000, ge=1, le=5000)


class ExportQuery(BaseModel):
    format: Literal["json", "csv", "lm_eval"] = Field(
        "json", description="json: the job and its samples; csv: the samples; lm_eval: "
        "the scores in the results format lm_eval writes")


class Progress(BaseModel):
    done: int
    total: int | None


class JobSummary(BaseModel):
    """A job as lists show it: everything but its params and events (GET /api/jobs/<id>
    has those), so a poll of the queue stays small whatever the jobs carry."""

    model_config = ConfigDict(protected_namespaces=())

    id: int
    model: str
    dataset: str
    state: JobState
    progress: Progress
    scores: dict[str, Any] = Field(
        description="`overall`, and each breakdown as a list, e.g. `cells` for NIAH")
    memory: dict[str, Any] = Field(
        description="RSS readings: `rss_own_peak_bytes`/`_mb` (the job's own peak, above "
        "`rss_baseline_bytes`: the worker's RSS without the job's model), `rss_peak_bytes`/"
        "`_mb` (the worker process's peak, which carries what ran before)…; and `gpu` per "
        "device")
    error: str | None
    worker_id: str | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    timeout_s: float | None = None
    priority: int = 0
    submitter: str = "anonymous"
    worker_label: str | None = None
    num_gpus: int = 1
    data_parallel: int = Field(1, description="shards the job's samples are spread over")
    memory_estimate_bytes: int | None = Field(
        None, description="estimated GPU memory (weights, KV cache, activations) a worker "
                          "must have free to claim the job")
    waiting_reason: str | None = Field(
        None, description="why a queued job does not run yet (no worker with its label, "
                          "GPUs or free memory, all busy, or its turn has not come)")
    api: dict[str, Any] | None = Field(
        None, description="an openai: model's options as given, without the key")
    api_key_set: bool = Field(False, description="whether the job carries its own API key")
    phase: str | None = Field(
        None, description='"fetching data" while the worker downloads the dataset\'s data '
                          'from the Hugging Face hub (see data_fetch), "downloading model" '
                          "while it downloads a hub model not in the cache (LBS_ALLOW_DOWNLOAD"
                          "=1; a `model_download` event in `events`), else null")
    data_fetch: dict[str, Any] | None = Field(
        None, description="the job's latest data fetch: dataset, state (running|done), "
                          "bytes_done, bytes_total")


class ShardOut(BaseModel):
    """One shard of a data-parallel job: the worker running its share of the items."""

    id: int = Field(description="the shard's own job id (GET /api/jobs/<id> shows it whole)")
    shard_index: int = Field(description="k: the shard evaluates the items whose "
                                         "idx % data_parallel == k")
    state: JobState
    worker_id: str | None
    progress: Progress = Field(description="its own samples over its share of the items")
    attempts: int
    cancel_requested: bool
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    memory: dict[str, Any] = Field(description="its peaks, as a job's `memory`")
    waiting_reason: str | None = None


class JobOut(JobSummary):
    """A job with everything: its params and model events too."""

    params: dict[str, Any]
    effective_params: dict[str, Any] | None = Field(
        None, description="what the job runs with: `params` with every default of its "
        "dataset filled in (split, chat template, max_new_tokens…); null for a dataset "
        "that is no longer installed")
    events: list[dict[str, Any]]
    manifest: dict[str, Any] | None = Field(
        None, description="what the job ran with: versions, device, the model's identity "
        "(real location, weights fingerprint), the task's (effective params, data files' "
        "sha256, prompt code and chat template hashes), inference settings, decoding, "
        "started_at / finished_at; null until its model has loaded")
    shards: list[ShardOut] | None = Field(
        None, description="a data-parallel job's shards by index (GET /api/jobs/<id> "
                          "only); null for a job on one worker")


SUMMARY_EXCLUDE = {"params", "effective_params", "events", "shards", "manifest"}


class SampleOut(BaseModel):
    idx: int
    prompt: str
    prompt_tokens: int
    prediction: str
    score: float | None
    latency_s: float
    output_tokens: int | None
    context_length: int | None = None
    depth_percent: float | None = None
    fields: dict[str, Any]
    peak_rss_mb: float | None = Field(description="the worker process's peak RSS")
    peak_own_rss_mb: float | None = Field(
        None, description="the sample's RSS peak above its job's baseline (`rss_baseline`)")
    peak_gpu_mb: float | None
    error: str | None


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[ErrorDetail] = []


class ErrorResponse(BaseModel):
    status: Literal["error"] = "error"
    error: ErrorBody


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / MB, 2)


def _plural(name: str) -> str:
    return name[:-1] + "ies" if name.endswith("y") else name + "s"


def _spread(entry: Any) -> tuple[float | None, list[float] | None]:
    """(stderr, [low, high]) of a stored Score or a dataset's ScoreEntry."""
    ci95 = getattr(entry, "ci95", None)
    if ci95 is None and getattr(entry, "ci_low", None) is not None:
        ci95 = (entry.ci_low, entry.ci_high)
    return getattr(entry, "stderr", None), list(ci95) if ci95 is not None else None


def scores_dict(entries: list[Any]) -> dict[str, Any]:
    """Score entries as the API shows them: `overall` and `count`, every other
    unlabelled entry as a number under its name (e.g. `micro`), and labelled
    entries as a list under the plural of their name (`cells`, `subjects`…).
    Every score carries its error bars beside it: `<name>_stderr` and `<name>_ci95`
    ([low, high], 95%) for the unlabelled ones, `stderr` and `ci95` in a row; None
    where there are none. `few_items` marks a score from fewer than 30 items."""
    scores: dict[str, Any] = {}
    for s in entries:
        stderr, ci95 = _spread(s)
        if s.name == "overall":
            scores["overall"] = s.value
            scores["count"] = s.count
            scores["overall_stderr"], scores["overall_ci95"] = stderr, ci95
            scores["few_items"] = 0 < s.count < FEW_ITEMS
        elif not s.labels:
            scores[s.name] = s.value
            scores[f"{s.name}_stderr"], scores[f"{s.name}_ci95"] = stderr, ci95
        else:
            scores.setdefault(_plural(s.name), []).append(
                {**s.labels, "score": s.value, "count": s.count, "stderr": stderr,
                 "ci95": ci95, "few_items": 0 < s.count < FEW_ITEMS})
    return scores


def memory_dict(readings: list[tuple[str, str, int]]) -> dict[str, Any]:
    """(name, device, bytes) readings as the API shows them: RSS at the top, GPU per device."""
    memory: dict[str, Any] = {}
    gpu: dict[str, dict[str, Any]] = {}
    for name, device, value in readings:
        if device == "cpu":
            memory[f"{name}_bytes"] = value
            memory[f"{name}_mb"] = _mb(value)
        else:
            short = name.removeprefix("cuda_")
            gpu.setdefault(device, {})[f"{short}_bytes"] = value
            gpu[device][f"{short}_mb"] = _mb(value)
    if gpu:
        memory["gpu"] = gpu
    return memory


def job_out(job: Job, waiting_reason: str | None = None, summary: bool = False) -> JobOut:
    """The job as the API shows it; a `summary` (lists) leaves its effective parameters
    uncomputed, as they are left out of it."""
    scores = scores_dict(job.scores)
    memory = memory_dict([(m.name, m.device, m.bytes) for m in job.memory_peaks])
    duration = _duration(job)
    fetches = [e for e in job.events or [] if e.get("kind") == "data_fetch"]
    data_fetch = fetches[-1] if fetches else None
    fetching = (data_fetch is not None and data_fetch.get("state") == "running"
                and job.state == JobState.RUNNING.value)
    downloads = [e for e in job.events or [] if e.get("kind") == "model_download"]
    downloading = (bool(downloads) and downloads[-1].get("state") == "running"
                   and job.state == JobState.RUNNING.value)
    return JobOut(
        id=job.id, model=job.model, dataset=job.dataset, params=job.params,
        effective_params=None if summary else effective_params(job.dataset, job.params or {}),
        state=JobState(job.state), progress=Progress(done=job.progress_done,
                                                     total=job.progress_total),
        scores=scores, memory=memory, error=job.error, worker_id=job.worker_id,
        attempts=job.attempts, cancel_requested=job.cancel_requested,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        duration_s=duration, timeout_s=job.timeout_s, priority=job.priority,
        submitter=job.submitter, worker_label=job.worker_label, num_gpus=job.num_gpus,
        data_parallel=job.shard_count or 1,
        memory_estimate_bytes=job.memory_bytes, waiting_reason=waiting_reason,
        api=job.api, api_key_set=job.api_key_encrypted is not None,
        phase="fetching data" if fetching else "downloading model" if downloading else None,
        data_fetch=data_fetch,
        events=job.events or [],
        manifest={**job.manifest, "started_at": _iso(job.started_at),
                  "finished_at": _iso(job.finished_at)}
        if job.manifest else None)


def effective_params(dataset: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """A job's parameters with its dataset's defaults filled in; None for a dataset no
    longer installed or parameters it no longer takes."""
    from backend.datasets.registry import get_dataset

    try:
        return get_dataset(dataset).parse_params(params).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - a dataset since removed, parameters since renamed
        return None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _duration(job: Any) -> float | None:
    if job.started_at and job.finished_at:
        return round((job.finished_at - job.started_at).total_seconds(), 3)
    return None


def shard_out(shard: Job, waiting_reason: str | None = None,
              job_total: int | None = None) -> ShardOut:
    """A shard as its job shows it. Its progress counts its own samples against its
    share of the job's items (those with idx % n == k), known once the job's count is
    (`job_total`: the job's, set by whichever shard started first)."""
    total, k, n = shard.progress_total or job_total, shard.shard_index, shard.shard_count
    share = None if total is None else max(0, (total - k + n - 1) // n)
    return ShardOut(
        id=shard.id, shard_index=k, state=JobState(shard.state), worker_id=shard.worker_id,
        progress=Progress(done=shard.progress_done, total=share), attempts=shard.attempts,
        cancel_requested=shard.cancel_requested, error=shard.error,
        started_at=shard.started_at, finished_at=shard.finished_at,
        duration_s=_duration(shard), waiting_reason=waiting_reason,
        memory=memory_dict([(m.name, m.device, m.bytes) for m in shard.memory_peaks]))


def sample_out(sample: Sample | Any) -> SampleOut:
    """A stored Sample, or anything with the same attributes (the CLI's records)."""
    fields = sample.fields or {}
    return SampleOut(
        idx=sample.idx, prompt=sample.prompt, prompt_tokens=sample.prompt_tokens,
        prediction=sample.prediction, score=sample.score, latency_s=sample.latency_s,
        output_tokens=sample.output_tokens, context_length=fields.get("context_length"),
        depth_percent=fields.get("depth_percent"), fields=fields,
        peak_rss_mb=_mb(sample.peak_rss_bytes),
        peak_own_rss_mb=_mb(sample.peak_own_rss_bytes),
        peak_gpu_mb=_mb(sample.peak_gpu_bytes),
        error=sample.error)
