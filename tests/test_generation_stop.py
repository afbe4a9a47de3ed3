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
