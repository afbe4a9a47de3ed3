"""LongBench v2: long-context multiple choice (A-D) with the official prompts.

Data: the official `data.json` (a JSON list; JSONL also read) in
`<data_dir>/`, each {"_id", "domain", "sub_domain", "difficulty" (easy|hard),
"length" (short|medium|long), "question", "choice_A".."choice_D", "answer",
"context"}.

The prompt is the official zero-shot one (or, with `cot: true`, the
chain-of-thought one followed by the official second turn that asks for the
single answer). The document is truncated in the middle, in the model's tokens,
to fit the budget. The answer is extracted the official way: asterisks
dropped, then "The correct answer is (X)" or "The correct answer is X".
Accuracy overall, by difficulty and by length.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field

from backend.datasets.base import Dataset, DatasetParams, Item, ScoreEntry, batch_rows
from backend.datasets.files import find_files
from backend.datasets.hub import HubSource
from backend.datasets.longbench import TEMPLATE_SLACK, truncate_middle
from backend.datasets.registry import register
from backend.engine.contracts import BatchPlan, CacheMode, ParamError, PromptTokenizer

_CHOICES = ("Choices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n")
PROMPT = ("Please read the following text and answer the question below.\n\n<text>\n$DOC$\n"
          "</text>\n\nWhat is the correct answer to this question: $Q$\n" + _CHOICES +
          'Format your response as follows: "The correct answer is (insert answer here)".')
PROMPT_COT = ("Please read the following text and answer the questions below.\n\n<text>\n$DOC$\n"
              "</text>\n\nWhat is the correct answer to this question: $Q$\n" + _CHOICES +
              "Let’s think step by step:")
PROMPT_COT_ANSWER = ("Please read the following text and answer the questions below.\n\n"
                     "The text is too long and omitted here.\n\n"
                     "What is the correct answer to this question: $Q$\n" + _CHOICES +
                     "Let’s think step by step: $COT$\n\nBased on the above, what is the "
                     "single, most likely answer choice? Format your response as follows: "
                     '"The correct answer is (insert answer here)".')


def fill(template: str, row: dict[str, Any], doc: str = "", cot: str = "") -> str:
    return (template.replace("$DOC$", doc.strip()).replace("$Q$", row["question"].strip())
            .replace("$C_A$", row["choice_A"].strip()).replace("$C_B$", row["choice_B"].strip())
            .replace("$C_C$", row["choice_C"].strip()).replace("$C_D$", row["choice_D"].strip())
            .replace("$COT$", cot))


def extract_choice(response: str) -> str:
    """A-D from "The correct answer is (X)" / "… is X", as the official script does."""
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response) or \
        re.search(r"The correct answer is ([A-D])", response)
    return match.group(1) if match else ""


class LongBenchV2Params(DatasetParams):
    data_dir: str | None = Field(None, description="folder with data.json (default: "
                                 "LBS_DATASETS_DIR/longbench_v2)")
    cot: bool = Field(False, title="Chain of thought",
                      description="chain of thought, then the official answer turn")
    max_samples: int | None = Field(None, ge=1, description="at most this many questions")
    max_length: int | None = Field(None, ge=256, description="prompt budget in tokens; "
                                   "default: the model's maximum minus the answer length")
    difficulty: str | None = Field(None, pattern="^(easy|hard)$",
                                   description="only easy or only hard questions")
    length: str | None = Field(None, pattern="^(short|medium|long)$",
                               description="only short, medium or long contexts")
    use_chat_template: bool = Field(True, description="wrap the prompt in the chat template")


@register
class LongBenchV2(Dataset):
    name = "longbench_v2"
    description = ("LongBench v2: 503 long-context multiple-choice questions; accuracy "
                   "overall, by difficulty and by length.")
    cache_mode = CacheMode.UNCACHED
    length_sorted = True
    cost = "503 questions of 8k-2M words (middle-truncated to the model)"
    Params = LongBenchV2Params
    hub = HubSource("THUDM/LongBench-v2", files=("data.json",), splits=("train",))

    has_data_parts = True
    prompt_budget = True

    def data_parts(self, folder) -> list[tuple[str, str, list]]:
        try:
            return [("all", "train", find_files(folder, ["data", "train"]))]
        except ParamError:
            return []

    def _rows(self, params: LongBenchV2Params) -> list[dict[str, Any]]:
        rows = self.read_all(find_files(self.data_folder(params.data_dir), ["data", "train"]))
        rows = [r for r in rows if (params.difficulty in (None, r.get("difficulty")))
                and (params.length in (None, r.get("length")))]
        return rows[:params.max_samples]

    def check(self, params: LongBenchV2Params, model: Any) -> None:
        self._rows(params)

    def worst_batches(self, params: LongBenchV2Params, model_max: int | None
                      ) -> list[BatchPlan]:
        """Prompts of the budget (max_length, else the model's maximum less the answer
        and TEMPLATE_SLACK) plus TEMPLATE_SLACK, then the answer: 128 tokens; with cot
        the 1024-token reasoning, then the answer turn, whose prompt holds the question
        and the reasoning, and its 128. None when neither bound is known."""
        new = 1024 + 128 if params.cot else 128
        if params.max_length is None:
            if model_max is None:
                return []
            prompt = model_max - new
        else:
            prompt = params.max_length + TEMPLATE_SLACK
            if model_max:
                prompt = min(prompt, model_max - new)
        rows = batch_rows(params)
        if not params.cot:
            return [BatchPlan("generate", rows, prompt, 128, padded=rows > 1)]
        return [BatchPlan("generate", rows, prompt, 1024, padded=rows > 1),
                BatchPlan("generate", rows, prompt + 1024, 128, padded=rows > 1)]

    def chat_template(self, params: LongBenchV2Params) -> bool:
        return params.use_chat_template

    def build_items(self, params: LongBenchV2Params, tokenizer: PromptTokenizer) -> list[Item]:
        template = PROMPT_COT if params.cot else PROMPT
        new_tokens = 1024 if params.cot else 128
        budget = params.max_length or tokenizer.max_length - new_tokens - TEMPLATE_SLACK
        items = []
        for row in self._rows(params):
            overhead = len(tokenizer.encode(fill(template, row)))
            doc = truncate_middle(row["context"], tokenizer, max(16, budget - overhead))
            prompt = tokenizer.render(fill(template, row, doc))
            items.append(Item(
                idx=len(items), prompt=prompt, prompt_tokens=tokenizer.count_prompt(prompt),
                max_new_tokens=new_tokens, reference=row["answer"].strip(),
                fields={"_id": row.get("_id"), "difficulty": row.get("difficulty"),
                        "length": row.get("length"), "domain": row.get("domain"),
                        "question": row["question"], **{k: row[k] for k in (
                            "choice_A", "choice_B", "choice_C", "choice_D")}} if params.cot
                else {"_id": row.get("_id"), "difficulty": row.get("difficulty"),
                      "length": row.get("length"), "domain": row.get("domain")}))
        return items

    def second_turn(self, item: Item, reply: str, tokenizer: PromptTokenizer) -> Item | None:
        """With `cot`, the official answer turn that follows the reasoning."""
        if "question" not in item.fields:
            return None
        prompt = tokenizer.render(fill(PROMPT_COT_ANSWER, item.fields, cot=reply.strip()))
        return Item(idx=item.idx, prompt=prompt, prompt_tokens=tokenizer.count_prompt(prompt),
                    max_new_tokens=128, reference=item.reference,
                    fields={**item.fields, "cot": reply})

    breakdowns = [
        {"kind": "table", "key": "difficulties", "title": "By difficulty",
         "columns": [{"key": "difficulty", "title": "Difficulty"}]},
        {"kind": "table", "key": "lengths", "title": "By length",
         "columns": [{"key": "length", "title": "Length"}]},
    ]
    sample_columns = [{"key": "difficulty", "title": "Difficulty", "filter": True},
                      {"key": "length", "title": "Length", "filter": True},
                      {"key": "domain", "title": "Domain", "filter": True},
                      {"key": "extracted", "title": "Chosen answer"}]

    def explain(self, item: Item, prediction: str) -> dict[str, Any]:
        choice = extract_choice(prediction)
        return {"reference": item.reference, "extracted": choice,
                "why": (f"chose {choice}" if choice else "no 'The correct answer is (X)'")
                + f"; the reference is {item.reference}"}

    def score(self, item: Item, prediction: str) -> float:
        return 1.0 if extract_choice(prediction) == item.reference else 0.0

    def aggregate(self, scored: list[tuple[dict[str, Any], float]]) -> list[ScoreEntry]:
        entries = super().aggregate(scored)
        for key in ("difficulty", "length"):
            groups: dict[str, list[float]] = {}
            for fields, value in scored:
                if fields.get(key):
                    groups.setdefault(fields[key], []).append(value)
            entries += [ScoreEntry.mean(key, v, {key: k}) for k, v in sorted(groups.items())]
        return entries
