"""Settings: defaults, .env, environment, and clear errors for bad values."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from backend.common.config import (
    SETTINGS,
    ConfigError,
    Settings,
    apply_allocator_settings,
    load_settings,
)
from backend.common.settings_table import markdown_table
from backend.common.units import format_bytes
from tests.conftest import ROOT


def test_defaults(data_dir):
    s = load_settings()
    assert s.data_dir == data_dir.resolve()
    assert s.database_url == f"sqlite:///{data_dir.resolve() / 'lbs.sqlite3'}"
    assert (s.host, s.port, s.workers) == ("127.0.0.1", 8080, None)
    assert (s.gpu_memory_limit, s.enable_memory_management, s.torch_dtype) == (0.0, True, "auto")
    assert (s.use_model_cache, s.trust_remote_code, s.allow_download) == (True, False, False)


def test_env_file_then_environment(tmp_path, monkeypatch):
    env_file = tmp_path / "my.env"
    env_file.write_text("LBS_PORT=9001\nLBS_TORCH_DTYPE=float16\n")
    monkeypatch.setenv("LBS_ENV_FILE", str(env_file))
    s = load_settings()
    assert (s.port, s.torch_dtype) == (9001, "float16")
    monkeypatch.setenv("LBS_PORT", "9002")
    assert load_settings().port == 9002


@pytest.mark.parametrize("name, value, accepted", [
    ("LBS_GPU_MEMORY_LIMIT", "1.5", "0.0 (no limit) to 1.0"),
    ("LBS_GPU_MEMORY_LIMIT", "lots", "0.0 (no limit) to 1.0"),
    ("LBS_TORCH_DTYPE", "int4", "auto, float16, bfloat16, float32"),
    ("LBS_USE_MODEL_CACHE", "maybe", "1/0, true/false"),
    ("LBS_PORT", "70000", "0 to 65535"),
    ("LBS_WORKERS", "-1", "'auto' or an integer"),
    ("MAX_MEMORY_USAGE", "-8GB", "a number of bytes or a size such as 8GB"),
    ("LBS_SIMULATED_GPU_MEMORY", "24XB", "sizes separated by ','"),
])
def test_bad_value_names_variable_and_accepted_values(monkeypatch, name, value, accepted):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert name in str(err.value) and repr(value) in str(err.value)
    assert accepted in str(err.value)


def test_server_refuses_to_start_on_bad_setting(monkeypatch):
    monkeypatch.setenv("LBS_TORCH_DTYPE", "float8")
    proc = subprocess.run([sys.executable, "-m", "backend.server"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "LBS_TORCH_DTYPE='float8' is not valid" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_allocator_setting(monkeypatch):
    monkeypatch.setattr("os.environ", dict(__import__("os").environ))
    import os

    assert apply_allocator_settings(load_settings()) == "expandable_segments:True"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:128"
    assert apply_allocator_settings(load_settings()) == "max_split_size_mb:128"  # user wins
    del os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    os.environ["LBS_ENABLE_MEMORY_MANAGEMENT"] = "0"
    assert apply_allocator_settings(load_settings()) is None
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def _rows(table: str) -> dict[str, str]:
    return {line.split(" | ")[0].strip("| `"): line for line in table.splitlines()[2:]}


def test_settings_table_is_made_from_the_definitions():
    """docs/settings.md's table is what `lbs config --markdown` prints from the settings'
    definitions: the same variables, defaults and meanings, in the same order."""
    made = subprocess.run([sys.executable, "-m", "backend.apps.lbs", "config", "--markdown"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True).stdout
    readme = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    start = readme.index("| variable | default | meaning |")
    in_readme = readme[start:readme.index("<!-- end generated", start)]
    ours, theirs = _rows(made), _rows(in_readme)
    assert list(ours) == [s.name for s in SETTINGS]
    assert list(theirs) == list(ours), "docs/settings.md's table lists other variables"
    differ = [name for name in ours if ours[name] != theirs[name]]
    assert not differ, (f"docs/settings.md's table differs from backend/common/config.py"
                        f" for {differ}; run `python scripts/docs.py`")
    assert in_readme == made


def test_settings_without_the_prefix_are_the_briefs():
    """Four variables lack LBS_: they are the product brief's names, and say so."""
    unprefixed = {s.name for s in SETTINGS if not s.name.startswith("LBS_")}
    assert unprefixed == {s.name for s in SETTINGS if s.seed_name} == {
        "MAX_MEMORY_USAGE", "MEMORY_CHECK_INTERVAL", "AUTO_CLEANUP_ENABLED", "GPU_IDLE_TIMEOUT"}
    assert all("product brief" in _rows(markdown_table())[name] for name in unprefixed)


def test_the_package_version_is_pyprojects():
    import re

    from backend import __version__
    from tests.conftest import ROOT

    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == __version__


