"""lm-eval requests through our runner (RunnerLM over HFRunner, as the lm_eval dataset
serves them) against lm-evaluation-harness 0.4.13's HF backend (HFLM), on identical
requests, in one process, alternated A B A B; prints the median of each side, the ratio
ours/lm-eval and how many outputs are identical.

    .venv/bin/python bench/shared_prefix.py [--case gsm8k|mmlu|unshared|all] \
        [--model builtin:small] [--questions N] [--rounds 2] [--ours-batch B] \
        [--lm-eval-batch B] [--sweep 1,8,32] [--threads 1]

`--sweep` first times each side once at each of those batch sizes on the same
requests and then compares each side at its own fastest ("each tool at its best batch
setting"); the sweep's timings are printed too.

Cases (prompts from the bundled essays):
  gsm8k     GSM8K-shaped 5-shot generation ("Question: ...\\nAnswer: ...", five solved
            examples before every question), `max_gen_toks` 64, until "Question:".
  mmlu      MMLU-shaped 5-shot multiple choice: one subject's header and five solved
            examples, then the question and options A-D; the four letters scored.
  unshared  multiple choice with no long shared prefix: a ~30-token common header,
            then a long question of its own (~`--tokens` tokens); four letters.
Both sides get the same strings; ours batches `--ours-batch` requests per runner call
(the job's batch_size), lm-eval's HFLM `--lm-eval-batch` (its batch_size). float32, CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sentences() -> list[str]:
    from backend.datasets.needle_in_haystack import load_haystack

    return [s.strip() for s in load_haystack("essays") if len(s.strip()) > 20]


def gsm8k_requests(n: int) -> list[tuple[str, dict]]:
    s = sentences()
    shots = "".join(f"Question: {s[100 + k]}\nAnswer: {s[200 + k]}\n\n" for k in range(5))
    gen = {"until": ["Question:"], "max_gen_toks": 64, "do_sample": False}
    return [(f"{shots}Question: {s[(7 * i) % len(s)]}\nAnswer:", gen) for i in range(n)]


def _mc(header: str, question: str, options: list[str]) -> str:
    body = "".join(f"{'ABCD'[k]}. {o}\n" for k, o in enumerate(options))
    return f"{header}{question}\n{body}Answer:"


def mmlu_requests(n: int) -> list[tuple[str, str]]:
    s = sentences()
    header = "The following are multiple choice questions (with answers) about physics.\n\n"
    shots = "".join(_mc("", s[300 + 5 * k], s[301 + 5 * k:305 + 5 * k]) + f" {'ABCD'[k % 4]}\n\n"
                    for k in range(5))
    out = []
    for i in range(n):
        j = (11 * i) % (len(s) - 5)
        ctx = _mc(header + shots, s[j], s[j + 1:j + 5])
        out += [(ctx, f" {letter}") for letter in "ABCD"]
    return out


def unshared_requests(n: int, tokens: int) -> list[tuple[str, str]]:
    s = sentences()
    header = "Answer the question below with the letter of the right option.\n\n"
    out = []
    for i in range(n):
        words, k = [], 0
        while len(" ".join(words)) < tokens * 3:  # ~3 characters a token here
            words.append(s[(13 * i + k) % len(s)])
            k += 1
        ctx = _mc(header, " ".join(words), s[(17 * i) % (len(s) - 4):][:4])
        out += [(ctx, f" {letter}") for letter in "ABCD"]
    return out


def instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def ours(model_dir: Path, batch: int):
    from backend.common.config import load_settings
    from backend.runners.hf.loading import LoadOptions
    from backend.runners.hf.runner import HFRunner
    from backend.runners.models import resolve_model

    settings = load_settings()
    runner = HFRunner.load(resolve_model(str(model_dir), settings, confine=False),
                           LoadOptions.from_settings(settings), settings)
    return runner_lm(runner, batch)


def runner_lm(runner, batch: int):
    """Our runner as the lm_eval dataset wraps it, `batch` requests per runner call."""
    from backend.datasets.lm_eval_lm import RunnerLM
    from backend.engine.answering import Backoff

    return RunnerLM(runner, Backoff(batch, lambda size, message: None).run)


def theirs(model_dir: Path, batch: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=batch)


class ForwardClock:
    """Seconds a model spends in forward passes over several tokens a row (prefill,
    scoring) and over one (decode steps), from forward hooks."""

    def __init__(self, model):
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self._started = 0.0
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self._started = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        part = "decode" if ids is not None and ids.shape[-1] == 1 else "prefill"
        self.seconds[part] += time.perf_counter() - self._started

    def reset(self) -> None:
        self.seconds = {"prefill": 0.0, "decode": 0.0}


def _timed(lm, kind: str, reqs: list) -> tuple[float, list]:
    if hasattr(lm, "runner"):
        lm.runner.forget_prefixes()  # each run starts from nothing kept
    started = time.perf_counter()
    got = getattr(lm, kind)(instances(kind, reqs))
    return time.perf_counter() - started, got


def sweep(kind: str, reqs: list, model_dir: Path, sizes: list[int]) -> dict[str, int]:
    """Each side timed once at each batch size (A B alternated); its fastest size."""
    from lm_eval.models.huggingface import HFLM

    best: dict[str, int] = {}
    times: dict[str, dict[int, float]] = {"ours": {}, "lm_eval": {}}
    lm = ours(model_dir, sizes[0])
    theirs_lm = theirs(model_dir, sizes[0])
    for lm_ in (lm, theirs_lm):  # first-call costs, untimed
        getattr(lm_, kind)(instances(kind, reqs[:4]))
    for size in sizes:
        lm = runner_lm(lm.runner, size)
        theirs_lm.batch_size_per_gpu = size
        assert isinstance(theirs_lm, HFLM)
        times["ours"][size] = _timed(lm, kind, reqs)[0]
        times["lm_eval"][size] = _timed(theirs_lm, kind, reqs)[0]
        print(f"sweep batch {size:4}: ours {times['ours'][size]:8.2f} s, lm-eval "
              f"{times['lm_eval'][size]:8.2f} s", flush=True)
    for side, by_size in times.items():
        best[side] = min(by_size, key=by_size.get)
    print(f"fastest: ours batch {best['ours']}, lm-eval batch {best['lm_eval']}", flush=True)
    return best


def run_case(case: str, args, model_dir: Path) -> None:
    if case == "gsm8k":
        kind, reqs = "generate_until", gsm8k_requests(args.questions)
    elif case == "mmlu":
        kind, reqs = "loglikelihood", mmlu_requests(args.questions)
    else:
        kind, reqs = "loglikelihood", unshared_requests(args.questions, args.tokens)
    if args.sweep:
        best = sweep(kind, reqs, model_dir, [int(n) for n in args.sweep.split(",")])
        args.ours_batch, args.lm_eval_batch = best["ours"], best["lm_eval"]
    sides = {"ours": ours(model_dir, args.ours_batch),
             "lm_eval": theirs(model_dir, args.lm_eval_batch)}
    for lm in sides.values():  # first-call costs (thread pools, allocations), untimed
        getattr(lm, kind)(instances(kind, reqs[:4]))
    clocks = {"ours": ForwardClock(sides["ours"].runner.model),
              "lm_eval": ForwardClock(sides["lm_eval"].model)}
    split: dict[str, list[dict[str, float]]] = {"ours": [], "lm_eval": []}
    times: dict[str, list[float]] = {"ours": [], "lm_eval": []}
    outputs: dict[str, list] = {}
    for r in range(args.rounds):
        for name in (("ours", "lm_eval") if r % 2 == 0 else ("lm_eval", "ours")):
            lm = sides[name]
            if name == "ours":
                lm.runner.forget_prefixes()  # each round starts from nothing kept
            clocks[name].reset()
            started = time.perf_counter()
            got = getattr(lm, kind)(instances(kind, reqs))
            times[name].append(time.perf_counter() - started)
            split[name].append(dict(clocks[name].seconds))
            outputs[name] = got
            print(f"{case} round {r + 1} {name:8} {times[name][-1]:8.2f} s", flush=True)
    a, b = outputs["ours"], outputs["lm_eval"]
    if kind == "generate_until":
        same = sum(x == y for x, y in zip(a, b, strict=True))
        detail = f"identical replies {same}/{len(a)}"
    else:
        picks = []
        for out in (a, b):
            scores = [o[0] for o in out]
            picks.append([max(range(4), key=lambda k, q=q: scores[4 * q + k])
                          for q in range(len(scores) // 4)])
        diff = max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True))
        same = sum(x == y for x, y in zip(*picks, strict=True))
        detail = f"identical picks {same}/{len(picks[0])}, largest logprob difference {diff:.1e}"
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"{case}: {args.questions} questions, ours batch {args.ours_batch}, lm-eval batch "
          f"{args.lm_eval_batch}: median ours {med['ours']:.2f} s, lm-eval "
          f"{med['lm_eval']:.2f} s, ratio ours/lm-eval {med['ours'] / med['lm_eval']:.3f}; "
          f"{detail}", flush=True)
    for name in ("ours", "lm_eval"):
        prefill = statistics.median(s["prefill"] for s in split[name])
        decode = statistics.median(s["decode"] for s in split[name])
        print(f"{case}: {name} in forward passes (median): prompts {prefill:.2f} s, decode "
              f"steps {decode:.2f} s, the rest {med[name] - prefill - decode:.2f} s", flush=True)
    if kind == "generate_until":
        share = statistics.median(s["prefill"] for s in split["lm_eval"]) / med["lm_eval"]
        print(f"{case}: lm-eval's prompt passes are {share:.2f} of its time: computing "
              f"prompts once can at best bring ours to {1 - share:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="all", choices=["gsm8k", "mmlu", "unshared", "all"])
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ours-batch", type=int, default=8)
    parser.add_argument("--lm-eval-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for both sides (0: torch's default); 1 keeps a "
                             "loaded machine's descheduled threads from stalling each op")
    parser.add_argument("--sweep", default="",
                        help="comma-separated batch sizes: compare each side at its fastest")
    args = parser.parse_args()
    import os

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    os.environ.setdefault("LBS_DATA_DIR", tempfile.mkdtemp(prefix="lbs-bench-"))
    from backend.runners.builtin import ensure_builtin_model

    model_dir = ensure_builtin_model(Path(os.environ["LBS_DATA_DIR"]),
                                     args.model.removeprefix("builtin:"))
    for case in (["gsm8k", "mmlu", "unshared"] if args.case == "all" else [args.case]):
        run_case(case, args, model_dir)
    import torch

    print(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average "
          f"{os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
