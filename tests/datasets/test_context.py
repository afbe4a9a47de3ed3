"""A dataset is made with its job's context (data folder, access, confinement) and
reads within it: nothing is set on it afterwards, and nothing one job's dataset
allowed or refused leaks to another's in the same thread."""

from __future__ import annotations

import json

import pytest

from backend.datasets.base import DataContext
from backend.datasets.registry import get_dataset
from backend.engine.contracts import PathRefused


def test_reads_follow_each_datasets_own_context(tmp_path):
    allowed = tmp_path / "datasets"
    (allowed / "gsm8k").mkdir(parents=True)
    outside = tmp_path / "private.jsonl"
    outside.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    link = allowed / "gsm8k" / "test.jsonl"
    link.symlink_to(outside)

    confined = get_dataset("gsm8k", DataContext(datasets_dir=allowed, confine=True))
    command_line = get_dataset("gsm8k", DataContext(datasets_dir=allowed))
    with pytest.raises(PathRefused, match="refused"):
        confined.read_records(link)
    assert command_line.read_records(link) == [{"question": "q", "answer": "#### 1"}]
    with pytest.raises(PathRefused):  # the unconfined read changed nothing for the job
        confined.read_all([link])
    inside = allowed / "gsm8k" / "rows.jsonl"
    inside.write_text(outside.read_text())
    assert confined.read_records(inside)[0]["answer"] == "#### 1"


def test_the_context_is_fixed_when_the_dataset_is_made(tmp_path):
    ds = get_dataset("gsm8k", DataContext(datasets_dir=tmp_path, confine=True))
    assert (ds.datasets_dir, ds.confine_paths) == (tmp_path, True)
    with pytest.raises(AttributeError):
        ds.datasets_dir = tmp_path / "elsewhere"
    with pytest.raises(AttributeError):
        ds.confine_paths = False
