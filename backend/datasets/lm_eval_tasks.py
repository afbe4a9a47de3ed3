"""lm-evaluation-harness tasks as a dataset: any lm-eval task, group or list of them,
run through our runner in our worker (model manager, batching, out-of-memory halving,
memory tracking, resume and cancel between documents).

lm-eval builds the requests (its `TaskManager`, `Task.build_all_requests`: prompts,
few-shot examples, choices, generation kwargs), our runner answers them, lm-eval's
filters and `process_results` score each document and its own aggregation
(`_process_results`: per-task metrics with their stderr, group aggregates) makes the
job's scores. Every document is one Item and one stored sample, whose fields keep the
per-metric values, so a resumed job aggregates stored and new documents alike.

lm_eval imports torch: it is imported only in the worker's path (`build_items`,
`answer`, `aggregate`) and in the task-list subprocess, never by the server.
lm_eval_lookup.py finds the task list and the lengths of a job's requests (in that
subprocess); lm_eval_results.py scores a document and aggregates a job's metrics.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator

from backend.common.config import Settings
from backend.datasets.base import DataContext, Dataset, DatasetParams, Item, ScoreEntry, batch_rows
from backend.datasets.hub import DataMissing
from backend.datasets.lm_eval_catalog import (
    by_name,
    fetch_command,
    missing_data,
    missing_message,
)
from backend.datasets.lm_eval_kwargs import max_gen_toks, named_max_gen_toks, sampling_keys
from backend.datasets.lm_eval_lookup import (
    cached_task_list,
    datasets_offline,
    plain_token_bound,
    request_shapes,
    shared_task_manager,
)
from backend.datasets.lm_eval_results import aggregate_metrics, jsonable, score_document
from backend.engine.contracts import (
    BatchPlan,
    BatchRun,
    DatasetAnswer,
    LoadedModel,
    ModelInfo,
    ParamError,
)

log = logging.getLogger(__name__)


TASK_SEARCH = "/api/lm_eval/tasks"

EXAMPLES = Path(__file__).resolve().parent / "lm_eval_examples"
"""Example task YAMLs that ship with the product (lbs_example_mc): always indexed, first,
so a folder of LBS_LM_EVAL_INCLUDE_PATH may override them."""


class LmEvalParams(DatasetParams):
    tasks: list[str] = Field(
        min_length=1, max_length=64, title="Tasks",
        description="lm-evaluation-harness task or group names (e.g. arc_easy, mmlu), or "
                    "tasks from the local YAML folders of LBS_LM_EVAL_INCLUDE_PATH",
        json_schema_extra={"x-search": "/api/lm_eval/tasks"})
    num_fewshot: int | None = Field(
        None, ge=0, le=64, title="Few-shot examples",
        description="overrides each task's num_fewshot (lm_eval --num_fewshot); tasks "
                    "whose YAML sets 0 keep 0")
    limit: float | None = Field(
        None, gt=0, title="Limit",
        description="documents per task: a count, or a fraction of each task when under 1 "
                    "(lm_eval --limit)")
    gen_kwargs: dict[str, str | int | float | bool | list[str]] | str | None = Field(
        None, title="Generation kwargs",
        description="merged into generation tasks' generation_kwargs (lm_eval --gen_kwargs): "
                    "an object, or lm_eval's text form, e.g. max_gen_toks=64,until=Q:; "
                    "decoding is greedy")
    max_length: int | None = Field(
        None, ge=2, title="Context length",
        description="the tokens a request may take (lm_eval --model_args max_length): "
                    "longer prompts lose their earliest tokens, as lm-eval's HF backend "
                    "cuts them, and the job counts them; default the model's context")
    apply_chat_template: bool = Field(
        False, title="Chat template",
        description="prompts in the model's chat template, as lm_eval "
                    "--apply_chat_template renders them")
    fewshot_as_multiturn: bool = Field(
        True, title="Few-shot as turns",
        description="with the chat template, each few-shot example is a user turn and an "
                    "assistant turn (lm_eval --fewshot_as_multiturn); else one user turn")
    system_instruction: str | None = Field(
        None, max_length=20_000, title="System instruction",
        description="put before every prompt (lm_eval --system_instruction): the system "
                    "message with the chat template")
    bootstrap_iters: int = Field(
        100000, ge=0, le=1_000_000, title="Bootstrap iterations",
        description="for the stderr of metrics lm-eval bootstraps (0: no stderr)")
    fewshot_seed: int = Field(1234, title="Few-shot seed",
                              description="seed of the few-shot sampler (lm-eval's default)")

    @field_validator("tasks")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each task at most once")
        return value

    @field_validator("gen_kwargs")
    @classmethod
    def _greedy(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        if isinstance(value, str):
            value = parse_arg_string(value) or None
        if value and sampling_keys(value):
            raise ValueError(f"decoding is greedy here: {'/'.join(sampling_keys(value))} "
                             "not taken")
        return value


class LmEvalTasks(Dataset):
    name = "lm_eval"
    description = ("Any lm-evaluation-harness task, group or list of tasks (MMLU, ARC, "
                   "HellaSwag, ...) with its official prompts and metrics, scored by "
                   "lm-eval's own aggregation")
    Params = LmEvalParams
    data_per_task = True
    prompt_budget = True
    tasks_param = "tasks"
    cost = ("depends on the tasks; lm-eval's task index is built once (~15 s) and kept "
            "in LBS_CACHE_DIR")

    include_path: tuple[str, ...] = (str(EXAMPLES),)
    """The bundled example tasks, then LBS_LM_EVAL_INCLUDE_PATH (set by `configure`)."""
    cache_dir: Path | None = None
    """LBS_CACHE_DIR (set by `configure`): where lm-eval's task index is kept."""
    datasets_cache: Path = Path("~/.cache/huggingface/datasets").expanduser()
    """The `datasets` cache (settings.hf_datasets_cache, set by `configure`)."""

    breakdowns: ClassVar[list[dict[str, Any]]] = [
        {"kind": "table", "key": "metrics", "title": "lm-eval results (per task and group)",
         "columns": [{"key": "task", "title": "Task"}, {"key": "kind", "title": "Kind"},
                     {"key": "metric", "title": "Metric"},
                     {"key": "filter", "title": "Filter"},
                     {"key": "stderr", "title": "Stderr"},
                     {"key": "n_shot", "title": "Shots"},
                     {"key": "version", "title": "Version"}]},
        {"kind": "figures", "key": "truncation", "title": "Prompts longer than the context",
         "rows": [
             {"key": "truncated_prompts", "title": "Documents cut", "format": "count",
              "help": "their earliest tokens dropped, as lm-eval's HF backend drops them"},
             {"key": "truncated_tokens_max", "title": "Most tokens cut from one",
              "format": "count"}]},
        {"kind": "table", "key": "versions", "title": "Versions (for reproducibility)",
         "columns": [{"key": "what", "title": "Package or task"},
                     {"key": "version", "title": "Version"}]},
    ]
    sample_columns: ClassVar[list[dict[str, Any]]] = [
        {"key": "task", "title": "Task", "filter": True},
        {"key": "doc_id", "title": "Doc", "filter": False},
        {"key": "metrics", "title": "Metrics", "filter": False},
        {"key": "answers", "title": "Answer by filter", "filter": False},
        {"key": "truncated_tokens", "title": "Tokens cut", "filter": False},
    ]

    def __init__(self, context: DataContext | None = None) -> None:
        self._docs: dict[int, tuple[str, Any, list[Any]]] = {}
        self._loaded: dict[str, Any] | None = None
        super().__init__(context)

    def configure(self, settings: Settings) -> None:
        self.include_path = tuple(dict.fromkeys((str(EXAMPLES),
                                                 *settings.lm_eval_include_path)))
        self.cache_dir = settings.cache_dir
        self.datasets_cache = settings.hf_datasets_cache

    def chat_template(self, params: LmEvalParams) -> bool:
        return params.apply_chat_template

    def check(self, params: LmEvalParams, model: ModelInfo) -> None:
        if params.methods:
            raise ParamError("methods", "not offered for lm_eval tasks")
        if model.max_length and params.max_length and params.max_length > model.max_length:
            raise ParamError("max_length", f"max_length {params.max_length} is above the "
                             f"{model.max_length} tokens {model.name} can read")
        context = params.max_length or model.max_length
        budget = named_max_gen_toks(params.gen_kwargs or {})
        if context and budget is not None and budget >= context:
            raise ParamError("gen_kwargs", f"max_gen_toks {budget} leaves no room for the "
                             f"prompt in a context of {context} tokens")
        rows = cached_task_list(self.include_path, self.cache_dir)
        if rows is None:
            return  # still indexing: the worker says what it cannot find
        known = {r["name"] for r in rows}
        unknown = [t for t in params.tasks if t not in known]
        if unknown:
            raise ParamError("tasks", f"unknown lm-eval task(s): {', '.join(unknown)}"
                             + _suggest(unknown, known))
        access = self.data_access
        allowed = bool(access and access.allow_download and not access.offline)
        missing = missing_data(list(params.tasks), by_name(rows), self.datasets_cache)
        # local files that do not exist are refused always; hub data when it cannot come
        refused = [m for m in missing if m["source"] == "local" or not allowed]
        if refused:
            raise DataMissing(missing_message(
                refused, allow_download=bool(access and access.allow_download),
                offline=bool(access and access.offline), cache=self.datasets_cache),
                {"fetch_command": fetch_command(sorted({m["asked"] for m in refused})),
                 "downloads_allowed": allowed}, field="tasks")

    def worst_batches(self, params: LmEvalParams, model_max: int | None) -> list[BatchPlan]:
        """The job's batches from the lengths of the requests lm-eval builds for its
        tasks (`request_shapes`, in a subprocess: lm_eval imports torch), as the worker
        answers them: log-likelihood requests `batch_size` together, their contexts in
        one padded pass (only the last position's logits, then the continuations'
        tokens); generation requests `batch_size` together; rolling ones one window
        of at most the model's length, every position scored. When the requests cannot
        be built here (a dataset not in the local cache), the default: the model's
        whole context."""
        shapes = request_shapes(self.include_path, params, self.cache_dir,
                                offline=not self._downloads_allowed())
        if shapes is None:
            return super().worst_batches(params, model_max)
        cap = min(n for n in (model_max, params.max_length, 2**31) if n)

        def bound(nbytes: int) -> int:
            return min(plain_token_bound(nbytes), cap)

        rows, plans = batch_rows(params), []
        if "loglikelihood" in shapes:
            ll = shapes["loglikelihood"]
            plans.append(BatchPlan("loglikelihood", rows, bound(ll["context"]),
                                   bound(ll["continuation"]), padded=rows > 1,
                                   continuations=rows))
        if "generate_until" in shapes:
            gen = shapes["generate_until"]
            plans.append(BatchPlan("generate", min(rows, gen["count"]), bound(gen["context"]),
                                   gen["max_gen_toks"], padded=rows > 1))
        if "loglikelihood_rolling" in shapes:
            window = bound(shapes["loglikelihood_rolling"]["text"]) + 1
            window = min(window, cap)
            plans.append(BatchPlan("rolling", 1, window, 0, padded=False,
                                   logits_positions=window))
        return plans

    def _downloads_allowed(self) -> bool:
        access = self.data_access
        return bool(access and access.allow_download and not access.offline)

    # --- building ------------------------------------------------------------------

    def _load(self, params: LmEvalParams) -> dict[str, Any]:
        started = time.perf_counter()
        paths = tuple(self.include_path)
        manager = shared_task_manager(paths, False, self.cache_dir) if paths else None
        if manager is None or any(t not in manager.all_tasks for t in params.tasks):
            manager = shared_task_manager(paths, True, self.cache_dir)
        unknown = [t for t in params.tasks if t not in manager.all_tasks]
        if unknown:
            raise ParamError("tasks", f"unknown lm-eval task(s): {', '.join(unknown)}")
        try:
            with datasets_offline(not self._downloads_allowed()):
                loaded = manager.load(list(params.tasks))
        except (ConnectionError, FileNotFoundError) as exc:
            if self._downloads_allowed():
                raise
            raise ParamError("tasks", offline_message(params.tasks, exc,
                                                      self.datasets_cache)) from None
        for task in loaded["tasks"].values():
            if task.get_config("output_type") == "generate_until":
                if params.gen_kwargs:
                    task.set_config(key="generation_kwargs", value=dict(params.gen_kwargs),
                                    update=True)
                sampled = sampling_keys(task.get_config("generation_kwargs") or {})
                if sampled:
                    raise ParamError("tasks", f"task {task.get_config('task')} samples "
                                     f"({', '.join(sampled)} in its generation_kwargs); "
                                     "decoding is greedy here: set them off in gen_kwargs")
            if params.num_fewshot is not None:
                if task.get_config("num_fewshot") != 0:
                    task.set_config(key="num_fewshot", value=params.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=params.fewshot_seed)
        log.info("[Datasets] lm-eval loaded %d task(s) in %.1f s", len(loaded["tasks"]),
                 time.perf_counter() - started)
        return loaded

    def build_items(self, params: LmEvalParams, tokenizer: Any) -> list[Item]:
        """One item per lm-eval document: tasks in name order, documents in doc_id order
        (lm-eval's own order), so the same parameters give the same idx."""
        import random

        import numpy as np
        from lm_eval.evaluator_utils import get_sample_size

        # simple_evaluate's seeds: few-shot sampling and some doc_to_text use them
        random.seed(0)
        np.random.seed(1234)
        self._loaded = self._load(params)
        self._params = params
        items: list[Item] = []
        for name in sorted(self._loaded["tasks"]):
            task = self._loaded["tasks"][name]
            chat = params.apply_chat_template
            task.build_all_requests(
                limit=get_sample_size(task, params.limit), rank=0, world_size=1,
                system_instruction=params.system_instruction, apply_chat_template=chat,
                fewshot_as_multiturn=params.fewshot_as_multiturn,
                chat_template=tokenizer.render_chat if chat else None,
                tokenizer_name="lbs" if chat else "")
            by_doc: dict[int, list[Any]] = defaultdict(list)
            for inst in task.instances:
                by_doc[inst.doc_id].append(inst)
            for doc_id in sorted(by_doc):
                instances = sorted(by_doc[doc_id], key=lambda x: x.idx)
                first = instances[0]
                idx = len(items)
                self._docs[idx] = (name, first.doc, instances)
                kind = first.request_type
                max_new = 0
                if kind == "generate_until":
                    max_new = max_gen_toks(first.args[1])
                prompt = first.args[0]
                items.append(Item(
                    idx=idx, prompt=prompt, prompt_tokens=0, max_new_tokens=max_new,
                    reference=jsonable(task.doc_to_target(first.doc)),
                    fields={"task": name, "doc_id": doc_id, "request_type": kind}))
        return items

    # --- answering (the evaluation loop's `answer` hook) -----------------------------

    answers_itself = True

    def answer(self, items: list[Item], model: LoadedModel,
               run: BatchRun) -> list[DatasetAnswer]:
        """Answer a batch of documents through `runner`; `run(fn, requests)` calls a runner
        method in batches, halving them on out-of-memory (an OomFailure in place of a
        result that does not fit alone)."""
        from backend.datasets.lm_eval_lm import RunnerLM
        from backend.engine.contracts import OomFailure

        lm = RunnerLM(model, run, self._params.max_length, self._params.apply_chat_template)
        by_type: dict[str, list[Any]] = defaultdict(list)
        for item in items:
            for inst in self._docs[item.idx][2]:
                by_type[inst.request_type].append(inst)
        unknown = set(by_type) - {"loglikelihood", "generate_until", "loglikelihood_rolling"}
        if unknown:
            raise ValueError(f"unsupported lm-eval request type(s): {', '.join(unknown)}")
        for kind, instances in by_type.items():
            for inst, out in zip(instances, getattr(lm, kind)(instances), strict=True):
                # a task's `repeats`: lm-eval answers each copy of a request; greedy
                # decoding gives every copy the same answer, so it is computed once
                inst.resps = [out] * inst.repeats
        answers = []
        for item in items:
            name, doc, instances = self._docs[item.idx]
            oom = next((r.resps[0].message for r in instances
                        if isinstance(r.resps[0], OomFailure)), None)
            if oom is not None:
                answers.append(DatasetAnswer(error=oom, fields=item.fields))
                continue
            answers.append(score_document(self._loaded["tasks"][name], item, doc,
                                          instances, model))
        return answers

    def score_answer(self, item: Item, prediction: str, fields: dict[str, Any]) -> float:
        """The document's first metric (e.g. acc, exact_match) as its 0-1 sample score
        where it is one; perplexity-like metrics are not, and score 0."""
        for value in (fields.get("metrics") or {}).values():
            if isinstance(value, int | float) and 0 <= value <= 1:
                return float(value)
            return 0.0
        return 0.0

    def score(self, item: Item, prediction: str) -> float:
        return self.score_answer(item, prediction, item.fields)

    def explain(self, item: Item, prediction: str) -> dict[str, Any]:
        return {"reference": item.reference}

    # --- aggregation ---------------------------------------------------------------

    def aggregate(self, scored: list[tuple[dict[str, Any], float]]) -> list[ScoreEntry]:
        """lm-eval's own aggregation of the stored per-document metric values
        (lm_eval_results.aggregate_metrics)."""
        if self._loaded is None:
            raise RuntimeError("aggregate before build_items")
        return aggregate_metrics(self._loaded, self._params.bootstrap_iters, scored)

    def describe(self) -> dict[str, Any]:
        """Small: the task list itself is searched through GET /api/lm_eval/tasks (the
        Launch form's search box, the MCP tool search_lm_eval_tasks)."""
        out = super().describe()
        tasks = cached_task_list(self.include_path, self.cache_dir)
        out["tasks"] = ({"status": "indexing", "search": TASK_SEARCH} if tasks is None else
                        {"status": "ready", "count": len(tasks), "search": TASK_SEARCH})
        return out





