"""How much GPU memory a job needs, estimated at submit time without loading anything.

A worker claims a job only when this estimate fits the GPU memory it can give
(see scheduling.py); the API shows why a job waits. For the job's longest
sequence of T tokens (`Dataset.longest_sequence`: its longest prompt plus the
tokens generated after it) and a batch of B, in the model's element size E:

    weights (runners.models.estimate_model_bytes, in the dtype they load in)
  + B x KV cache: 2 x layers x kv_heads x head_dim x T x E
  + B x one layer's activations: T x (4 x hidden + 2 x intermediate) x E
  + B x eager attention scores, only for the `basic` method (eager attention):
        heads x T^2 x (2E + 4): the scores, their float32 softmax and its cast back,
        alive together in transformers' eager_attention_forward (SDPA does not
        materialise them)
  + B x logits, float32: vocab x T x 4 when the dataset scores by log-likelihood
        (a forward pass keeps every position's logits), else vocab x 4 (generate
        asks the model for the last position only: `logits_to_keep=1`)

It is an estimate for admission, not a promise: CUDA's own context and the
allocator's fragmentation come on top.
"""

from __future__ import annotations

import json
from typing import Any

from backend.common.config import Settings
from backend.datasets.base import Dataset, DatasetParams, ParamError
from backend.engine.memory.limits import Headroom
from backend.runners import builtin
from backend.runners.models import ModelSpec, estimate_model_bytes

_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _architecture(spec: ModelSpec) -> dict[str, Any] | None:
    if spec.builtin:
        recipe = builtin.BUILTIN_MODELS[spec.builtin]
        return {"hidden_size": recipe.hidden_size, "intermediate_size": recipe.intermediate_size,
                "num_hidden_layers": recipe.num_hidden_layers,
                "num_attention_heads": recipe.num_attention_heads,
                "num_key_value_heads": recipe.num_key_value_heads,
                "vocab_size": recipe.vocab_size, "torch_dtype": "float32"}
    if spec.path is None or not (spec.path / "config.json").is_file():
        return None
    config = json.loads((spec.path / "config.json").read_text(encoding="utf-8"))
    return config.get("text_config") or config


def estimate_job_bytes(spec: ModelSpec, dataset: Dataset, params: DatasetParams,
                       model_max: int | None, settings: Settings,
                       num_gpus: int = 1) -> int | None:
    """Estimated GPU bytes of a job (see the module docstring) over its `num_gpus` GPUs;
    None when the model's size is unknown (a hub model not downloaded yet), which
    admits it anywhere. A model sharded over several GPUs runs its layers on each in
    turn, so every GPU keeps room for one layer's activations of its own, and placing
    whole layers leaves some room unused (`Headroom.sharded`).
    Raises ParamError when the dataset's files cannot be read for their lengths."""
    weights = estimate_model_bytes(spec, settings.torch_dtype)
    if not weights:
        return None
    headroom = estimate_job_headroom(spec, dataset, params, model_max, settings)
    return weights + headroom.sharded(num_gpus)


def estimate_job_headroom(spec: ModelSpec, dataset: Dataset, params: DatasetParams,
                          model_max: int | None, settings: Settings) -> Headroom:
    """What the job holds beyond its weights (the terms of the module docstring), by
    where it lands when the model is sharded over GPUs: the KV cache follows the
    layers, the activations and attention scores are on every GPU that runs layers,
    the logits on the GPU of the output head. Empty when the lengths are unknown."""
    arch = _architecture(spec)
    try:
        tokens = dataset.longest_sequence(params, model_max)
    except (KeyError, TypeError, AttributeError) as exc:  # a record without a field it reads
        raise ParamError("data_dir", f"the {dataset.name} data has a record without the "
                                     f"field {exc}") from None
    if not arch or not tokens:
        return Headroom()
    dtype = settings.torch_dtype if settings.torch_dtype != "auto" else \
        str(arch.get("torch_dtype") or arch.get("dtype") or "float16")
    element = _ELEMENT_BYTES.get(dtype, 2)
    hidden = int(arch.get("hidden_size") or 0)
    layers = int(arch.get("num_hidden_layers") or 0)
    heads = int(arch.get("num_attention_heads") or 1)
    kv_heads = int(arch.get("num_key_value_heads") or heads)
    head_dim = int(arch.get("head_dim") or hidden // max(heads, 1))
    intermediate = int(arch.get("intermediate_size") or 4 * hidden)
    vocab = int(arch.get("vocab_size") or 0)
    batch = 1 if params.batch_size == "auto" else params.batch_size  # "auto" takes what is free
    kv_cache = 2 * layers * kv_heads * head_dim * tokens * element
    activations = tokens * (4 * hidden + 2 * intermediate) * element
    scores = heads * tokens * tokens * (2 * element + 4) if "basic" in (params.methods or []) \
        else 0
    logits = vocab * (tokens if dataset.scores_every_position(params) else 1) * 4
    # the layers' share of the weights, which the KV cache follows when sharded: not
    # the embeddings nor the head (counted twice unless the config says they are tied,
    # which errs towards keeping more free)
    embedding = vocab * hidden * element
    weights = estimate_model_bytes(spec, settings.torch_dtype) or 0
    layer_weights = max(0, weights - embedding * (1 if arch.get("tie_word_embeddings") else 2))
    layer = layer_weights // max(layers, 1)
    return Headroom(layers=batch * kv_cache, each=batch * (activations + scores),
                    last=batch * logits, layer_weights=layer_weights, layer_bytes=layer,
                    largest_module=max(layer, embedding))
