"""Harness overhead: the same NIAH grid through LLM Bench Shower and through a bare
transformers loop over the identical prompts, in one run, as whole processes.

    .venv/bin/python bench/overhead.py [--model builtin:tiny] [--repeats 3]

Three timings per repeat, taken alternately so drift hits all of them alike:
  bare     `python bench/overhead.py --bare prompts.json`: import torch and
           transformers, load the model, generate greedily for every prompt.
  cli      `python -m backend.apps.cli eval …`: the harness in one process (settings,
           model resolution, prompt building in tokens, model manager, memory
           sampler, scoring, result file).
  server   `python -m backend.server` with its worker: the job's duration from
           claim to finish as stored in its row (lease heartbeats, one SQLite
           transaction per sample, model load in the worker, release after),
           and submit->succeeded as the client saw it (polling once a second).
It prints medians and the ratios cli/bare process and server job/bare load+generation,
and checks that harness and bare loop produced the same predictions. The harness
computes the haystack before each needle once (prefix-shared prefill) where the
bare loop prefills every prompt whole; `--depths 11` runs the 3 x 11 grid; the job
runs at the dataset's defaults (one context length's prompts decoding together)
unless `--batch-size` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from local_server import ROOT, http_json, running_server  # bench/ is this script's folder

GRID = {"context_lengths": [512, 1024, 2048], "depth_percents": [0, 25, 50, 75, 100],
        "max_new_tokens": 32}


def bare(prompts_file: str) -> None:
    """The baseline: plain transformers over the harness's own prompts."""
    started = time.perf_counter()
    import torch
    import transformers.generation  # noqa: F401 - the same imports a worker makes at start
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = time.perf_counter()
    spec = json.loads(Path(prompts_file).read_text())
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    loaded = time.perf_counter()
    predictions = []
    for prompt in spec["prompts"]:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=spec["max_new_tokens"], do_sample=False,
                                 temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id)
        predictions.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    done = time.perf_counter()
    print(json.dumps({"import_s": imported - started, "load_s": loaded - imported,
                      "loop_s": done - loaded,
                      "predictions": predictions}))