def test_gb_means_one_thing_wherever_a_size_is_read(monkeypatch):
    """"24GB" in LBS_SIMULATED_GPU_MEMORY is the same amount as limit_gb=24 on the memory
    API, LBS_MIN_AVAILABLE_GB=24 and the product brief's MAX_MEMORY_USAGE (8589934592 bytes,
    shown as "8.00 GB" there): 2**30 bytes a GB, as GPU tools count. A simulated 24 GB GPU
    must not show up as 22.4 GiB on the workers page."""
    from backend.engine.memory.entries import ManagerConfig

    monkeypatch.setenv("LBS_SIMULATED_GPU_MEMORY", "24GB,24GiB,512MB")
    monkeypatch.setenv("LBS_MIN_AVAILABLE_GB", "24")
    s = load_settings()
    assert s.simulated_gpu_memory == (24 * 2**30, 24 * 2**30, 512 * 2**20)
    assert ManagerConfig.from_settings(s).min_available_bytes == s.simulated_gpu_memory[0]


def test_only_config_reads_the_environment():
    """Every variable is read in backend/common/config.py, so the settings table is complete:
    no other module of the product touches os.environ or os.getenv."""
    import ast

    offenders = []
    for path in [*(ROOT / "backend").rglob("*.py"), ROOT / "clear_gpu_memory.py"]:
        if path == ROOT / "backend" / "common" / "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = (node.attr if isinstance(node, ast.Attribute)
                    else node.name if isinstance(node, ast.alias) else None)
            if name in ("environ", "getenv", "environb", "getenvb"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"read the environment outside backend/common/config.py: {offenders}"


def test_sizes_with_units_and_the_briefs_bytes(monkeypatch):
    """MAX_MEMORY_USAGE takes the brief's number of bytes or a size with its unit."""
    monkeypatch.setenv("MAX_MEMORY_USAGE", "8589934592")
    assert load_settings().max_memory_usage == 8 * 2**30
    for spelled in ("8GB", "8 GiB", "8g", "8192MB"):
        monkeypatch.setenv("MAX_MEMORY_USAGE", spelled)
        assert load_settings().max_memory_usage == 8 * 2**30, spelled
    monkeypatch.setenv("LBS_PINNED_MEMORY_BUDGET", "1.5GB")
    assert load_settings().pinned_memory_budget == 3 * 2**29
    assert format_bytes(8 * 2**30) == "8.00 GiB" and format_bytes(3 * 2**19) == "1.50 MiB"


def test_the_dataclass_defaults_are_the_definitions(monkeypatch, data_dir):
    """Settings built in code gets the same defaults as one read from an empty environment,
    the derived ones included (database, server URL, datasets folder)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LBS_MODEL_DIRS")  # conftest's; LBS_DATA_DIR stays set
    monkeypatch.delenv("LBS_CACHE_DIR")  # conftest's shared cache
    loaded = load_settings()
    assert Settings(data_dir=data_dir.resolve(), hub_offline=True) == loaded
    assert loaded.server_url == "http://127.0.0.1:8080"
    assert loaded.datasets_dir == data_dir.resolve() / "datasets"
    groups = load_settings({"LBS_WORKERS": "0,1;2"})
    assert (groups.workers, groups.worker_gpu_groups) == (2, ("0,1", "2"))
    moved = dataclasses.replace(groups, cuda_visible_devices="3")
    assert (moved.workers, moved.worker_gpu_groups) == (2, ("0,1", "2"))


def test_the_settings_repr_shows_no_database_password(monkeypatch):
    """A PostgreSQL URL carries its password: the settings' repr (what a log line or a
    traceback would show) leaves it out, like the API token and keys."""
    monkeypatch.setenv("LBS_DATABASE_URL", "postgresql+psycopg://lbs:pa55-w0rd@db:5432/lbs")
    monkeypatch.setenv("LBS_API_TOKEN", "tok-0123456789")
    text = repr(load_settings())
    assert "pa55-w0rd" not in text and "tok-0123456789" not in text


def test_server_takes_host_and_port_flags(monkeypatch, data_dir):
    """`python -m backend.server --port N` listens on N (LBS_PORT says otherwise here);
    a bad --port or a --host other machines reach without a token is refused by name."""
    import time
    import urllib.request

    from tests.conftest import free_port, stop_process

    monkeypatch.setenv("LBS_PORT", "1")  # the flag wins over the environment
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "backend.server", "--no-workers",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, status = time.monotonic() + 60, None
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    status = r.status
            except OSError:
                time.sleep(0.2)
        assert status == 200, proc.stderr.read() if proc.poll() is not None else "no answer"
    finally:
        stop_process(proc)
    bad = subprocess.run([sys.executable, "-m", "backend.server", "--port", "70000"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--port" in bad.stderr and "Traceback" not in bad.stderr
    exposed = subprocess.run([sys.executable, "-m", "backend.server", "--host", "0.0.0.0"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert exposed.returncode == 2 and "LBS_API_TOKEN" in exposed.stderr
