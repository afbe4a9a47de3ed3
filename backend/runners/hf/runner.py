"""The Hugging Face transformers runner: AutoModelForCausalLM + AutoTokenizer.

The class side answers the runner registry without torch (resolve a reference, check a
job, estimate its memory by the account, make its loader); a loaded `HFRunner` generates
(generation.py), scores (scoring.py), is moved by the model manager (offload.py) and
finds the batch size that fits the memory left (here). Generation is greedy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from backend.common.config import Settings
from backend.engine.contracts import BatchPlan, JobOptions, JobPlan, ModelInfo, ModelSpec
from backend.runners.base import Runner
from backend.runners.hf import account
from backend.runners.hf.account import cache_length
from backend.runners.hf.generation import Generator
from backend.runners.hf.loading import LoadOptions, load_model, model_key
from backend.runners.hf.offload import Offloader
from backend.runners.hf.placement import Headroom, room_bytes
from backend.runners.hf.scoring import Scorer
from backend.runners.hf.tokenizer import HFTokenizer
from backend.runners.models import estimate_model_bytes, model_info, resolve_local_model

log = logging.getLogger(__name__)

CPU_MAX_BATCH = 64
"""Where batch_size "auto" starts on the CPU (see HFRunner.find_batch_size): wide
batches of generation sharing a prefix are the fastest there too (BENCHMARKS.md,
bench/shared_prefix.py --sweep), and the trial keeps a smaller size where it is faster."""


def _with_rows(plan: BatchPlan, rows: int) -> BatchPlan:
    """`plan` with `rows` rows, its longer continuations (counted over the batch) in
    proportion."""
    return replace(plan, rows=rows, continuations=-(-plan.continuations * rows // plan.rows)
                   if plan.rows else plan.continuations)


class HFRunner(Generator, Scorer, Offloader, Runner):
    """A transformers model and tokenizer, loaded by `HFRunner.load`: the runner of
    every model reference without a runner scheme (folders, hub ids, builtin:)."""

    scheme = "hf"

    # --- class side (the runner registry; no torch) ------------------------------------

    @classmethod
    def resolve(cls, reference: str, settings: Settings, confine: bool = True) -> ModelSpec:
        return resolve_local_model(reference, settings, confine)

    @classmethod
    def check_job(cls, job: JobPlan, settings: Settings, confine: bool = True) -> JobOptions:
        from backend.engine.contracts import JobFieldError

        if job.api is not None:
            raise JobFieldError("api", "only for openai:<name> models")
        return JobOptions(None, job.api_key)

    @classmethod
    def model_folder(cls, spec: ModelSpec) -> Path | None:
        """A checkpoint folder on disk; None for a built-in model and a hub id, whose
        reference is their identity."""
        return spec.path if spec.path and not spec.hub_id and not spec.builtin else None

    @classmethod
    def model_info(cls, job: JobPlan) -> ModelInfo:
        return model_info(job.spec)

    @classmethod
    def estimate_job_bytes(cls, job: JobPlan, settings: Settings) -> int | None:
        return account.estimate_job_bytes(job.spec, job.dataset, job.params,
                                          job.info.max_length, settings, num_gpus=job.num_gpus)

    @classmethod
    def _options(cls, job: JobPlan, settings: Settings, method: str | None) -> LoadOptions:
        return LoadOptions.from_settings(settings, method or "default", job.num_gpus)

    @classmethod
    def cache_key(cls, job: JobPlan, settings: Settings, method: str | None) -> tuple:
        return model_key(job.spec, settings, cls._options(job, settings, method))

    @classmethod
    def load_estimate(cls, job: JobPlan, settings: Settings, method: str | None) -> int:
        return estimate_model_bytes(job.spec, cls._options(job, settings, method).dtype)

    @classmethod
    def loader(cls, job: JobPlan, settings: Settings, method: str | None) -> Callable[[], HFRunner]:
        options = cls._options(job, settings, method)
        # what the job needs on the GPU besides the weights: placing them leaves it free
        headroom = account.estimate_job_headroom(job.spec, job.dataset, job.params,
                                                 job.info.max_length, settings)
        return partial(cls.load, job.spec, options, settings, headroom_bytes=headroom)

    # --- instance side -----------------------------------------------------------------

    def __init__(self, spec: ModelSpec, model, tokenizer, device: str, max_length: int,
                 static_cache: bool = False):
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.tok = HFTokenizer(tokenizer, max_length)
        self.device = device
        self.max_length = max_length
        self.pad_token_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
        self._host: dict[str, object] | None = None  # CPU copy of every weight, once made
        self.host_pinned = False
        self.static_cache = static_cache
        """Generate with a preallocated KV cache (the "optimized" method)."""
        self.share_prefixes = True
        """Continue requests with a `prefix` from a copy of its cached keys/values."""
        self._prefix: tuple[tuple[int, ...], object] | None = None
        """The shared prefix kept in this pass: its token ids and cache."""
        self._last_prompt: tuple[int, ...] = ()
        """The tokens of the last request generated alone in this pass."""
        self._cut_back: bool | None = None
        """Whether the model's cache can be cut back to a prefix (read once, on use)."""
        self._static: tuple[tuple[int, int], object] | None = None
        """The static cache of the size in use ((rows, slots), cache), kept for the pass:
        see `_static_cache`."""

    @classmethod
    def load(cls, spec: ModelSpec, options: LoadOptions, settings: Settings,
             headroom_bytes: int | Headroom = 0) -> HFRunner:
        """Load the model and tokenizer (loading.load_model: the settings' dtype, the
        GPU memory cap and a placement that keeps `headroom_bytes` free)."""
        loaded = load_model(spec, options, settings, headroom_bytes)
        return cls(spec, loaded.model, loaded.tokenizer, loaded.device, loaded.max_length,
                   static_cache=loaded.static_cache)

    def work_bytes(self, plan: BatchPlan) -> int:
        """Bytes this model holds on its device beyond the weights while it runs `plan`
        (a runners.base.BatchPlan): the memory account of account.py for the
        loaded model's config and dtype, the one admission reads for a job's worst
        batch. The method is the loaded one unless the plan names another."""
        config = self.model.config
        arch = (config.get_text_config() if hasattr(config, "get_text_config")
                else config).to_dict()
        element = next(self.model.parameters()).element_size()
        if plan.method == "default":
            loaded = ("optimized" if self.static_cache else
                      "basic" if getattr(config, "_attn_implementation", "") == "eager"
                      else "default")
            plan = replace(plan, method=loaded)
        return account.work_bytes(arch, element, plan)

    # --- PromptTokenizer (delegated) ------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def render(self, user_message: str, chat_template: bool = True) -> str:
        return self.tok.render(user_message, chat_template)

    def count_prompt(self, prompt: str, chat_template: bool = True) -> int:
        return self.tok.count_prompt(prompt, chat_template)

    def render_chat(self, messages: list[dict[str, str]],
                    add_generation_prompt: bool = True) -> str:
        return self.tok.render_chat(messages, add_generation_prompt)

    def prefix_token_text(self) -> str | None:
        return self.tok.prefix_token_text()

    def run_settings(self) -> dict[str, Any]:
        import torch

        first = next(iter(self.model.parameters()), None)
        out: dict[str, Any] = {
            "device": self.device,
            "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
            "attention": getattr(self.model.config, "_attn_implementation", None),
            "cache": "static" if self.static_cache else "dynamic",
            "shared_prefixes": self.share_prefixes,
            "chat_template": self.tokenizer.chat_template
            if isinstance(self.tokenizer.chat_template, str) else None}
        if self.device.startswith("cuda") and torch.cuda.is_available():
            out["device_name"] = torch.cuda.get_device_name(torch.device(self.device))
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map and len(set(map(str, device_map.values()))) > 1:
            out["devices"] = sorted(set(map(str, device_map.values())))
        return out

    def find_batch_size(self, plan: BatchPlan) -> int:
        """See `Runner.find_batch_size`. Starts at `plan.rows` (at most CPU_MAX_BATCH on
        the CPU), then at the most rows whose memory account (`work_bytes`) fits
        the room this process may still use: on CUDA `room_bytes`, on the CPU half the
        RAM the machine has available (a step too large for RAM would not raise, the
        kernel would kill the worker: there the account is the answer). Where steps can
        fail (`steps_can_fail`: CUDA) that
        batch is then checked by one real step of the path the job runs (`_probe_step`),
        halving while it runs out of memory of any kind (CUDA's, a cuBLAS or cuDNN
        allocation failure, Python's MemoryError); other errors are raised. After each
        failure the failed batch's tensors are gone (the exception and its frames are
        dropped, the kept caches forgotten) before the device cache is emptied."""
        from accelerate.utils.memory import clear_device_cache

        size = max(1, plan.rows)
        room = self.room_bytes()
        if self.device == "cpu":
            size = min(size, CPU_MAX_BATCH)
            if room is None:  # RAM running out ends in the OOM killer, not in an error
                import psutil

                room = psutil.virtual_memory().available // 2
        if room is not None:
            size = self._rows_within(plan, size, room)
        if not self.steps_can_fail():
            return size
        while True:
            failure = self._try_step(_with_rows(plan, size))
            if failure is None:
                return size
            clear_device_cache(garbage_collection=True)
            log.info("[Runner] batch_size auto: %d rows did not fit (%s)", size, failure)
            if size == 1:
                return 1  # not even one fits: the job's own halving records the failures
            size //= 2

    def steps_can_fail(self) -> bool:
        """Whether a batch too large for memory raises (CUDA's allocator and libraries
        do), so that `find_batch_size` checks its batch by one real step. On the CPU it
        does not: RAM running out ends in the kernel's OOM killer, so the memory account
        alone decides there, and no step (a whole batch's prefill, a minute on a small
        model) is spent on it."""
        return self.device != "cpu"

    def room_bytes(self) -> int | None:
        """What this process may still allocate on the model's CUDA devices (see
        placement.room_bytes); None on the CPU."""
        return room_bytes(sorted({str(p.device) for p in self.model.parameters()}))

    def _rows_within(self, plan: BatchPlan, start: int, room: int) -> int:
        """The most rows, 1 to `start`, whose account (`work_bytes`) fits in `room`
        (1 when none does: the real step then says so)."""
        low, high = 1, start
        while low < high:
            middle = (low + high + 1) // 2
            if self.work_bytes(_with_rows(plan, middle)) <= room:
                low = middle
            else:
                high = middle - 1
        log.info("[Runner] batch_size auto: the account fits %d rows of %d + %d tokens in "
                 "%.2f GiB", low, plan.prompt_tokens, plan.new_tokens, room / 2**30)
        return low

    def _try_step(self, plan: BatchPlan) -> str | None:
        """Run `_probe_step` on `plan`: None when it fits, else what ran out. The
        exception, and with its traceback every frame of the failed step, is gone
        when this returns; so are the caches kept from it."""
        from backend.engine.contracts import is_out_of_memory

        try:
            self._probe_step(plan)
            return None
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            text = str(exc).strip()
            failure = f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"
        self.forget_prefixes()
        return failure

    def _probe_step(self, plan: BatchPlan) -> None:
        """One step of the path the batch `plan` takes, at its fullest. Log-likelihood:
        `_score` over `plan.rows` contexts of `plan.prompt_tokens` tokens (one a token
        shorter when rows are padded), with `plan.continuations` continuations of
        `plan.new_tokens` tokens shared out over them. Generation: the left-padded prefill
        of prompts as long as the prompt plus the new tokens but the last, so the KV
        cache (the kept static cache with the "optimized" method) reaches its final
        length, then one decode step on it."""
        import torch

        token = self.tokenizer.eos_token_id or 0
        rows = max(1, plan.rows)
        lengths = [max(1, plan.prompt_tokens)] * rows
        if plan.kind == "loglikelihood":
            if plan.padded and rows > 1 and lengths[-1] > 1:
                lengths[-1] -= 1
            continuation = [token] * max(1, plan.new_tokens)
            each = max(1, -(-plan.continuations // rows))
            self._score([((token,) * n, [(k * each + j, continuation) for j in range(each)])
                         for k, n in enumerate(lengths)], share_prefix=False)
            return
        width = max(lengths[0], plan.prompt_tokens + plan.new_tokens - 2)
        lengths = [width] * rows
        if plan.padded and rows > 1 and width > 1:
            lengths[-1] -= 1
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - n) + [token] * n for n in lengths],
                           device=self.device)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=self.device)
        extra = {}
        if self.static_cache:
            extra["cache"] = self._static_cache(rows, cache_length(width + 1))
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2,
                                min_new_tokens=2, do_sample=False, temperature=None,
                                top_p=None, top_k=None, pad_token_id=pad, **extra)
