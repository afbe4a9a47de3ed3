"""Results across jobs: the leaderboard (models x datasets with score, memory, speed),
memory against context length, two jobs compared item by item, lm-eval's export format.

Read-only queries over the jobs, scores, memory_peaks and samples tables; no torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from backend.common import stats
from backend.queue.db import Job, JobState, MemoryPeak, Sample, Score

MAX_JOBS = 2000
"""The leaderboard reads at most this many of the newest finished jobs."""

def model_identity(name: str, resolve: Callable[[str], Path | None]) -> tuple[str, str]:
    """(key, display name) of a model as jobs named it. A checkpoint folder named by
    its absolute path and by its name under LBS_MODEL_DIRS resolves to one folder, so
    both get one key; the display name is the folder's name. `resolve` gives the folder
    of a name (None when the name is its own identity, as an API model's is, or when it
    cannot: a model since removed, a hub id not cached)."""
    try:
        folder = resolve(name)
    except Exception:  # noqa: BLE001 - any failure means "not resolvable now"
        folder = None
    if folder is not None:
        return str(folder), folder.name
    stripped = name.rstrip("/")
    if stripped.startswith(("/", ".", "~")):  # a folder that is gone: its name
        return Path(stripped).name, Path(stripped).name
    return stripped, stripped


def _peaks(session: Any, ids: list[int]) -> dict[int, dict[str, int]]:
    """Per job: `gpu` (the allocator's reserved peak summed over devices, else what NVML
    saw for the process), `rss` (the job's own peak resident memory, above the worker's
    baseline; the process's for a job run before that was measured) and `rss_process`
    (the worker process's peak), in bytes."""
    out: dict[int, dict[str, int]] = {i: {} for i in ids}
    nvml: dict[int, int] = {}
    for row in session.execute(sa.select(MemoryPeak.job_id, MemoryPeak.name, MemoryPeak.bytes)
                               .where(MemoryPeak.job_id.in_(ids))):
        if row.name == "rss_own_peak":
            out[row.job_id]["rss"] = row.bytes
        elif row.name == "rss_peak":
            out[row.job_id]["rss_process"] = row.bytes
            out[row.job_id].setdefault("rss", row.bytes)
        elif row.name == "cuda_max_reserved":
            out[row.job_id]["gpu"] = out[row.job_id].get("gpu", 0) + row.bytes
        elif row.name == "cuda_nvml_process_used":
            nvml[row.job_id] = row.bytes
    for job_id, value in nvml.items():
        out[job_id].setdefault("gpu", value)
    return out


RUN_ONLY_PARAMS = frozenset({"batch_size", "on_oom", "bootstrap_iters"})
"""Parameters that say how a job ran, not what it measured: runs that differ only in
these are runs of one configuration (a difference in their scores shows as spread)."""

def task_identity(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(key, parameters) of a configuration: the effective parameters less the run-only
    ones, and a short hash of them as canonical JSON."""
    shown = {k: v for k, v in sorted(params.items()) if k not in RUN_ONLY_PARAMS}
    text = json.dumps(shown, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12], shown


def recorded_identity(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The parts of a task's identity only the run knows, from its manifest: the hash of
    the data files read and of the prompt code (none for a job run before manifests)."""
    task = (manifest or {}).get("task") or {}
    out = {}
    if (task.get("data") or {}).get("sha256"):
        out["data_sha256"] = task["data"]["sha256"][:16]
    if task.get("prompt_code_sha256"):
        out["prompt_code_sha256"] = task["prompt_code_sha256"][:16]
    return out


def _lm_eval_rows(session: Any, ids: list[int]) -> dict[int, dict[str, dict[str, Any]]]:
    """Per lm-eval job, per task or group: its metrics in the order lm-eval wrote them."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for row in session.execute(sa.select(Score.job_id, Score.value, Score.count, Score.labels,
                                         Score.stderr, Score.ci_low, Score.ci_high)
                               .where(Score.job_id.in_(ids), Score.name == "metric")
                               .order_by(Score.id)):
        labels = row.labels or {}
        task = out.setdefault(row.job_id, {}).setdefault(labels.get("task"), {
            "kind": labels.get("kind"), "version": labels.get("version"),
            "n_shot": labels.get("n_shot"), "count": row.count, "metrics": []})
        task["metrics"].append({
            "metric": labels.get("metric"), "filter": labels.get("filter"), "value": row.value,
            "stderr": row.stderr if row.stderr is not None else labels.get("stderr"),
            "ci95": [row.ci_low, row.ci_high] if row.ci_low is not None else None})
    return out


def leaderboard(factory: sessionmaker, resolve: Callable[[str], Path | None],
                effective: Callable[[str, dict[str, Any]], dict[str, Any]] = (
                    lambda _dataset, params: params),
                tasks_param: Callable[[str], str | None] = lambda _dataset: None
                ) -> dict[str, Any]:
    """One row per model and configuration: a dataset with its effective parameters
    (`effective` fills the dataset's defaults; run-only ones such as batch_size left
    out), and per task or group of its own for a dataset whose jobs run several tasks
    (`tasks_param` names the parameter listing them, left out of a task's identity).
    The newest succeeded run of each
    is shown: main score with its standard error and 95% interval, peak memory (GPU, or
    for a job that ran without one its own RSS peak above the worker's baseline, with the
    process's peak beside it in `process_peak_bytes`), tokens per second, duration, the job. `runs`
    counts the runs of the configuration, `runs_agree` those with the shown score, and
    `run_spread` is [lowest, highest] when they differ; `distinct` names the parameters
    that set the row apart from the other rows of its benchmark."""
    with factory() as session:
        jobs = session.execute(
            sa.select(Job.id, Job.model, Job.dataset, Job.params, Job.started_at,
                      Job.finished_at, Job.progress_done, Job.manifest)
            .where(Job.state == JobState.SUCCEEDED.value, Job.parent_id.is_(None))
            .order_by(Job.id.desc()).limit(MAX_JOBS)).all()
        ids = [j.id for j in jobs]
        if not ids:
            return {"rows": [], "models": []}
        overall = {r.job_id: r for r in session.execute(
            sa.select(Score.job_id, Score.value, Score.stderr, Score.ci_low, Score.ci_high)
            .where(Score.job_id.in_(ids), Score.name == "overall"))}
        tokens = {r.job_id: (r.prompt or 0) + (r.output or 0) for r in session.execute(
            sa.select(Sample.job_id, sa.func.sum(Sample.prompt_tokens).label("prompt"),
                      sa.func.sum(Sample.output_tokens).label("output"))
            .where(Sample.job_id.in_(ids)).group_by(Sample.job_id))}
        peaks = _peaks(session, ids)
        split = {name: tasks_param(name) for name in {j.dataset for j in jobs}}
        tasks = _lm_eval_rows(session, [j.id for j in jobs if split[j.dataset]])
    identities: dict[str, tuple[str, str]] = {}
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for job in jobs:  # newest first: the first run of a configuration is the one shown
        key, display = identities.setdefault(job.model, model_identity(job.model, resolve))
        params = {**effective(job.dataset, job.params or {}), **recorded_identity(job.manifest)}
        weights = ((job.manifest or {}).get("model") or {}).get("weights_sha256")
        if weights:  # the same folder with other weights in it is another model
            key = f"{key}#{weights[:12]}"
        duration = ((job.finished_at - job.started_at).total_seconds()
                    if job.started_at and job.finished_at else None)
        peak, score = peaks[job.id], overall.get(job.id)
        common = {
            "model": display, "model_key": key, "dataset": job.dataset, "job_id": job.id,
            "peak_bytes": peak.get("gpu", peak.get("rss")),
            "peak_kind": "gpu" if "gpu" in peak else "rss" if "rss" in peak else None,
            "process_peak_bytes": peak.get("rss_process"),
            "tokens_per_s": round(tokens.get(job.id, 0) / duration, 1)
            if duration and tokens.get(job.id) else None,
            "duration_s": round(duration, 3) if duration is not None else None}
        entries = []
        if split[job.dataset] and tasks.get(job.id):
            base = {k: v for k, v in params.items() if k != split[job.dataset]}
            for task, info in tasks[job.id].items():
                first = info["metrics"][0]
                entries.append(({**base, "task": task, "task_version": info["version"],
                                 "n_shot": info["n_shot"]}, {
                    "benchmark": f"{job.dataset}:{task}", "task": task, "task_kind": info["kind"],
                    "metric": first["metric"], "metrics": info["metrics"],
                    "score": first["value"], "score_stderr": first["stderr"],
                    "score_ci95": first["ci95"], "samples": info["count"],
                    "few_items": 0 < (info["count"] or 0) < stats.FEW_ITEMS}))
        else:
            entries.append((params, {
                "benchmark": job.dataset, "score": score.value if score else None,
                "score_stderr": score.stderr if score else None,
                "score_ci95": [score.ci_low, score.ci_high]
                if score is not None and score.ci_low is not None else None,
                "samples": job.progress_done,
                "few_items": 0 < (job.progress_done or 0) < stats.FEW_ITEMS}))
        for identity_params, own in entries:
            params_key, shown = task_identity(identity_params)
            row = rows.get((key, own["benchmark"], params_key))
            if row is not None:
                row["runs"] += 1
                row["run_scores"].append(own["score"])
                if job.model not in row["names"]:
                    row["names"].append(job.model)
                continue
            rows[(key, own["benchmark"], params_key)] = {
                **common, **own, "names": [job.model], "params_key": params_key,
                "params": shown, "runs": 1, "run_scores": [own["score"]]}
    out_rows = list(rows.values())
    by_benchmark: dict[str, list[dict[str, Any]]] = {}
    for row in out_rows:
        by_benchmark.setdefault(row["benchmark"], []).append(row)
        scores = [s for s in row.pop("run_scores") if s is not None]
        row["runs_agree"] = sum(1 for s in scores if row["score"] is not None
                                and abs(s - row["score"]) <= 1e-9)
        row["run_spread"] = ([min(scores), max(scores)]
                             if len(scores) > 1 and max(scores) - min(scores) > 1e-9 else None)
    for group in by_benchmark.values():
        keys = sorted({k for row in group for k in row["params"]})
        differ = [k for k in keys
                  if len({json.dumps(r["params"].get(k), sort_keys=True, default=str)
                          for r in group}) > 1]
        for row in group:
            row["distinct"] = {k: row["params"].get(k) for k in differ}
    models = sorted({(r["model_key"], r["model"]) for r in out_rows})
    return {"rows": out_rows, "models": [{"key": k, "model": m} for k, m in models]}


def memory_by_length(factory: sessionmaker, resolve: Callable[[str], Path | None],
                     datasets: tuple[str, ...]) -> dict[str, Any]:
    """Per dataset, per model (its newest succeeded job): the peak memory of the samples
    at each context length, [[tokens, bytes], ...] sorted by length. The length is the
    NIAH cell's context length, else the prompt's tokens; the memory is each sample's
    GPU peak, or when the job ran without a GPU its own RSS peak above the job's baseline
    (the process's on samples stored before that was measured) (`kind`)."""
    out: dict[str, list[dict[str, Any]]] = {}
    with factory() as session:
        for dataset in datasets:
            jobs = session.execute(
                sa.select(Job.id, Job.model).where(Job.state == JobState.SUCCEEDED.value,
                                                   Job.dataset == dataset)
                .order_by(Job.id.desc()).limit(200)).all()
            seen: set[str] = set()
            series = []
            for job in jobs:
                key, display = model_identity(job.model, resolve)
                if key in seen:
                    continue
                seen.add(key)
                samples = session.execute(
                    sa.select(Sample.prompt_tokens, Sample.fields, Sample.peak_gpu_bytes,
                              Sample.peak_rss_bytes, Sample.peak_own_rss_bytes)
                    .where(Sample.job_id == job.id)).all()
                gpu = any(s.peak_gpu_bytes for s in samples)
                best: dict[int, int] = {}
                for s in samples:
                    value = s.peak_gpu_bytes if gpu else (
                        s.peak_rss_bytes if s.peak_own_rss_bytes is None
                        else s.peak_own_rss_bytes)
                    if value is None:
                        continue
                    length = int((s.fields or {}).get("context_length") or s.prompt_tokens)
                    best[length] = max(best.get(length, 0), value)
                if best:
                    series.append({"model": display, "job_id": job.id,
                                   "kind": "gpu" if gpu else "rss",
                                   "points": sorted([k, v] for k, v in best.items())})
            out[dataset] = series
    return {"datasets": out}


DISAGREEMENTS_SHOWN = 200
"""At most this many items where two compared jobs disagree come back, worst first."""


class CompareError(ValueError):
    """Two jobs that cannot be compared: `field` (a or b) and why."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status


def _item_keys(rows: list[Any]) -> dict[tuple[Any, ...], Any]:
    """Samples by what identifies their item across jobs: the method (a comparison
    job's), the prompt, and its occurrence among samples with the same prompt."""
    seen: dict[tuple[Any, ...], int] = {}
    out: dict[tuple[Any, ...], Any] = {}
    for row in rows:
        base = ((row.fields or {}).get("method"), row.prompt)
        seen[base] = seen.get(base, -1) + 1
        out[(*base, seen[base])] = row
    return out


def _differing(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested record as dotted keys (`versions.torch`); lists stay values."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


MANIFEST_NOT_COMPARED = ("model.reference", "task.params")
"""Manifest entries a comparison does not list: how the model was named (its location
and fingerprint say whether it is the same model) and the parameters (listed apart)."""


def manifest_differences(a: dict[str, Any] | None, b: dict[str, Any] | None
                         ) -> dict[str, list[Any]] | None:
    """What differs between two runs' manifests, as dotted keys; None when either has
    none (a job from before manifests were recorded)."""
    if not a or not b:
        return None
    fa, fb = flatten(a), flatten(b)
    return {k: v for k, v in _differing(fa, fb).items()
            if not k.startswith(MANIFEST_NOT_COMPARED)}


def paired_comparison(factory: sessionmaker, a_id: int, b_id: int,
                      effective: Callable[[str, dict[str, Any]], dict[str, Any]] = (
                          lambda _dataset, params: params)) -> dict[str, Any]:
    """Two jobs compared item by item on the items both scored (matched by prompt):
    counts of both right / only A / only B / both wrong and McNemar's exact test for
    0-1 scores, the difference of means (A - B) with its 95% interval (paired), the
    items where they disagree with both answers, the parameters that differ
    (`effective` fills a dataset's defaults) and, when the items are cells of a context
    length x depth grid (NIAH's), the heatmap difference.
    Raises CompareError naming `a` or `b`."""
    with factory() as session:
        jobs = {j.id: j for j in session.scalars(sa.select(Job).where(Job.id.in_([a_id, b_id])))}
        for field, job_id in (("a", a_id), ("b", b_id)):
            if job_id not in jobs:
                raise CompareError(field, f"job {job_id} does not exist", 404)
        a, b = jobs[a_id], jobs[b_id]
        if a.dataset != b.dataset:
            raise CompareError("b", f"job {b_id} ran {b.dataset!r} and job {a_id} ran "
                               f"{a.dataset!r}: compare two jobs of one dataset")
        columns = (Sample.idx, Sample.prompt, Sample.prediction, Sample.score, Sample.fields)
        samples = {job_id: _item_keys(session.execute(
            sa.select(*columns).where(Sample.job_id == job_id, Sample.score.is_not(None))
            .order_by(Sample.idx)).all()) for job_id in (a_id, b_id)}
        overall = dict(session.execute(sa.select(Score.job_id, Score.value).where(
            Score.job_id.in_([a_id, b_id]), Score.name == "overall")).all())
    shared = [k for k in samples[a_id] if k in samples[b_id]]
    pairs = [(samples[a_id][k], samples[b_id][k]) for k in shared]
    sa_scores = [float(x.score) for x, _ in pairs]
    sb_scores = [float(y.score) for _, y in pairs]
    binary = stats.is_binary(sa_scores) and stats.is_binary(sb_scores)
    paired: dict[str, Any] = {"n": len(pairs), "binary": binary,
                              "a_mean": sum(sa_scores) / len(pairs) if pairs else None,
                              "b_mean": sum(sb_scores) / len(pairs) if pairs else None,
                              "both_right": None, "a_only": None, "b_only": None,
                              "both_wrong": None, "mcnemar_p": None,
                              "difference": None, "ci95": None}
    if binary:
        a_only = sum(1 for x, y in zip(sa_scores, sb_scores, strict=True) if x > y)
        b_only = sum(1 for x, y in zip(sa_scores, sb_scores, strict=True) if x < y)
        both_right = sum(1 for x, y in zip(sa_scores, sb_scores, strict=True) if x == y == 1)
        paired.update(both_right=both_right, a_only=a_only, b_only=b_only,
                      both_wrong=len(pairs) - both_right - a_only - b_only,
                      mcnemar_p=stats.mcnemar_exact(a_only, b_only))
    difference = stats.paired_difference(sa_scores, sb_scores)
    if difference is not None:
        paired["difference"], paired["ci95"] = difference[0], list(difference[1])
    disagree = sorted((p for p in pairs if p[0].score != p[1].score),
                      key=lambda p: (-abs(p[0].score - p[1].score), p[0].idx))
    out: dict[str, Any] = {
        "a": _job_summary(a, overall.get(a_id), len(samples[a_id])),
        "b": _job_summary(b, overall.get(b_id), len(samples[b_id])),
        "same_items": len(pairs) == len(samples[a_id]) == len(samples[b_id]),
        "differing_params": _differing(effective(a.dataset, a.params or {}),
                                       effective(b.dataset, b.params or {})),
        "differing_manifest": manifest_differences(a.manifest, b.manifest),
        "paired": paired,
        "disagreements_total": len(disagree),
        "disagreements": [{
            "a_idx": x.idx, "b_idx": y.idx, "prompt_tail": x.prompt[-300:],
            "reference": (x.fields or {}).get("reference"),
            "a": {"prediction": x.prediction, "score": x.score},
            "b": {"prediction": y.prediction, "score": y.score}}
            for x, y in disagree[:DISAGREEMENTS_SHOWN]]}
    cells: dict[tuple[int, float], list[tuple[float, float]]] = {}
    for x, y in pairs:
        f = x.fields or {}
        if f.get("context_length") is not None and f.get("depth_percent") is not None:
            cells.setdefault((f["context_length"], f["depth_percent"]), []).append(
                (float(x.score), float(y.score)))
    if cells:
        out["heatmap_difference"] = [
            {"context_length": length, "depth_percent": depth,
             "a": sum(p[0] for p in v) / len(v), "b": sum(p[1] for p in v) / len(v),
             "difference": sum(p[0] - p[1] for p in v) / len(v), "count": len(v)}
            for (length, depth), v in sorted(cells.items())]
    return out


def _job_summary(job: Job, overall: float | None, scored: int) -> dict[str, Any]:
    return {"id": job.id, "model": job.model, "dataset": job.dataset, "state": job.state,
            "overall": overall, "scored_items": scored}


def _lm_eval_key(metric: str, filt: str | None) -> str:
    return f"{metric},{filt or 'none'}"


def lm_eval_results(job: dict[str, Any], per_task: bool = False) -> dict[str, Any]:
    """A job's scores in the results format `lm_eval` writes (results, groups,
    group_subtasks, configs, versions, n-shot, n-samples, config), so tools that read
    lm-eval's output read ours. A job of a dataset that runs several tasks (`per_task`,
    lm-eval's) gives its tasks and groups as lm-eval computed them; any other dataset is
    a task named after it whose metrics are its unlabelled scores (`score` is the
    overall one) with their standard errors, and whose breakdown rows (subjects, cells,
    subsets…) are its subtasks."""
    scores, params = job.get("scores") or {}, job.get("params") or {}
    out: dict[str, Any] = {"results": {}, "groups": {}, "group_subtasks": {}, "configs": {},
                           "versions": {}, "n-shot": {}, "higher_is_better": {},
                           "n-samples": {}}
    if per_task and scores.get("metrics"):
        for row in scores["metrics"]:
            task = row["task"]
            entry = out["results"].setdefault(task, {"alias": task})
            key = _lm_eval_key(row["metric"], row.get("filter"))
            entry[key] = row["score"]
            stderr = row.get("stderr")
            entry[_lm_eval_key(f"{row['metric']}_stderr", row.get("filter"))] = (
                stderr if stderr is not None else "N/A")
            if row.get("kind") == "group":
                out["groups"].setdefault(task, {"alias": task})[key] = row["score"]
            out["versions"][task] = row.get("version")
            out["n-shot"][task] = row.get("n_shot")
            out["n-samples"][task] = {"original": row["count"], "effective": row["count"]}
            out["configs"].setdefault(task, {"task": task, "num_fewshot": row.get("n_shot"),
                                             "metadata": {"version": row.get("version")}})
        groups = set(out["groups"])
        tasks = [t for t in out["results"] if t not in groups]
        for group in groups:  # the tasks lm-eval scored under each group (a group's
            out["group_subtasks"][group] = [t for t in tasks if t != group]  # members)
        for task in tasks:
            out["group_subtasks"].setdefault(task, [])
    else:
        name = job["dataset"]
        entry: dict[str, Any] = {"alias": name}
        for key, value in scores.items():
            if key in ("overall", "count", "few_items") or not isinstance(value, int | float) \
                    or isinstance(value, bool) or key.endswith(("_stderr", "_ci95")):
                continue
            entry[_lm_eval_key(key, None)] = value
            stderr = scores.get(f"{key}_stderr")
            entry[_lm_eval_key(f"{key}_stderr", None)] = stderr if stderr is not None else "N/A"
        if scores.get("overall") is not None:
            entry["score,none"] = scores["overall"]
            stderr = scores.get("overall_stderr")
            entry["score_stderr,none"] = stderr if stderr is not None else "N/A"
        out["results"][name] = entry
        subtasks = []
        for key, rows in scores.items():
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                continue  # a breakdown is a list of rows; an interval is a list of numbers
            for row in rows:
                labels = [str(v) for k, v in row.items()
                          if k not in ("score", "count", "stderr", "ci95", "few_items")]
                sub = f"{name}_{key}_{'_'.join(labels)}".replace(" ", "_")
                stderr = row.get("stderr")
                out["results"][sub] = {"alias": " / ".join(labels), "score,none": row["score"],
                                       "score_stderr,none": stderr if stderr is not None
                                       else "N/A"}
                out["n-samples"][sub] = {"original": row["count"], "effective": row["count"]}
                out["versions"][sub] = None
                subtasks.append(sub)
        if subtasks:
            out["groups"][name] = dict(entry)
            out["group_subtasks"][name] = subtasks
        out["versions"][name] = None
        out["n-shot"][name] = params.get("num_fewshot", params.get("shots", 0))
        out["n-samples"][name] = {"original": job["progress"]["total"],
                                  "effective": scores.get("count", job["progress"]["done"])}
        out["configs"][name] = {"task": name, "dataset_path": name,
                                "metadata": {"params": params}}
        out["higher_is_better"][name] = {"score": True}
    out["config"] = {"model": "llm-bench-shower", "model_args": job["model"],
                     "batch_size": params.get("batch_size"), "limit": params.get("limit")}
    out["date"] = job.get("finished_at")
    out["job_id"] = job["id"]
    return out


class Results:
    """`leaderboard`, `memory_by_length` and `paired_comparison` on one database."""

    def __init__(self, factory: sessionmaker):
        self.factory = factory

    def leaderboard(self, resolve: Callable[[str], Path | None],
                    effective: Callable[[str, dict[str, Any]], dict[str, Any]] = (
                        lambda _dataset, params: params),
                    tasks_param: Callable[[str], str | None] = lambda _dataset: None
                    ) -> dict[str, Any]:
        return leaderboard(self.factory, resolve, effective, tasks_param)

    def memory_by_length(self, resolve: Callable[[str], Path | None],
                         datasets: tuple[str, ...]) -> dict[str, Any]:
        return memory_by_length(self.factory, resolve, datasets)

    def paired_comparison(self, a_id: int, b_id: int,
                          effective: Callable[[str, dict[str, Any]], dict[str, Any]] = (
                              lambda _dataset, params: params)) -> dict[str, Any]:
        return paired_comparison(self.factory, a_id, b_id, effective)
