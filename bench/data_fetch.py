"""Data fetch by hub id: the first job's fetch + read against a plain
`datasets.load_dataset` of the same files, from the same loopback hub, same run.

    .venv/bin/python bench/data_fetch.py [--rows 40000] [--shards 4] [--rounds 3]

The hub is tests/hub_server.py serving a GSM8K-shaped repository (`openai/gsm8k`,
`main/test-0000k-of-0000n.parquet`, `rows` questions of ~0.5 kB). Each measurement
runs in a fresh process with an empty HF_HOME and times only the operation (imports
excluded):

- project: `hub.fetch(GSM8K.hub)` (huggingface_hub: plan, download, snapshot) and
  reading every record of the test split (`find_files` + `read_all`), i.e. what the
  first GSM8K job does before building prompts;
- datasets: `datasets.load_dataset("openai/gsm8k", "main", split="test")` and the
  rows as Python dicts (`to_list()`).

Rounds alternate the two; the medians are compared (target: project / datasets <= 1.1).
Then the cached read (HF_HUB_OFFLINE=1, what every later job does) is timed per 1,000
items, for both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROJECT = """
import time
import pyarrow.parquet  # imported before timing, as datasets is below
from huggingface_hub import hf_hub_download, snapshot_download
from backend.datasets.files import find_files, read_all
from backend.datasets.gsm8k import GSM8K
from backend.datasets.hub import cached_folder, fetch
t = time.perf_counter()
if {cached}:
    folder = cached_folder(GSM8K.hub)
else:
    folder, _ = fetch(GSM8K.hub)
rows = read_all(find_files(folder, ["test"]))
print(time.perf_counter() - t, len(rows))
"""

DATASETS = """
import time
import datasets
datasets.disable_progress_bars()
t = time.perf_counter()
ds = datasets.load_dataset("openai/gsm8k", "main", split="test")
rows = ds.to_list()
print(time.perf_counter() - t, len(rows))
"""


def make_repo(rows: int, shards: int) -> dict[str, bytes]:
    import io
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    words = ("apples pears cost dollars each week Natalia sold clips friends April May "
             "how many altogether half as many she has twice").split()
    # the card declares the configs as the real openai/gsm8k card does
    card = ("---\nlicense: mit\nconfigs:\n- config_name: main\n  data_files:\n"
            "  - split: train\n    path: main/train-*\n  - split: test\n    path: main/test-*\n"
            "---\nGSM8K-shaped benchmark data\n")
    files = {"README.md": card.encode()}
    per = rows // shards
    for split, count in (("test", rows), ("train", 100)):
        n = shards if split == "test" else 1
        for k in range(n):
            size = per if split == "test" else count
            recs = [{"question": " ".join(rng.choice(words) for _ in range(60)) + "?",
                     "answer": " ".join(rng.choice(words) for _ in range(30))
                     + f"\n#### {rng.randint(1, 999)}"} for _ in range(size)]
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(recs), buf)
            files[f"main/{split}-{k:05d}-of-{n:05d}.parquet"] = buf.getvalue()
    return files


def run(code: str, env: dict[str, str]) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    seconds, count = out.stdout.split()[-2:]
    return float(seconds), int(count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from tests.hub_server import FakeHub

    repo = make_repo(args.rows, args.shards)
    hub = FakeHub({"openai/gsm8k": repo}).start()
    size = sum(len(v) for k, v in repo.items() if k.startswith("main/"))
    print(f"loopback hub {hub.url}: openai/gsm8k, {args.rows} test rows in {args.shards} "
          f"shards + train, {size / 1e6:.1f} MB of Parquet")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LBS_"))}
    base.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(ROOT))
    first = {"project": [], "datasets": []}
    cached = {"project": [], "datasets": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, code in (("project", PROJECT), ("datasets", DATASETS)):
                home = Path(tmp) / f"{name}-{r}"
                env = {**base, "HF_HOME": str(home)}
                seconds, count = run(code.format(cached=False), env)
                assert count == args.rows, (name, count)
                first[name].append(seconds)
                env_off = {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
                seconds, count = run(code.format(cached=True), env_off)
                assert count == args.rows, (name, count)
                cached[name].append(seconds)
    hub.stop()
    med = {k: statistics.median(v) for k, v in first.items()}
    cmed = {k: statistics.median(v) for k, v in cached.items()}
    ratio = med["project"] / med["datasets"]
    print(json.dumps({"first": first, "cached": cached}, indent=None))
    print(f"first job, fetch + read: project {med['project']:.3f} s, datasets.load_dataset "
          f"{med['datasets']:.3f} s, ratio {ratio:.2f} (target <= 1.1)")
    for name in ("project", "datasets"):
        print(f"cached read ({name}): {cmed[name]:.3f} s for {args.rows} items = "
              f"{1000 * cmed[name] / args.rows * 1000:.2f} ms per 1,000 items")


if __name__ == "__main__":
    main()
