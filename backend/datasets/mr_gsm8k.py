"""MR-GSM8K: meta-reasoning. The model grades a student's solution to a GSM8K problem:
is it correct, which step is the first wrong one, and why.

Data: the official `MR-GSM8K.json` (a JSON list; any `*.json` file named by
`file`) with "question", "model_output_steps" (list of steps),
"model_output_solution_correctness" (correct|wrong),
"model_output_solution_first_error_step", "model_output_solution_first_error_reason".

Prompt: the official zero-shot grading prompt. The reply is parsed the official
way ("Final Judgement:", "First Error Step:", "Error Analysis:"), including its
quirks: a judgement of exactly "incorrect" counts as "wrong", and the true
label is matched as a substring of the judgement; "step 3" counts as "3".

MR-Score components, as the official calculate_mr_score.py defines them:
- `mcc`: Matthews correlation of the correct/wrong judgement (task 1);
- `step_accuracy`: share of the wrong solutions judged wrong with the right
  first error step (task 2);
- the error-reason accuracy (task 3) needs a grading model (GPT-4 in the
  paper), which this dataset does not run: it is not reported, and
  `mr_score_without_reason` = 0.2 * max(0, mcc) + 0.3 * step_accuracy is the
  MR-Score with that term at 0 (a lower bound; the full score adds
  0.5 * reason accuracy). Each sample's score is 1 when its judgement is right.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from pydantic import Field

from backend.common.stats import bootstrap_spread
from backend.datasets.base import Dataset, DatasetParams, Item, ScoreEntry, batch_rows, token_bound
from backend.datasets.hub import HubSource
from backend.datasets.registry import register
from backend.engine.contracts import BatchPlan, CacheMode, ParamError, PromptTokenizer

PROMPT = """Act as a grade school math teacher and score the following problem solution.

Question:
{question}

Student Solution:
{steps}

Your task involves three parts:
1. **Step-by-step Evaluation:** Go through the student solution carefully and identify key errors and potential misunderstandings that led to the incorrect solution.
2. **Final Judgement:**  Provide an overall judgement on the correctness of the student's solution.
3. **First Error Step:** If the solution is incorrect, generate the step number where the first error occurs, otherwise generate N/A here
4. **Error Analysis:** If the solution is incorrect, analyse the cause and reasons for the first error step, otherwise generate N/A here 

Here's the format I want:
Step-by-step Evaluation: [Provide a step by step examination of the student solution and identify key errors and misunderstandings here.]
Final Judgement: [Insert only **correct** or **wrong** here]
First Error Step: [Insert either N/A or the step number where the first error occurs]
Error Analysis: [Insert either N/A or the analysis of error in the first error among solution steps]