def offline_message(tasks: list[str], exc: BaseException, cache: Path) -> str:
    """Why a task's data could not be read with downloads off, and how to get it."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (f"the data of lm-eval task(s) {', '.join(tasks)} is not in this machine's Hugging "
            f"Face datasets cache ({cache}) and data downloads are off "
            f"(LBS_ALLOW_DATA_DOWNLOAD=0; {reason}). On a machine with a network run "
            f"`{fetch_command(list(tasks))}` and copy the cache folder here, or set "
            "LBS_ALLOW_DATA_DOWNLOAD=1")


def _suggest(unknown: list[str], known: set[str]) -> str:
    """"; did you mean …" for names close to known ones (a typo, another case)."""
    import difflib

    lowered = {k.lower(): k for k in known}
    hints = []
    for name in unknown:
        close = ([lowered[name.lower()]] if name.lower() in lowered else
                 difflib.get_close_matches(name, known, n=3, cutoff=0.75))
        if close:
            hints.append(f"{name} -> {' or '.join(close)}")
    return f"; did you mean {', '.join(hints)}?" if hints else ""


def parse_arg_string(text: str) -> dict[str, Any]:
    """lm_eval's `key=value,key=value` argument text (`simple_parse_args_string`), values
    read as booleans, integers or floats where they are."""
    out: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {part!r}")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        out[key.strip()] = value
    return out
