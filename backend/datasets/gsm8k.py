"""GSM8K: grade-school maths word problems, answered by generation (greedy).

Data: the official JSONL layout, `<data_dir>/test.jsonl` (and `train.jsonl`
for few-shot examples), one {"question", "answer"} per line, the answer's
last line being "#### <number>"; the hub's Parquet layout
(`main/test-0000k-of-0000n.parquet`, every shard) is read too.

Prompt: "Question: …\\nAnswer:" after `shots` solved examples from the train
file in the same form. The reply is cut at the next "Question:" (the model
starting an example of its own). Extraction: the number after "####" when the
reply has one, else "The answer is N", else the last number in the reply;
commas, a trailing ".0" and "$" are removed. Score: exact match with the
reference number (GSM8K accuracy).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field

from backend.datasets.base import Dataset, DatasetParams, Item, ScoreEntry, batch_rows, token_bound
from backend.datasets.files import find_files
from backend.datasets.hub import HubSource
from backend.datasets.registry import register
from backend.engine.contracts import BatchPlan, CacheMode, ParamError, PromptTokenizer

_NUMBER = r"-?[\d,]*\.?\d+"


class GSM8KParams(DatasetParams):
    data_dir: str | None = Field(None, description="folder with test.jsonl (and train.jsonl "
                                 "for shots); default: LBS_DATASETS_DIR/gsm8k")
    split: str = Field("test", pattern=r"^[a-z_]+$", description="the file to read: <split>.jsonl")
    shots: int = Field(0, ge=0, le=8, description="solved examples from train.jsonl")
    max_samples: int | None = Field(None, ge=1, description="at most this many problems")
    max_new_tokens: int = Field(256, ge=1, le=2048, description="longest reply, in tokens")
    use_chat_template: bool = Field(True, description="wrap the prompt in the chat template")


def normalise_number(text: str) -> str:
    value = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", value):
        value = value.split(".")[0]
    return value


def extract_with_rule(reply: str) -> tuple[str, str]:
    """The final numeric answer of a reply and the rule that found it: "####",
    "the answer is", "last number", or ("", "none") when the reply has no number."""
    reply = reply.split("Question:")[0]
    for rule, pattern in (("####", rf"####\s*\$?({_NUMBER})"),
                          ("the answer is", rf"[Tt]he answer is\s*\$?({_NUMBER})")):
        match = re.search(pattern, reply)
        if match:
            return normalise_number(match.group(1)), rule
    numbers = re.findall(_NUMBER, reply)
    return (normalise_number(numbers[-1]), "last number") if numbers else ("", "none")


def extract_answer(reply: str) -> str:
    """The final numeric answer of a reply ('' when it has no number)."""
    return extract_with_rule(reply)[0]


def reference_answer(answer: str) -> str:
    return normalise_number(answer.split("####")[-1])


@register
class GSM8K(Dataset):
    name = "gsm8k"
    description = "GSM8K: grade-school maths word problems; accuracy of the final number."
    cache_mode = CacheMode.CACHED
    length_sorted = True
    cost = "1319 test problems, up to max_new_tokens generated each"
    Params = GSM8KParams
    hub = HubSource("openai/gsm8k", files=("main/*.parquet",), configs=("main",),
                    splits=("train", "test"))

    has_data_parts = True

    def data_parts(self, folder) -> list[tuple[str, str, list]]:
        out = []
        for split in ("test", "train"):
            try:
                out.append(("main", split, find_files(folder, [split])))
            except ParamError:
                continue
        return out

    def _file(self, params: GSM8KParams, split: str | None = None):
        return find_files(self.data_folder(params.data_dir), [split or params.split],
                          field="split" if split is None else "shots")

    def check(self, params: GSM8KParams, model: Any) -> None:
        self._file(params)
        if params.shots:
            self._file(params, "train")

    def _messages(self, params: GSM8KParams) -> list[tuple[dict[str, Any], str]]:
        """(row, user message) of every question of the job."""
        shots = ""
        if params.shots:
            for ex in self.read_all(self._file(params, "train"))[:params.shots]:
                shots += f"Question: {ex['question'].strip()}\nAnswer: {ex['answer'].strip()}\n\n"
        rows = self.read_all(self._file(params))[:params.max_samples]
        return [(row, f"{shots}Question: {row['question'].strip()}\nAnswer:") for row in rows]

    def worst_batches(self, params: GSM8KParams, model_max: int | None) -> list[BatchPlan]:
        """A batch of the longest question (with its shots) as bounded by `token_bound`,
        then max_new_tokens generated."""
        longest = max((token_bound(m) for _, m in self._messages(params)), default=0)
        rows = batch_rows(params)
        return [BatchPlan("generate", rows, min(longest, model_max or longest),
                          params.max_new_tokens, padded=rows > 1)]

    def chat_template(self, params: GSM8KParams) -> bool:
        return params.use_chat_template

    def build_items(self, params: GSM8KParams, tokenizer: PromptTokenizer) -> list[Item]:
        items = []
        for i, (row, message) in enumerate(self._messages(params)):
            prompt = tokenizer.render(message)
            items.append(Item(idx=i, prompt=prompt, prompt_tokens=tokenizer.count_prompt(prompt),
                              max_new_tokens=params.max_new_tokens,
                              reference=reference_answer(row["answer"]),
                              fields={"reference": reference_answer(row["answer"])}))
        return items

    breakdowns = [
        {"kind": "table", "key": "extractions", "title": "By the extraction that matched",
         "columns": [{"key": "extraction", "title": "Answer read from"}]},
    ]
    sample_columns = [{"key": "extracted", "title": "Extracted answer"},
                      {"key": "extraction", "title": "Answer read from", "filter": True}]

    def explain(self, item: Item, prediction: str) -> dict[str, Any]:
        value, rule = extract_with_rule(prediction)
        why = (f"read {value} from the {rule}; the reference is {item.reference}"
               if value else f"no number in the reply; the reference is {item.reference}")
        return {"reference": item.reference, "extracted": value, "extraction": rule,
                "why": why}

    def score(self, item: Item, prediction: str) -> float:
        return 1.0 if extract_answer(prediction) == item.reference else 0.0

    def aggregate(self, scored: list[tuple[dict[str, Any], float]]) -> list[ScoreEntry]:
        entries = super().aggregate(scored)
        groups: dict[str, list[float]] = {}
        for fields, value in scored:
            if fields.get("extraction"):
                groups.setdefault(fields["extraction"], []).append(value)
        entries += [ScoreEntry.mean("extraction", v, {"extraction": k})
                    for k, v in sorted(groups.items())]
        return entries
