"""Loading a transformers model: `from_pretrained` under the settings.

dtype from LBS_TORCH_DTYPE, trust_remote_code only with LBS_TRUST_REMOTE_CODE=1, never
a download unless LBS_ALLOW_DOWNLOAD=1, the weights straight onto the worker's device,
and with LBS_GPU_MEMORY_LIMIT > 0 on CUDA the process's allocator capped and a device
map under accelerate's `max_memory` (see placement.py). The inference method picks the
attention and, for "optimized", a static cache that transformers compiles on CUDA.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from backend.common.config import Settings
from backend.engine.contracts import ModelSpec
from backend.runners.builtin import ensure_builtin_model
from backend.runners.hf.placement import (
    Headroom,
    cap_process_memory,
    load_placement,
    spills,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    """What, besides the model itself, changes the loaded result (part of the cache key)."""

    dtype: str
    trust_remote_code: bool
    gpu_memory_limit: float
    method: str = "default"
    """Inference method: "default" (transformers' defaults), "basic" (eager attention,
    dynamic cache) or "optimized" (SDPA attention and a static KV cache; on CUDA also
    torch.compile): the `methods` a job may ask for (DatasetParams.methods)."""
    num_gpus: int = 1
    """GPUs (the first of those visible) the model's layers are spread over."""

    @classmethod
    def from_settings(cls, settings: Settings, method: str = "default",
                      num_gpus: int = 1) -> LoadOptions:
        return cls(settings.torch_dtype, settings.trust_remote_code, settings.gpu_memory_limit,
                   method, num_gpus)


def _torch_dtype(name: str, on_cuda: bool):
    import torch

    if name == "auto":
        # float16/bfloat16 on CPU are slow or unsupported for many kernels.
        return "auto" if on_cuda else torch.float32
    return getattr(torch, name)


def configure_compile(model) -> bool:
    """Let transformers compile generation its own way on CUDA, or forbid it; True if
    it will compile.

    transformers compiles only the decode step, and only with a static cache on CUDA
    (generation/utils.py `_valid_auto_compile_criteria`, `get_compiled_call` in
    modeling_utils.py): the prefill, whose shape changes with every prompt length, stays
    eager. A model that spills layers to CPU RAM or disk is never compiled (the same rule
    transformers applies when it sees the device map; said here outright). Off CUDA
    nothing is set: transformers would not compile there, only warn about the config.
    """
    from transformers import CompileConfig

    config = model.generation_config
    if spills(model):
        config.compile_config, config.disable_compile = None, True
        return False
    if model.device.type != "cuda":
        return False
    config.compile_config = CompileConfig()  # transformers' defaults: reduce-overhead
    return True


def model_source(spec: ModelSpec, settings: Settings) -> str:
    """What `from_pretrained` reads: a built-in model's folder (made first if it is not
    there yet), a checkpoint folder, or a hub id."""
    if spec.builtin:
        return str(ensure_builtin_model(settings.data_dir, spec.builtin))
    return str(spec.path) if spec.path is not None else spec.hub_id


def model_key(spec: ModelSpec, settings: Settings, options: LoadOptions | None = None
              ) -> tuple:
    """What makes two loaded transformers models different (the model manager's key). A
    folder is known by its real path, so the same folder named by its path and by its
    name under LBS_MODEL_DIRS (or through a symlink) is one loaded model."""
    where = str(spec.path.resolve()) if spec.path is not None else spec.name
    return (where, "hf", options or LoadOptions.from_settings(settings))


@dataclass
class LoadedModel:
    """A model and tokenizer as `load_model` leaves them."""

    model: Any
    tokenizer: Any
    device: str
    """Where the first weight is: "cpu" or "cuda:N"."""
    max_length: int
    """The model's context: its config's max_position_embeddings, else the tokenizer's."""
    static_cache: bool
    """Generate with a preallocated KV cache (the "optimized" method)."""


def load_model(spec: ModelSpec, options: LoadOptions, settings: Settings,
               headroom_bytes: int | Headroom = 0) -> LoadedModel:
    """Load the model and tokenizer. On CUDA, LBS_GPU_MEMORY_LIMIT first caps this
    process's allocator (placement.cap_process_memory); the weights go straight onto
    the GPU, or under a device map that keeps free on each GPU what the job holds there
    beyond the weights (`headroom_bytes`: its KV cache, activations and logits;
    `load_placement`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_source(spec, settings)
    local_only = not settings.allow_download
    on_cuda = torch.cuda.is_available()
    kwargs = dict(dtype=_torch_dtype(options.dtype, on_cuda),
                  trust_remote_code=options.trust_remote_code,
                  local_files_only=local_only)
    if options.method == "basic":
        kwargs["attn_implementation"] = "eager"
    elif options.method == "optimized":
        kwargs["attn_implementation"] = "sdpa"
    if on_cuda:
        cap_process_memory(options.gpu_memory_limit)
        kwargs.update(load_placement(options.gpu_memory_limit, num_gpus=options.num_gpus,
                                     headroom_bytes=headroom_bytes))
    else:
        kwargs["device_map"] = {"": "cpu"}
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(
        source, trust_remote_code=options.trust_remote_code, local_files_only=local_only)
    # With a device map transformers materialises each tensor on its device as it
    # reads it (transformers 5 dropped low_cpu_mem_usage: modeling_utils.py pops it
    # unread); a map to one device is applied without accelerate hooks
    # (modeling_utils.py dispatches only a map over several devices or disk).
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model.eval()
    device = str(next(model.parameters()).device)
    # A preallocated (static) KV cache saves the dynamic cache's copy per decoded
    # token: 1.12-1.37x decode tokens/s on the CPU (bench/cache_compile.py). Its
    # fixed shapes are what lets a compiled decode step be replayed step after step
    # on CUDA; transformers compiles only that step, and only on CUDA (on the CPU
    # compiling cost ~18 s per shape and gained nothing at 4096 tokens).
    static_cache = options.method == "optimized"
    if static_cache and not configure_compile(model) and spills(model):
        log.info("[Runner] %s spills layers to cpu/disk: generation is not compiled",
                 spec.name)
    config_max = getattr(model.config, "max_position_embeddings", None)
    tok_max = tokenizer.model_max_length if tokenizer.model_max_length < 10**9 else None
    max_length = config_max or tok_max or 2048
    log.info("[Runner] loaded %s on %s (%s) in %.2f s", spec.name, device,
             str(next(model.parameters()).dtype).removeprefix("torch."),
             time.perf_counter() - started)
    return LoadedModel(model, tokenizer, device, max_length, static_cache)
