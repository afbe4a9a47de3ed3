"""What a job naming a large haystack file costs the server: `POST /api/jobs/estimate`
time and the server process's RSS growth, for this tree against a baseline revision
(the code before haystack files were size-checked), same file, same run.

    .venv/bin/python bench/haystack_estimate.py [--mb 100] [--estimates 3] [--baseline REV]

The haystack is the bundled essays repeated to `mb` MB in a LBS_DATASETS_DIR. Each tree
runs in a fresh process (its own app, `create_app(...).test_client()`, no worker): one
estimate of a job on the bundled haystack first (imports and caches warm up), then RSS,
then `estimates` estimates of a NIAH job naming the file, each timed, then RSS again.
This tree runs with LBS_MAX_HAYSTACK_BYTES above the file's size, so that both trees
accept the job (at its default, 32 MiB, the file is refused with a 422 as quickly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROBE = """
import json, sys, time, psutil
from backend.common.config import load_settings
from backend.server import create_app
client = create_app(load_settings(), {"TESTING": True}).test_client()
job = {"model": "builtin:tiny", "dataset": "needle_in_haystack",
       "params": {"context_lengths": [512], "depth_percents": [50], "haystack": "essays"}}
assert client.post("/api/jobs/estimate", json=job).status_code == 200
proc = psutil.Process()
before = proc.memory_info().rss
job["params"]["haystack"] = sys.argv[1]
times = []
for _ in range(int(sys.argv[2])):
    started = time.perf_counter()
    res = client.post("/api/jobs/estimate", json=job)
    times.append(time.perf_counter() - started)
    assert res.status_code == 200, res.get_json()
print(json.dumps({"times": times, "grown": proc.memory_info().rss - before}))
"""


def run(tree: Path, data: Path, datasets: Path, name: str, estimates: int,
        extra: dict[str, str]) -> dict:
    env = {**os.environ, "LBS_DATA_DIR": str(data), "LBS_DATASETS_DIR": str(datasets),
           "LBS_ENV_FILE": str(data / "no.env"), "PYTHONPATH": str(tree), **extra}
    out = subprocess.run([sys.executable, "-c", PROBE, name, str(estimates)], cwd=tree,
                         env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--estimates", type=int, default=3)
    parser.add_argument("--baseline", default="86e01e6",
                        help="the revision to compare with (default: before this change)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        datasets = tmp_path / "datasets"
        datasets.mkdir()
        essays = (ROOT / "backend" / "datasets" / "data" / "haystack_essays.txt").read_bytes()
        (datasets / "big.txt").write_bytes(essays * (args.mb * 10**6 // len(essays)))
        size = (datasets / "big.txt").stat().st_size
        baseline = tmp_path / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        results = {}
        for label, tree, extra in (
                ("baseline", baseline, {}),
                ("this tree", ROOT, {"LBS_MAX_HAYSTACK_BYTES": str(size + 1)})):
            data = tmp_path / f"data-{label.replace(' ', '-')}"
            data.mkdir()
            results[label] = run(tree, data, datasets, "big.txt", args.estimates, extra)
    print(f"haystack file: {size / 1e6:.0f} MB, {args.estimates} estimates, "
          f"baseline {args.baseline}")
    print(f"{'':10} {'first (s)':>10} {'later (s)':>10} {'RSS growth (MB)':>16}")
    for label, r in results.items():
        later = sum(r["times"][1:]) / max(1, len(r["times"]) - 1)
        print(f"{label:10} {r['times'][0]:10.3f} {later:10.3f} {r['grown'] / 1e6:16.1f}")
    b, t = results["baseline"], results["this tree"]
    print(f"first estimate: this tree takes {t['times'][0] / b['times'][0]:.4f} of the "
          f"baseline's time; RSS growth {t['grown'] / 1e6:.1f} MB against "
          f"{b['grown'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
