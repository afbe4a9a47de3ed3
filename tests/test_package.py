"""What a user installs: the wheel, built from this checkout and installed into a fresh
virtual environment outside it, serves the page and the queue with no torch importable,
and with the worker's libraries runs a NIAH job through `lbs serve`/`lbs worker` and
`lbs eval` (a module or data file left out of the wheel fails here)."""

from __future__ import annotations

import email
import json
import os
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, LiveServer, stop_process

pytestmark = pytest.mark.slow

HEAVY = ("torch", "transformers", "accelerate", "datasets", "lm_eval", "tokenizers",
         "safetensors")
NIAH = {"context_lengths": [256], "depth_percents": [0, 100], "max_new_tokens": 4}

BLOCKER = f'''"""Makes {', '.join(HEAVY)} unimportable, as on a box installed without extras."""
import sys

class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed here)")
        return None

sys.meta_path.insert(0, _Absent())
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from this checkout."""
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist),
                    str(ROOT)], check=True, timeout=600)
    (built,) = dist.glob("llm_bench_shower-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv outside the checkout with the wheel installed (no deps: the test
    environment's packages are visible to it through a .pth line, so nothing is
    downloaded); returns its bin folder."""
    root = tmp_path_factory.mktemp("package")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                   "print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--no-deps", "-q", str(wheel)], check=True, timeout=600)
    return venv / "bin"


def test_wheel_declares_no_torch_without_the_worker_extra(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta = email.message_from_bytes(zf.read(next(
            n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))))
        names = set(zf.namelist())
    requires = meta.get_all("Requires-Dist")
    base = [r.split(";")[0].strip().lower() for r in requires if "extra ==" not in r]
    assert not [r for r in base if r.startswith(HEAVY)], base
    worker = [r for r in requires if 'extra == "worker"' in r]
    assert any(r.startswith("torch==2.13.0") for r in worker), worker
    for path in ("frontend/index.html", "backend/datasets/data/haystack_essays.txt",
                 "backend/datasets/lm_eval_examples/lbs_example_mc.yaml",
                 "backend/datasets/longbench/subsets.json", "clear_gpu_memory.py"):
        assert path in names, f"{path} is not in the wheel"


def test_installed_lbs_serves_without_torch_and_runs_a_job(installed, with_tiny, tmp_path):
    outside = tmp_path / "elsewhere"  # not the checkout: only the wheel's files are here
    outside.mkdir()
    blocker = tmp_path / "no-extras"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    check = subprocess.run([str(installed / "python"), "-c", "import backend, torch"],
                           env={**os.environ, "PYTHONPATH": str(blocker)}, cwd=outside,
                           capture_output=True, text=True)
    assert "No module named 'torch'" in check.stderr  # the blocker works

    live = LiveServer(with_tiny, {"PYTHONPATH": str(blocker)},
                      cmd=[str(installed / "lbs"), "serve", "--no-workers"], cwd=outside)
    live.start()
    worker = None
    try:
        with urllib.request.urlopen(live.url + "/", timeout=30) as res:
            assert b"LLM Bench Shower" in res.read()
        status, body = live.request("GET", "/api/datasets")
        assert status == 200 and "needle_in_haystack" in {
            d["name"] for d in body["data"]["datasets"]}
        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "needle_in_haystack", "params": NIAH})
        assert status == 201, body
        job_id = body["data"]["job"]["id"]
        assert "No module named" not in live.log()

        # a worker with the worker's libraries (here: the test environment's)
        env = {k: v for k, v in live.env.items() if k != "PYTHONPATH"}
        worker = subprocess.Popen([str(installed / "lbs"), "worker"], cwd=outside, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        job = live.wait_for(job_id, ("succeeded", "failed"), timeout=300)
        assert job["state"] == "succeeded", job["error"]
        assert job["progress"] == {"done": 2, "total": 2}
    finally:
        if worker is not None:
            stop_process(worker)
        live.stop()

    out = subprocess.run([str(installed / "lbs"), "eval", "--model", "builtin:tiny",
                          "--dataset", "needle_in_haystack",
                          "--param", "context_lengths=[256]", "--param", "depth_percents=[50]",
                          "--param", "max_new_tokens=4", "--output", str(tmp_path / "r.json")],
                         cwd=outside, env={**os.environ, "LBS_DATA_DIR": str(with_tiny)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert "overall" in json.dumps(result)
    helped = subprocess.run([str(installed / "lbs"), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "lbs serve" in helped.stdout


def test_requirements_files_are_generated_from_pyproject():
    """One list of dependencies: requirements*.txt say what pyproject.toml says."""
    check = subprocess.run([sys.executable, "scripts/requirements.py", "--check"], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
