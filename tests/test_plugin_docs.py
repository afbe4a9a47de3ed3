"""Each docs/adding-*.md followed once from scratch: its plugin file, taken from the
document's code blocks as written, saved in a temporary plugin folder (LBS_PLUGIN_DIRS)
and used the way a user would, by a job through the CLI or the server's queue."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, LiveServer

_BLOCK = re.compile(r"```python\n# (\w+\.py)[^\n]*\n(.*?)```", re.S)


def plugin_files(doc: str, folder: Path) -> list[Path]:
    """Save the document's plugin files into `folder`: every ```python block whose first
    line is `# <file>.py` (or `# <file>.py (continued)`) is appended to that file."""
    written: dict[str, list[str]] = {}
    for name, code in _BLOCK.findall((ROOT / "docs" / doc).read_text(encoding="utf-8")):
        written.setdefault(name, []).append(code)
    folder.mkdir(exist_ok=True)
    for name, parts in written.items():
        (folder / name).write_text("\n\n".join(parts), encoding="utf-8")
    return [folder / name for name in written]


def test_adding_a_dataset_followed_from_scratch(with_tiny, tmp_path):
    """The doc's Echo dataset, from a plugin folder, evaluated by the CLI on the built-in
    tiny model: one sample per word, scored by the doc's rule, with its fields."""
    files = plugin_files("adding-a-dataset.md", tmp_path / "plugins")
    assert [f.name for f in files] == ["echo_dataset.py"]
    out = tmp_path / "echo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "backend.apps.cli", "eval", "--model", "builtin:tiny",
         "--dataset", "echo", "--param", 'words=["apple","river"]', "--param",
         "max_new_tokens=4", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "LBS_PLUGIN_DIRS": str(tmp_path / "plugins")})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    samples = result["samples"]
    assert [s["fields"]["word"] for s in samples] == ["apple", "river"]
    for sample in samples:
        word = sample["fields"]["word"]
        assert "Repeat this word: " + word in sample["prompt"]
        assert sample["score"] == (1.0 if word in sample["prediction"].lower()
                                   else 0.0)
    assert result["scores"]["count"] == 2
    assert result["scores"]["overall"] == sum(s["score"] for s in samples) / 2
    # its worst batch, as admission reads it: two rows of the longest prompt's bound
    # ("Repeat this word: apple", 23 bytes, + 128 template tokens), then 4 new tokens
    code = ("from backend.datasets.registry import get_dataset;"
            "from backend.engine.plugins import load_plugins;"
            "load_plugins([sys.argv[1]]); d = get_dataset('echo');"
            "print(d.worst_batches(d.parse_params({'words': ['apple', 'river'], "
            "'max_new_tokens': 4, 'batch_size': 2}), 2048))")
    plans = subprocess.run([sys.executable, "-c", "import sys;" + code,
                            str(tmp_path / "plugins")], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, check=True)
    assert plans.stdout.strip() == (
        "[BatchPlan(kind='generate', rows=2, prompt_tokens=151, new_tokens=4, "
        "shared_prefix=0, padded=True, logits_positions=1, method='default', "
        "continuations=0)]")


def test_adding_a_runner_followed_from_scratch(with_tiny, tmp_path):
    """The doc's echo runner, from a plugin folder, serving a Needle-in-a-Haystack job
    submitted to the server and run by its worker: the model repeats each prompt, so the
    needle is in every reply and every cell scores 1.0; a runner that holds nothing
    locally needs no GPU memory (no estimate)."""
    files = plugin_files("adding-a-runner.md", tmp_path / "plugins")
    assert [f.name for f in files] == ["echo_runner.py"]
    server = LiveServer(with_tiny, {"LBS_PLUGIN_DIRS": str(tmp_path / "plugins")}).start()
    try:
        status, body = server.request("POST", "/api/jobs", {
            "model": "echo:parrot", "dataset": "needle_in_haystack",
            "params": {"context_lengths": [1024, 2048], "depth_percents": [0, 100]}})
        assert status in (200, 201), body
        job_id = body["data"]["jobs"][0]["id"] if "jobs" in body["data"] \
            else body["data"]["job"]["id"]
        job = server.wait_for(job_id, ("succeeded", "failed", "cancelled"))
        assert job["state"] == "succeeded", job.get("error")
        assert job["memory_estimate_bytes"] is None
        assert job["scores"]["overall"] == 1.0 and job["scores"]["count"] == 4
        assert sorted((c["context_length"], c["depth_percent"], c["score"])
                      for c in job["scores"]["cells"]) == \
            [(1024, 0.0, 1.0), (1024, 100.0, 1.0), (2048, 0.0, 1.0), (2048, 100.0, 1.0)]
        status, body = server.request("GET", f"/api/jobs/{job_id}/samples")
        assert status == 200, body
        samples = body["data"]["samples"]
        assert len(samples) == 4
        for sample in samples:  # one token per character, the reply the prompt itself
            assert sample["prediction"] == sample["prompt"]
            assert sample["prompt_tokens"] == len(sample["prompt"])
        # a second reference of the scheme is refused before it queues
        status, body = server.request("POST", "/api/jobs", {
            "model": "echo:", "dataset": "needle_in_haystack",
            "params": {"context_lengths": [1024]}})
        assert status == 422 and "echo:" in json.dumps(body), body
    finally:
        server.stop()
