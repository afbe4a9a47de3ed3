"""One job over 1 and over 2 workers (`data_parallel`), in one run, through the server.

    .venv/bin/python bench/data_parallel.py [--model builtin:small] [--repeats 2]

A server with two workers (LBS_WORKERS=2, both on the CPU here) runs the same NIAH job
with data_parallel 1 and 2, alternately; the job's time is claim of its first shard ->
end of its last (started_at -> finished_at, as stored). It prints the medians, the
speed-up, and checks that the two runs' predictions and scores are identical.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from local_server import http_json, run_job, running_server  # bench/ is this script's folder

PARAMS = {"context_lengths": [512, 1024, 2048], "depth_percents": {"count": 4},
          "max_new_tokens": 32}


def run(base: str, model: str, shards: int) -> tuple[float, list[str], list]:
    took, job, samples = run_job(base, {"model": model, "dataset": "needle_in_haystack",
                                        "params": PARAMS, "data_parallel": shards})
    return took, [s["prediction"] for s in samples], job["scores"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lbs-dp-"))
    env = {**os.environ, "LBS_DATA_DIR": str(work / "data"), "LBS_ENV_FILE": str(work / "x"),
           "LBS_LOG_LEVEL": "WARNING", "TQDM_DISABLE": "1", "LBS_WORKERS": "2",
           "LBS_POLL_INTERVAL": "0.05", "OMP_NUM_THREADS": "1"}
    times: dict[int, list[float]] = {1: [], 2: []}
    with running_server(env) as port:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):  # both workers have imported torch before the clock starts
            workers = http_json(base + "/api/workers")["data"]["workers"]
            if len([w for w in workers if w["alive"]]) == 2:
                break
            time.sleep(0.1)
        reference = None
        for repeat in range(args.repeats):
            for shards in (1, 2):
                took, predictions, scores = run(base, args.model, shards)
                if reference is None:
                    reference = (predictions, scores)
                same = (predictions, scores) == reference
                times[shards].append(took)
                print(f"repeat {repeat + 1}: data_parallel {shards}: job {took:.2f} s, "
                      f"same predictions and scores as data_parallel 1: {same}")
                if not same:
                    raise SystemExit("sharded and single-worker runs disagree")
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"\nmedians ({os.cpu_count()} CPUs, one torch thread per worker): "
          f"1 worker {one:.2f} s, 2 workers {two:.2f} s, speed-up {one / two:.2f}x")


if __name__ == "__main__":
    main()
