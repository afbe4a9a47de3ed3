"""The runner registry: which runner serves a model reference as users type it."""

from __future__ import annotations

import pytest

from backend.engine.contracts import Generation
from backend.runners import registry
from backend.runners.base import Runner


@pytest.mark.parametrize("reference, runner", [
    ("builtin:tiny", "hf"),
    ("/models/llama-3-8b", "hf"),
    ("meta-llama/Llama-3.1-8B", "hf"),
    ("./zoo/tiny-copy", "hf"),
    ("openai:gpt-4o", "openai"),
    (" openai:gpt-4o ", "openai"),
    ("OpenAI:gpt-4o", "hf"),      # schemes are lower case, as before: a name, not found
    ("nosuch:model", "hf"),       # an unregistered scheme is no runner's: hf refuses it
])
def test_references_go_to_their_runner(reference, runner):
    assert registry.runner_name_for(reference) == runner


def test_registering_a_runner_serves_its_scheme(monkeypatch, settings):
    monkeypatch.setattr(registry._registry, "_classes", dict(registry._registry._classes))

    class Parrot(Runner):
        scheme = "parrot"
        max_length = 64

        @classmethod
        def loader(cls, job, settings, method):
            return cls

        def encode(self, text):
            return list(text.encode())

        def decode(self, ids):
            return bytes(ids).decode()

        def render(self, user_message, chat_template=True):
            return user_message

        def count_prompt(self, prompt, chat_template=True):
            return len(prompt.encode())

        def generate(self, requests):
            return [Generation(r.prompt, len(r.prompt), 0, 0.0) for r in requests]

    assert registry.runner_name_for("parrot:polly") == "hf"
    registry.register(Parrot)
    assert registry.get_runner(registry.runner_name_for("parrot:polly")) is Parrot
    from backend.engine.contracts import ModelNotFound
    from backend.runners.models import resolve_model

    spec = resolve_model("parrot:polly", settings)
    assert (spec.runner, spec.target, spec.path) == ("parrot", "polly", None)
    with pytest.raises(ModelNotFound, match="after parrot:"):
        resolve_model("parrot:", settings)


def test_a_scheme_must_be_a_plain_word():
    class Bad(Runner):
        scheme = "Not A Scheme"

    with pytest.raises(ValueError, match="scheme"):
        registry.register(Bad)
    with pytest.raises(registry.UnknownRunner, match="known: hf, openai"):
        registry.get_runner("nosuch")
