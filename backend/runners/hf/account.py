"""The transformers runner's memory account: what it holds on its device beyond the
weights for one planned batch (a `BatchPlan`, `work_bytes`), and from it what a job
needs in GPU memory, estimated at submit time without loading anything
(`estimate_job_bytes`): the one account that admission (queue/scheduling.py) reads for
a job's worst batch and the runner reads for a batch it is about to run
(HFRunner.work_bytes).

No torch here: the server calls it at submit time. Each term follows what the code
paths of this package (generation.py, scoring.py) and transformers 5 allocate,
checked on the CPU by a census of live tensor storage (tests/test_memory_account.py):

- KV cache: 2 x layers x kv_heads x head_dim x element bytes per position, for each
  copy the code holds: one per row; a plan with a shared prefix keeps one more (the
  kept prefix, as long as a row while that row's rest is computed on it); a
  log-likelihood batch whose continuations run past one token repeats a context's
  row for each of them. A dynamic cache grows by `torch.cat`, so one layer's keys
  exist twice for a moment. The "optimized" method's static cache holds
  `cache_length(...)` positions per row from the first step.
- Attention mask: transformers' `sdpa_mask` materialises a boolean [B, 1, q, kv]
  once a row is padded or the queries continue a cache (a shared prefix); eager
  attention (method "basic") always builds it, in the model dtype.
- Eager attention scores (method "basic"): [B, heads, q, kv] twice (the product and
  its scaled or masked copy), or for 16-bit models the float32 softmax beside them.
- Logits for the positions asked (`logits_to_keep`), in the model dtype, plus the
  float32 copy and the log_softmax the runner (or generate) makes of them.
- One decoder layer's activations for the tokens of one forward pass: the MLP's
  three intermediate-sized tensors or attention's projections, whichever is larger,
  beside the residual stream.

The batch's need is its largest moment: a kept prefix's own pass; the prompt's pass,
whose cache stays while first a layer's tensors (mask, activations, scores) and then
the logits come and go; the end of decoding, the whole cache. A row that continues a
shared prefix has queries after the prefix's keys, so transformers materialises its
mask even unpadded: at the shallowest NIAH needle that is about the prompt's length
squared in bytes (16 GiB at 128k tokens).

A job's estimate is

    weights (runners.models.estimate_model_bytes, in the dtype they load in)
  + what the runner holds beyond them for the job's worst batch

where the dataset states its batches (`Dataset.worst_batches`: rows, the longest
prompt, the tokens generated or scored, a shared prefix, padding, the positions whose
logits are asked for) and `work_bytes` says what each holds. A comparison of `methods`
runs them one after another: the largest counts. It is an estimate for admission, not
a promise: CUDA's own context and the allocator's fragmentation come on top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from backend.common.config import Settings
from backend.engine.contracts import BatchPlan, JobParams, ModelSpec, ParamError, PlannedDataset
from backend.runners import builtin
from backend.runners.hf.placement import Headroom
from backend.runners.models import estimate_model_bytes

_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Shape:
    """The dimensions of a decoder-only transformer the account needs (config.json)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, arch: dict[str, Any]) -> Shape:
        hidden = int(arch.get("hidden_size") or 0)
        heads = int(arch.get("num_attention_heads") or 1)
        return cls(layers=int(arch.get("num_hidden_layers") or 0), hidden=hidden,
                   intermediate=int(arch.get("intermediate_size") or 4 * hidden),
                   heads=heads, kv_heads=int(arch.get("num_key_value_heads") or heads),
                   head_dim=int(arch.get("head_dim") or hidden // max(heads, 1)),
                   vocab=int(arch.get("vocab_size") or 0))


def kv_bytes_per_token(shape: Shape, element_bytes: int) -> int:
    """Keys and values of one position over every layer."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * element_bytes


def _activations(shape: Shape, element_bytes: int, tokens: int, masked_keys: int = 0) -> int:
    """One decoder layer's live tensors for `tokens` tokens in one forward pass: the
    embeddings, the residual stream, its normed copy and the layer's output beside
    either the MLP (activated gate, up projection and their product) or attention
    (queries and their rotated copy, the new keys and values, the output), plus the
    rotary tables. Under a materialised mask transformers' SDPA cannot group query
    heads (`use_gqa_in_sdpa`): the `masked_keys` keys and values (rows x positions)
    are repeated to every head."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    mlp = tokens * 3 * shape.intermediate
    attention = tokens * (4 * q + 2 * kv)
    if shape.kv_heads != shape.heads:
        attention += masked_keys * 2 * q
    return (tokens * (4 * shape.hidden + 2 * shape.head_dim) + max(mlp, attention)) \
        * element_bytes + tokens * 24  # the ids, mask and positions (int64)


def _logits(shape: Shape, element_bytes: int, positions: int) -> int:
    """Logits of `positions` positions in the model dtype, their float32 copy (the same
    tensor for a float32 model) and its log_softmax (or generate's scores)."""
    copy = 0 if element_bytes == 4 else 4
    return positions * shape.vocab * (element_bytes + copy + 4)


def _eager_scores(shape: Shape, element_bytes: int, rows: int, queries: int,
                  keys: int) -> int:
    """transformers' eager_attention_forward for one layer: the scores and their scaled
    (then masked) copy alive together, or with a 16-bit model the masked scores, their
    float32 softmax and its cast back; keys and values repeated to every head."""
    per_score = 2 * element_bytes if element_bytes == 4 else 2 * element_bytes + 4
    repeated = 0
    if shape.kv_heads != shape.heads:
        repeated = 2 * rows * shape.heads * keys * shape.head_dim * element_bytes
    return rows * shape.heads * queries * keys * per_score + repeated


def work_bytes(arch: dict[str, Any], element_bytes: int, plan: BatchPlan) -> int:
    """Bytes the transformers runner holds on its device beyond the weights while it
    runs `plan` (see the module docstring for each term). `arch` is the model's
    config.json (its text config for a multimodal model), `element_bytes` the size of
    one element of the dtype the model runs in. Never negative; 0 for an empty plan."""
    if plan.rows <= 0 or plan.prompt_tokens <= 0:
        return 0
    shape = Shape.of(arch)
    rows, prompt, new = plan.rows, plan.prompt_tokens, max(0, plan.new_tokens)
    kv_token = kv_bytes_per_token(shape, element_bytes)
    layer_kv = kv_token // max(shape.layers, 1)
    eager = plan.method == "basic"

    if plan.kind == "rolling":
        # one window through the model: no padding; the cache transformers builds by
        # default grows layer by layer during the pass, then every position's logits
        # (gone with the output), then those logits' float32 copy and log_softmax
        cache = rows * prompt * kv_token
        layers = _activations(shape, element_bytes, rows * prompt)
        if eager:
            layers += rows * prompt * prompt * element_bytes \
                + _eager_scores(shape, element_bytes, rows, prompt, prompt)
        positions = rows * min(plan.logits_positions, prompt)
        head = (positions * shape.vocab + rows * prompt * shape.hidden) * element_bytes
        return max(cache + max(layers, head), _logits(shape, element_bytes, positions))

    if plan.kind == "loglikelihood":
        return _loglikelihood(shape, element_bytes, plan, kv_token, layer_kv)

    # generate: the prompt's forward pass (prefill), then one token per row per step;
    # with a static cache the runner shares no prefix (each row has its own slots)
    total = prompt + new
    shared = plan.shared_prefix if plan.method != "optimized" else 0
    if plan.method == "optimized":
        slots = cache_length(total - 1) if new else prompt
        copies = rows
        prefill_cache = end_cache = copies * slots * kv_token
        keys_seen = slots
    elif shared:
        # the rows' cache is allocated once for prompt and new tokens (cache.BatchSlots,
        # written in place) beside the one kept prefix, which grows to a row's prompt
        # while that row's rest is computed on it: each layer's keys (then values) joined
        # to the rest's by torch.cat, the old and the new tensor alive together a moment
        end_cache = (rows * total + prompt) * kv_token
        prefill_cache = end_cache + (prompt - shared) * layer_kv // 2
        keys_seen = prompt
    else:
        # each decoded token is joined to a layer's keys (then values) by torch.cat:
        # the old and the new tensor alive together for a moment
        prefill_cache = rows * prompt * kv_token
        end_cache = rows * total * kv_token + rows * total * layer_kv // 2
        keys_seen = prompt
    prefix = 0
    if shared:
        # the kept prefix's own pass, then each row's rest alone on a copy of it, its
        # queries after the prefix (a materialised mask), then the rows decode together
        prefix = shared * kv_token + max(_activations(shape, element_bytes, shared),
                                         _logits(shape, element_bytes, 1))
        queries, mask_rows, flow_rows = prompt - shared, 1, 1
        mask = (prompt - shared) * prompt
    else:
        queries, mask_rows, flow_rows = rows * prompt, rows, rows
        mask = rows * prompt * keys_seen if (plan.padded or eager) else 0
    if eager:
        mask *= 1 + element_bytes  # its boolean form, then the additive one
    masked = mask_rows * keys_seen if mask and not eager else 0
    layers = mask + _activations(shape, element_bytes, queries, masked)
    if eager:
        layers += _eager_scores(shape, element_bytes, flow_rows, queries // mask_rows,
                                keys_seen)
    # the layers' tensors are gone when the last position's logits are made
    prefill = prefill_cache + max(layers, _logits(shape, element_bytes, rows))
    decode = end_cache + _logits(shape, element_bytes, rows) \
        + _activations(shape, element_bytes, rows, rows * total if (
            plan.padded or shared or plan.method == "optimized") else 0) \
        + rows * total * (1 + element_bytes)
    return max(prefix, prefill, decode)


def _loglikelihood(shape: Shape, element_bytes: int, plan: BatchPlan, kv_token: int,
                   layer_kv: int) -> int:
    """scoring.Scorer._score: a shared prefix's pass (repeated to every row), one padded
    pass over the contexts' rest keeping the last position's logits, then, when
    continuations run past one token, the cache's rows repeated for each of them and
    one pass over their tokens, every position's logits kept."""
    rows, context, shared = plan.rows, plan.prompt_tokens, plan.shared_prefix
    width = context - shared
    eager = plan.method == "basic"
    longer = plan.new_tokens > 1
    cached = longer or shared > 0  # the runner asks for a cache only then
    cache = rows * context * kv_token if cached else rows * context * layer_kv
    continued = shared > 0
    mask = rows * width * context if (plan.padded or continued or eager) else 0
    if eager:
        mask *= 1 + element_bytes
    layers = mask + _activations(shape, element_bytes, rows * width,
                                 rows * context if mask and not eager else 0)
    if eager:
        layers += _eager_scores(shape, element_bytes, rows, width, context)
    first = cache + max(layers, _logits(shape, element_bytes, rows))
    if not longer:
        return first
    # the continuations' pass: `repeats` rows (a context's row for each of its longer
    # continuations), `steps` tokens each, every position's logits kept
    repeats = plan.continuations or rows
    steps = plan.new_tokens - 1
    end = context + steps
    # the first pass's logits and their log_softmax stay, with its rows picked for the
    # continuations; ids, masks and positions (int64) beside them
    last = rows * shape.vocab * (element_bytes + 4) + repeats * shape.vocab * 4 \
        + repeats * end * 24
    logits = repeats * steps * shape.vocab * (element_bytes + 4) \
        + repeats * (steps + 1) * shape.vocab * 4  # float32 log-probs joined to `last`
    layers = repeats * steps * end + _activations(shape, element_bytes, repeats * steps,
                                                  repeats * end)
    if eager:
        layers += _eager_scores(shape, element_bytes, repeats, steps, end)
    head = repeats * steps * (shape.vocab + shape.hidden) * element_bytes
    joined = max(rows, repeats) * end * layer_kv // 2  # a layer's keys, old and new
    second = repeats * end * kv_token + last + max(layers, head, logits, joined)
    return max(first, second)


def cache_length(needed: int) -> int:
    """Slots of a static KV cache for a request that needs `needed` positions: the next
    power of two up to 4096 (at least 256), four sizes per doubling past it (at most 1/4
    more than needed, where slots cost real memory). A compiled decode step's graphs
    are specialised on the cache's shape (and on CUDA recorded at its address), so
    prompts of a job meet a handful of sizes, each reused (HFRunner keeps the cache of
    the size in use), rather than one size per prompt length. The memory account
    (`work_bytes`) counts these slots for a static-cache batch."""
    if needed <= 256:
        return 256
    if needed <= 4096:
        return 1 << (needed - 1).bit_length()
    step = 1 << (needed.bit_length() - 3)
    return -(-needed // step) * step


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


def estimate_job_bytes(spec: ModelSpec, dataset: PlannedDataset, params: JobParams,
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


def estimate_job_headroom(spec: ModelSpec, dataset: PlannedDataset, params: JobParams,
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
