"""Multiple-choice scoring: the harness's shared-context log-likelihood vs a bare loop
that scores each option with its own full forward pass; same model, same prompts.

    .venv/bin/python bench/loglikelihood.py [--model builtin:small] [--questions 40]
    .venv/bin/python bench/loglikelihood.py --vs-lm-eval [--questions 300] \
        [--project-batch 16] [--lm-eval-batch 8] [--rounds 2] [--sweep 1,4,8,16]
        [--sweep-questions 40]

--vs-lm-eval: the same C-Eval-shaped questions (one subject, 5 shots) as a C-Eval data
folder for the project (`python -m backend.apps.cli eval --dataset ceval`) and as a local
task YAML (dataset_path: json) for the `lm_eval` command, same model folder
(builtin:small, float32), whole processes alternated `--rounds` times. Each process
runs under bench/ll_timing.py, which times its scoring path and model forward calls.
Prints wall and CPU time per process, the scoring and forward-pass time inside it
(wall and CPU), the ratios project/lm-eval (medians), and checks that the prompts are
identical and both chose the same letter for every question. `--sweep` first times
each batch size on the first `--sweep-questions` (40), one process per tool and size,
and keeps each tool's best (least scoring CPU time).

Prompts are C-Eval-shaped (header, 5 solved examples, the question, "答案："), made
from the bundled essays so each is a few hundred tokens; the options are the
letters A-D. Prints both times, the ratio harness/bare (shared-context scoring
should make it well under 1) and checks that both pick the same letters.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def question(sentences: list[str], i: int) -> dict[str, str]:
    """A C-Eval row made from the bundled essays."""
    s = [sentences[(i * 7 + k) % len(sentences)].strip() for k in range(5)]
    return {"id": str(i), "question": s[0], "A": s[1], "B": s[2], "C": s[3], "D": s[4],
            "answer": "ABCD"[i % 4]}


def write_questions(work: Path, n: int) -> tuple[Path, Path, list[str]]:
    """A C-Eval data folder (dev: 5 shots, val: n questions), the lm-eval task folder
    over the same prompts, and the prompts."""
    import csv
    import json

    sys.path.insert(0, str(ROOT))
    from backend.datasets.ceval import SUBJECTS, format_question
    from backend.datasets.needle_in_haystack import load_haystack

    sentences = load_haystack("essays")
    data = work / "ceval"
    subject = "high_school_physics"
    header = f"以下是中国关于{SUBJECTS[subject][0]}考试的单项选择题，请选出其中的正确答案。\n\n"
    rows = {"dev": [question(sentences, 1000 + k) for k in range(5)],
            "val": [question(sentences, i) for i in range(n)]}
    for split, split_rows in rows.items():
        (data / split).mkdir(parents=True, exist_ok=True)
        with open(data / split / f"{subject}_{split}.csv", "w", newline="",
                  encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(split_rows[0]))
            writer.writeheader()
            writer.writerows(split_rows)
    shots = "".join(format_question(r, True) for r in rows["dev"])
    prompts = [header + shots + format_question(r, False) for r in rows["val"]]
    tasks = work / "tasks"
    tasks.mkdir(exist_ok=True)
    with open(tasks / "questions.jsonl", "w", encoding="utf-8") as f:
        for row, prompt in zip(rows["val"], prompts, strict=True):
            f.write(json.dumps({"id": row["id"], "prompt": prompt,
                                "label": "ABCD".index(row["answer"])}, ensure_ascii=False)
                    + "\n")
    # YAML is a superset of JSON: every value written with json.dumps.
    (tasks / "lbs_ceval_bench.yaml").write_text("\n".join([
        "task: lbs_ceval_bench", "dataset_path: json",
        "dataset_kwargs:", "  data_files:",
        f"    test: {json.dumps(str(tasks / 'questions.jsonl'))}",
        "test_split: test", "output_type: multiple_choice",
        "doc_to_text: prompt", 'doc_to_choice: ["A", "B", "C", "D"]', "doc_to_target: label",
        'target_delimiter: ""',  # the letter right after "答案：", as C-Eval's own scorer
        "metric_list:", "  - metric: acc", ""]), encoding="utf-8")
    return data, tasks, prompts


def run_process(work: Path, tool: str, batch: int, n: int, data: Path, tasks: Path,
                model_dir: Path, tag: str) -> dict:
    """One whole process of `tool`; its wall time, timers, prompts and chosen letters."""
    import json
    import subprocess

    out = work / f"{tag}.json"
    timing = work / f"{tag}.timing.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if tool == "project":
        args = ["eval", "--model", "builtin:small", "--dataset", "ceval", "--quiet",
                "--param", f"data_dir={json.dumps(str(data))}", "--param", "shots=5",
                "--param", f"max_samples={n}", "--param", f"batch_size={batch}",
                "--output", str(out)]
    else:
        args = ["run", "--model", "hf", "--model_args",
                f"pretrained={model_dir},dtype=float32", "--tasks", "lbs_ceval_bench",
                "--include_path", str(tasks), "--batch_size", str(batch), "--device", "cpu",
                "--limit", str(n), "--log_samples", "--output_path", str(work / tag)]
    started, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "ll_timing.py"), str(timing),
                           tool, *args], env=env, capture_output=True, text=True,
                          timeout=3600)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{done.stderr[-3000:]}")
    result = {"wall_s": wall, "cpu_s": cpu, **json.loads(timing.read_text())}
    if tool == "project":
        samples = sorted(json.loads(out.read_text())["samples"], key=lambda s: s["idx"])
        result["prompts"] = [s["prompt"] for s in samples]
        result["picks"] = [s["prediction"] for s in samples]
    else:
        (found,) = (work / tag).rglob("samples_lbs_ceval_bench_*.jsonl")
        rows = sorted((json.loads(line) for line in found.read_text().splitlines()),
                      key=lambda r: r["doc_id"])
        result["prompts"] = [r["arguments"]["gen_args_0"]["arg_0"] for r in rows]
        result["picks"] = ["ABCD"[max(range(4), key=lambda k: float(r["resps"][k][0][0]))]
                           for r in rows]
    return result


def vs_lm_eval(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="lbs-vs-lmeval-"))
    os.environ.update(LBS_DATA_DIR=str(work / "data"), LBS_ENV_FILE=str(work / "x"))
    sys.path.insert(0, str(ROOT))
    from backend.runners.builtin import ensure_builtin_model

    model_dir = ensure_builtin_model(work / "data", "small")
    data, tasks, prompts = write_questions(work, args.questions)
    best = {"project": args.project_batch, "lm_eval": args.lm_eval_batch}
    if args.sweep:
        sizes = [int(x) for x in args.sweep.split(",")]
        n = min(args.sweep_questions, args.questions)
        for tool in ("project", "lm_eval"):
            walls = {}
            for size in sizes:
                r = run_process(work, tool, size, n, data, tasks, model_dir, f"sweep-{tool}-{size}")
                walls[size] = r["scoring_cpu_s"]  # CPU time: steadier on a shared machine
                print(f"sweep {tool:8} batch {size:3}: wall {r['wall_s']:7.2f} s, scoring "
                      f"{r['scoring_s']:7.2f} s (CPU {r['scoring_cpu_s']:7.2f} s), forward "
                      f"{r['forward_s']:7.2f} s ({n} questions)", flush=True)
            best[tool] = min(walls, key=walls.get)
    runs: dict[str, list[dict]] = {"project": [], "lm_eval": []}
    for k in range(args.rounds):
        for tool in (("project", "lm_eval") if k % 2 == 0 else ("lm_eval", "project")):
            r = run_process(work, tool, best[tool], args.questions, data, tasks, model_dir,
                            f"{tool}-{k}")
            runs[tool].append(r)
            print(f"round {k} {tool:8} batch {best[tool]:3}: wall {r['wall_s']:7.2f} s "
                  f"(CPU {r['cpu_s']:7.2f} s), scoring {r['scoring_s']:7.2f} s (CPU "
                  f"{r['scoring_cpu_s']:7.2f} s), forward {r['forward_s']:7.2f} s (CPU "
                  f"{r['forward_cpu_s']:7.2f} s, {r['forwards']} calls)", flush=True)
    keys = ("wall_s", "cpu_s", "scoring_s", "scoring_cpu_s", "forward_s", "forward_cpu_s")
    med = {tool: {key: sorted(r[key] for r in rs)[len(rs) // 2] for key in keys}
           for tool, rs in runs.items()}
    same_prompts = all(r["prompts"] == prompts for rs in runs.values() for r in rs)
    picks = runs["project"][0]["picks"]
    same_picks = all(r["picks"] == picks for rs in runs.values() for r in rs)
    print(f"{args.questions} C-Eval-shaped questions (5 shots, prompts {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} characters), builtin:small float32, {os.cpu_count()} "
          f"CPUs, {args.rounds} rounds alternated (medians)")
    for tool in ("project", "lm_eval"):
        m = med[tool]
        print(f"{tool:8} batch {best[tool]:3}: wall {m['wall_s']:7.2f} s (CPU {m['cpu_s']:7.2f} s)"
              f", scoring {m['scoring_s']:7.2f} s (CPU {m['scoring_cpu_s']:7.2f} s), forward "
              f"passes {m['forward_s']:7.2f} s (CPU {m['forward_cpu_s']:7.2f} s)")
    for key in keys:
        print(f"ratio project / lm-eval, {key[:-2].replace('_', ' ')}: "
              f"{med['project'][key] / med['lm_eval'][key]:.3f}")
    print(f"identical prompts: {same_prompts}; identical choices: {same_picks}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--questions", type=int, default=None,
                        help="default 40 (300 with --vs-lm-eval)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vs-lm-eval", action="store_true")
    parser.add_argument("--project-batch", type=int, default=16)
    parser.add_argument("--lm-eval-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sweep", default="", help="batch sizes to try first, e.g. 1,4,8,16")
    parser.add_argument("--sweep-questions", type=int, default=40)
    args = parser.parse_args()
    if args.vs_lm_eval:
        args.questions = args.questions or 300
        return vs_lm_eval(args)
    args.questions = args.questions or 40
    work = Path(tempfile.mkdtemp(prefix="lbs-ll-"))
    os.environ.update(LBS_DATA_DIR=str(work / "data"), LBS_ENV_FILE=str(work / "x"))
    sys.path.insert(0, str(ROOT))
    import torch

    from backend.common.config import load_settings
    from backend.datasets.base import Item
    from backend.datasets.ceval import format_question
    from backend.datasets.needle_in_haystack import load_haystack
    from backend.engine.answering import choose
    from backend.runners.hf.loading import LoadOptions
    from backend.runners.hf.runner import HFRunner
    from backend.runners.models import resolve_model

    torch.set_grad_enabled(False)
    settings = load_settings()
    # prompts as plain text: chat_template=False on every call below
    runner = HFRunner.load(resolve_model(args.model, settings), LoadOptions.from_settings(settings),
                           settings)
    sentences = load_haystack("essays")
    letters = ["A", "B", "C", "D"]

    def question_text(i: int) -> str:
        return format_question(question(sentences, i), False)

    shots = "".join(format_question(question(sentences, 1000 + k), True) for k in range(5))
    header = "以下是中国关于高中物理考试的单项选择题，请选出其中的正确答案。\n\n"
    items = [Item(idx=i, prompt=header + shots + question_text(i), prompt_tokens=0,
                  max_new_tokens=1, reference="A", choices=letters, labels=letters)
             for i in range(args.questions)]
    tokens = [runner.count_prompt(item.prompt, chat_template=False) for item in items]

    def harness() -> list[str]:
        return [choose(runner, item, chat_template=False)[0] for item in items]

    def bare() -> list[str]:
        picks = []
        for item in items:
            scores = []
            for letter in letters:
                ctx = runner.tok.prompt_ids(item.prompt, chat_template=False)
                whole = runner.tok.prompt_ids(item.prompt + letter, chat_template=False)
                logp = torch.log_softmax(runner.model(torch.tensor([whole])).logits[0].float(), -1)
                scores.append(sum(float(logp[j - 1, whole[j]])
                                  for j in range(len(ctx), len(whole))))
            picks.append(letters[max(range(4), key=scores.__getitem__)])
        return picks

    harness(), bare()  # warm up
    times = {"harness": [], "bare": []}
    for _ in range(args.repeats):
        for name, fn in (("bare", bare), ("harness", harness)):
            started = time.perf_counter()
            picks = fn()
            times[name].append(time.perf_counter() - started)
            if name == "bare":
                bare_picks = picks
        same = picks == bare_picks
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"{args.questions} questions x 4 options, prompts {min(tokens)}-{max(tokens)} tokens, "
          f"model {args.model}, {os.cpu_count()} CPUs, {args.repeats} repeats (medians)")
    print(f"bare loop (one full pass per option): {med['bare']:.3f} s")
    print(f"harness (one shared pass per question): {med['harness']:.3f} s")
    print(f"ratio harness / bare: {med['harness'] / med['bare']:.3f}; same letters chosen: {same}")


if __name__ == "__main__":
    main()
