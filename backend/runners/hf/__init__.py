"""The Hugging Face transformers runner (`HFRunner`, in runner.py): the runner of every
model reference without a runner scheme (folders, hub ids, builtin:).

    runner.py      HFRunner: the class side the registry asks (resolve, check, estimate,
                   loader) and the loaded model's batch sizing
    loading.py     from_pretrained with the settings' dtype, attention and compile rules
    placement.py   LBS_GPU_MEMORY_LIMIT: the process's allocator cap, accelerate's
                   max_memory and where the weights go (Headroom)
    account.py     the memory account: what a batch holds beyond the weights
                   (work_bytes) and a job's estimate from it at submit time
    tokenizer.py   a transformers tokenizer as datasets see it (HFTokenizer)
    generation.py  greedy generation, static caches and shared prefixes (Generator)
    cache.py       the key/value caches the runner lays out itself (imports torch)
    scoring.py     log-likelihood and rolling log-likelihood (Scorer)
    offload.py     the weights to the CPU and back, and release (Offloader)

Nothing here imports torch at import time but cache.py, which only the loaded model's
code imports: the server resolves models and estimates jobs through this package.
"""
