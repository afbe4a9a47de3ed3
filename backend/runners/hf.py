"""Hugging Face transformers runner: AutoModelForCausalLM + AutoTokenizer.

Loading follows the settings: dtype from LBS_TORCH_DTYPE, trust_remote_code
only with LBS_TRUST_REMOTE_CODE=1, never a download unless
LBS_ALLOW_DOWNLOAD=1, the weights straight onto the worker's device, and with
LBS_GPU_MEMORY_LIMIT > 0 on CUDA the process's allocator capped and a device map
under accelerate's `max_memory` (see backend.engine.memory.limits). Generation is
greedy, one request at a time (prompts of a job differ in length, and
padding a 100k-token batch wastes the memory NIAH needs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from backend.common.config import Settings
from backend.engine.memory.limits import Headroom, cap_process_memory, load_placement
from backend.runners.base import (
    BatchPlan,
    Generation,
    GenerationRequest,
    Runner,
    move_trailing_whitespace,
)
from backend.runners.builtin import ensure_builtin_model
from backend.runners.models import (
    ModelSpec,
    estimate_model_bytes,
    model_info,
    resolve_local_model,
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
    torch.compile). See METHODS."""
    num_gpus: int = 1
    """GPUs (the first of those visible) the model's layers are spread over."""

    @classmethod
    def from_settings(cls, settings: Settings, method: str = "default",
                      num_gpus: int = 1) -> LoadOptions:
        return cls(settings.torch_dtype, settings.trust_remote_code, settings.gpu_memory_limit,
                   method, num_gpus)


METHODS = ("basic", "optimized")


def _torch_dtype(name: str, on_cuda: bool):
    import torch

    if name == "auto":
        # float16/bfloat16 on CPU are slow or unsupported for many kernels.
        return "auto" if on_cuda else torch.float32
    return getattr(torch, name)


CPU_MAX_BATCH = 16
"""Where batch_size "auto" starts on the CPU (see HFRunner.find_batch_size)."""
MIN_SHARED_PREFIX = 32
"""Tokens a batch's contexts must share before the shared part is computed once."""


