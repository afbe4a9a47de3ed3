"""Error bars on scores and the paired comparison of two jobs: the statistics against
scipy's independent implementations, then through a real server and worker (a job's
stderr against the binomial formula over its own samples, /api/compare's counts and
McNemar p against the samples both jobs stored)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import transformers
from scipy import stats as scipy_stats

from backend.common import stats
from backend.datasets.needle_in_haystack import BUNDLED_HAYSTACKS
from tests.conftest import LiveServer

# A plugin dataset whose score depends on the reply's length: the built-in tiny model's
# replies differ with max_new_tokens, so two jobs disagree on some items and not others.
PARITY_PLUGIN = '''
from pydantic import Field

from backend.datasets.base import CacheMode, Dataset, DatasetParams, Item
from backend.datasets.registry import register


class ParityParams(DatasetParams):
    items: int = Field(40, ge=1, le=200)
    max_new_tokens: int = Field(4, ge=1, le=16)


@register
class Parity(Dataset):
    name = "parity"
    description = "Scores 1 when the reply has an even number of characters (test plugin)."
    cache_mode = CacheMode.CACHED
    Params = ParityParams

    def build_items(self, params, tokenizer):
        items = []
        for i in range(params.items):
            prompt = tokenizer.render(f"Item {i}: say something about the number {i * 7}")
            items.append(Item(idx=i, prompt=prompt, prompt_tokens=tokenizer.count_prompt(prompt),
                              max_new_tokens=params.max_new_tokens, reference=str(i),
                              fields={"n": i}))
        return items

    def score(self, item, prediction):
        return 1.0 if len(prediction) % 2 == 0 else 0.0
'''


def test_binomial_error_and_wilson_interval_match_scipy():
    for k, n in ((0, 10), (3, 10), (10, 10), (57, 120)):
        spread = stats.binomial(k, n)
        p = k / n
        assert spread.stderr == pytest.approx(math.sqrt(p * (1 - p) / n))
        wilson = scipy_stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert spread.ci95 == pytest.approx((wilson.low, wilson.high))


def test_mcnemar_exact_matches_scipy_binomial_test():
    for a_only, b_only in ((0, 0), (1, 6), (6, 1), (5, 5), (0, 12), (13, 30)):
        expected = (1.0 if a_only + b_only == 0 else
                    scipy_stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)
        assert stats.mcnemar_exact(a_only, b_only) == pytest.approx(expected)


def test_bootstrap_is_fixed_and_brackets_the_mean():
    values = [0.1, 0.35, 0.9, 0.5, 0.42, 0.77, 0.05, 0.6]
    first, again = stats.bootstrap_mean(values), stats.bootstrap_mean(values)
    assert first == again  # a fixed seed: the same scores, the same interval
    mean = sum(values) / len(values)
    assert first.ci95[0] < mean < first.ci95[1]
    # the bootstrap error of a mean is close to the sample's s / sqrt(n) (ddof=0)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    assert first.stderr == pytest.approx(sd / math.sqrt(len(values)), rel=0.15)


def test_macro_average_combines_the_groups_errors():
    groups = [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    spread = stats.macro_spread(groups)
    se = [stats.binomial(sum(g), len(g)).stderr for g in groups]
    assert spread.stderr == pytest.approx(math.sqrt(se[0] ** 2 + se[1] ** 2) / 2)


@pytest.mark.slow
def test_scores_carry_error_bars_and_two_jobs_compare_item_by_item(with_tiny, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "parity_dataset.py").write_text(PARITY_PLUGIN)
    live = LiveServer(with_tiny, {"LBS_PLUGIN_DIRS": str(plugins)}).start()
    try:
        ids = []
        for params in ({"max_new_tokens": 3}, {"max_new_tokens": 8}, {"items": 10}):
            status, body = live.request("POST", "/api/jobs", {
                "model": "builtin:tiny", "dataset": "parity", "params": params})
            assert status == 201, body
            ids.append(body["data"]["job"]["id"])
        jobs = [live.wait_for(i, ("succeeded", "failed")) for i in ids]
        assert [j["state"] for j in jobs] == ["succeeded"] * 3, live.log()[-3000:]
        samples = {}
        for job in jobs:
            rows = live.request("GET", f"/api/jobs/{job['id']}/samples")[1]["data"]["samples"]
            samples[job["id"]] = {r["idx"]: r["score"] for r in rows}

        # Every score carries its error bars: the binomial formula over its own samples.
        a, b, small = jobs
        values = list(samples[a["id"]].values())
        p = sum(values) / len(values)
        assert a["scores"]["overall"] == pytest.approx(p)
        assert a["scores"]["overall_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 40))
        low, high = a["scores"]["overall_ci95"]
        assert 0.0 <= low <= p <= high <= 1.0
        assert a["scores"]["few_items"] is False and small["scores"]["few_items"] is True

        # The paired comparison, recomputed here from the samples both jobs stored.
        status, body = live.request("GET", f"/api/compare?a={a['id']}&b={b['id']}")
        assert status == 200, body
        paired = body["data"]["paired"]
        sa, sb = samples[a["id"]], samples[b["id"]]
        a_only = sum(1 for i in sa if sa[i] > sb[i])
        b_only = sum(1 for i in sa if sa[i] < sb[i])
        both_right = sum(1 for i in sa if sa[i] == sb[i] == 1)
        assert a_only + b_only > 0, "the two jobs should disagree somewhere"
        assert (paired["n"], paired["a_only"], paired["b_only"], paired["both_right"],
                paired["both_wrong"]) == (40, a_only, b_only, both_right,
                                          40 - a_only - b_only - both_right)
        assert paired["mcnemar_p"] == pytest.approx(
            scipy_stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)
        assert paired["difference"] == pytest.approx((a_only - b_only) / 40)
        assert paired["ci95"][0] <= paired["difference"] <= paired["ci95"][1]
        assert body["data"]["differing_params"] == {"max_new_tokens": [3, 8]}
        assert body["data"]["differing_manifest"] == {}  # same model, code, versions
        assert body["data"]["disagreements_total"] == a_only + b_only
        shown = body["data"]["disagreements"][0]
        assert shown["a"]["score"] != shown["b"]["score"]
        assert shown["a"]["prediction"] and shown["b"]["prediction"]

        # Different item sets compare on the items they share, naming what differs.
        body = live.request("GET", f"/api/compare?a={a['id']}&b={small['id']}")[1]
        assert body["data"]["paired"]["n"] == 10 and body["data"]["same_items"] is False
        assert body["data"]["differing_params"] == {"items": [40, 10],
                                                    "max_new_tokens": [3, 4]}

        # Bad input: a clear 4xx naming the field.
        status, body = live.request("GET", f"/api/compare?a={a['id']}&b=999999")
        assert status == 404 and body["error"]["details"][0]["field"] == "b"
        status, body = live.request("GET", f"/api/compare?a={a['id']}")
        assert status == 422 and "b" in body["error"]["message"]
        status, niah = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "needle_in_haystack",
            "params": {"context_lengths": [256], "depth_percents": [50],
                       "max_new_tokens": 2}})
        done = live.wait_for(niah["data"]["job"]["id"], ("succeeded", "failed"))

        # The run manifest: what the job was measured with.
        manifest = done["manifest"]
        assert manifest["versions"]["torch"] == torch.__version__
        assert manifest["versions"]["transformers"] == transformers.__version__
        assert manifest["model"]["location"] == str((with_tiny / "models").resolve()
                                                    / "builtin-tiny-v1")
        assert manifest["model"]["weights_sha256"]
        assert (manifest["inference"]["device"], manifest["inference"]["dtype"]) == \
            ("cpu", "float32")
        (haystack,) = manifest["task"]["data"]["files"]  # the bundled haystack, hashed
        bundled = BUNDLED_HAYSTACKS[manifest["task"]["params"]["haystack"]]
        assert haystack["sha256"] == hashlib.sha256(bundled.read_bytes()).hexdigest()
        assert manifest["started_at"] == done["started_at"]
        assert manifest["task"]["params"]["max_new_tokens"] == 2
        status, body = live.request(
            "GET", f"/api/compare?a={a['id']}&b={niah['data']['job']['id']}")
        assert status == 422 and body["error"]["details"][0]["field"] == "b"
        assert "one dataset" in body["error"]["message"]
        assert "Traceback" not in live.log()
    finally:
        live.stop()
