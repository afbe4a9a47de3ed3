"""LongBench (v1): 21 long-context subsets in English and Chinese, scored like eval.py.

Data: the official layout, `<data_dir>/<subset>.jsonl` (LongBench-E:
`<subset>_e.jsonl`), one {"input", "context", "answers", "length",
"all_classes", "_id", …} per line. `subsets.json` holds each subset's official
prompt format, maximum generation length and metric (see metrics.py).

Prompts longer than the budget are truncated in the **middle**, in the model's
tokens (the first and last halves are kept), before the chat template is
applied. As in the official pred.py, the few-shot and code subsets (trec,
triviaqa, samsum, lsht, lcc, repobench-p) are fed without a chat template and
their first reply line only is scored for trec, triviaqa, samsum and lsht.
A sample's score is its best over the reference answers; a subset's score is
the mean of its samples; `overall` is the mean over subsets. With LongBench-E
files (`use_e: true`) each subset is also broken down by length bucket
(0-4k, 4-8k, 8k+ by the `length` field).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from backend.datasets.base import (
    Dataset,
    DatasetParams,
    Item,
    LengthAxis,
    ScoreEntry,
    batch_rows,
    check_known,
)
from backend.datasets.files import find_files
from backend.datasets.hub import HubSource
from backend.datasets.longbench.metrics import score_sample
from backend.datasets.registry import register
from backend.engine.contracts import BatchPlan, CacheMode, ParamError, PromptTokenizer

SUBSETS: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).parent / "subsets.json").read_text(encoding="utf-8"))
NO_CHAT_TEMPLATE = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
FIRST_LINE_ONLY = {"trec", "triviaqa", "samsum", "lsht"}
TEMPLATE_SLACK = 64  # tokens the chat template may add around the prompt


def length_bucket(length: int) -> str:
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


class LongBenchParams(DatasetParams):
    data_dir: str | None = Field(None, description="folder with <subset>.jsonl files "
                                 "(default: LBS_DATASETS_DIR/longbench)")
    subsets: list[str] | None = Field(None, description="subsets to run; default: every "
                                      "subset whose file is in the folder")
    use_e: bool = Field(False, title="LongBench-E",
                        description="LongBench-E files (<subset>_e.jsonl) and length "
                                    "buckets 0-4k, 4-8k, 8k+")
    max_samples: int | None = Field(None, ge=1, description="at most this many per subset")
    max_length: int | None = Field(None, ge=256, description="prompt budget in tokens before "
                                   "middle truncation; default: the model's maximum minus "
                                   "the subset's generation length")
    use_chat_template: bool = Field(True, description="for the subsets that use it officially")

    @field_validator("subsets")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        return check_known(value, SUBSETS, "subset(s)")


def truncate_middle(prompt: str, tokenizer: PromptTokenizer, budget: int) -> str:
    """Keep the first and last budget/2 tokens of `prompt` when it is longer."""
    ids = tokenizer.encode(prompt)
    if len(ids) <= budget:
        return prompt
    half = budget // 2
    return tokenizer.decode(ids[:half]) + tokenizer.decode(ids[-half:])


@register
class LongBench(Dataset):
    name = "longbench"
    description = ("LongBench: 21 long-context subsets (QA, summarisation, few-shot, "
                   "synthetic, code) in English and Chinese with the official metrics.")
    cache_mode = CacheMode.UNCACHED
    length_sorted = True
    cost = "21 subsets, 4750 samples of up to ~30k tokens"
    Params = LongBenchParams
    # The repository's loading script (LongBench.py) reads data.zip, whose data/ folder is
    # the official layout; datasets 5 no longer runs scripts, so the zip is read directly.
    hub = HubSource("THUDM/LongBench", files=("data.zip",), archive="data.zip", layout="data",
                    configs=tuple(SUBSETS) + tuple(f"{s}_e" for s in SUBSETS),
                    splits=("test",))

    has_data_parts = True
    prompt_budget = True
    length_axis = LengthAxis("prompt_tokens", series=False)

    def data_parts(self, folder: Path) -> list[tuple[str, str, list[Path]]]:
        out = []
        for subset in SUBSETS:
            for stem in (subset, subset + "_e"):
                try:
                    out.append((stem, "test", find_files(folder, [stem])))
                except ParamError:
                    continue
        return out

    def runs_by_default(self, part: str, split: str) -> bool:
        """LongBench-E's files (`<subset>_e`) are read only with `use_e`."""
        return not part.endswith("_e")

    def _files(self, params: LongBenchParams) -> list[tuple[str, list[Path]]]:
        folder = self.data_folder(params.data_dir)
        suffix = "_e" if params.use_e else ""
        if params.subsets:
            return [(s, find_files(folder, [s + suffix], field="subsets"))
                    for s in params.subsets]
        files = []
        for subset in SUBSETS:
            try:
                files.append((subset, find_files(folder, [subset + suffix])))
            except ParamError:
                continue
        if not files:
            raise ParamError("data_dir", f"no LongBench files (<subset>{suffix}.jsonl) in "
                                         f"{folder}")
        return files

    def check(self, params: LongBenchParams, model: Any) -> None:
        self._files(params)

    def worst_batches(self, params: LongBenchParams, model_max: int | None
                      ) -> list[BatchPlan]:
        """A batch of prompts of the budget (max_length, else the model's maximum less
        the subset's generation length and TEMPLATE_SLACK) plus TEMPLATE_SLACK, then
        the subset's generation length, over the job's subsets; none when neither
        bound is known. Rows of a batch differ in length: padded."""
        new = max(SUBSETS[s]["max_new_tokens"] for s, _ in self._files(params))
        if params.max_length is None:
            if model_max is None:
                return []
            prompt = model_max - new
        else:
            prompt = params.max_length + TEMPLATE_SLACK
            if model_max:
                prompt = min(prompt, model_max - new)
        rows = batch_rows(params)
        return [BatchPlan("generate", rows, prompt, new, padded=rows > 1)]

    def chat_template(self, params: LongBenchParams) -> bool:
        return params.use_chat_template

    def build_items(self, params: LongBenchParams, tokenizer: PromptTokenizer) -> list[Item]:
        items = []
        for subset, paths in self._files(params):
            spec = SUBSETS[subset]
            budget = params.max_length or (tokenizer.max_length - spec["max_new_tokens"]
                                           - TEMPLATE_SLACK)
            for row in self.read_all(paths)[:params.max_samples]:
                text = truncate_middle(spec["prompt"].format(**row), tokenizer, budget)
                templated = params.use_chat_template and subset not in NO_CHAT_TEMPLATE
                prompt = tokenizer.render(text) if templated else text
                items.append(Item(
                    idx=len(items), prompt=prompt, prompt_tokens=tokenizer.count_prompt(prompt),
                    max_new_tokens=spec["max_new_tokens"],
                    reference={"answers": row["answers"], "all_classes": row.get("all_classes")},
                    fields={"subset": subset, "length": row.get("length"),
                            "_id": row.get("_id"),
                            # LongBench-E's breakdown: plain rows carry a length too
                            **({"bucket": length_bucket(int(row["length"]))}
                               if params.use_e and row.get("length") is not None else {})}))
        return items

    breakdowns = [
        {"kind": "table", "key": "subsets", "title": "By subset",
         "columns": [{"key": "subset", "title": "Subset"}]},
        {"kind": "table", "key": "buckets", "title": "By subset and length (LongBench-E buckets)",
         "columns": [{"key": "subset", "title": "Subset"},
                     {"key": "bucket", "title": "Length (words)"}]},
    ]
    sample_columns = [{"key": "subset", "title": "Subset", "filter": True},
                      {"key": "length", "title": "Length (words)"},
                      {"key": "bucket", "title": "Length bucket", "filter": True},
                      {"key": "metric", "title": "Metric"}]

    def explain(self, item: Item, prediction: str) -> dict[str, Any]:
        subset = item.fields["subset"]
        metric = SUBSETS[subset]["metric"]
        answers = item.reference["answers"]
        out = {"reference": answers, "metric": metric,
               "why": f"{metric}: the best over {len(answers)} reference answer(s)"
                      + (", first line of the reply only" if subset in FIRST_LINE_ONLY
                         else "")}
        return out

    def score(self, item: Item, prediction: str) -> float:
        subset = item.fields["subset"]
        return score_sample(SUBSETS[subset]["metric"], prediction, item.reference["answers"],
                            item.reference["all_classes"], first_line=subset in FIRST_LINE_ONLY)

    def aggregate(self, scored: list[tuple[dict[str, Any], float]]) -> list[ScoreEntry]:
        by_subset: dict[str, list[float]] = {}
        buckets: dict[tuple[str, str], list[float]] = {}
        for fields, value in scored:
            by_subset.setdefault(fields["subset"], []).append(value)
            if fields.get("bucket") is not None:
                buckets.setdefault((fields["subset"], fields["bucket"]), []).append(value)
        entries = [ScoreEntry.macro("overall", list(by_subset.values()), len(scored))]
        entries += [ScoreEntry.mean("subset", by_subset[s], {"subset": s})
                    for s in SUBSETS if s in by_subset]
        entries += [ScoreEntry.mean("bucket", v, {"subset": s, "bucket": b})
                    for (s, b), v in sorted(buckets.items())]
        return entries
