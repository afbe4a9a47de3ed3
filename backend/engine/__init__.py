"""The evaluation engine: the loop that answers and scores a job's items (evaluation)
and the model manager with its memory tools (memory); what a job needs in GPU memory
is its runner's estimate (for transformers models, runners/hf/account.py). Its plugins
sit beside it at fixed places: model runners in `backend/runners/`, datasets in
`backend/datasets/`.

It imports `backend.common` and its own plugins, never the queue or an application:
the worker hands it a job and a sink for its samples."""
