"""Admission estimates for real model shapes, against figures computed by hand.

The configs are the published config.json values of Llama-3.1-8B-Instruct,
Qwen2.5-7B-Instruct and Mistral-7B-v0.1, written into temporary folders with a
safetensors file that holds only a header (the shapes are all the estimate reads;
nothing is downloaded). The datasets read small files written here, so each
prompt's byte length is known exactly.
"""

from __future__ import annotations

import json
import struct

import pytest

from backend.datasets.registry import get_dataset
from backend.engine.admission import estimate_job_bytes
from backend.queue import jobs
from backend.queue.scheduling import Capacity
from backend.runners.models import ModelSpec

CONFIGS = {
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, max_position_embeddings=131072,
                         tie_word_embeddings=False, torch_dtype="bfloat16"),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, tie_word_embeddings=False,
                       torch_dtype="bfloat16"),
    "mistral-7b": dict(architectures=["MistralForCausalLM"], hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                       tie_word_embeddings=False, torch_dtype="bfloat16"),
}
# Parameter counts as published (8.03B, 7.62B, 7.24B); bfloat16 weights take 2 bytes each.
PARAMS = {"llama-3.1-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512,
          "mistral-7b": 7_241_732_096}


def _shapes(c: dict) -> dict[str, list[int]]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": [v, h], "lm_head.weight": [v, h],
              "model.norm.weight": [h]}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        a = p + "self_attn."
        shapes.update({a + "q_proj.weight": [q, h], a + "k_proj.weight": [kv, h],
                       a + "v_proj.weight": [kv, h], a + "o_proj.weight": [h, q],
                       p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h],
                       p + "mlp.down_proj.weight": [h, i], p + "input_layernorm.weight": [h],
                       p + "post_attention_layernorm.weight": [h]})
        if c["architectures"] == ["Qwen2ForCausalLM"]:  # Qwen2 has q/k/v biases
            shapes.update({p + "self_attn.q_proj.bias": [q], p + "self_attn.k_proj.bias": [kv],
                           p + "self_attn.v_proj.bias": [kv]})
    return shapes


