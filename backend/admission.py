"""How much GPU memory a job needs, estimated at submit time without loading anything.

A worker claims a job only when this estimate fits the GPU memory it can give
(see scheduling.py); the API shows why a job waits. The estimate is

    weights (runners.models.estimate_model_bytes, in the dtype they load in)
  + KV cache for the longest sequence: 2 × layers × kv_heads × head_dim × tokens
  + one layer's activations at that length: tokens × (4 × hidden + 2 × intermediate)

(the last two per sequence in a batch, in the model's element size). The
longest sequence is the job's largest context length plus its new tokens
(Needle-in-a-Haystack), or its `max_length` prompt budget plus new tokens
(LongBench), else the model's maximum length: an upper bound for datasets whose
prompts are shorter. It is an estimate for admission, not a promise: CUDA's own
context and the allocator's fragmentation come on top.
"""

from __future__ import annotations

import json
from typing import Any

from backend.config import Settings
from backend.runners import builtin
from backend.runners.models import ModelSpec, estimate_model_bytes

_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _architecture(spec: ModelSpec) -> dict[str, Any] | None:
    if spec.builtin:
        recipe = builtin.BUILTIN_MODELS[spec.builtin]
        return {"hidden_size": recipe.hidden_size, "intermediate_size": recipe.intermediate_size,
                "num_hidden_layers": recipe.num_hidden_layers,
                "num_attention_heads": recipe.num_attention_heads,
                "num_key_value_heads": recipe.num_key_value_heads, "torch_dtype": "float32"}
    if spec.path is None or not (spec.path / "config.json").is_file():
        return None
    config = json.loads((spec.path / "config.json").read_text(encoding="utf-8"))
    return config.get("text_config") or config


def longest_sequence(params: Any, model_max: int | None) -> int | None:
    """Most tokens one sequence of the job holds (prompt + generated), or None."""
    new_tokens = int(getattr(params, "max_new_tokens", 0) or 0)
    if hasattr(params, "lengths"):  # Needle-in-a-Haystack: its context lengths
        return max(params.lengths()) + new_tokens
    budget = getattr(params, "max_length", None)
    if isinstance(budget, int) and budget > 0:
        return budget + (new_tokens or 512)
    return model_max


def estimate_job_bytes(spec: ModelSpec, params: Any, model_max: int | None,
                       settings: Settings) -> int | None:
    """Estimated GPU bytes of a job (see the module docstring); None when the model's
    size is unknown (a hub model not downloaded yet), which admits it anywhere."""
    weights = estimate_model_bytes(spec, settings.torch_dtype)
    if not weights:
        return None
    arch = _architecture(spec)
    tokens = longest_sequence(params, model_max)
    if not arch or not tokens:
        return weights
    dtype = settings.torch_dtype if settings.torch_dtype != "auto" else \
        str(arch.get("torch_dtype") or arch.get("dtype") or "float16")
    element = _ELEMENT_BYTES.get(dtype, 2)
    hidden = int(arch.get("hidden_size") or 0)
    layers = int(arch.get("num_hidden_layers") or 0)
    heads = int(arch.get("num_attention_heads") or 1)
    kv_heads = int(arch.get("num_key_value_heads") or heads)
    head_dim = int(arch.get("head_dim") or hidden // max(heads, 1))
    intermediate = int(arch.get("intermediate_size") or 4 * hidden)
    batch = getattr(params, "batch_size", 1) or 1
    batch = batch if isinstance(batch, int) else 1  # "auto": what fits is found by halving
    kv_cache = 2 * layers * kv_heads * head_dim * tokens * element
    activations = tokens * (4 * hidden + 2 * intermediate) * element
    return weights + batch * (kv_cache + activations)
