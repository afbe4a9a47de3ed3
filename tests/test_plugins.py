"""Third-party datasets: a module in LBS_PLUGIN_DIRS, or an installed package's entry point."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_entry_point_plugin_is_registered(tmp_path, echo_plugin_dir):
    """A package installed with an entry point in group `llm_bench_shower.datasets`."""
    pkg = tmp_path / "site"
    (pkg / "lbs_echo_pkg").mkdir(parents=True)
    (pkg / "lbs_echo_pkg" / "__init__.py").write_text(
        (echo_plugin_dir / "echo_dataset.py").read_text().replace('name = "echo"',
                                                                  'name = "echo_pkg"'))
    dist = pkg / "lbs_echo_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lbs-echo-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[llm_bench_shower.datasets]\necho_pkg = lbs_echo_pkg:Echo\n")
    code = ("from backend.datasets.registry import dataset_names, get_dataset;"
            "from backend.engine.plugins import load_plugins;"
            "load_plugins([]); print(dataset_names()); print(get_dataset('echo_pkg').name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": f"{pkg}:{ROOT}", "PATH": "/usr/bin:/bin"},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'echo_pkg'" in out.stdout and out.stdout.strip().endswith("echo_pkg")


def test_broken_plugin_is_skipped_with_a_log(tmp_path, caplog):
    from backend.engine.plugins import load_plugins

    (tmp_path / "broken.py").write_text("raise RuntimeError('nope')\n")
    load_plugins([str(tmp_path)])
    assert "broken.py failed to load" in caplog.text
