"""A small OpenAI-compatible HTTP server on loopback for the faults a real server does not
produce on demand. The real thing (`transformers serve`) is in tests/test_openai_serve.py.

It serves the built-in tiny model through the real HF runner: /v1/chat/completions,
/v1/completions and /v1/models, with an API key check and scripted failures (429, 500,
slow answers, bad JSON, an error naming a missing chat template, logprobs without the
echoed prompt) to exercise the client. Its completions endpoint behaves like
llama-cpp-python's server: `echo` + `logprobs` return the prompt's tokens with their
log-probabilities followed by the generated ones, and `max_tokens: 0` means "generate
until the context is full" (`n_ctx`, kept small here), not "generate nothing".
With `logprobs=False` it behaves like `transformers serve` instead: `echo` and
`logprobs` are ignored and `max_tokens: 0` is an HTTP 500.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAI:
    def __init__(self, runner, served_name: str = "tiny", api_key: str | None = None,
                 logprobs: bool = True):
        self.runner = runner
        self.served_name = served_name
        self.api_key = api_key
        self.logprobs = logprobs
        self.failures: list[str] = []  # consumed one per request: 429, 500, slow, badjson
        self.slow_seconds = 3.0
        self.n_ctx = 96  # llama.cpp's context size: max_tokens 0 generates up to it
        self.requests: list[dict[str, Any]] = []  # path, body, auth_ok, outcome
        self.lock = threading.Lock()
        self.model_lock = threading.Lock()  # one generation at a time on the CPU model
        self.in_flight = 0
        self.max_in_flight = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- the model's side -------------------------------------------------------------

    def _generate(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        from backend.engine.contracts import GenerationRequest

        with self.model_lock:
            (gen,) = self.runner.generate([GenerationRequest(prompt, max_tokens)])
        return {"text": gen.text, "usage": {"prompt_tokens": gen.prompt_tokens,
                                            "completion_tokens": gen.output_tokens,
                                            "total_tokens": gen.prompt_tokens
                                            + gen.output_tokens}}

    def _with_logprobs(self, prompt: str, max_tokens: int, echo: bool) -> dict[str, Any]:
        """A completion choice with `logprobs` (tokens, token_logprobs, top_logprobs,
        text_offset) as llama-cpp-python builds it: greedy decoding of `max_tokens`
        tokens (0: until n_ctx), the prompt's tokens first when `echo`."""
        import torch

        tok = self.runner.tokenizer
        enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        n_prompt = len(ids)
        if max_tokens <= 0:
            max_tokens = max(0, self.n_ctx - n_prompt)
        with self.model_lock, torch.inference_mode():
            for _ in range(max_tokens):
                logits = self.runner.model(input_ids=torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
            logits = self.runner.model(input_ids=torch.tensor([ids])).logits[0].float()
        logps = torch.log_softmax(logits, dim=-1)
        generated = tok.decode(ids[n_prompt:])
        offsets = [start for start, _ in enc["offset_mapping"]]
        offsets += [len(prompt) + len(tok.decode(ids[n_prompt:pos]))
                    for pos in range(n_prompt, len(ids))]
        tokens = [tok.decode([i]) for i in ids]
        values: list[float | None] = [None]
        tops: list[dict[str, float] | None] = [None]
        for pos in range(1, len(ids)):
            row = logps[pos - 1]
            values.append(float(row[ids[pos]]))
            best = int(row.argmax())
            tops.append({tok.decode([best]): float(row[best])})
        first = 0 if echo else n_prompt
        return {"text": (prompt if echo else "") + generated, "index": 0,
                "finish_reason": "length",
                "logprobs": {"tokens": tokens[first:], "token_logprobs": values[first:],
                             "top_logprobs": tops[first:], "text_offset": offsets[first:]},
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(ids) - n_prompt,
                          "total_tokens": len(ids)}}

    # --- HTTP -------------------------------------------------------------------------------

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def _send(self, status: int, payload: Any, raw: bytes | None = None,
                      headers: dict[str, str] | None = None) -> None:
                body = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": fake.served_name,
                                                                 "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                auth_ok = (fake.api_key is None
                           or self.headers.get("Authorization") == f"Bearer {fake.api_key}")
                with fake.lock:
                    failure = fake.failures.pop(0) if fake.failures and auth_ok else None
                    record = {"path": self.path, "body": body, "auth_ok": auth_ok,
                              "outcome": failure or "ok"}
                    fake.requests.append(record)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._answer(body, auth_ok, failure)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _answer(self, body: dict[str, Any], auth_ok: bool, failure: str | None):
                if not auth_ok:
                    return self._send(401, {"error": {"message": "Incorrect API key provided",
                                                      "type": "invalid_request_error"}})
                if failure == "429":
                    return self._send(429, {"error": {"message": "Rate limit reached"}},
                                      headers={"Retry-After": "0.05"})
                if failure == "500":
                    return self._send(500, {"error": {"message": "The server had an error"}})
                if failure == "badjson":
                    return self._send(200, None, raw=b"{\"choices\": [ oops")
                if failure == "notemplate":  # vLLM's answer for a model without one
                    return self._send(400, {"error": {
                        "message": "As of transformers v4.44, default chat template is no "
                                   "longer allowed,\nso you must provide a chat template "
                                   "\x1b[31mif the tokenizer does not define one." + "!" * 500,
                        "type": "BadRequestError", "code": 400}})
                if failure == "slow":
                    time.sleep(fake.slow_seconds)
                if body.get("model") != fake.served_name:
                    return self._send(404, {"error": {"message": f"model {body.get('model')!r} "
                                                                 "does not exist"}})
                max_tokens = int(body.get("max_tokens", 16))
                if self.path == "/v1/chat/completions":
                    message = body["messages"][-1]["content"]
                    out = fake._generate(fake.runner.render(message), max_tokens)
                    return self._send(200, {
                        "object": "chat.completion", "model": fake.served_name,
                        "choices": [{"index": 0, "finish_reason": "length", "message": {
                            "role": "assistant", "content": out["text"]}}],
                        "usage": out["usage"]})
                if self.path == "/v1/completions":
                    prompt = body["prompt"]
                    if fake.logprobs and body.get("logprobs") is not None:
                        # "noecho": logprobs of the generated tokens only (echo ignored)
                        choice = fake._with_logprobs(prompt, max_tokens, bool(
                            body.get("echo")) and failure != "noecho")
                        usage = choice.pop("usage")
                    elif max_tokens <= 0:
                        if not fake.logprobs:  # transformers serve's generate() refuses it
                            return self._send(500, None, raw=b"Internal Server Error")
                        out = fake._generate(prompt, fake.n_ctx)
                        choice = {"index": 0, "finish_reason": "length", "text": out["text"]}
                        usage = out["usage"]
                    else:
                        out = fake._generate(prompt, max_tokens)
                        choice = {"index": 0, "finish_reason": "length", "text": out["text"]}
                        usage = out["usage"]
                    return self._send(200, {"object": "text_completion",
                                            "model": fake.served_name,
                                            "choices": [choice], "usage": usage})
                return self._send(404, {"error": {"message": "not found"}})

        return Handler
