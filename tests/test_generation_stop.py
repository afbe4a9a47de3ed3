"""A running `generate` ends when its stop strings appear (a stopping criterion, not a
cut afterwards) and when its job is cancelled or timed out (the runner's should_stop),
on the built-in model."""

from __future__ import annotations

import pytest


@pytest.fixture
def runner(with_tiny):
    from backend.common.config import load_settings
    from backend.runners.hf.loading import LoadOptions
    from backend.runners.hf.runner import HFRunner
    from backend.runners.models import resolve_model

    settings = load_settings()
    return HFRunner.load(resolve_model("builtin:tiny", settings, confine=False),
                         LoadOptions.from_settings(settings), settings)


PROMPT = "The quick brown fox"


def test_stop_strings_end_generation_early(runner):
    """The reply is the one without the stop string, cut before it, and the model made
    only the tokens up to the stop string, not the whole budget."""
    from backend.engine.contracts import GenerationRequest, cut_at_stop

    (free,) = runner.generate([GenerationRequest(PROMPT, 40, chat_template=False, stop=("\x00",))])
    assert free.output_tokens == 40
    ids = runner.encode(free.text)
    stop = runner.decode(ids[3:5])  # text a few tokens in
    assert stop and stop in free.text
    (cut,) = runner.generate([GenerationRequest(PROMPT, 120, chat_template=False, stop=(stop,))])
    assert cut.text == cut_at_stop(free.text, (stop,))
    assert cut.output_tokens <= 8, "decoding went on after the stop string"


def test_a_stopped_job_ends_a_running_generate(runner):
    """should_stop (cancel, timeout) is checked at every new token: Stopped after the
    token it turned true, not after the 300 tokens asked for."""
    from backend.engine.contracts import GenerationRequest, Stopped

    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 5

    runner.should_stop = should_stop
    with pytest.raises(Stopped):
        runner.generate([GenerationRequest(PROMPT, 300, chat_template=False),
                         GenerationRequest(PROMPT + " jumps", 300, chat_template=False)])
    assert len(calls) == 6


def test_a_generation_budget_beyond_the_context_is_refused_at_submission():
    from backend.datasets.registry import get_dataset
    from backend.engine.contracts import ModelInfo, ParamError

    dataset = get_dataset("lm_eval")
    params = dataset.parse_params({"tasks": ["lbs_gen"],
                                   "gen_kwargs": {"max_gen_toks": 10**9, "until": []}})
    with pytest.raises(ParamError, match="max_gen_toks 1000000000 leaves no room") as err:
        dataset.check(params, ModelInfo("m", 2048))
    assert err.value.field == "gen_kwargs"
    with pytest.raises(ParamError, match="above the 2048 tokens"):
        dataset.check(dataset.parse_params({"tasks": ["lbs_gen"], "max_length": 4096}),
                      ModelInfo("m", 2048))


@pytest.mark.slow
def test_cancel_and_timeout_reach_a_running_lm_eval_generation(with_tiny, tasks_dir):
    """A generation asking 8,000 new tokens with no stop string (minutes on the CPU) on a
    real server and worker: a 10 s job timeout fails it and a cancel cancels it, each
    within seconds of the signal, not when the generation would have ended."""
    import time

    from tests.conftest import LiveServer

    live = LiveServer(with_tiny, {"LBS_LM_EVAL_INCLUDE_PATH": str(tasks_dir),
                                  "HF_DATASETS_OFFLINE": "1"}).start()
    endless = {"tasks": ["lbs_gen"], "limit": 1,
               "gen_kwargs": {"max_gen_toks": 8000, "until": []}}
    try:
        live.wait_for_worker()
        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "lm_eval", "params": endless,
            "timeout_s": 10})
        assert status == 201, body
        job = live.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"), timeout=120)
        assert job["state"] == "failed" and "timed out" in job["error"], job
        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "lm_eval", "params": endless})
        job_id = body["data"]["job"]["id"]
        live.wait_for(job_id, ("running",), timeout=60)
        time.sleep(3)  # into the generation
        assert live.request("POST", f"/api/jobs/{job_id}/cancel")[0] == 200
        cancelled = time.monotonic()
        job = live.wait_for(job_id, ("cancelled", "succeeded", "failed"), timeout=120)
        assert job["state"] == "cancelled", job
        assert time.monotonic() - cancelled < 20
    finally:
        live.stop()
