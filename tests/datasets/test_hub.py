"""Hub sources without a server: partial fetches by part, what the cache answers, the
guidance of missing data, and archives that try to write outside their folder. The
hub is tests/hub_server.py on loopback; huggingface_hub reads HF_ENDPOINT when it is
imported, so the fetching code runs in a child process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import pytest

from backend.common.commands import lbs_command
from backend.datasets.base import DataContext
from backend.datasets.ceval import CEval
from backend.datasets.hub import DataMissing, _extract, guidance, locate
from backend.engine.contracts import ParamError
from tests.conftest import ROOT
from tests.hub_server import FakeHub

SCRIPT = """
import json, sys
from backend.datasets.ceval import CEval
from backend.datasets.base import DataContext
from backend.datasets.hub import DataAccess, cached_folder, locate
folder = __import__("pathlib").Path(sys.argv[1])
ds = CEval(DataContext(datasets_dir=folder, access=DataAccess(allow_download=True, fetch_now=True)))
out = {}
out["law"] = str(locate(ds, ["law"]))
out["law_cached"] = cached_folder(ds.hub, ["law"]) is not None
out["physics_cached"] = cached_folder(ds.hub, ["high_school_physics"]) is not None
out["all_cached"] = cached_folder(ds.hub) is not None
out["fetched"] = ds.data_access.fetched
rows = ds.build_items(ds.parse_params({"subjects": ["law"]}), __import__(
    "tests.datasets.test_files", fromlist=["Plain"]).Plain())
out["items"] = [i.fields["id"] for i in rows]
ds = CEval(DataContext(datasets_dir=folder, access=DataAccess(allow_download=True, fetch_now=True)))
locate(ds, ["high_school_physics"])
out["fetched2"] = ds.data_access.fetched
print(json.dumps(out))
"""


def test_parts_are_fetched_alone_and_cached(tmp_path):
    hub = FakeHub().start()
    try:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "none")], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        commit = hub.commit("ceval/ceval-exam")
        assert result["law_cached"] and not result["physics_cached"] and not result["all_cached"]
        assert result["items"] == ["0", "1"]  # val split of law, from the hub's Parquet
        assert [f["files"] for f in result["fetched"]] == [3]
        assert [f["files"] for f in result["fetched2"]] == [3]  # physics only, law not again
        gets = hub.file_gets()
        assert len(gets) == len(set(gets)) == 6
        assert all(g.startswith(f"/datasets/ceval/ceval-exam/resolve/{commit}/") for g in gets)
        assert not any("README" in g for g in gets)
    finally:
        hub.stop()


def test_missing_data_names_hub_command_and_folder(tmp_path):
    ds = CEval(DataContext(datasets_dir=tmp_path))
    with pytest.raises(DataMissing) as err:
        locate(ds, ["law"])  # no cache here (HF_HUB_OFFLINE=1 in the tests), no access
    message = err.value.message
    assert err.value.field == "data_dir"
    assert "ceval/ceval-exam" in message
    assert lbs_command("data fetch ceval --subsets law") in message
    assert str(tmp_path / "ceval") in message and "LBS_ALLOW_DATA_DOWNLOAD=1" in message
    assert err.value.guidance == guidance(ds, ["law"], False)
    assert err.value.guidance["hub"]["configs"][:2] == ["computer_network", "operating_system"]


def test_archive_members_outside_the_folder_are_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("data/ok.jsonl", "{}\n")
        zf.writestr("../escaped.txt", "no")
    archive = tmp_path / "data.zip"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(ParamError, match="outside"):
        _extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def _bomb(size: int) -> bytes:
    """A zip of one member of `size` newlines: it deflates about a thousand times."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data/qasper.jsonl", b"\n" * size)
    return buf.getvalue()


def test_a_zip_bomb_from_the_hub_is_refused_and_nothing_is_kept(tmp_path):
    """`data fetch longbench` from a hostile mirror whose data.zip unpacks a thousand
    times its size: the fetch fails saying why, and no unpacked file is left."""
    bomb = _bomb(32 * 1024**2)
    hub = FakeHub({"THUDM/LongBench": {"README.md": b"LongBench\n", "data.zip": bomb}}).start()
    try:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
               "LBS_DATASETS_DIR": str(tmp_path / "ds")}
        out = subprocess.run([sys.executable, "-m", "backend.apps.cli", "data", "fetch",
                              "longbench"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
    finally:
        hub.stop()
    assert out.returncode == 1, out.stdout + out.stderr
    assert "data.zip unpacks to more than" in out.stderr, out.stderr
    assert "times its own" in out.stderr and "Traceback" not in out.stderr
    unpacked = [p for p in (tmp_path / "hf").rglob("*") if p.is_file()
                and "extracted" in p.parts]
    assert unpacked == []


def test_an_archive_over_the_total_cap_is_refused(tmp_path):
    """The total cap holds for archives that compress only a little."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("data/a.jsonl", os.urandom(300_000))
        zf.writestr("data/b.jsonl", os.urandom(300_000))
    archive = tmp_path / "data.zip"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(ParamError, match="more than 500000 bytes"):
        _extract(archive, tmp_path / "out", max_bytes=500_000)
    assert not (tmp_path / "out").exists()
    _extract(archive, tmp_path / "ok", max_bytes=600_000)
    assert (tmp_path / "ok" / "data" / "b.jsonl").stat().st_size == 300_000