@pytest.fixture
def model(tmp_path):
    def make(name: str) -> ModelSpec:
        folder = tmp_path / name
        folder.mkdir()
        config = CONFIGS[name]
        (folder / "config.json").write_text(json.dumps(config))
        header, offset = {}, 0
        for tensor, shape in _shapes(config).items():
            size = 2
            for dim in shape:
                size *= dim
            header[tensor] = {"dtype": "BF16", "shape": shape,
                              "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
        return ModelSpec(name, folder)
    return make


@pytest.fixture
def data(tmp_path):
    gsm8k = tmp_path / "gsm8k"
    gsm8k.mkdir()
    rows = [{"question": "q" * 100, "answer": "#### 1"},
            {"question": "q" * 300, "answer": "#### 2"}]
    (gsm8k / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ceval = tmp_path / "ceval" / "val"
    ceval.mkdir(parents=True)
    (ceval / "law_val.csv").write_text("id,question,A,B,C,D,answer\n"
                                       f"0,{'问' * 50},甲,乙,丙,丁,A\n", encoding="utf-8")
    longbench = tmp_path / "longbench"
    longbench.mkdir()
    (longbench / "hotpotqa.jsonl").write_text(json.dumps(
        {"input": "q", "context": "c", "answers": ["a"], "length": 1, "_id": "x"}) + "\n")
    return tmp_path


def _estimate(spec: ModelSpec, dataset: str, params: dict, settings) -> int:
    ds = get_dataset(dataset)
    ds.datasets_dir = None
    parsed = ds.parse_params(params)
    return estimate_job_bytes(spec, ds, parsed, CONFIGS[spec.name]["max_position_embeddings"],
                              settings)


# Per token, in bfloat16 (E = 2):
#   KV cache     2 x layers x kv_heads x head_dim x E
#   activations  (4 x hidden + 2 x intermediate) x E
# llama-3.1-8b / mistral-7b: KV 2*32*8*128*2 = 131072, activations (16384 + 28672)*2 = 90112
# qwen2.5-7b:                KV 2*28*4*128*2 =  57344, activations (14336 + 37888)*2 = 104448
PER_TOKEN = {"llama-3.1-8b": 131072 + 90112, "mistral-7b": 131072 + 90112,
             "qwen2.5-7b": 57344 + 104448}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gsm8k_estimate(name, model, data, settings):
    # longest message "Question: " + 300 x "q" + "\nAnswer:" = 318 bytes, + 128 template
    # tokens, + 256 new tokens = 702 tokens; generate keeps the last position's logits only
    tokens = 318 + 128 + 256
    logits = CONFIGS[name]["vocab_size"] * 4
    expected = {"llama-3.1-8b": 16_060_522_496 + 702 * 221_184 + 513_024,
                "qwen2.5-7b": 15_231_233_024 + 702 * 161_792 + 608_256,
                "mistral-7b": 14_483_464_192 + 702 * 221_184 + 128_000}[name]
    assert expected == PARAMS[name] * 2 + tokens * PER_TOKEN[name] + logits
    got = _estimate(model(name), "gsm8k", {"data_dir": str(data / "gsm8k")}, settings)
    assert got == expected


def test_gsm8k_on_llama_8b_is_admitted_on_a_24gb_card(model, data, settings, factory):
    need = _estimate(model("llama-3.1-8b"), "gsm8k", {"data_dir": str(data / "gsm8k")},
                     settings)
    assert need < 15.2 * 2**30  # weights 14.96 GiB and a 702-token sequence
    (job,) = jobs.submit_jobs(factory, [jobs.NewJob("llama", "gsm8k", {}, memory_bytes=need)])
    card = Capacity(gpu_count=1, free_gpu_bytes=(24 * 10**9 - 2**29,))  # less CUDA context
    claimed = jobs.claim_job(factory, "w", 60, 3, capacity=card)
    assert claimed is not None and claimed.id == job.id


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ceval_loglikelihood_counts_every_position_logits(name, model, data, settings):
    # "以下是中国关于法学考试的单项选择题，请选出其中的正确答案。\n\n": 29 CJK x 3 + 2 = 89 bytes;
    # 50 x "问" = 150, "\n", 4 x "A. 甲\n" (7 bytes) = 28, "答案：" = 9: 277 bytes.
    # + 128 template tokens + 1 answer letter = 406 tokens; logits float32 at every one.
    tokens = 277 + 128 + 1
    spec = model(name)
    got = _estimate(spec, "ceval", {"data_dir": str(data / "ceval")}, settings)
    vocab = CONFIGS[name]["vocab_size"]
    assert got == PARAMS[name] * 2 + tokens * PER_TOKEN[name] + vocab * tokens * 4
    generate = _estimate(spec, "ceval", {"data_dir": str(data / "ceval"), "method": "generate"},
                         settings)
    # generate: 277 + 128 + 16 new tokens, logits of the last position only
    assert generate == PARAMS[name] * 2 + (277 + 128 + 16) * PER_TOKEN[name] + vocab * 4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_longbench_estimate_follows_max_length(name, model, data, settings):
    spec = model(name)
    params = {"data_dir": str(data / "longbench"), "subsets": ["hotpotqa"]}
    # hotpotqa generates 32 tokens; budget 4000 + 64 template slack + 32 = 4096 tokens
    got = _estimate(spec, "longbench", {**params, "max_length": 4000}, settings)
    vocab = CONFIGS[name]["vocab_size"]
    assert got == PARAMS[name] * 2 + 4096 * PER_TOKEN[name] + vocab * 4
    # no max_length: the prompt is cut to fill the model's context
    full = _estimate(spec, "longbench", params, settings)
    context = CONFIGS[name]["max_position_embeddings"]
    assert full == PARAMS[name] * 2 + context * PER_TOKEN[name] + vocab * 4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_niah_estimate_counts_eager_scores(name, model, settings):
    spec = model(name)
    params = {"context_lengths": [2000, 8000], "depth_percents": [50]}
    tokens = 8000 + 48  # largest context length + default max_new_tokens
    vocab, heads = CONFIGS[name]["vocab_size"], CONFIGS[name]["num_attention_heads"]
    sdpa = _estimate(spec, "needle_in_haystack", params, settings)
    assert sdpa == PARAMS[name] * 2 + tokens * PER_TOKEN[name] + vocab * 4
    eager = _estimate(spec, "needle_in_haystack", {**params, "methods": ["basic"]}, settings)
    # bfloat16 scores + their float32 softmax + its bfloat16 cast: 2 + 4 + 2 bytes each
    assert eager - sdpa == heads * tokens * tokens * 8
    assert eager - sdpa == {"llama-3.1-8b": 16_581_197_824, "mistral-7b": 16_581_197_824,
                            "qwen2.5-7b": 14_508_548_096}[name]


FIXTURES = [
    ("gsm8k", {"data_dir": "gsm8k", "shots": 2}),
    ("ceval", {"data_dir": "ceval", "shots": 2}),
    ("ceval", {"data_dir": "ceval", "method": "generate"}),
    ("mr_gsm8k", {"data_dir": "mr_gsm8k"}),
    ("longbench", {"data_dir": "longbench", "max_length": 300}),
    ("longbench_v2", {"data_dir": "longbench_v2", "max_length": 300}),
    ("longbench_v2", {"data_dir": "longbench_v2", "max_length": 300, "cot": True}),
    ("needle_in_haystack", {"context_lengths": [600, 900], "depth_percents": [50]}),
]


@pytest.fixture(scope="module")
def tiny_runner(tmp_path_factory):
    from backend.common.config import load_settings
    from backend.runners.builtin import ensure_builtin_model
    from backend.runners.hf import HFRunner, LoadOptions
    from backend.runners.models import resolve_model

    data = tmp_path_factory.mktemp("tiny")
    ensure_builtin_model(data, "tiny")
    settings = load_settings(overrides={"LBS_DATA_DIR": str(data)})
    return HFRunner.load(resolve_model("builtin:tiny", settings),
                         LoadOptions("float32", False, 0.0), settings)


@pytest.mark.parametrize("dataset, params", FIXTURES)
def test_declared_longest_sequence_bounds_the_real_prompts(dataset, params, tiny_runner):
    """With a real tokenizer, no item is longer than what the dataset declares."""
    from tests.conftest import ROOT

    if "data_dir" in params:
        params = {**params, "data_dir": str(ROOT / "tests" / "fixtures" / params["data_dir"])}
    ds = get_dataset(dataset)
    parsed = ds.parse_params(params)
    items = ds.build_items(parsed, tiny_runner)
    longest = max(i.prompt_tokens + (1 if i.choices else i.max_new_tokens) for i in items)
    declared = ds.longest_sequence(parsed, tiny_runner.max_length)
    assert longest <= declared < tiny_runner.max_length


def test_a_data_file_without_the_fields_read_is_a_422_at_submit(tmp_path, monkeypatch,
                                                                with_tiny):
    from backend.common.config import load_settings
    from backend.server import create_app

    folder = tmp_path / "datasets" / "gsm8k"
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text(json.dumps({"problem": "no question field"}) + "\n")
    monkeypatch.setenv("LBS_DATASETS_DIR", str(tmp_path / "datasets"))
    client = create_app(load_settings()).test_client()
    res = client.post("/api/jobs", json={"model": "builtin:tiny", "dataset": "gsm8k"})
    assert res.status_code == 422, res.get_json()
    error = res.get_json()["error"]
    assert error["details"][0]["field"] == "params.data_dir" and "question" in error["message"]
