"""Built-in models, made locally on first use so nothing is ever downloaded.

`builtin:tiny` is a small Llama-style causal LM with random weights from a
fixed seed and a byte-level BPE tokenizer trained with the `tokenizers` library
on the bundled haystack essays, with a chat template. It is deterministic (the
same files on every machine) and a few MB, so every feature of the product can
be shown and tested without downloads (`builtin:small`, ~45 MB, is the same
recipe scaled up for benchmarks). It does not know anything: its NIAH
scores are near zero, which is what a random model should score.

The folder is written under `<data dir>/models/` and published with an atomic
rename under a file lock, so several workers starting together make it once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CORPUS = Path(__file__).resolve().parent.parent / "datasets" / "data" / "haystack_essays.txt"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
FORMAT_VERSION = 1  # bump when the recipe changes, so old copies are rebuilt


@dataclass(frozen=True)
class BuiltinModel:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    seed: int


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny": BuiltinModel(vocab_size=2048, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, seed=1234),
    # ~11M parameters (45 MB in float32): heavy enough that generation, not
    # bookkeeping, dominates a job, for benchmarks and memory demonstrations.
    "small": BuiltinModel(vocab_size=2048, hidden_size=384, intermediate_size=1024,
                          num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=3,
                          max_position_embeddings=8192, seed=4321),
}


def model_dir(data_dir: Path, key: str) -> Path:
    return Path(data_dir) / "models" / f"builtin-{key}-v{FORMAT_VERSION}"


def ensure_builtin_model(data_dir: Path, key: str) -> Path:
    """The folder of built-in model `key`, made first if it does not exist yet."""
    target = model_dir(data_dir, key)
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        log.info("[Builtin] creating builtin:%s in %s", key, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build_model(BUILTIN_MODELS[key], tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the bundled essays, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train([str(CORPUS)], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=None, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(recipe: BuiltinModel, folder: Path) -> None:
    """Write tokenizer, config and seeded random weights (safetensors) to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(recipe.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config.tokenizer_model_max_length = recipe.max_position_embeddings
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(config).to(torch.float32)
        # Random weights would often pick </s> first and stop at once. Zero
        # output rows give special tokens a logit of 0 while some ordinary
        # token always scores higher, so replies are max_new_tokens long:
        # a steady, realistic generation workload.
        with torch.no_grad():
            model.lm_head.weight[: len(SPECIAL_TOKENS)] = 0.0
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.do_sample = False
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.model_max_length = recipe.max_position_embeddings
    tokenizer.save_pretrained(folder)
