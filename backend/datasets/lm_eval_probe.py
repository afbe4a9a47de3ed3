"""The lm-eval work the server runs in a subprocess, so that its own process never
imports lm-eval (or torch): `python -m backend.datasets.lm_eval_probe [--parent PID] [--cache DIR]
<include paths…>` prints the task list (lm_eval_lookup.list_tasks), and `--shapes
<params JSON> <include paths…>` the lengths of a job's requests (`build_shapes`), as
JSON. lm_eval_lookup starts it and keeps the answers."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from backend.common.config import Settings
from backend.datasets.base import DataContext
from backend.datasets.lm_eval_lookup import list_tasks
from backend.datasets.lm_eval_tasks import LmEvalParams, LmEvalTasks


def build_shapes(include: list[str], asked: dict[str, Any],
                 cache_dir: Path | None = None) -> dict[str, Any]:
    """For each request type of the tasks' built requests: the longest context (or
    text) and continuation in UTF-8 bytes, the most choices of one document, the
    largest generation budget and how many requests there are."""
    settings = replace(Settings(), lm_eval_include_path=tuple(include), cache_dir=cache_dir)
    dataset = LmEvalTasks(DataContext(settings=settings))
    params = LmEvalParams.model_validate(asked)
    items = dataset.build_items(params, None)
    shapes: dict[str, dict[str, int]] = {}
    for item in items:
        instances = dataset._docs[item.idx][2]
        kind = instances[0].request_type
        shape = shapes.setdefault(kind, {"context": 0, "continuation": 0, "choices": 0,
                                         "max_gen_toks": 0, "count": 0, "text": 0})
        shape["count"] += len(instances)
        shape["choices"] = max(shape["choices"], len(instances))
        for inst in instances:
            first = inst.args[0] or ""
            if kind == "loglikelihood":
                shape["context"] = max(shape["context"], len(first.encode("utf-8")))
                shape["continuation"] = max(shape["continuation"],
                                            len(inst.args[1].encode("utf-8")))
            elif kind == "generate_until":
                from backend.datasets.lm_eval_kwargs import max_gen_toks

                shape["context"] = max(shape["context"], len(first.encode("utf-8")))
                shape["max_gen_toks"] = max(shape["max_gen_toks"], max_gen_toks(inst.args[1]))
            else:
                shape["text"] = max(shape["text"], len(first.encode("utf-8")))
    return shapes


if __name__ == "__main__":
    import os

    from backend.common.lifetime import die_with_parent

    args = sys.argv[1:]
    parent = os.getppid()
    if args[:1] == ["--parent"]:  # the process that asked names itself
        parent, args = int(args[1]), args[2:]
    # nobody reads a probe's answer once the server (or job) that asked is gone (a
    # parent that died while this one started is not mistaken for its successor)
    if not die_with_parent(parent, "[Datasets]"):
        sys.exit(1)
    logging.disable(logging.WARNING)
    cache: Path | None = None
    if args[:1] == ["--cache"]:
        cache = None if args[1] == "off" else Path(args[1])
        args = args[2:]
    if args[:1] == ["--shapes"]:
        print(json.dumps(build_shapes(args[2:], json.loads(args[1]), cache)))
    else:
        print(json.dumps(list_tasks(args, cache)))
