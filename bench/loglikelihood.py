"""Multiple-choice scoring: the harness's shared-context log-likelihood vs a bare loop
that scores each option with its own full forward pass; same model, same prompts.

    .venv/bin/python bench/loglikelihood.py [--model builtin:small] [--questions 40]

Prompts are C-Eval-shaped (header, 5 solved examples, the question, "答案："), made
from the bundled essays so each is a few hundred tokens; the options are the
letters A-D. Prints both times, the ratio harness/bare (shared-context scoring
should make it well under 1) and checks that both pick the same letters.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lbs-ll-"))
    os.environ.update(LBS_DATA_DIR=str(work / "data"), LBS_ENV_FILE=str(work / "x"))
    sys.path.insert(0, str(ROOT))
    import torch

    from backend.config import load_settings
    from backend.datasets.base import Item
    from backend.datasets.needle_in_haystack import load_haystack
    from backend.evaluation import _choose
    from backend.runners.hf import HFRunner, LoadOptions
    from backend.runners.models import resolve_model

    torch.set_grad_enabled(False)
    settings = load_settings()
    # prompts as plain text: chat_template=False on every call below
    runner = HFRunner.load(resolve_model(args.model, settings), LoadOptions.from_settings(settings),
                           settings)
    sentences = load_haystack("essays")
    letters = ["A", "B", "C", "D"]

    def question(i: int) -> str:
        s = [sentences[(i * 7 + k) % len(sentences)].strip() for k in range(5)]
        return f"{s[0]}\nA. {s[1]}\nB. {s[2]}\nC. {s[3]}\nD. {s[4]}\n答案："

    shots = "".join(question(1000 + k) + f"{letters[k % 4]}\n\n" for k in range(5))
    header = "以下是中国关于高中物理考试的单项选择题，请选出其中的正确答案。\n\n"
    items = [Item(idx=i, prompt=header + shots + question(i), prompt_tokens=0, max_new_tokens=1,
                  reference="A", choices=letters, labels=letters)
             for i in range(args.questions)]
    tokens = [runner.count_prompt(item.prompt, chat_template=False) for item in items]

    def harness() -> list[str]:
        return [_choose(runner, item, chat_template=False)[0] for item in items]

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
