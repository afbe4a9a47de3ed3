"""lm-eval's task index, stored once and read back by later processes: the stored
index must be the one lm-eval builds, load the same tasks, and follow edits."""

import logging
import time


def _shape(manager):
    return {name: (e.kind, e.yaml_path, e.cfg, e.tags) for name, e in
            manager.task_index.items()}, (manager.all_tasks, manager.all_subtasks,
                                          manager.all_groups, manager.all_tags)


def test_stored_index_is_lm_evals_own_and_loads_the_same_tasks(tasks_dir, shared_cache,
                                                                caplog):
    from lm_eval.tasks import TaskManager

    from backend.datasets.lm_eval_index import task_manager

    include = (str(tasks_dir),)
    cache = shared_cache  # lm-eval's own folder may be stored already: it is read then
    own = TaskManager(include_path=list(include))
    built = task_manager(include, True, cache)  # builds (the fixture folder) and stores
    assert len(list(cache.glob("lm_eval-index-*.json"))) >= 2  # a file per folder
    with caplog.at_level(logging.INFO, logger="backend.datasets.lm_eval_index"):
        started = time.perf_counter()
        read = task_manager(include, True, cache)  # a later process: reads
        took = time.perf_counter() - started
    assert "indexed in" not in caplog.text  # nothing was rebuilt
    assert _shape(read) == _shape(own) == _shape(built)
    assert "arc_easy" in read.all_tasks and "lbs_mc" in read.all_tasks
    assert took < 10, f"reading the stored index took {took:.1f} s"

    docs = [list(m.load(["lbs_mc"])["tasks"]["lbs_mc"].test_docs()) for m in (own, read)]
    assert docs[0] == docs[1] and docs[0]


def test_an_edited_yaml_makes_a_new_index(tasks_dir, tmp_path):
    from backend.datasets.lm_eval_index import task_manager

    include, cache = (str(tasks_dir),), tmp_path / "cache"
    first = task_manager(include, False, cache)
    assert "lbs_mc2" not in first.all_tasks
    yaml = (tasks_dir / "lbs_mc.yaml").read_text().replace("task: lbs_mc", "task: lbs_mc2")
    (tasks_dir / "lbs_mc_copy.yaml").write_text(yaml)
    again = task_manager(include, False, cache)
    assert "lbs_mc2" in again.all_tasks and "lbs_mc" in again.all_tasks
    (tasks_dir / "lbs_mc_copy.yaml").unlink()
    assert "lbs_mc2" not in task_manager(include, False, cache).all_tasks


def test_no_cache_folder_builds_every_time(tasks_dir):
    from backend.datasets.lm_eval_index import task_manager

    assert "lbs_mc" in task_manager((str(tasks_dir),), False, None).all_tasks


def test_a_task_list_probe_ends_with_the_process_that_asked(tmp_path):
    """The server lists lm-eval's tasks in a subprocess and nothing else waits for it:
    when the server is killed, the probe ends too instead of building the index (a
    core's worth of CPU, up to its 10-minute timeout) for nobody."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from tests.conftest import ROOT

    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys; subprocess.run([sys.executable, '-m', "
         "'backend.datasets.lm_eval_probe', '--cache', 'off'])"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        probe = None
        while probe is None and time.monotonic() < deadline:
            children = psutil.Process(parent.pid).children()
            probe = next((c for c in children if "lm_eval_probe" in " ".join(c.cmdline())),
                         None)
            time.sleep(0.1)
        assert probe is not None, "the probe never started"
        time.sleep(1.0)  # past its start-up: indexing
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        gone, alive = psutil.wait_procs([probe], timeout=15)
        assert not alive, "the probe outlived the process that started it"
    finally:
        parent.kill()
        for child in psutil.Process().children(recursive=True):
            if "lm_eval_probe" in " ".join(child.cmdline()):
                child.kill()
