"""Paths from the API stay inside the configured folders: model folders under
LBS_MODEL_DIRS, data folders and haystack files under LBS_DATASETS_DIR; `..`,
symbolic links out and absolute paths elsewhere are refused with a 403 naming
the field. The command line (the machine's own user) is not confined."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from backend.common.paths import OutsideAllowedFolders, confine
from backend.engine.preparation import prepare
from backend.queue import jobs
from backend.queue.db import JobState
from tests.conftest import queue_on

ROOT = Path(__file__).resolve().parent.parent
NIAH = "needle_in_haystack"
SMALL = {"context_lengths": [256], "depth_percents": [50], "max_new_tokens": 4}


def _submit(client, model="builtin:tiny", dataset=NIAH, params=None):
    res = client.post("/api/jobs", json={"model": model, "dataset": dataset,
                                         "params": params or SMALL})
    return res.status_code, res.get_json()


def _refused(client, field, **kw):
    status, body = _submit(client, **kw)
    assert status == 403, body
    assert body["status"] == "error" and body["error"]["code"] == "path_refused"
    assert body["error"]["details"][0]["field"] == field
    assert "Traceback" not in str(body)
    return body["error"]["message"]


@pytest.fixture
def outside_checkpoint(tmp_path, builtin_models_dir) -> Path:
    """A valid checkpoint folder that is not under LBS_MODEL_DIRS."""
    target = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(builtin_models_dir / "builtin-tiny-v1", target)
    return target


def test_model_folders_must_lie_under_model_dirs(client, tiny_copy, outside_checkpoint,
                                                 tmp_path):
    assert _submit(client, model=str(tiny_copy))[0] == 201
    assert _submit(client, model="tiny-copy")[0] == 201  # relative: looked up in the dirs

    assert "outside the folders in LBS_MODEL_DIRS" in _refused(
        client, "model", model=str(outside_checkpoint))
    assert "'..' is not allowed" in _refused(client, "model", model="../elsewhere/tiny")
    assert "'..' is not allowed" in _refused(client, "model", model="tiny-copy/../../elsewhere")
    _refused(client, "model", model="/etc")
    _refused(client, "model", model="~")

    (tmp_path / "zoo" / "sneaky").symlink_to(outside_checkpoint, target_is_directory=True)
    assert "through a symbolic link" in _refused(client, "model", model="sneaky")
    assert "through a symbolic link" in _refused(client, "model",
                                                 model=str(tmp_path / "zoo" / "sneaky"))

    # batch submits name the job at fault and store nothing
    res = client.post("/api/jobs", json={"jobs": [
        {"model": "builtin:tiny", "dataset": NIAH, "params": SMALL},
        {"model": str(outside_checkpoint), "dataset": NIAH, "params": SMALL}]})
    assert res.status_code == 403
    assert res.get_json()["error"]["details"][0]["field"] == "jobs[1].model"
    assert client.get("/api/jobs").get_json()["data"]["total"] == 2


def test_without_model_dirs_no_folder_is_accepted(monkeypatch, with_tiny, tiny_copy):
    from backend.common.config import load_settings
    from backend.server import create_app

    monkeypatch.setenv("LBS_MODEL_DIRS", "")
    client = create_app(load_settings()).test_client()
    assert "LBS_MODEL_DIRS is not set" in _refused(client, "model", model=str(tiny_copy))
    assert _submit(client, model="builtin:tiny")[0] == 201


def test_data_paths_must_lie_under_datasets_dir(client, settings, tmp_path):
    datasets = settings.datasets_dir
    shutil.copytree(ROOT / "tests" / "fixtures" / "gsm8k", datasets / "my-gsm8k")
    (datasets / "hay.txt").write_text("The sky was grey. The sea was calm. " * 50)
    secret = tmp_path / "secret.txt"
    secret.write_text("The password is swordfish. " * 50)

    assert _submit(client, dataset="gsm8k", params={"data_dir": "my-gsm8k"})[0] == 201
    assert _submit(client, dataset="gsm8k",
                   params={"data_dir": str(datasets / "my-gsm8k")})[0] == 201
    assert _submit(client, params={**SMALL, "haystack": "hay.txt"})[0] == 201

    message = _refused(client, "params.data_dir", dataset="gsm8k", params={"data_dir": "/etc"})
    assert "LBS_DATASETS_DIR" in message
    _refused(client, "params.data_dir", dataset="gsm8k", params={"data_dir": "../.."})
    _refused(client, "params.haystack", params={**SMALL, "haystack": str(secret)})
    _refused(client, "params.haystack", params={**SMALL, "haystack": "/etc/passwd"})
    _refused(client, "params.haystack", params={**SMALL, "haystack": "../secret.txt"})
    (datasets / "link.txt").symlink_to(secret)
    assert "symbolic link" in _refused(client, "params.haystack",
                                       params={**SMALL, "haystack": "link.txt"})
    # a missing file inside the folder is a plain 422
    status, body = _submit(client, params={**SMALL, "haystack": "missing.txt"})
    assert status == 422 and body["error"]["details"][0]["field"] == "params.haystack"


def test_the_worker_refuses_a_queued_job_outside_the_folders(settings, factory, with_tiny,
                                                             outside_checkpoint):
    """A row that reached the queue some other way is checked again before loading."""
    from backend.apps.worker import Worker

    (job_id,) = [j.id for j in queue_on(factory).submit(
        [jobs.NewJob(str(outside_checkpoint), NIAH, SMALL)])]
    worker = Worker(settings, worker_id="w")
    try:
        assert worker.run_once()
    finally:
        worker.manager.stop_monitor()
    job = queue_on(factory).get(job_id)
    assert job.state == JobState.FAILED.value
    assert "refused" in job.error and "LBS_MODEL_DIRS" in job.error


def test_the_command_line_is_not_confined(settings, with_tiny, outside_checkpoint, tmp_path):
    haystack = tmp_path / "hay.txt"
    haystack.write_text("The sky was grey. The sea was calm. " * 50)
    job = prepare(str(outside_checkpoint), NIAH, {**SMALL, "haystack": str(haystack)}, settings,
                  confine=False)
    assert job.spec.path == outside_checkpoint.resolve()


def test_confine_unit(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    assert confine("a", [root], "X") == (root / "a").resolve()
    assert confine(str(root / "a" / "new.txt"), [root], "X") == (root / "a" / "new.txt").resolve()
    for bad in ("..", "a/../../x", str(tmp_path), "/"):
        with pytest.raises(OutsideAllowedFolders):
            confine(bad, [root], "X")
    with pytest.raises(OutsideAllowedFolders, match="X is not set"):
        confine("a", [], "X")