def run_server_job(env: dict, model: str) -> tuple[float, dict, list[str]]:
    env = {**env, "LBS_WORKERS": "1", "LBS_POLL_INTERVAL": "0.05", "LBS_LOG_LEVEL": "WARNING"}
    with running_server(env) as port:
        base = f"http://127.0.0.1:{port}"
        # let the worker finish importing torch before the clock starts
        for _ in range(300):
            workers = http_json(base + "/api/workers")["data"]["workers"]
            if workers and workers[0]["alive"]:
                break
            time.sleep(0.1)
        started = time.perf_counter()
        job = http_json(base + "/api/jobs", {"model": model, "dataset": "needle_in_haystack",
                                         "params": GRID})["data"]["job"]
        while job["state"] in ("queued", "running"):
            time.sleep(1.0)  # as a person's page does; the job row has the exact duration
            job = http_json(f"{base}/api/jobs/{job['id']}")["data"]["job"]
        elapsed = time.perf_counter() - started
        assert job["state"] == "succeeded", job["error"]
        samples = http_json(f"{base}/api/jobs/{job['id']}/samples")["data"]["samples"]
        job["generation_s"] = sum(s["latency_s"] for s in samples)
        # timing is per batch (prompts of one length decode together): each sample's share
        job["prefill_tokens"] = round(sum(
            s["fields"]["timing"]["prefill_tokens"] / s["fields"]["timing"]["batch"]
            for s in samples if "timing" in s["fields"]))
        return elapsed, job, [s["prediction"] for s in samples]


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bare", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depths", type=int, default=5,
                        help="needle depths per context length, evenly from 0 to 100 percent")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the harness job's batch_size (the bare loop is always one prompt "
                             "at a time); default: the dataset's (NIAH: the number of depths, "
                             "one context length's prompts decoding together)")
    args = parser.parse_args()
    if args.bare:
        bare(args.bare)
        return
    if args.batch_size is not None:
        GRID["batch_size"] = args.batch_size
    GRID["depth_percents"] = [round(100 * i / (args.depths - 1), 2)
                              for i in range(args.depths)] if args.depths > 1 else [50.0]

    work = Path(tempfile.mkdtemp(prefix="lbs-bench-"))
    env = {**os.environ, "LBS_DATA_DIR": str(work / "data"), "LBS_ENV_FILE": str(work / "x"),
           "LBS_LOG_LEVEL": "WARNING", "TQDM_DISABLE": "1"}
    sys.path.insert(0, str(ROOT))
    os.environ.update({k: env[k] for k in ("LBS_DATA_DIR", "LBS_ENV_FILE")})
    from backend.common.config import load_settings
    from backend.datasets.registry import get_dataset
    from backend.queue.jobs import storable_text
    from backend.runners.builtin import ensure_builtin_model
    from backend.runners.hf.tokenizer import HFTokenizer
    from backend.runners.models import resolve_model

    settings = load_settings()
    spec = resolve_model(args.model, settings)
    model_dir = ensure_builtin_model(settings.data_dir, spec.builtin) if spec.builtin \
        else spec.path
    from transformers import AutoTokenizer

    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(model_dir), 10**6)
    ds = get_dataset("needle_in_haystack")
    items = ds.build_items(ds.parse_params(GRID), tokenizer)
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps({"model_dir": str(model_dir),
                                        "max_new_tokens": GRID["max_new_tokens"],
                                        "prompts": [i.prompt for i in items]}))
    cli_cmd = [sys.executable, "-m", "backend.apps.cli", "eval", "--model", args.model,
               "--dataset", "needle_in_haystack", "--quiet",
               "--output", str(work / "cli.json")]
    for key, value in GRID.items():
        cli_cmd += ["--param", f"{key}={json.dumps(value)}"]
    print(f"grid: {len(items)} prompts, {min(i.prompt_tokens for i in items)}-"
          f"{max(i.prompt_tokens for i in items)} tokens, model {args.model}, "
          f"{os.cpu_count()} CPUs")

    rows = {"bare": [], "bare_job": [], "cli": [], "server": [], "server_job": []}
    for repeat in range(args.repeats):
        t_bare, out = timed([sys.executable, __file__, "--bare", str(prompts_file)], env)
        bare_out = json.loads(out.strip().splitlines()[-1])
        t_cli, _ = timed(cli_cmd, env)
        cli_preds = [s["prediction"] for s in json.loads((work / "cli.json").read_text())
                     ["samples"]]
        t_server, job, server_preds = run_server_job(env, args.model)
        # the database keeps a NUL the model generated as U+FFFD (jobs.storable_text)
        same = [storable_text(p) for p in bare_out["predictions"]] == \
            [storable_text(p) for p in cli_preds] == server_preds
        rows["bare"].append(t_bare)
        rows["bare_job"].append(bare_out["load_s"] + bare_out["loop_s"])
        rows["cli"].append(t_cli)
        rows["server"].append(t_server)
        rows["server_job"].append(job["duration_s"])
        print(f"repeat {repeat + 1}: bare process {t_bare:.2f} s (imports "
              f"{bare_out['import_s']:.2f} s, load {bare_out['load_s']:.2f} s, generation "
              f"{bare_out['loop_s']:.2f} s) | cli process {t_cli:.2f} s | server submit->"
              f"succeeded {t_server:.2f} s (job {job['duration_s']:.2f} s, of it generation "
              f"{job['generation_s']:.2f} s, prefill tokens computed "
              f"{job['prefill_tokens']} of {sum(i.prompt_tokens for i in items)}) | "
              f"same predictions: {same}")
        if not same:
            raise SystemExit("harness and bare loop disagree on predictions")
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\nmedians: bare process {med['bare']:.2f} s, bare load+generation "
          f"{med['bare_job']:.2f} s, cli process {med['cli']:.2f} s, "
          f"server submit->succeeded {med['server']:.2f} s, server job {med['server_job']:.2f} s")
    print(f"ratio cli process / bare process:                {med['cli'] / med['bare']:.3f}")
    print(f"ratio server job (claim->finish) / bare load+gen: "
          f"{med['server_job'] / med['bare_job']:.3f}  (a server worker has its imports done "
          "before the job, as the bare loop's load+generation excludes them)")


if __name__ == "__main__":
    main()
