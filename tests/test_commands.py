"""The commands the product's hints show work as written on this install."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from backend.common.commands import lbs_command
from tests.conftest import ROOT


def test_hint_runs_as_written_from_where_the_server_runs(data_dir):
    """The command in a hint (here `data status`) runs as shown, from the folder the
    server was started in, without activating the virtual environment."""
    shown = lbs_command("data status", cwd=ROOT)
    assert not shown.startswith("python -m"), shown  # `python` is not this install's
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # no venv on PATH, as in a fresh shell
    out = subprocess.run(shlex.split(shown), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needle_in_haystack" in out.stdout


def test_the_command_that_is_true_here(tmp_path, monkeypatch):
    venv = tmp_path / "project" / ".venv" / "bin"
    venv.mkdir(parents=True)
    python = venv / "python"
    python.write_text("")
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    project = tmp_path / "project"
    # no lbs script: the module through this interpreter, relative to the folder
    assert lbs_command("worker", cwd=project) == ".venv/bin/python -m backend.apps.lbs worker"
    assert lbs_command("worker", cwd=tmp_path / "elsewhere") == \
        f"{python} -m backend.apps.lbs worker"
    (venv / "lbs").write_text("")
    (venv / "lbs").chmod(0o755)
    assert lbs_command("data fetch gsm8k", cwd=project) == ".venv/bin/lbs data fetch gsm8k"
    monkeypatch.setenv("PATH", f"{venv}:/usr/bin")  # an activated venv: lbs is on PATH
    assert lbs_command("data fetch gsm8k", cwd=project) == "lbs data fetch gsm8k"
    assert Path(sys.executable) == python