def _common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest token prefix common to every row."""
    first, n = rows[0], min(len(r) for r in rows)
    for row in rows[1:]:
        k = 0
        while k < n and row[k] == first[k]:
            k += 1
        n = k
    return n


def _cache_of(output):
    """The key/value cache of a forward's output (`cache` in recent transformers)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_length(needed: int) -> int:
    """Slots of a static KV cache for a request that needs `needed` positions: the next
    power of two up to 4096 (at least 256), four sizes per doubling past it (at most 1/4
    more than needed, where slots cost real memory). A compiled decode step's graphs
    are specialised on the cache's shape (and on CUDA recorded at its address), so
    prompts of a job meet a handful of sizes, each reused (HFRunner keeps the cache of
    the size in use), rather than one size per prompt length. The memory account
    (runners/hf_memory.py) counts these slots for a static-cache batch."""
    if needed <= 256:
        return 256
    if needed <= 4096:
        return 1 << (needed - 1).bit_length()
    step = 1 << (needed.bit_length() - 3)
    return -(-needed // step) * step


def room_bytes(devices: list[str]) -> int | None:
    """Bytes this process may still allocate on the CUDA `devices` a model uses: on each,
    the smaller of what the device has free (with what this process's allocator holds
    unused) and the allocator's cap (LBS_GPU_MEMORY_LIMIT, set by cap_process_memory,
    read back as torch's per-process fraction) less what is allocated; for a model
    spread over several GPUs, the tightest device's room on each (its layers' share of
    the KV cache is about even). None without CUDA devices: the CPU's RAM is not
    probed."""
    import torch

    cuda = [d for d in devices if str(d).startswith("cuda")]
    if not cuda or not torch.cuda.is_available():
        return None
    rooms = []
    for device in cuda:
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        unused = torch.cuda.memory_reserved(device) - allocated
        cap = int(torch.cuda.get_per_process_memory_fraction(device) * total) - allocated
        rooms.append(max(0, min(free + unused, cap)))
    return min(rooms) * len(rooms)


def _with_rows(plan: BatchPlan, rows: int) -> BatchPlan:
    """`plan` with `rows` rows, its longer continuations (counted over the batch) in
    proportion."""
    from dataclasses import replace

    return replace(plan, rows=rows, continuations=-(-plan.continuations * rows // plan.rows)
                   if plan.rows else plan.continuations)


def spills(model) -> bool:
    """Whether accelerate placed some of the model's layers in CPU RAM or on disk."""
    placed = set((getattr(model, "hf_device_map", None) or {}).values())
    return "disk" in placed or ("cpu" in placed and len(placed) > 1)


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


LENGTH_GROUP = 0.9
"""Shared-prefix prompts decode together when the shortest is at least this share of
the longest (NIAH prompts of one context length differ by a few tokens); others would
pad too much."""


def _length_groups(prompts: list[list[int]]) -> list[list[int]]:
    """Indexes of `prompts`, longest first, in groups of about one length."""
    groups: list[list[int]] = []
    for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        if not groups or len(prompts[i]) < LENGTH_GROUP * len(prompts[groups[-1][0]]):
            groups.append([])
        groups[-1].append(i)
    return groups


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` before the first occurrence of each non-empty stop string in turn (the
    rule of lm-evaluation-harness's `postprocess_generated_text`)."""
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


def rolling_windows(tokens: list[int], prefix: int, max_len: int
                    ) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, predicted) windows covering every token once, each at most
    `max_len` long, the first conditioned on `prefix`: lm-eval's
    `get_rolling_token_windows(context_len=1)` followed by `make_disjoint_window`."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix] + tokens[:first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        ctx, pred = tokens[max(0, end - max_len - 1):end - 1], tokens[end - n:end]
        windows.append((ctx, pred))
        done = end
    return [(ctx[:len(ctx) - (len(pred) - 1)], pred) for ctx, pred in windows]


class FirstTokenClock:
    """A logits processor that only notes when it is first called: the end of the
    prefill (the prompt's forward pass), so generation splits into prefill and decode."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.at = time.perf_counter()
        return scores


class HFTokenizer:
    """A transformers tokenizer as datasets see it (the PromptTokenizer protocol).

    `use_chat_template` is the default rendering (None: the template when the tokenizer
    has one); `render`, `prompt_ids` and `count_prompt` take a per-call `chat_template`
    that overrides it. A tokenizer without a template always renders plain text."""

    def __init__(self, tokenizer, max_length: int, use_chat_template: bool | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = self.has_template if use_chat_template is None else (
            use_chat_template and self.has_template)

    def templated(self, chat_template: bool | None) -> bool:
        """Whether prompts asked for with `chat_template` (None: the default) are in it."""
        if chat_template is None:
            return self.use_chat_template
        return chat_template and self.has_template

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render(self, user_message: str, chat_template: bool | None = None) -> str:
        if not self.templated(chat_template):
            return user_message
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False,
            add_generation_prompt=True)

    def prompt_ids(self, prompt: str, chat_template: bool | None = None) -> list[int]:
        # A rendered chat template already holds its special tokens (BOS…).
        return self.tokenizer.encode(prompt,
                                     add_special_tokens=not self.templated(chat_template))

    def count_prompt(self, prompt: str, chat_template: bool | None = None) -> int:
        return len(self.prompt_ids(prompt, chat_template))

    def prefix_token_text(self) -> str | None:
        """BOS, else EOS, as text (see Runner.prefix_token_text)."""
        return (getattr(self.tokenizer, "bos_token", None)
                or getattr(self.tokenizer, "eos_token", None))


def pinned_block_bytes(nbytes: int) -> int:
    """Host memory torch's caching host allocator takes to pin `nbytes`: the next power
    of two (ATen/core/CachingHostAllocator.h rounds every block with PowerOf2Ceil
    under its default thresholds), so a 22 MiB weight takes 32 MiB."""
    return 1 << max(0, nbytes - 1).bit_length() if nbytes > 0 else 0


def model_key(spec: ModelSpec, settings: Settings, options: LoadOptions | None = None
              ) -> tuple:
    """What makes two loaded transformers models different (the model manager's key). A
    folder is known by its real path, so the same folder named by its path and by its
    name under LBS_MODEL_DIRS (or through a symlink) is one loaded model."""
    where = str(spec.path.resolve()) if spec.path is not None else spec.name
    return (where, "hf", options or LoadOptions.from_settings(settings))


class HFRunner(Runner):
    """A transformers model and tokenizer, loaded by `HFRunner.load`: the runner of
    every model reference without a runner scheme (folders, hub ids, builtin:)."""

    scheme = "hf"

    # --- class side (the runner registry; no torch) ------------------------------------

    @classmethod
    def resolve(cls, reference: str, settings: Any, confine: bool = True) -> ModelSpec:
        return resolve_local_model(reference, settings, confine)

    @classmethod
    def check_job(cls, job: Any, settings: Any, confine: bool = True) -> None:
        from backend.runners.base import JobFieldError

        if job.api is not None:
            raise JobFieldError("api", "only for openai:<name> models")

    @classmethod
    def model_folder(cls, spec: ModelSpec) -> Path | None:
        """A checkpoint folder on disk; None for a built-in model and a hub id, whose
        reference is their identity."""
        return spec.path if spec.path and not spec.hub_id and not spec.builtin else None

    @classmethod
    def model_info(cls, job: Any) -> Any:
        return model_info(job.spec)

    @classmethod
    def estimate_job_bytes(cls, job: Any, settings: Any) -> int | None:
        from backend.engine.admission import estimate_job_bytes

        return estimate_job_bytes(job.spec, job.dataset, job.params, job.info.max_length,
                                  settings, num_gpus=job.num_gpus)

    @classmethod
    def _options(cls, job: Any, settings: Any, method: str | None) -> LoadOptions:
        return LoadOptions.from_settings(settings, method or "default", job.num_gpus)

    @classmethod
    def cache_key(cls, job: Any, settings: Any, method: str | None) -> tuple:
        return model_key(job.spec, settings, cls._options(job, settings, method))

    @classmethod
    def load_estimate(cls, job: Any, settings: Any, method: str | None) -> int:
        return estimate_model_bytes(job.spec, cls._options(job, settings, method).dtype)

    @classmethod
    def loader(cls, job: Any, settings: Any, method: str | None) -> Callable[[], HFRunner]:
        from backend.engine.admission import estimate_job_headroom

        options = cls._options(job, settings, method)
        # what the job needs on the GPU besides the weights: placing them leaves it free
        headroom = estimate_job_headroom(job.spec, job.dataset, job.params,
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
        self._cut_back: bool | None = None
        """Whether the model's cache can be cut back to a prefix (read once, on use)."""
        self._static: tuple[tuple[int, int], object] | None = None
        """The static cache of the size in use ((rows, slots), cache), kept for the pass:
        see `_static_cache`."""

    @classmethod
    def load(cls, spec: ModelSpec, options: LoadOptions, settings: Settings,
             headroom_bytes: int | Headroom = 0) -> HFRunner:
        """Load the model and tokenizer. On CUDA, LBS_GPU_MEMORY_LIMIT first caps this
        process's allocator (backend.engine.memory.limits.cap_process_memory); the weights go
        straight onto the GPU, or under a device map that keeps free on each GPU what the
        job holds there beyond the weights (`headroom_bytes`: its KV cache, activations
        and logits; `load_placement`)."""
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
        return cls(spec, model, tokenizer, device, max_length, static_cache=static_cache)

    def work_bytes(self, plan) -> int:
        """Bytes this model holds on its device beyond the weights while it runs `plan`
        (a runners.base.BatchPlan): the memory account of runners/hf_memory.py for the
        loaded model's config and dtype, the one admission reads for a job's worst
        batch. The method is the loaded one unless the plan names another."""
        from backend.runners.hf_memory import work_bytes

        config = self.model.config
        arch = (config.get_text_config() if hasattr(config, "get_text_config")
                else config).to_dict()
        element = next(self.model.parameters()).element_size()
        if plan.method == "default":
            from dataclasses import replace

            loaded = ("optimized" if self.static_cache else
                      "basic" if getattr(config, "_attn_implementation", "") == "eager"
                      else "default")
            plan = replace(plan, method=loaded)
        return work_bytes(arch, element, plan)

    # --- PromptTokenizer (delegated) ------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def render(self, user_message: str, chat_template: bool = True) -> str:
        return self.tok.render(user_message, chat_template)

    def count_prompt(self, prompt: str, chat_template: bool = True) -> int:
        return self.tok.count_prompt(prompt, chat_template)

    def prefix_token_text(self) -> str | None:
        return self.tok.prefix_token_text()

    # --- generation --------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Greedy replies, all requests in one batch (left-padded).

        The batch decodes up to the largest `max_new_tokens`; each reply is cut to
        its own budget and after its first end-of-sequence token, which is what it
        would be alone under greedy decoding.
        """
        if not requests:
            return []
        prompts = [self.tok.prompt_ids(r.prompt, r.chat_template) for r in requests]
        if any(r.prefix for r in requests) and self._shares_prefixes():
            return self._generate_shared(requests, prompts)
        width = max(len(ids) for ids in prompts)
        max_new = max(r.max_new_tokens for r in requests)
        cache = None
        if self.static_cache:
            # The last new token is never fed back: width + max_new - 1 positions.
            cache = self._static_cache(len(requests), cache_length(width + max_new - 1))
        try:
            rows, timing, took = self._greedy(prompts, max_new, time.perf_counter(), cache)
        except BaseException:
            self._static = None  # out of memory above all: no batch asks this size again
            raise
        timing.update(batch=len(requests), prefill_tokens=sum(len(p) for p in prompts))
        return [self._reply(row, request, len(ids), took / len(requests), timing)
                for row, request, ids in zip(rows, requests, prompts, strict=True)]

    def _static_cache(self, rows: int, slots: int):
        """The static KV cache for a batch of `rows` rows and `slots` positions, reset:
        the one kept from the last request when it had this shape, else a new one, made
        after the kept one is dropped (never two held: the memory account counts one
        batch's `cache_length(...)` slots per row). Reusing one cache keeps its tensors'
        addresses, which transformers marks static for a compiled decode step: on CUDA
        its graphs, recorded for those addresses, are replayed instead of recorded again
        for each request. Dropped by `forget_prefixes` (the end of a pass), `offload`
        and `close`.

        Our own cache rather than cache_implementation="static": transformers sizes that
        to the longest length the model has ever seen (generation/utils.py
        _prepare_static_cache, _previous_max_cache_length), so one 128k-token prompt
        made every later request allocate 128k slots."""
        import torch
        from transformers import StaticCache

        if self._static is not None and self._static[0] == (rows, slots):
            cache = self._static[1]
            with torch.inference_mode():  # its tensors were made under it
                cache.reset()  # zeroes keys and values, and the length written so far
            return cache
        self._static = None
        cache = StaticCache(config=self.model.config, max_cache_len=slots)
        self._static = ((rows, slots), cache)
        return cache

    def _greedy(self, prompts: list[list[int]], max_new: int, started: float,
                cache=None) -> tuple[list[list[int]], dict, float]:
        """`prompts` left-padded into one batch and decoded greedily up to `max_new`
        tokens, continuing `cache` when given: each row's new tokens, the prefill and
        decode seconds since `started`, and the seconds in all."""
        import torch

        width = max(len(ids) for ids in prompts)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts],
                                 device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts],
                            device=self.device)
        first_token = FirstTokenClock(self.device.startswith("cuda"))
        extra = {} if cache is None else {"cache": cache}
        with torch.inference_mode():
            # The runner chooses the cache (`cache`, else a dynamic one), never a
            # checkpoint's generation_config.cache_implementation: transformers refuses
            # it beside a cache, and its static cache is sized to the longest request
            # the model has seen (`_previous_max_cache_length`), not to this one.
            output = self.model.generate(
                input_ids=input_ids, attention_mask=mask,
                max_new_tokens=max_new, do_sample=False, cache_implementation=None,
                temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                logits_processor=[first_token], **extra)
        extra.clear()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        took = time.perf_counter() - started
        prefill = (first_token.at - started) if first_token.at else took
        return (output[:, width:].tolist(),
                {"prefill_s": round(prefill, 6), "decode_s": round(took - prefill, 6)}, took)

    def _reply(self, row: list[int], request: GenerationRequest, prompt_tokens: int,
               latency: float, timing: dict) -> Generation:
        """A generated row cut to the request's budget and after its first end token."""
        new_ids = row[:request.max_new_tokens]
        stops = self._eos_ids()
        end = next((i for i, t in enumerate(new_ids) if t in stops), None)
        if end is not None:
            new_ids = new_ids[:end + 1]
        text = self.decode(new_ids)
        text = cut_at_stop(text, request.stop) if request.stop else text.strip()
        return Generation(text=text, prompt_tokens=prompt_tokens,
                          output_tokens=len(new_ids), latency_s=latency,
                          extra={"timing": timing})

    # --- shared prefixes (GenerationRequest.prefix) -----------------------------------

    def _shared_length(self, request: GenerationRequest, ids: list[int]) -> int:
        """How many leading tokens of the prompt's `ids` are the prefix's: the tokens the
        prefix's own tokenisation agrees on with the prompt's (a token merging across
        the boundary is left to the rest), and at least one token left to feed."""
        if not request.prefix:
            return 0
        head = self.tok.prompt_ids(request.prefix, request.chat_template)
        n = 0
        for a, b in zip(head, ids, strict=False):
            if a != b:
                break
            n += 1
        return min(n, len(ids) - 1)

    def _kept_prefix(self, ids: list[int]):
        """The kept prefix's cache, made to start with the tokens `ids`, and how many of
        them had to be computed now (the caller reads the first len(ids) positions).

        One prefix is kept between calls. When `ids` is a prefix of it (a shallower
        needle: deepest first costs one prefill) it is used as it is; otherwise it is
        cut where the two part and extended by the rest of `ids` (a deeper prefix,
        another context length's haystack). The cut is a view, but the extension
        concatenates onto it, so the positions cut away are freed with the old
        tensors: one prefix is held at any time, never a copy of it."""
        import torch
        from transformers import DynamicCache

        kept_ids, kept = self._prefix or ((), None)
        common = 0
        for a, b in zip(kept_ids, ids, strict=False):
            if a != b:
                break
            common += 1
        if kept is not None and common == len(ids):
            return kept, 0
        self._prefix = None  # out of memory while extending it: nothing half-made kept
        if kept is None or common == 0:
            kept = None  # freed before its successor is computed
            kept, common = DynamicCache(config=self.model.config), 0
        else:
            kept.crop(common - len(kept_ids))
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([ids[common:]], device=self.device),
                       cache=kept, use_cache=True, logits_to_keep=1)
        self._prefix = (tuple(ids), kept)
        return kept, len(ids) - common

    def _copy_prefix(self, ids: list[int], cache) -> int:
        """Write the kept prefix's cache of the tokens `ids` (computing what it lacks)
        into `cache`, a row of the batch; returns the tokens computed. No reference to
        the kept cache outlives the call, so when the next row's prefix replaces it the
        old one is freed before the new one is computed."""
        kept, computed = self._kept_prefix(ids)
        n = len(ids)
        for layer, held in enumerate(kept.layers):
            cache.update(held.keys[..., :n, :], held.values[..., :n, :], layer)
        return computed

    def _shares_prefixes(self) -> bool:
        """Whether requests' prefixes are shared: on, the model's own cache (the
        optimized method's static cache has no room for a second row) and layers that
        can be cut back to a prefix (`hf_cache.can_cut_back`, read from the config
        before anything is computed)."""
        if not self.share_prefixes or self.static_cache:
            return False
        if self._cut_back is None:
            from backend.runners.hf_cache import can_cut_back

            self._cut_back = can_cut_back(self.model.config)
        return self._cut_back

    def _generate_shared(self, requests: list[GenerationRequest],
                         prompts: list[list[int]]) -> list[Generation]:
        """Requests with a shared prefix: prompts of about one length decode together,
        each one's cache continuing from the kept prefix's (deepest prefix first, so one
        prefill serves every shallower one). The same greedy tokens as each whole
        prompt alone."""
        shared = [self._shared_length(r, ids) for r, ids in zip(requests, prompts, strict=True)]
        results: list[Generation | None] = [None] * len(requests)
        try:
            for group in _length_groups(prompts):
                group.sort(key=lambda i: -shared[i])
                for i, generation in zip(group, self._continue_batch(
                        [requests[i] for i in group], [prompts[i] for i in group],
                        [shared[i] for i in group]), strict=True):
                    results[i] = generation
        except BaseException:
            self._prefix = None  # out of memory above all: the retry starts from nothing
            raise
        return results

    def _continue_batch(self, requests: list[GenerationRequest], prompts: list[list[int]],
                        shared: list[int]) -> list[Generation]:
        """Prompts of about one length, each one's first `shared` tokens those of the
        kept prefix, built into one left-padded cache (`hf_cache.BatchSlots`) allocated
        once for the prompts and the new tokens: a row's prefix is copied from the kept
        one and the rest of its prompt, but for its last token, computed in place; then
        `generate` feeds every row's last token and decodes them together on the same
        storage (the positions follow from the attention mask, as for any left-padded
        batch). At most B + 1 copies of one row are alive: the B rows and the kept
        prefix.

        Timing is the batch's, as for an ordinary batch: prefill and decode seconds,
        and the tokens computed and reused summed over the batch."""
        import torch

        from backend.runners.hf_cache import BatchSlots

        started = time.perf_counter()
        width = max(len(ids) for ids in prompts)
        max_new = max(r.max_new_tokens for r in requests)
        slots = BatchSlots(self.model.config, len(prompts), width + max_new - 1)
        computed = 0
        with torch.inference_mode():
            for row, (ids, n) in enumerate(zip(prompts, shared, strict=True)):
                cache = slots.row(row, start=width - len(ids))
                computed += self._copy_prefix(ids[:n], cache) if n else 0
                rest = ids[n:-1]
                if rest:
                    self.model(input_ids=torch.tensor([rest], device=self.device),
                               cache=cache, use_cache=True, logits_to_keep=1)
                computed += len(rest)
        rows, timing, took = self._greedy(prompts, max_new, started, slots.batch(width - 1))
        total = sum(len(ids) for ids in prompts)
        timing.update(batch=len(requests), prefill_tokens=computed + len(requests),
                      shared_prefix_tokens=total - computed - len(requests))
        return [self._reply(row, request, len(ids), took / len(requests), timing)
                for row, request, ids in zip(rows, requests, prompts, strict=True)]

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

    def forget_prefixes(self) -> None:
        """Drop the kept prefix cache and the kept static cache: the pass is over."""
        self._prefix = None
        self._static = None

    def _eos_ids(self) -> set[int]:
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if configured is None:
            configured = self.tokenizer.eos_token_id
        if configured is None:
            return set()
        return set(configured) if isinstance(configured, list | tuple) else {configured}

    # --- log-likelihood -------------------------------------------------------------

    def _split(self, request, contexts: dict | None = None
               ) -> tuple[list[int], list[int]]:
        """Context and continuation token ids. The text is split by
        `move_trailing_whitespace` (lm-evaluation-harness's rule); the tokens are cut
        where the whole text's tokens diverge from the context's, so a token merged
        across the boundary is scored with the continuation, never counted twice.
        `contexts` memoizes the context's tokens (the choices of a question share them).
        An empty context is the BOS token (else EOS), as in lm-evaluation-harness."""
        context, continuation = move_trailing_whitespace(request.context, request.continuation)
        whole = self.tok.prompt_ids(context + continuation, request.chat_template)
        key = (context, request.chat_template)
        if contexts is None or key not in contexts:
            ctx = self.tok.prompt_ids(context, request.chat_template)
            if contexts is not None:
                contexts[key] = ctx
        else:
            ctx = contexts[key]
        n = len(ctx)
        while n and whole[:n] != ctx[:n]:
            n -= 1
        if n == 0:
            prefix = (self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None
                      else self.tokenizer.eos_token_id)
            if prefix is not None and whole[:1] != [prefix]:
                return [prefix], whole
            n = 1  # the text starts with that token: it is the context
        return whole[:n], whole[n:]

    def loglikelihood(self, requests, batch_size: int = 1):
        """See `Runner.loglikelihood`. Distinct contexts go longest first, `batch_size`
        per forward pass, left-padded so every row ends on the last column (answer
        letters need that one column of logits: `logits_to_keep`); longer continuations
        then run on that pass's cache, right-padded. Position ids and the attention mask
        give each row what it would have alone: equal to unbatched scores within float
        rounding (1e-5 in float32)."""
        from backend.runners.base import Loglikelihood

        contexts: dict[tuple[str, bool], list[int]] = {}
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, request in enumerate(requests):
            ctx, cont = self._split(request, contexts)
            if not cont:
                raise ValueError(f"request {i}: the continuation has no tokens")
            groups.setdefault(tuple(ctx), []).append((i, cont))
        order = sorted(groups.items(),
                       key=lambda g: -(len(g[0]) + max(len(c) for _, c in g[1])))
        results: list[Loglikelihood | None] = [None] * len(requests)
        step = max(1, batch_size)
        for first in range(0, len(order), step):
            for i, result in self._score(order[first:first + step]):
                results[i] = result
        return results

    def _forward_takes(self, name: str) -> bool:
        """Whether the model's forward takes argument `name`: `logits_to_keep` (models
        of transformers >= 4.50) or `cache` (recent transformers; `past_key_values`
        before)."""
        if not hasattr(self, "_forward_params"):
            import inspect

            try:
                self._forward_params = set(inspect.signature(self.model.forward).parameters)
            except (TypeError, ValueError):
                self._forward_params = set()
        return name in self._forward_params

    def _score(self, batch: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]],
               share_prefix: bool = True):
        """(request index, Loglikelihood) for every continuation of the contexts in
        `batch`, from one padded pass over the contexts (and one over the longer
        continuations, if any). With `share_prefix`, a prefix of at least
        MIN_SHARED_PREFIX tokens common to every context (a few-shot prompt's header
        and examples) goes through the model once, and the padded pass covers only
        what follows it, on that prefix's cache."""
        import torch

        from backend.runners.base import Loglikelihood

        contexts = [list(ctx) for ctx, _ in batch]
        shared = _common_prefix(contexts) if share_prefix and len(batch) > 1 else 0
        shared = min(shared, min(len(c) for c in contexts) - 1)  # each row keeps a token
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        rest = [c[shared:] for c in contexts]
        width = max(len(r) for r in rest)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rest], device=self.device)
        mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * len(r) for r in rest],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        longer = [(row, i, cont) for row, (_, members) in enumerate(batch)
                  for i, cont in members if len(cont) > 1]
        extra = {"logits_to_keep": 1} if self._forward_takes("logits_to_keep") else {}
        cache_arg = "cache" if self._forward_takes("cache") else "past_key_values"
        out_rows = []
        with torch.inference_mode():
            if shared:
                head = self.model(input_ids=torch.tensor([contexts[0][:shared]],
                                                         device=self.device),
                                  use_cache=True, **extra)
                cache = _cache_of(head)
                cache.batch_repeat_interleave(len(batch))
                extra = {**extra, cache_arg: cache}
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             use_cache=bool(longer or shared), **extra)
            last = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            best = last.argmax(-1).tolist()
            for row, (_, members) in enumerate(batch):
                for i, cont in members:
                    if len(cont) == 1:  # answer letters: read off the shared pass
                        out_rows.append((i, Loglikelihood(float(last[row, cont[0]]),
                                                          best[row] == cont[0], 1)))
            if not longer:
                return out_rows
            # Each longer continuation extends its context's row of the cache (rows
            # repeated when a context has several), right-padded after its last token.
            rows = torch.tensor([row for row, _, _ in longer], device=self.device)
            cache = _cache_of(out)
            cache.batch_select_indices(rows)
            steps = max(len(cont) for _, _, cont in longer) - 1
            more_ids = torch.tensor([cont[:-1] + [pad] * (steps + 1 - len(cont))
                                     for _, _, cont in longer], device=self.device)
            more_mask = torch.tensor([[1] * (len(cont) - 1) + [0] * (steps + 1 - len(cont))
                                      for _, _, cont in longer], device=self.device)
            more = self.model(
                input_ids=more_ids, attention_mask=torch.cat([mask[rows], more_mask], dim=1),
                position_ids=positions[rows, -1:] + 1 + torch.arange(steps, device=self.device),
                use_cache=True, **{cache_arg: cache})
            logps = torch.cat([last[rows][:, None],
                               torch.log_softmax(more.logits.float(), dim=-1)], dim=1)
            for k, (_, i, cont) in enumerate(longer):
                target = torch.tensor(cont, device=logps.device)
                row = logps[k, :len(cont)]
                picked = row.gather(1, target[:, None])[:, 0]
                out_rows.append((i, Loglikelihood(float(picked.sum()),
                                                  bool((row.argmax(-1) == target).all()),
                                                  len(cont))))
        return out_rows

    def find_batch_size(self, plan: BatchPlan) -> int:
        """See `Runner.find_batch_size`. Starts at `plan.rows` (at most CPU_MAX_BATCH on
        the CPU, where memory is seldom the limit and wider batches bought no speed: see
        BENCHMARKS.md); on CUDA at the most rows whose memory account
        (`work_bytes`) fits the room this process may still use (`room_bytes`). That
        batch is then checked by one real step of the path the job runs (`_probe_step`),
        halving while it runs out of memory of any kind (CUDA's, a cuBLAS or cuDNN
        allocation failure, Python's MemoryError); other errors are raised. After each
        failure the failed batch's tensors are gone (the exception and its frames are
        dropped, the kept caches forgotten) before the device cache is emptied."""
        from accelerate.utils.memory import clear_device_cache

        size = max(1, plan.rows)
        if self.device == "cpu":
            size = min(size, CPU_MAX_BATCH)
        room = self.room_bytes()
        if room is not None:
            size = self._rows_within(plan, size, room)
        while True:
            failure = self._try_step(_with_rows(plan, size))
            if failure is None:
                return size
            clear_device_cache(garbage_collection=True)
            log.info("[Runner] batch_size auto: %d rows did not fit (%s)", size, failure)
            if size == 1:
                return 1  # not even one fits: the job's own halving records the failures
            size //= 2

    def room_bytes(self) -> int | None:
        """What this process may still allocate on the model's CUDA devices (see the
        module's `room_bytes`); None on the CPU."""
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
        from backend.runners.base import is_out_of_memory

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

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """Whole-text log-likelihoods, windowed as lm-evaluation-harness's HF backend does
        (`rolling_windows`): the text's tokens (the tokenizer's usual special tokens
        included), the first window conditioned on the BOS token (EOS without one)."""
        import torch

        prefix = (self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None
                  else self.tokenizer.eos_token_id)
        results = []
        with torch.inference_mode():
            for text in texts:
                results.append(sum(self._window_logprob(ctx, cont) for ctx, cont in
                                   rolling_windows(self.tokenizer.encode(text), prefix,
                                                   self.max_length)))
        return results

    def _window_logprob(self, context: list[int], predicted: list[int]) -> float:
        """The summed log-probability of `predicted` after `context` (one rolling
        window). Its logits (every position's, float32) die on return: a window's are
        never alive while the next one's forward pass runs."""
        import torch

        ids = torch.tensor([(context + predicted)[:-1]], device=self.device)
        logits = self.model(input_ids=ids).logits[0, -len(predicted):].float()
        logps = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(predicted, device=logps.device)
        return float(logps.gather(1, target[:, None]).sum())

    # --- placement (used by the model manager) --------------------------------------

    def _tensors(self):
        for name, param in self.model.named_parameters():
            yield name, param
        for name, buf in self.model.named_buffers():
            yield "buffer:" + name, buf

    def size_bytes(self) -> int:
        """Bytes of the model's weights and buffers (one copy)."""
        return sum(t.numel() * t.element_size() for _, t in self._tensors())

    def host_bytes(self) -> int:
        """Bytes of RAM the kept CPU copy holds while the model is on the GPU."""
        if self._host is None or self.device == "cpu":
            return 0
        return sum(t.numel() * t.element_size() for t in self._host.values())

    def ram_bytes(self) -> int:
        """Weights and buffers in RAM now (a device map may leave some layers on the
        CPU) plus the CPU copy kept while the model is on the GPU."""
        return self.host_bytes() + sum(t.numel() * t.element_size()
                                       for _, t in self._tensors() if t.device.type == "cpu")

    def pinned_bytes(self) -> int:
        """Pinned host memory an offload with `pin` takes: one block per weight and
        buffer, each rounded by the host allocator (see pinned_block_bytes)."""
        return sum(pinned_block_bytes(t.numel() * t.element_size()) for _, t in self._tensors())

    def movable(self) -> bool:
        """False for a model placed by accelerate hooks (a device map): it is released,
        never moved, since moving it under its hooks would break their bookkeeping."""
        return not any(hasattr(m, "_hf_hook") for m in self.model.modules())

    def offload(self, pin: bool) -> int:
        """Put the model on the CPU; returns bytes copied (0 when a copy was kept).

        Weights do not change during evaluation, so the first offload keeps a CPU
        copy (in pinned memory when `pin`) and later offloads only drop the GPU
        copy: milliseconds instead of a device-to-host copy.
        """
        import torch

        self.forget_prefixes()  # a shared prefix's cache and the static cache live there
        if self.device == "cpu":
            return 0
        copied = 0
        if self._host is None:
            host = {}
            for name, t in self._tensors():
                cpu = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                cpu.copy_(t.detach(), non_blocking=pin)
                host[name] = cpu
                copied += t.numel() * t.element_size()
            torch.cuda.synchronize()
            self._host, self.host_pinned = host, pin
        for name, t in self._tensors():
            t.data = self._host[name]
        self.device = "cpu"
        return copied

    def restore(self, device: str = "cuda:0", background: bool = False) -> int:
        """Copy the CPU copy back to `device` with non-blocking copies and one sync.

        With `background` (a prefetch beside a running job) the copies go on a side
        stream, not queued behind the job's kernels on the default stream; this thread
        waits for that stream alone, and the new weights are marked as used by the
        default stream (where the next job reads them), so the allocator does not hand
        their memory to the side stream again while such a job may still read it."""
        import torch

        if self.device != "cpu" or self._host is None:
            return 0
        names = [name for name, _ in self._tensors()]
        if background:
            side = torch.cuda.Stream(device)
            with torch.cuda.stream(side):
                moved = {name: self._host[name].to(device, non_blocking=True)
                         for name in names}
            side.synchronize()
            readers = torch.cuda.default_stream(device)
            for t in moved.values():
                t.record_stream(readers)
        else:
            moved = {name: self._host[name].to(device, non_blocking=True) for name in names}
            torch.cuda.synchronize()
        for name, t in self._tensors():
            t.data = moved[name]
        self.device = device
        return self.size_bytes()

    def close(self) -> None:
        """Drop the model; the model manager collects garbage and empties caches after.

        A model that generation compiled also resets torch.compile's caches: they hold
        the compiled decode step and, on CUDA, its CUDA-graph memory pools, which nothing
        else frees (torch._dynamo.reset calls reset_cudagraph_trees). The reset is
        process-wide: another cached model recompiles on its next use."""
        compiled = self.model is not None and "_compiled_call" in self.model.__dict__
        if compiled:
            del self.model._compiled_call  # model -> compiled call -> model
        self.forget_prefixes()
        self.model = None
        self.tokenizer = None
        self.tok = None
        self._host = None
        if compiled:
            import torch

            torch.compiler.reset()
