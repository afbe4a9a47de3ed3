"""Admission estimates for real model shapes, against figures computed by hand.

The configs are the published config.json values of Llama-3.1-8B-Instruct,
Qwen2.5-7B-Instruct and Mistral-7B-v0.1, written into temporary folders with a
safetensors file that holds only a header (the shapes are all the estimate reads;
nothing is downloaded). The datasets read small files written here, so each
prompt's byte length is known exactly.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from backend.datasets.registry import get_dataset
from backend.engine.contracts import BatchPlan, ModelSpec
from backend.queue import jobs
from backend.queue.scheduling import Capacity
from backend.runners.hf.account import estimate_job_bytes, work_bytes
from tests.conftest import queue_on
from tests.test_lm_eval import FIXTURES as LM_EVAL_FIXTURES

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
    parsed = ds.parse_params(params)
    return estimate_job_bytes(spec, ds, parsed, CONFIGS[spec.name]["max_position_embeddings"],
                              settings)


def _plans(dataset: str, params: dict, model_max: int = 131072):
    ds = get_dataset(dataset)
    return ds.worst_batches(ds.parse_params(params), model_max)


def _beyond_weights(name: str, plan: BatchPlan) -> int:
    return work_bytes(CONFIGS[name], 2, plan)


# Keys and values of one position, every layer, bfloat16: 2 x layers x kv_heads x head_dim x 2
KV_PER_TOKEN = {"llama-3.1-8b": 131072, "mistral-7b": 131072, "qwen2.5-7b": 57344}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gsm8k_estimate_is_the_weights_and_the_account_of_its_worst_batch(name, model, data,
                                                                          settings):
    # longest message "Question: " + 300 x "q" + "\nAnswer:" = 318 bytes, + 128 template
    # tokens; then 256 new tokens; batch_size 4: four rows, padded
    params = {"data_dir": str(data / "gsm8k"), "batch_size": 4}
    (plan,) = _plans("gsm8k", params)
    assert plan == BatchPlan("generate", 4, 318 + 128, 256, padded=True)
    got = _estimate(model(name), "gsm8k", params, settings)
    assert got == PARAMS[name] * 2 + _beyond_weights(name, plan)
    # the account holds at least the four rows' whole caches and the padded prompt's mask
    assert got - PARAMS[name] * 2 >= 4 * (446 + 256) * KV_PER_TOKEN[name] + 4 * 446 * 446


def test_gsm8k_on_llama_8b_is_admitted_on_a_24gb_card(model, data, settings, factory):
    need = _estimate(model("llama-3.1-8b"), "gsm8k", {"data_dir": str(data / "gsm8k")},
                     settings)
    assert need < 15.2 * 2**30  # weights 14.96 GiB and a 702-token sequence
    (job,) = queue_on(factory).submit([jobs.NewJob("llama", "gsm8k", {}, memory_bytes=need)])
    card = Capacity(gpu_count=1, free_gpu_bytes=(24 * 10**9 - 2**29,))  # less CUDA context
    claimed = queue_on(factory).claim("w", capacity=card)
    assert claimed is not None and claimed.id == job.id


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ceval_loglikelihood_counts_the_last_position_logits_only(name, model, data, settings):
    # "以下是中国关于法学考试的单项选择题，请选出其中的正确答案。\n\n": 29 CJK x 3 + 2 = 89 bytes;
    # 50 x "问" = 150, "\n", 4 x "A. 甲\n" (7 bytes) = 28, "答案：" = 9: 277 bytes.
    # + 128 template tokens = 405 tokens; the letter is read off the last position
    spec, vocab = model(name), CONFIGS[name]["vocab_size"]
    params = {"data_dir": str(data / "ceval"), "batch_size": 16}
    (plan,) = _plans("ceval", params)
    assert (plan.kind, plan.rows, plan.prompt_tokens, plan.logits_positions) == \
        ("loglikelihood", 16, 405, 1)
    beyond = _estimate(spec, "ceval", params, settings) - PARAMS[name] * 2
    assert beyond == _beyond_weights(name, plan)
    # logits: each row's last position in bfloat16, its float32 copy and log_softmax,
    # not 16 x 405 positions in float32 (what was counted before): a vocabulary twice
    # as large adds at most those to the estimate
    larger = work_bytes({**CONFIGS[name], "vocab_size": 2 * vocab}, 2, plan)
    assert larger - beyond <= 16 * vocab * (2 + 4 + 4) < 16 * 405 * vocab * 4
    # and the rows' caches: they continue the subject's shared header
    assert beyond >= 16 * 405 * KV_PER_TOKEN[name]
    generate = _estimate(spec, "ceval", {**params, "method": "generate"}, settings)
    (gen,) = _plans("ceval", {**params, "method": "generate"})
    assert gen == BatchPlan("generate", 16, 405, 16, padded=True)
    assert generate == PARAMS[name] * 2 + _beyond_weights(name, gen)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_longbench_counts_the_padded_batch_mask(name, model, data, settings):
    spec = model(name)
    params = {"data_dir": str(data / "longbench"), "subsets": ["hotpotqa"], "batch_size": 8}
    # hotpotqa generates 32 tokens; budget 32000 + 64 template slack
    (plan,) = _plans("longbench", {**params, "max_length": 32000},
                     CONFIGS[name]["max_position_embeddings"])
    assert plan == BatchPlan("generate", 8, 32064, 32, padded=True)
    got = _estimate(spec, "longbench", {**params, "max_length": 32000}, settings)
    prompt = 32064
    # transformers materialises a boolean [8, 1, T, T] mask once one row is padded
    mask = 8 * prompt * prompt
    assert got >= PARAMS[name] * 2 + 8 * prompt * KV_PER_TOKEN[name] + mask
    unpadded = work_bytes(CONFIGS[name], 2, replace(plan, padded=False))
    assert _beyond_weights(name, plan) - unpadded >= mask
    # no max_length: the prompt is cut to fill the model's context
    (full,) = _plans("longbench", params, CONFIGS[name]["max_position_embeddings"])
    assert full.prompt_tokens + full.new_tokens == CONFIGS[name]["max_position_embeddings"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_niah_estimate_counts_eager_scores(name, model, settings):
    spec = model(name)
    params = {"context_lengths": [2000, 8000], "depth_percents": [50]}
    heads = CONFIGS[name]["num_attention_heads"]
    sdpa = _estimate(spec, "needle_in_haystack", params, settings)
    eager = _estimate(spec, "needle_in_haystack", {**params, "methods": ["basic"]}, settings)
    # a row's queries after the shared prefix over all 8000 keys: bfloat16 scores, their
    # float32 softmax and its bfloat16 cast (2 + 4 + 2 bytes each), in one layer
    scores = heads * 7999 * 8000 * 8
    assert scores <= eager - sdpa <= 1.3 * scores


@pytest.fixture
def lm_eval_tasks(tmp_path) -> Path:
    """The local lm-eval task YAMLs, their data files at absolute paths."""
    folder = tmp_path / "lm_eval_tasks"
    shutil.copytree(LM_EVAL_FIXTURES, folder)
    for yaml in folder.glob("*.yaml"):
        text = yaml.read_text()
        for data in ("mc.jsonl", "gen.jsonl", "text.jsonl"):
            text = text.replace(f": {data}", f": {folder / data}")
        yaml.write_text(text)
    return folder


def test_lm_eval_multiple_choice_on_llama_8b_takes_its_lengths_from_the_requests(
        model, settings, lm_eval_tasks, monkeypatch):
    """HellaSwag-like multiple choice: its contexts are short, so the job is its weights
    and a few hundred tokens, not the model's whole 128k context with every position's
    logits (104.6 GiB before)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = get_dataset("lm_eval")
    monkeypatch.setattr(type(ds), "include_path", (str(lm_eval_tasks),))
    params = ds.parse_params({"tasks": ["lbs_mc"], "batch_size": 4})
    (plan,) = ds.worst_batches(params, 131072)
    # the longest context "Question: The sun rises in the\nAnswer:" and choice " north"
    assert plan.kind == "loglikelihood" and plan.logits_positions == 1
    # batch_size 4: four requests (contexts with their choice) in one padded pass
    assert plan.rows == 4 and plan.continuations == 4 and plan.padded
    assert plan.prompt_tokens < 64 and plan.new_tokens < 16
    got = estimate_job_bytes(model("llama-3.1-8b"), ds, params, 131072, settings)
    assert got < 20 * 2**30
    mix = ds.worst_batches(ds.parse_params({"tasks": ["lbs_mc", "lbs_gen", "lbs_ppl"]}),
                           131072)
    assert sorted(p.kind for p in mix) == ["generate", "loglikelihood", "rolling"]


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
    from backend.runners.hf.loading import LoadOptions
    from backend.runners.hf.runner import HFRunner
    from backend.runners.models import resolve_model

    data = tmp_path_factory.mktemp("tiny")
    ensure_builtin_model(data, "tiny")
    settings = load_settings(overrides={"LBS_DATA_DIR": str(data)})
    return HFRunner.load(resolve_model("builtin:tiny", settings),
                         LoadOptions("float32", False, 0.0), settings)


@pytest.mark.parametrize("dataset, params", FIXTURES)
def test_declared_worst_batch_bounds_the_real_prompts(dataset, params, tiny_runner):
    """With a real tokenizer, no item is longer than the worst batch the dataset declares."""
    from tests.conftest import ROOT

    if "data_dir" in params:
        params = {**params, "data_dir": str(ROOT / "tests" / "fixtures" / params["data_dir"])}
    ds = get_dataset(dataset)
    parsed = ds.parse_params(params)
    items = ds.build_items(parsed, tiny_runner)
    longest = max(i.prompt_tokens + (1 if i.choices else i.max_new_tokens) for i in items)
    declared = max(p.prompt_tokens + p.new_tokens
                   for p in ds.worst_batches(parsed, tiny_runner.max_length))
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
