"""Dataset files in the hub's Parquet layouts read the same as the official JSONL/CSV."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backend.datasets.ceval import CEval
from backend.datasets.files import find_files, read_records
from backend.datasets.gsm8k import GSM8K
from backend.engine.contracts import ParamError
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"


class Plain:
    max_length = 4096

    def render(self, message):
        return message

    def count_prompt(self, prompt):
        return len(prompt)


def _to_parquet(records, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)


def test_gsm8k_hub_parquet_layout(tmp_path):
    for split in ("test", "train"):
        _to_parquet(read_records(FIXTURES / "gsm8k" / f"{split}.jsonl"),
                    tmp_path / "main" / f"{split}-00000-of-00001.parquet")
    ds = GSM8K()
    from_jsonl = ds.build_items(ds.parse_params({"data_dir": str(FIXTURES / "gsm8k"),
                                                 "shots": 2}), Plain())
    from_parquet = ds.build_items(ds.parse_params({"data_dir": str(tmp_path), "shots": 2}),
                                  Plain())
    assert [i.prompt for i in from_parquet] == [i.prompt for i in from_jsonl]
    assert [i.reference for i in from_parquet] == ["27", "32", "36"]


def test_ceval_hub_parquet_layout(tmp_path):
    for split in ("dev", "val"):
        rows = read_records(FIXTURES / "ceval" / split / f"law_{split}.csv")
        _to_parquet(rows, tmp_path / "law" / f"{split}-00000-of-00001.parquet")
    ds = CEval()
    a = ds.build_items(ds.parse_params({"data_dir": str(FIXTURES / "ceval"), "shots": 1,
                                        "subjects": ["law"]}), Plain())
    b = ds.build_items(ds.parse_params({"data_dir": str(tmp_path), "shots": 1}), Plain())
    assert [i.prompt for i in b] == [i.prompt for i in a] and len(b) == 2


def test_find_files_names_what_it_looked_for(tmp_path):
    with pytest.raises(ParamError) as err:
        find_files(tmp_path, ["test"])
    assert "test.jsonl" in err.value.message and str(tmp_path) in err.value.message


def test_hub_cache_snapshot(tmp_path):
    """data_dir "hub:<repo>" reads the dataset's snapshot from the local HF cache."""
    import subprocess
    import sys

    snap = tmp_path / "cache" / "datasets--openai--gsm8k" / "snapshots" / ("a" * 40)
    _to_parquet(read_records(FIXTURES / "gsm8k" / "test.jsonl"),
                snap / "main" / "test-00000-of-00001.parquet")
    refs = tmp_path / "cache" / "datasets--openai--gsm8k" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    script = tmp_path / "probe.py"
    script.write_text(
        "from backend.datasets.base import ParamError\n"
        "from backend.datasets.gsm8k import GSM8K\n"
        "from tests.datasets.test_files import Plain\n"
        "ds = GSM8K()\n"
        "print(len(ds.build_items(ds.parse_params({'data_dir': 'hub:openai/gsm8k'}), Plain())))\n"
        "try:\n"
        "    ds.check(ds.parse_params({'data_dir': 'hub:nobody/nothing'}), None)\n"
        "except ParamError as exc:\n"
        "    print(exc.field, exc.message)\n")
    env = {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()
    assert first == "3"
    assert second.startswith("data_dir") and "not in the local Hugging Face cache" in second


def test_every_parquet_shard_of_a_split_is_read(tmp_path):
    """A split in several shards (the hub's `<split>-0000k-of-0000n.parquet`) is read
    whole, in shard order, for GSM8K's and C-Eval's layouts."""
    rows = read_records(FIXTURES / "gsm8k" / "test.jsonl")
    _to_parquet(rows[:1], tmp_path / "gsm" / "main" / "test-00000-of-00002.parquet")
    _to_parquet(rows[1:], tmp_path / "gsm" / "main" / "test-00001-of-00002.parquet")
    ds = GSM8K()
    items = ds.build_items(ds.parse_params({"data_dir": str(tmp_path / "gsm")}), Plain())
    assert [i.reference for i in items] == ["27", "32", "36"]

    law = read_records(FIXTURES / "ceval" / "val" / "law_val.csv")
    _to_parquet(law[:1], tmp_path / "ce" / "law" / "val-00000-of-00002.parquet")
    _to_parquet(law[1:], tmp_path / "ce" / "law" / "val-00001-of-00002.parquet")
    ds = CEval()
    items = ds.build_items(ds.parse_params({"data_dir": str(tmp_path / "ce")}), Plain())
    assert [i.fields["id"] for i in items] == [str(r["id"]) for r in law]