Please follow this format without any additional introductory or concluding statements.
"""  # noqa: E501, W291 - the official text, trailing space included


def parse_reply(reply: str) -> dict[str, str]:
    """Judgement, first error step and error analysis of a grading reply (empty strings
    when the reply does not follow the format)."""
    judgement = re.search(r"Final Judgement:\s*(.*?)\s*First Error Step:", reply, re.S)
    step = re.search(r"First Error Step:\s*(.*?)\s*Error Analysis:", reply, re.S)
    reason = re.search(r"Error Analysis:\s*(.*)", reply, re.S)
    if not (judgement and step and reason):
        return {"judgement": "", "error_step": "", "error_reason": ""}
    return {"judgement": judgement.group(1), "error_step": step.group(1),
            "error_reason": reason.group(1).strip()}


def judged(truth: str, judgement: str) -> bool:
    pred = judgement.strip().lower()
    pred = "wrong" if pred == "incorrect" else pred
    return truth.lower() in pred


def step_number(text: str) -> str:
    text = text.strip()
    if text.isdigit():
        return text
    match = re.fullmatch(r"step (\d+)", text.lower())
    return match.group(1) if match else ""


def mcc(tp: int, tn: int, fp: int, fn: int) -> float:
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def _mcc(truth: np.ndarray, right: np.ndarray, step: np.ndarray) -> np.ndarray:
    """`mcc` of each resample (rows of the arrays)."""
    tp, tn = (truth * right).sum(axis=1), ((1 - truth) * right).sum(axis=1)
    fp, fn = (1 - truth).sum(axis=1) - tn, truth.sum(axis=1) - tp
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.divide(tp * tn - fp * fn, denominator, out=np.zeros_like(tp),
                     where=denominator > 0)


def _mr_score(truth: np.ndarray, right: np.ndarray, step: np.ndarray) -> np.ndarray:
    wrong = (1 - truth).sum(axis=1)
    step_acc = np.divide(step.sum(axis=1), wrong, out=np.zeros_like(wrong), where=wrong > 0)
    return 0.2 * np.maximum(0.0, _mcc(truth, right, step)) + 0.3 * step_acc


class MRGSM8KParams(DatasetParams):
    data_dir: str | None = Field(None, description="folder with MR-GSM8K.json (default: "
                                 "LBS_DATASETS_DIR/mr_gsm8k)")
    file: str = Field("MR-GSM8K.json", pattern=r"^[\w.-]+\.(json|jsonl|parquet)$",
                      description="the data file in that folder")
    max_samples: int | None = Field(None, ge=1, description="at most this many solutions")
    max_new_tokens: int = Field(1024, ge=16, le=4096, description="longest reply, in tokens")
    use_chat_template: bool = Field(True, description="wrap the prompt in the chat template")


def _message(row: dict[str, Any]) -> str:
    return PROMPT.format(question=row["question"], steps="\n".join(row["model_output_steps"]))


@register
class MRGSM8K(Dataset):
    name = "mr_gsm8k"
    description = ("MR-GSM8K: the model grades GSM8K solutions (correct? first wrong step?); "
                   "MR-Score components.")
    cache_mode = CacheMode.CACHED
    length_sorted = True
    cost = "3000 solutions to grade, up to max_new_tokens generated each"
    Params = MRGSM8KParams
    # The hub dataset the official repository (dvlab-research/MR-GSM8K) links to; its
    # JSON files are fetched and `file` is looked for anywhere in the snapshot.
    hub = HubSource("Randolphzeng/DiagGSM8K", files=("*.json", "*.jsonl", "*.parquet"),
                    splits=("test",))

    @staticmethod
    def _file(folder, name: str):
        path = folder / name
        if path.is_file():
            return path
        return next(iter(sorted(folder.rglob(name))), None)

    has_data_parts = True

    def data_parts(self, folder) -> list[tuple[str, str, list]]:
        path = self._file(folder, MRGSM8KParams.model_fields["file"].default)
        return [("all", "test", [path])] if path else []

    def _rows(self, params: MRGSM8KParams) -> list[dict[str, Any]]:
        folder = self.data_folder(params.data_dir)
        path = self._file(folder, params.file)
        if path is None:
            raise ParamError("file", f"no {params.file} in {folder}")
        return self.read_records(path)[:params.max_samples]

    def check(self, params: MRGSM8KParams, model: Any) -> None:
        self._rows(params)

    def worst_batches(self, params: MRGSM8KParams, model_max: int | None) -> list[BatchPlan]:
        """A batch of the longest solution to grade as bounded by `token_bound`, then
        max_new_tokens generated."""
        longest = max((token_bound(_message(row)) for row in self._rows(params)), default=0)
        rows = batch_rows(params)
        return [BatchPlan("generate", rows, min(longest, model_max or longest),
                          params.max_new_tokens, padded=rows > 1)]

    def chat_template(self, params: MRGSM8KParams) -> bool:
        return params.use_chat_template

    def build_items(self, params: MRGSM8KParams, tokenizer: PromptTokenizer) -> list[Item]:
        items = []
        for i, row in enumerate(self._rows(params)):
            prompt = tokenizer.render(_message(row))
            truth = row["model_output_solution_correctness"].lower()
            items.append(Item(
                idx=i, prompt=prompt, prompt_tokens=tokenizer.count_prompt(prompt),
                max_new_tokens=params.max_new_tokens,
                reference={"correctness": truth,
                           "error_step": str(row.get("model_output_solution_first_error_step"))},
                fields={"truth": truth, "question_type": row.get("question_type"),
                        "error_step": str(row.get("model_output_solution_first_error_step"))}))
        return items

    breakdowns = [
        {"kind": "figures", "key": "mr_score", "title": "MR-Score terms", "rows": [
            {"key": "overall", "title": "Judgement accuracy",
             "help": "share of solutions judged correct/wrong as the reference says"},
            {"key": "mcc", "title": "MCC",
             "help": "Matthews correlation of the correct/wrong judgements (weight 0.2)"},
            {"key": "step_accuracy", "title": "First-error-step accuracy",
             "help": "over the wrong solutions: the first wrong step found (weight 0.3)"},
            {"key": "mr_score_without_reason", "title": "MR-Score without the reason term",
             "help": "0.2 x max(0, MCC) + 0.3 x step accuracy; the 0.5 error-reason term "
                     "needs a judge model and is left out"}]},
    ]
    sample_columns = [{"key": "truth", "title": "Solution is", "filter": True},
                      {"key": "judgement", "title": "Judged"},
                      {"key": "error_step", "title": "First wrong step"},
                      {"key": "extracted", "title": "Step named"},
                      {"key": "step_ok", "title": "Step right", "filter": True}]

    def explain(self, item: Item, prediction: str) -> dict[str, Any]:
        reply = parse_reply(prediction)
        ok = judged(item.reference["correctness"], reply["judgement"])
        step = step_number(reply["error_step"])
        step_ok = bool(ok and item.reference["correctness"] == "wrong"
                       and step == item.reference["error_step"])
        return {"reference": item.reference, "judgement": reply["judgement"],
                "extracted": step, "judgement_ok": ok, "step_ok": step_ok,
                "why": (f"judged {reply['judgement'] or '(no Final Judgement)'}, the solution "
                        f"is {item.reference['correctness']}")}

    def score(self, item: Item, prediction: str) -> float:
        reply = parse_reply(prediction)
        return 1.0 if judged(item.reference["correctness"], reply["judgement"]) else 0.0

    def aggregate(self, scored: list[tuple[dict[str, Any], float]]) -> list[ScoreEntry]:
        correct = [(f, v) for f, v in scored if f["truth"] == "correct"]
        wrong = [(f, v) for f, v in scored if f["truth"] == "wrong"]
        tp = sum(v for _, v in correct)
        tn = sum(v for _, v in wrong)
        m = mcc(int(tp), int(tn), len(wrong) - int(tn), len(correct) - int(tp))
        step_acc = sum(bool(f.get("step_ok")) for f, _ in wrong) / len(wrong) if wrong else 0.0
        # MCC and the MR-Score are not means of items: their error bars are bootstrapped
        # over the solutions (truth, judged right, first wrong step found).
        items = {"truth": [1.0 if f["truth"] == "correct" else 0.0 for f, _ in scored],
                 "right": [float(v) for _, v in scored],
                 "step": [1.0 if f["truth"] == "wrong" and f.get("step_ok") else 0.0
                          for f, _ in scored]}
        return [ScoreEntry.mean("overall", [v for _, v in scored]),
                ScoreEntry.spread("mcc", m, len(scored), bootstrap_spread(items, _mcc)),
                ScoreEntry.mean("step_accuracy",
                                [1.0 if f.get("step_ok") else 0.0 for f, _ in wrong]),
                ScoreEntry.spread("mr_score_without_reason", 0.2 * max(0.0, m) + 0.3 * step_acc,
                                  len(scored), bootstrap_spread(items, _mr_score))]
