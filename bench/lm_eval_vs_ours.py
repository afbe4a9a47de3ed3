"""The same lm-evaluation-harness tasks through our job (the CLI, a whole process) and
through the `lm_eval` command (its HF backend), alternated in one run: wall time and peak
RSS (the process tree, polled at 20 Hz) of each, the ratio ours/lm_eval, and the largest
difference between the two runs' metrics.

    .venv/bin/python bench/lm_eval_vs_ours.py [--rounds 2] [--repeat 4] [--model builtin:tiny]

The tasks are the test fixtures (tests/fixtures/lm_eval: multiple choice, generation with
a regex filter, rolling log-likelihood), their documents repeated `--repeat` times, read
from local json files (HF_DATASETS_OFFLINE=1, no network). Both run on the CPU in float32
with batch size 1. Note: lm_eval indexes all of its ~13k task configs at start-up; our
job indexes only the LBS_LM_EVAL_INCLUDE_PATH folder when every task asked for is there.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "lm_eval"
TASKS = ["lbs_gen", "lbs_mc", "lbs_ppl"]
MB = 2**20


def make_tasks(folder: Path, repeat: int) -> None:
    shutil.copytree(FIXTURES, folder)
    for data in ("mc.jsonl", "gen.jsonl", "text.jsonl"):
        path = folder / data
        path.write_text(path.read_text() * repeat)
    for yaml in folder.glob("*.yaml"):
        text = yaml.read_text()
        for data in ("mc.jsonl", "gen.jsonl", "text.jsonl"):
            text = text.replace(f": {data}", f": {folder / data}")
        yaml.write_text(text)


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS of the process tree, and the output tail."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    out, _ = proc.communicate(timeout=1800)
    done.set()
    thread.join()
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, peak, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--model", default="builtin:tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lbs-lmeval-bench-") as tmp:
        tmp = Path(tmp)
        data_dir = tmp / "data"
        data_dir.mkdir()
        tasks = tmp / "tasks"
        make_tasks(tasks, args.repeat)
        env = {**os.environ, "LBS_DATA_DIR": str(data_dir), "LBS_ENV_FILE": str(tmp / "no.env"),
               "LBS_LM_EVAL_INCLUDE_PATH": str(tasks), "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        sys.path.insert(0, str(ROOT))
        from backend.runners.builtin import ensure_builtin_model

        model_dir = ensure_builtin_model(data_dir, args.model.removeprefix("builtin:"))
        ours_cmd = [sys.executable, "-m", "backend.apps.cli", "eval", "--model", args.model,
                    "--dataset", "lm_eval", "--param", f"tasks={json.dumps(TASKS)}",
                    "--quiet", "--output", str(tmp / "ours.json")]
        lm_eval_bin = str(Path(sys.executable).parent / "lm_eval")
        theirs_cmd = [lm_eval_bin, "--model", "hf", "--model_args",
                      f"pretrained={model_dir},dtype=float32", "--tasks", ",".join(TASKS),
                      "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1",
                      "--output_path", str(tmp / "theirs")]
        rows: dict[str, list[tuple[float, int]]] = {"ours": [], "lm_eval": []}
        for r in range(args.rounds):
            for name, cmd in (("ours", ours_cmd), ("lm_eval", theirs_cmd)) if r % 2 == 0 \
                    else (("lm_eval", theirs_cmd), ("ours", ours_cmd)):
                wall, peak, _ = measure(cmd, env)
                rows[name].append((wall, peak))
                print(f"round {r + 1} {name:8} wall {wall:7.2f} s  peak RSS {peak / MB:8.1f} MB",
                      flush=True)
        ours = json.loads((tmp / "ours.json").read_text())
        mine = {(m["task"], f"{m['metric']},{m['filter']}"): m["score"]
                for m in ours["scores"]["metrics"]}
        (path,) = glob.glob(str(tmp / "theirs" / "**" / "results_*.json"), recursive=True)[-1:]
        theirs = json.loads(Path(path).read_text())["results"]
        diff = max(abs(mine[(t, k)] - v) for t, vals in theirs.items() for k, v in vals.items()
                   if "," in k and "_stderr," not in k and isinstance(v, int | float))
    wall = {n: sum(w for w, _ in v) / len(v) for n, v in rows.items()}
    peak = {n: max(p for _, p in v) for n, v in rows.items()}
    docs = 14 * args.repeat
    print(f"\n{docs} documents x {args.rounds} rounds, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print(f"mean wall: ours {wall['ours']:.2f} s, lm_eval {wall['lm_eval']:.2f} s, "
          f"ratio ours/lm_eval {wall['ours'] / wall['lm_eval']:.2f}x")
    print(f"peak RSS: ours {peak['ours'] / MB:.1f} MB, lm_eval {peak['lm_eval'] / MB:.1f} MB, "
          f"ratio {peak['ours'] / peak['lm_eval']:.2f}x")
    print(f"largest metric difference between the two: {diff:.2e}")


if __name__ == "__main__":
    main()
