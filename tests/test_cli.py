"""`python -m backend.apps.cli eval`: one evaluation in-process, a result file with the
API's fields."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend.apps.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_eval_writes_scores_memory_and_samples(with_tiny, tmp_path):
    out = tmp_path / "result.json"
    proc = run_cli("eval", "--model", "builtin:tiny", "--dataset", "needle_in_haystack",
                   "--param", "context_lengths=[256,384]", "--param",
                   'depth_percents={"count": 2}', "--param", "max_new_tokens=4",
                   "--data-parallel", "auto", "--output", str(out))  # auto: this process
    assert proc.returncode == 0, proc.stderr
    assert "overall score:" in proc.stdout and "cells:" in proc.stdout
    assert "sample/s" in proc.stderr or "100%" in proc.stderr  # the progress bar
    result = json.loads(out.read_text())
    assert set(result) >= {"scores", "memory", "samples"}
    assert len(result["scores"]["cells"]) == 4
    assert result["memory"]["rss_peak_bytes"] > 0
    sample = result["samples"][0]
    for key in ("prompt", "prompt_tokens", "context_length", "depth_percent", "prediction",
                "score", "latency_s"):
        assert key in sample, key
    assert [s["depth_percent"] for s in result["samples"]] == [0.0, 100.0, 0.0, 100.0]


def test_eval_refuses_bad_input_without_traceback(with_tiny):
    proc = run_cli("eval", "--model", "builtin:tiny", "--dataset", "needle_in_haystack",
                   "--param", "context_lengths=[100000]")
    assert proc.returncode == 2
    assert "context_lengths" in proc.stderr and "beyond the maximum" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("eval", "--model", "nowhere/model", "--dataset", "needle_in_haystack")
    assert proc.returncode == 2 and "not in the local Hugging Face cache" in proc.stderr
    proc = run_cli("eval", "--model", "builtin:tiny", "--dataset", "needle_in_haystack",
                   "--param", "batch_size=x")
    assert proc.returncode == 2
    assert "error: params.batch_size: Input should be a valid integer, or be 'auto'" \
        in proc.stderr, proc.stderr


def test_data_parallel_beyond_this_process_is_refused_clearly():
    proc = run_cli("eval", "--model", "builtin:tiny", "--dataset", "needle_in_haystack",
                   "--data-parallel", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--data-parallel 2" in proc.stderr and "POST /api/jobs" in proc.stderr
    for bad in ("many", "0", "65"):
        proc = run_cli("eval", "--model", "builtin:tiny", "--dataset", "needle_in_haystack",
                       "--data-parallel", bad)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "--data-parallel" in proc.stderr and '"auto"' in proc.stderr, proc.stderr
