"""How much GPU memory a job needs, estimated at submit time without loading anything.

A worker claims a job only when this estimate fits the GPU memory it can give
(see scheduling.py); the API shows why a job waits. The estimate is

    weights (runners.models.estimate_model_bytes, in the dtype they load in)
  + what the runner holds beyond them for the job's worst batch

where the dataset states its batches (`Dataset.worst_batches`: rows, the longest
prompt, the tokens generated or scored, a shared prefix, padding, the positions whose
logits are asked for) and the transformers runner's own account says what each holds
(runners/hf_memory.py `work_bytes`: KV per copy, materialised masks, logits, eager
scores, activations). The code that allocates follows the same account, and a CPU
census of live tensor storage checks it on every path (tests/test_memory_account.py).
A comparison of `methods` runs them one after another: the largest counts.

It is an estimate for admission, not a promise: CUDA's own context and the
allocator's fragmentation come on top.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from backend.common.config import Settings
from backend.datasets.base import Dataset, DatasetParams
from backend.engine.contracts import ModelSpec, ParamError
from backend.engine.memory.limits import Headroom
from backend.runners import builtin
from backend.runners.hf_memory import work_bytes
from backend.runners.models import estimate_model_bytes

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
    """What the runner holds beyond the weights for the job's worst batch (its account,
    `work_bytes`), by where it lands when the model is sharded over GPUs: the KV
    cache follows the layers, the activations, masks and attention scores are on every
    GPU that runs layers, the logits on the GPU of the output head. Empty when the
    lengths are unknown."""
    arch = _architecture(spec)
    try:
        plans = dataset.worst_batches(params, model_max)
    except (KeyError, TypeError, AttributeError) as exc:  # a record without a field it reads
        raise ParamError("data_dir", f"the {dataset.name} data has a record without the "
                                     f"field {exc}") from None
    if not arch or not plans:
        return Headroom()
    dtype = settings.torch_dtype if settings.torch_dtype != "auto" else \
        str(arch.get("torch_dtype") or arch.get("dtype") or "float16")
    element = _ELEMENT_BYTES.get(dtype, 2)
    methods = params.methods or ["default"]
    worst = max((replace(plan, method=method) for plan in plans for method in methods),
                key=lambda plan: work_bytes(arch, element, plan))
    # Where the account's bytes land is read from the account itself: what it loses
    # without the decoder layers follows them (their KV cache), what it then loses
    # without the vocabulary is the output head's (the logits), the rest is each GPU's.
    held = work_bytes(arch, element, worst)
    no_layers = work_bytes({**arch, "num_hidden_layers": 0}, element, worst)
    no_head = work_bytes({**arch, "num_hidden_layers": 0, "vocab_size": 0}, element, worst)
    # the layers' share of the weights, which the KV cache follows when sharded: not
    # the embeddings nor the head (counted twice unless the config says they are tied,
    # which errs towards keeping more free)
    layers = int(arch.get("num_hidden_layers") or 0)
    embedding = int(arch.get("vocab_size") or 0) * int(arch.get("hidden_size") or 0) * element
    weights = estimate_model_bytes(spec, settings.torch_dtype) or 0
    layer_weights = max(0, weights - embedding * (1 if arch.get("tie_word_embeddings") else 2))
    layer = layer_weights // max(layers, 1)
    return Headroom(layers=max(0, held - no_layers), each=max(0, no_head),
                    last=max(0, no_layers - no_head), layer_weights=layer_weights,
                    layer_bytes=layer, largest_module=max(layer, embedding))
