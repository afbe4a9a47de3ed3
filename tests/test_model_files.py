"""Every file a model load may open stays inside LBS_MODEL_DIRS: a checkpoint folder
whose chat_template.jinja (or any file, or a linked subfolder's file) is a symbolic
link to a file elsewhere is refused at submission with 403 naming the model, and by
the worker if the link appears after submission; links that stay inside are fine."""

from __future__ import annotations

import json

from tests.conftest import work_one_job

SECRET = "PRIVATE-TEXT-OUTSIDE-THE-MODEL-DIRS"
JOB = {"dataset": "needle_in_haystack",
       "params": {"context_lengths": [256], "depth_percents": [50], "max_new_tokens": 2}}


def _link_template(model, target):
    (model / "chat_template.jinja").unlink(missing_ok=True)
    (model / "chat_template.jinja").symlink_to(target)


def _private(tmp_path):
    outside = tmp_path / "private"
    outside.mkdir()
    secret = outside / "notes.jinja"
    secret.write_text(SECRET + "{{ messages[0]['content'] }}")
    return secret


def test_a_linked_file_in_a_model_folder_is_refused_at_submission(client, tiny_copy,
                                                                   tmp_path):
    _link_template(tiny_copy, _private(tmp_path))
    res = client.post("/api/jobs", json={"model": str(tiny_copy), **JOB})
    assert res.status_code == 403, res.get_json()
    error = res.get_json()["error"]
    assert error["code"] == "path_refused" and error["details"][0]["field"] == "model"
    assert "chat_template.jinja" in error["message"] and "symbolic link" in error["message"]

    (tiny_copy / "extra").mkdir()  # a link that stays inside is fine
    (tiny_copy / "extra" / "template.jinja").write_text("{{ messages[0]['content'] }}")
    _link_template(tiny_copy, tiny_copy / "extra" / "template.jinja")
    res = client.post("/api/jobs", json={"model": str(tiny_copy), **JOB})
    assert res.status_code == 201, res.get_json()


def test_a_linked_subfolder_is_checked_file_by_file(client, tiny_copy, tmp_path):
    linked = tiny_copy.parent / "templates"  # inside LBS_MODEL_DIRS, holding a way out
    linked.mkdir()
    (linked / "chat.jinja").symlink_to(_private(tmp_path))
    (tiny_copy / "additional_chat_templates").symlink_to(linked, target_is_directory=True)
    res = client.post("/api/jobs", json={"model": str(tiny_copy), **JOB})
    assert res.status_code == 403, res.get_json()
    assert "chat.jinja" in res.get_json()["error"]["message"]


def test_the_worker_refuses_a_link_made_after_submission(client, settings, tiny_copy,
                                                         tmp_path):
    res = client.post("/api/jobs", json={"model": str(tiny_copy), **JOB})
    assert res.status_code == 201, res.get_json()
    job_id = res.get_json()["data"]["job"]["id"]
    _link_template(tiny_copy, _private(tmp_path))
    work_one_job(settings)
    job = client.get(f"/api/jobs/{job_id}").get_json()["data"]["job"]
    assert job["state"] == "failed" and "symbolic link" in job["error"], job
    samples = client.get(f"/api/jobs/{job_id}/samples").get_json()
    assert SECRET not in json.dumps(samples)
