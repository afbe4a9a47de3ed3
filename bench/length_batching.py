"""Length-aware batching: a LongBench-shaped generation set with `batch_size: "auto"`
against `batch_size: 1`, in one run, through the server.

    .venv/bin/python bench/length_batching.py [--model builtin:small] [--repeats 3]
        [--items 40]

It writes a synthetic LongBench folder (the official jsonl fields: input, context,
answers, length, dataset, language, all_classes, _id) of `--items` items over four
subsets (hotpotqa, multifieldqa_en, trec, lcc: 32 or 64 new tokens each), their
contexts cut from the bundled essays to lengths spread evenly from about 200 to about
3000 tokens and shuffled, so that the file order is not the length order. A server
with one worker (LBS_DATASETS_DIR pointing at that folder) runs the same LongBench job
with batch_size 1 and "auto", alternately; the job's time is claim -> end
(started_at -> finished_at, as stored; both pay the same model load). It prints the
medians, the ratio, the batch size auto chose (the largest batch a sample ran in,
`fields.timing.batch`, and any out-of-memory halving) and whether the predictions and
scores equal batch 1's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from local_server import ROOT, http_json, run_job, running_server  # bench/ is this script's folder

SUBSETS = {  # subset -> (question, answers, all_classes)
    "hotpotqa": ("Which city did the author move to after college?", ["Boston"], None),
    "multifieldqa_en": ("What does the essay say about startups?", ["they grow fast"], None),
    "trec": ("Question: What city hosts the old harbour?\nType:", ["City"],
             ["City", "Individual", "Other location", "Country"]),
    "lcc": ("", ["    return a - b"], None),
}
WORDS_PER_TOKEN = 0.62
"""Words of the bundled essays per token of the built-in tokenizer (builtin:tiny and
builtin:small share it): measured, 0.62 gives contexts of 176-2949 tokens for the
default 200-3000; the prompt template adds some. The printed lengths are the
measured prompts'."""


def write_dataset(folder: Path, items: int, shortest: int, longest: int,
                  seed: int = 1) -> None:
    """`items` LongBench-format items over SUBSETS, contexts from `shortest` to
    `longest` tokens (about), in a shuffled order, as <folder>/longbench/<subset>.jsonl."""
    words = (ROOT / "backend" / "datasets" / "data" / "haystack_essays.txt").read_text(
        encoding="utf-8").split()
    rng = random.Random(seed)
    step = (longest - shortest) / max(items - 1, 1)
    lengths = [round(shortest + i * step) for i in range(items)]
    rng.shuffle(lengths)
    rows: dict[str, list[dict]] = {name: [] for name in SUBSETS}
    names = list(SUBSETS)
    for i, tokens in enumerate(lengths):
        subset = names[i % len(names)]
        question, answers, classes = SUBSETS[subset]
        count = int(tokens * WORDS_PER_TOKEN)
        start = rng.randrange(0, max(1, len(words) - count))
        context = " ".join(words[start:start + count])
        if subset == "lcc":  # code completion: the context is the code so far
            context = "def add(a, b):\n    return a + b\n\n# " + context + "\ndef sub(a, b):\n"
        rows[subset].append({"input": question, "context": context, "answers": answers,
                             "length": count, "dataset": subset, "language": "en",
                             "all_classes": classes, "_id": f"{subset}-{i}"})
    target = folder / "longbench"
    target.mkdir(parents=True, exist_ok=True)
    for subset, items_of in rows.items():
        (target / f"{subset}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items_of),
            encoding="utf-8")


def run(base: str, model: str, batch_size: int | str) -> tuple[float, list[dict], dict, list]:
    params = {"subsets": list(SUBSETS), "batch_size": batch_size}
    took, job, samples = run_job(base, {"model": model, "dataset": "longbench",
                                        "params": params}, poll=0.3)
    return took, samples, job["scores"], job["events"]


def batches(samples: list[dict]) -> Counter:
    """How many samples ran in a batch of each size."""
    return Counter((s["fields"].get("timing") or {}).get("batch") for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--shortest", type=int, default=200, help="tokens, about")
    parser.add_argument("--longest", type=int, default=3000, help="tokens, about")
    args = parser.parse_args()
    if args.items < len(SUBSETS):
        parser.error(f"--items must be at least {len(SUBSETS)} (one per subset)")
    work = Path(tempfile.mkdtemp(prefix="lbs-lenbatch-"))
    write_dataset(work / "datasets", args.items, args.shortest, args.longest)
    env = {**os.environ, "LBS_DATA_DIR": str(work / "data"), "LBS_ENV_FILE": str(work / "x"),
           "LBS_DATASETS_DIR": str(work / "datasets"), "LBS_LOG_LEVEL": "WARNING",
           "TQDM_DISABLE": "1", "LBS_WORKERS": "auto", "LBS_POLL_INTERVAL": "0.05"}
    times: dict[str, list[float]] = {"1": [], "auto": []}
    with running_server(env) as port:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):  # the worker has imported torch before the clock starts
            if any(w["alive"] for w in http_json(base + "/api/workers")["data"]["workers"]):
                break
            time.sleep(0.1)
        reference = None
        for repeat in range(args.repeats):
            for size in (1, "auto"):
                took, samples, scores, events = run(base, args.model, size)
                predictions = [(s["idx"], s["prediction"]) for s in samples]
                if reference is None:
                    reference = (predictions, scores)
                    lengths = [s["prompt_tokens"] for s in samples]
                    print(f"{len(samples)} items over {len(SUBSETS)} subsets, prompts of "
                          f"{min(lengths)}-{max(lengths)} tokens (median "
                          f"{statistics.median(lengths):.0f}), model {args.model}, "
                          f"{os.cpu_count()} CPUs")
                times[str(size)].append(took)
                used = batches(samples)
                ooms = [e.get("note") for e in events if e.get("kind") == "oom"]
                print(f"repeat {repeat + 1}: batch_size {size}: job {took:.2f} s, batch sizes "
                      f"used {dict(sorted(used.items()))}"
                      f"{f', out-of-memory halvings: {ooms}' if ooms else ''}, "
                      f"same predictions as batch 1: {predictions == reference[0]}, "
                      f"same scores: {scores == reference[1]}")
                if size == "auto":
                    chosen = max(k for k in used if k)
    one, auto = statistics.median(times["1"]), statistics.median(times["auto"])
    print(f"\nmedians: batch_size 1 {one:.2f} s, batch_size auto (chose {chosen}) "
          f"{auto:.2f} s, auto / 1 = {auto / one:.3f} (speed-up {one / auto:.2f}x)")


if __name__ == "__main__":
    main()
