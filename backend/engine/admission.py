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
from backend.datasets.base import Dataset, DatasetParams, ParamError
from backend.runners import builtin
from backend.runners.hf_memory import work_bytes
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
                       model_max: int | None, settings: Settings) -> int | None:
    """Estimated GPU bytes of a job (see the module docstring); None when the model's
    size is unknown (a hub model not downloaded yet), which admits it anywhere.
    Raises ParamError when the dataset's files cannot be read for their lengths."""
    weights = estimate_model_bytes(spec, settings.torch_dtype)
    if not weights:
        return None
    arch = _architecture(spec)
    try:
        plans = dataset.worst_batches(params, model_max)
    except (KeyError, TypeError, AttributeError) as exc:  # a record without a field it reads
        raise ParamError("data_dir", f"the {dataset.name} data has a record without the "
                                     f"field {exc}") from None
    if not arch or not plans:
        return weights
    dtype = settings.torch_dtype if settings.torch_dtype != "auto" else \
        str(arch.get("torch_dtype") or arch.get("dtype") or "float16")
    element = _ELEMENT_BYTES.get(dtype, 2)
    methods = params.methods or ["default"]
    return weights + max(work_bytes(arch, element, replace(plan, method=method))
                         for plan in plans for method in methods)
