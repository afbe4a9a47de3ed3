"""Models behind an OpenAI-compatible HTTP API (`openai:<served model name>`).

    runner.py     OpenAIRunner: prompts and log-likelihood requests over the API, the
                  local tokenizer prompts are built in, reading echoed log-probabilities
    options.py    a job's `api` options (ApiOptions), the hosts a job may reach, the key
                  sent to each
    transport.py  one POST with retries, backoff and a prompt stop (ApiClient), and
                  remote error text made safe to store

No module here imports torch or transformers at import time: the HTTP server validates
a job's `api` options with ApiOptions.
"""
