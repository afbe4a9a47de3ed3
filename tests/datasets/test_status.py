"""The data status counts what a job with default parameters runs, and each split."""

from __future__ import annotations

import pytest

from backend.datasets.base import DataContext
from backend.datasets.registry import get_dataset
from backend.datasets.status import dataset_status
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"


@pytest.mark.parametrize("name, items, by_split", [
    # val is C-Eval's default split (5 questions); dev (3) is read only for shots
    ("ceval", 5, {"val": 5, "dev": 3}),
    # test is GSM8K's default split; train only gives the solved examples
    ("gsm8k", 3, {"test": 3, "train": 2}),
    # LongBench-E's files (hotpotqa_e, 3 items) are read only with use_e
    ("longbench", 6, {"test": 9}),
])
def test_items_are_what_a_default_job_runs(name, items, by_split):
    ds = get_dataset(name, DataContext(datasets_dir=FIXTURES))
    status = dataset_status(ds, allow_download=False, wait=True)
    assert status["state"] == "ready" and status["source"] == "folder"
    assert status["items"] == items
    assert status["items_by_split"] == by_split
    assert sum(p["items"] for p in status["parts"] if p["default"]) == items
