"""C-Eval and GSM8K jobs on the built-in model through the API, data from the official
layouts under LBS_DATASETS_DIR."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, LiveServer

pytestmark = pytest.mark.slow


# Six jobs in a row, one of them ~2.5 CPU-minutes of generation (LongBench v2 with chain of
# thought: 1024 + 128 new tokens per answer, under two methods); on a shared, loaded machine
# the whole takes over the suite's 300 s, so the test and its waits have room for that.
@pytest.mark.timeout(1200)
def test_ceval_and_gsm8k_jobs(with_tiny):
    # a server-wide context ceiling: the LongBench job below names no max_length and
    # gets the ceiling as its prompt budget
    live = LiveServer(with_tiny, {"LBS_DATASETS_DIR": str(ROOT / "tests" / "fixtures"),
                                  "LBS_MAX_CONTEXT_LENGTH": "400"}).start()
    try:
        status, body = live.request("POST", "/api/jobs", {"jobs": [
            {"model": "builtin:tiny", "dataset": "ceval", "params": {"shots": 1}},
            {"model": "builtin:tiny", "dataset": "gsm8k",
             "params": {"max_new_tokens": 8, "shots": 1}}]})
        assert status == 201, body
        ceval_id, gsm_id = (j["id"] for j in body["data"]["jobs"])
        ceval = live.wait_for(ceval_id, ("succeeded", "failed"))
        assert ceval["state"] == "succeeded", ceval["error"]
        assert ceval["progress"] == {"done": 5, "total": 5}
        subjects = {s["subject"]: s for s in ceval["scores"]["subjects"]}
        assert set(subjects) == {"high_school_physics", "law"}
        assert {c["category"] for c in ceval["scores"]["categories"]} == {"STEM", "Humanities"}
        assert ceval["scores"]["micro"] == pytest.approx(
            sum(s["score"] * s["count"] for s in subjects.values()) / 5)
        samples = live.request("GET", f"/api/jobs/{ceval_id}/samples")[1]["data"]["samples"]
        for s in samples:
            assert s["prediction"] in "ABCD" and set(s["fields"]["logprobs"]) == set("ABCD")
            chosen = max(s["fields"]["logprobs"], key=s["fields"]["logprobs"].get)
            assert s["prediction"] == chosen
        gsm = live.wait_for(gsm_id, ("succeeded", "failed"))
        assert gsm["state"] == "succeeded", gsm["error"]
        assert gsm["scores"]["count"] == 3 and 0.0 <= gsm["scores"]["overall"] <= 1.0
        # both cached: one load of the model for the two jobs
        kinds = [e["kind"] for j in (ceval, gsm) for e in j["events"]]
        assert kinds.count("load") == 1

        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "longbench",
            "params": {"subsets": ["hotpotqa", "multifieldqa_zh", "trec"]}})
        assert status == 201, body
        assert body["data"]["job"]["params"]["max_length"] == 400
        status, refused = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "longbench",
            "params": {"subsets": ["trec"], "max_length": 1000}})
        assert status == 422
        assert refused["error"]["details"][0]["field"] == "params.max_length"
        lb = live.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"))
        assert lb["state"] == "succeeded", lb["error"]
        assert {s["subset"] for s in lb["scores"]["subsets"]} == \
            {"hotpotqa", "multifieldqa_zh", "trec"}
        lb_samples = live.request("GET", f"/api/jobs/{lb['id']}/samples")[1]["data"]["samples"]
        assert all(s["prompt_tokens"] <= 400 + 64 for s in lb_samples)

        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "longbench_v2",
            "params": {"cot": True, "max_length": 400, "methods": ["basic", "optimized"],
                       "max_samples": 2}})  # an easy and a hard question
        assert status == 201, body
        v2 = live.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"), timeout=900)
        assert v2["state"] == "succeeded", v2["error"]
        assert {d["difficulty"] for d in v2["scores"]["difficulties"]} == {"easy", "hard"}
        v2_samples = live.request("GET", f"/api/jobs/{v2['id']}/samples")[1]["data"]["samples"]
        assert all("cot" in s["fields"] for s in v2_samples)  # the reasoning turn is kept
        # two turns per answer: the timing covers both, so the comparison has figures
        assert all(s["fields"]["timing"]["prefill_tokens"] > s["prompt_tokens"]
                   for s in v2_samples)
        assert [m["method"] for m in v2["scores"]["methods"]] == ["basic", "optimized"]
        assert all(m["decode_tokens_per_s"] and m["prefill_tokens_per_s"]
                   for m in v2["scores"]["methods"])

        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "mr_gsm8k", "params": {"max_new_tokens": 16}})
        assert status == 201, body
        mr = live.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"))
        assert mr["state"] == "succeeded", mr["error"]
        assert {"mcc", "step_accuracy", "mr_score_without_reason"} <= set(mr["scores"])

        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "gsm8k",
            "params": {"data_dir": "nowhere/gsm8k"}})  # under LBS_DATASETS_DIR, missing
        assert status == 422
        assert body["error"]["details"][0]["field"] == "params.data_dir"
        assert "nowhere/gsm8k" in body["error"]["message"]
    finally:
        live.stop()
