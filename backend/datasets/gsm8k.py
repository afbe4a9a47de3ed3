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

from backend.datasets.base import (
    CacheMode,
    Dataset,
    DatasetParams,
    Item,
    ParamError,
    PromptTokenizer,
)
from backend.datasets.files import find_files, read_all
from backend.datasets.hub import HubSource
from backend.datasets.registry import register

_NUMBER = r"-?[\d,]*\.?\d+"


class GSM8KParams(DatasetParams):
    data_dir: str | None = Field(None, description="folder with test.jsonl (and train.jsonl "
                                 "for shots); default: LBS_DATASETS_DIR/gsm8k")
    split: str = Field("test", pattern=r"^[a-z_]+$")
    shots: int = Field(0, ge=0, le=8, description="solved examples from train.jsonl")
    max_samples: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(256, ge=1, le=2048)
    use_chat_template: bool = True


def normalise_number(text: str) -> str:
    value = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", value):
        value = value.split(".")[0]
    return value


def extract_answer(reply: str) -> str:
    """The final numeric answer of a reply ('' when it has no number)."""
    reply = reply.split("Question:")[0]
    for pattern in (rf"####\s*\$?({_NUMBER})", rf"[Tt]he answer is\s*\$?({_NUMBER})"):
        match = re.search(pattern, reply)
        if match:
            return normalise_number(match.group(1))
    numbers = re.findall(_NUMBER, reply)
    return normalise_number(numbers[-1]) if numbers else ""


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

    def build_items(self, params: GSM8KParams, tokenizer: PromptTokenizer) -> list[Item]:
        paths = self._file(params)
        shots = ""
        if params.shots:
            for ex in read_all(self._file(params, "train"))[:params.shots]:
                shots += f"Question: {ex['question'].strip()}\nAnswer: {ex['answer'].strip()}\n\n"
        rows = read_all(paths)[:params.max_samples]
        items = []
        for i, row in enumerate(rows):
            prompt = tokenizer.render(f"{shots}Question: {row['question'].strip()}\nAnswer:")
            items.append(Item(idx=i, prompt=prompt, prompt_tokens=tokenizer.count_prompt(prompt),
                              max_new_tokens=params.max_new_tokens,
                              reference=reference_answer(row["answer"]),
                              fields={"reference": reference_answer(row["answer"])}))
        return items

    def score(self, item: Item, prediction: str) -> float:
        return 1.0 if extract_answer(prediction) == item.reference else 0.0
