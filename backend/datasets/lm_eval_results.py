"""Scoring lm-eval documents the way lm-eval does: a document's answer and metrics from
its responses (`score_document`: the task's filters and `process_results`), and
the job's scores from the stored metric values (`aggregate_metrics`: lm-eval's own
`_process_results`, per task and group, each metric with its stderr).
"""

from __future__ import annotations

import json
from collections import defaultdict
from importlib.metadata import version as package_version
from typing import Any

from backend.common.stats import normal_spread
from backend.datasets.base import Item, ScoreEntry
from backend.engine.contracts import DatasetAnswer, LoadedModel


def score_document(task: Any, item: Item, doc: Any, instances: list[Any],
                     runner: LoadedModel) -> DatasetAnswer:
    """The answer to one document of `task` whose requests `instances` hold their
    responses: the text, token counts, and fields with each metric of the task's filters."""
    for inst in instances:
        inst.filtered_resps = {}
    for ensemble in task._filters:
        ensemble.apply(instances)
    metrics: dict[str, Any] = {}
    for key in instances[0].filtered_resps:
        values = task.process_results(doc, [i.filtered_resps[key] for i in instances])
        for metric, value in values.items():
            metrics[f"{metric},{key}"] = jsonable(value)
    kind = instances[0].request_type
    first_filtered = next(iter(instances[0].filtered_resps.values()))
    prompt_tokens = output_tokens = 0
    if kind == "loglikelihood":
        resps = [list(i.resps[0]) for i in instances]
        choices = [i.args[1] for i in instances]
        best = max(range(len(resps)), key=lambda k: resps[k][0])
        text = choices[best]
        extra = {"choices": choices, "resps": resps}
    elif kind == "generate_until":
        text = first_filtered if isinstance(first_filtered, str) else str(first_filtered)
        prompt_tokens, output_tokens = getattr(instances[0], "lbs_tokens", (0, 0))
        # every filter's answer, side by side (GSM8K's strict-match and flexible-extract)
        extra = {"raw": instances[0].resps[0],
                 "answers": {key: jsonable(value)
                             for key, value in instances[0].filtered_resps.items()}}
    else:
        text = repr(instances[0].resps[0])
        extra = {"loglikelihood": instances[0].resps[0]}
    # tokens lost to the context's length (the most any of the document's requests lost)
    extra["truncated_tokens"] = max(getattr(i, "lbs_truncated", 0) for i in instances)
    return DatasetAnswer(text, prompt_tokens or len(runner.encode(item.prompt)), output_tokens,
                         {**item.fields, "metrics": metrics, **extra})


def aggregate_metrics(loaded: dict[str, Any], bootstrap_iters: int,
                      scored: list[tuple[dict[str, Any], float]]) -> list[ScoreEntry]:
    """lm-eval's own aggregation (`_process_results`) of the stored per-document
    metric values of the tasks `loaded` (TaskManager.load): per task and group, each
    metric with its stderr (bootstrapped `bootstrap_iters` times where lm-eval does)."""
    from lm_eval.evaluator_utils import _process_results

    tasks = loaded["tasks"]
    acc = {name: {"task": task, "raw_metrics": defaultdict(list), "logged_samples": []}
           for name, task in tasks.items()}
    by_task: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for fields, _ in scored:
        if fields.get("task") in acc:
            by_task[fields["task"]].append((fields.get("doc_id", 0), fields))
    for name, rows in by_task.items():
        for _, fields in sorted(rows, key=lambda r: r[0]):
            for key, value in (fields.get("metrics") or {}).items():
                metric, _, filt = key.partition(",")
                acc[name]["raw_metrics"][(metric, filt)].append(restore_metric(value))
    acc = {name: a for name, a in acc.items() if a["raw_metrics"]}
    if not acc:
        return [ScoreEntry("overall", 0.0, 0)]
    results = _process_results(acc, loaded.get("groups"), bootstrap_iters)._to_eval_results()
    entries = [ScoreEntry.mean("overall", [s for _, s in scored])]
    n_shot = results.get("n-shot", {})
    versions = results.get("versions", {})
    samples = {k: v.get("effective", v.get("original"))
               for k, v in (results.get("n-samples") or {}).items()}
    groups = set(results.get("groups", {}))
    for task_name, values in {**results.get("results", {}),
                              **results.get("groups", {})}.items():
        for key, value in values.items():
            if (key in ("alias", "sample_len") or "_stderr," in key
                    or not isinstance(value, int | float)):
                continue
            metric, _, filt = key.partition(",")
            stderr = values.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, int | float) else None
            # lm-eval's own stderr (its formula or its bootstrap), a normal interval
            entries.append(ScoreEntry.spread(
                "metric", float(value), int(samples.get(task_name) or 0),
                normal_spread(float(value), stderr) if stderr is not None else None, {
                    "task": task_name, "kind": "group" if task_name in groups else "task",
                    "metric": metric, "filter": filt, "stderr": stderr,
                    "n_shot": n_shot.get(task_name), "version": versions.get(task_name)}))
    cut = [fields.get("truncated_tokens") or 0 for fields, _ in scored]
    entries.append(ScoreEntry("truncated_prompts", float(sum(1 for n in cut if n)), len(cut)))
    entries.append(ScoreEntry("truncated_tokens_max", float(max(cut, default=0)), len(cut)))
    entries.append(ScoreEntry("version", 0.0, 0, {"what": "lm-eval",
                                                   "version": package_version("lm-eval")}))
    for name in sorted(versions):
        entries.append(ScoreEntry("version", 0.0, 0, {"what": name,
                                                       "version": versions[name]}))
    return entries


def jsonable(value: Any) -> Any:
    """lm-eval values as JSON (tuples -> lists, numpy numbers -> Python)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item")
                                 else str(o)))


def restore_metric(value: Any) -> Any:
    """A stored metric value back as lm-eval gave it (pairs such as bits_per_byte's
    (log-likelihood, bytes) were tuples)."""
    return tuple(value) if isinstance(value, list) else value
