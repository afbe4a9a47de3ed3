"""C-Eval: 52 subjects of Chinese exam multiple choice (A-D), zero- or few-shot.

Data: the official layout, `<data_dir>/{dev,val,test}/<subject>_<split>.csv`
with columns id, question, A, B, C, D, answer (dev also has explanation), or
the hub's `<data_dir>/<subject>/<split>-*.parquet` with the same columns.
The test split has no public answers, so `val` is the default split; few-shot
examples come from `dev`, as in the official evaluation.

Prompt (the official one): "以下是中国关于{科目}考试的单项选择题，请选出其中的正确
答案。" then the examples, each "question / A. … / B. … / C. … / D. … / 答案：X", and
the question ending in "答案：". Scoring: by default the log-likelihood of each
answer letter after the prompt (one forward pass per question); `method:
generate` asks the model to answer and takes the option letter of its reply (the
official evaluator's rules, then the first standalone capital A-D; see extract_letter).
Accuracy per subject, per category (STEM, Social Science, Humanities, Other),
and the average over subjects (as the official leaderboard reports it); the
accuracy over all questions is reported as `micro`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from backend.datasets.base import (
    Dataset,
    DatasetParams,
    Item,
    ScoreEntry,
    batch_rows,
    check_known,
    token_bound,
)
from backend.datasets.hub import HubSource
from backend.datasets.registry import register
from backend.engine.contracts import BatchPlan, CacheMode, ParamError, PromptTokenizer

LETTERS = ["A", "B", "C", "D"]

# subject -> (Chinese name, category), per the official subject mapping
SUBJECTS: dict[str, tuple[str, str]] = {
    "computer_network": ("计算机网络", "STEM"), "operating_system": ("操作系统", "STEM"),
    "computer_architecture": ("计算机组成", "STEM"), "college_programming": ("大学编程", "STEM"),
    "college_physics": ("大学物理", "STEM"), "college_chemistry": ("大学化学", "STEM"),
    "advanced_mathematics": ("高等数学", "STEM"),
    "probability_and_statistics": ("概率统计", "STEM"),
    "discrete_mathematics": ("离散数学", "STEM"),
    "electrical_engineer": ("注册电气工程师", "STEM"),
    "metrology_engineer": ("注册计量师", "STEM"),
    "high_school_mathematics": ("高中数学", "STEM"), "high_school_physics": ("高中物理", "STEM"),
    "high_school_chemistry": ("高中化学", "STEM"), "high_school_biology": ("高中生物", "STEM"),
    "middle_school_mathematics": ("初中数学", "STEM"),
    "middle_school_biology": ("初中生物", "STEM"), "middle_school_physics": ("初中物理", "STEM"),
    "middle_school_chemistry": ("初中化学", "STEM"), "veterinary_medicine": ("兽医学", "STEM"),
    "college_economics": ("大学经济学", "Social Science"),
    "business_administration": ("工商管理", "Social Science"),
    "marxism": ("马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("教育学", "Social Science"),
    "teacher_qualification": ("教师资格", "Social Science"),
    "high_school_politics": ("高中政治", "Social Science"),
    "high_school_geography": ("高中地理", "Social Science"),
    "middle_school_politics": ("初中政治", "Social Science"),
    "middle_school_geography": ("初中地理", "Social Science"),
    "modern_chinese_history": ("近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("思想道德修养与法律基础", "Humanities"),
    "logic": ("逻辑学", "Humanities"), "law": ("法学", "Humanities"),
    "chinese_language_and_literature": ("中国语言文学", "Humanities"),
    "art_studies": ("艺术学", "Humanities"), "professional_tour_guide": ("导游资格", "Humanities"),
    "legal_professional": ("法律职业资格", "Humanities"),
    "high_school_chinese": ("高中语文", "Humanities"),
    "high_school_history": ("高中历史", "Humanities"),
    "middle_school_history": ("初中历史", "Humanities"),
    "civil_servant": ("公务员", "Other"), "sports_science": ("体育学", "Other"),
    "plant_protection": ("植物保护", "Other"), "basic_medicine": ("基础医学", "Other"),
    "clinical_medicine": ("临床医学", "Other"),
    "urban_and_rural_planner": ("注册城乡规划师", "Other"),
    "accountant": ("注册会计师", "Other"), "fire_engineer": ("注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": ("环境影响评价工程师", "Other"),
    "tax_accountant": ("税务师", "Other"), "physician": ("医师资格", "Other"),
}


class CEvalParams(DatasetParams):
    data_dir: str | None = Field(None, description="folder with dev/ val/ test/ "
                                 "(default: LBS_DATASETS_DIR/ceval)")
    subjects: list[str] | None = Field(None, description="subjects to run; default: all "
                                       "found in the folder")
    split: Literal["val", "dev", "test"] = Field("val", description="test has no answers")
    shots: int = Field(0, ge=0, le=5, description="examples from the dev split")
    max_samples: int | None = Field(None, ge=1, description="at most this many per subject")
    method: Literal["loglikelihood", "generate"] = Field(
        "loglikelihood", description="loglikelihood: the likeliest answer letter; generate: "
                                     "the first A-D letter of the reply")
    max_new_tokens: int = Field(16, ge=1, le=512, description="for method generate")
    use_chat_template: bool = Field(False, description="wrap the prompt in the chat template")

    @field_validator("subjects")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        return check_known(value, SUBJECTS, "subject(s)")


def split_files(folder, subject: str, split: str) -> list:
    """The official `<split>/<subject>_<split>.csv`, or every shard of the hub's
    `<subject>/<split>-*.parquet`; [] when neither exists."""
    path = folder / split / f"{subject}_{split}.csv"
    if path.is_file():
        return [path]
    return sorted(folder.glob(f"{subject}/{split}-*.parquet"))


def split_file(folder, subject: str, split: str):
    """The first file of `split_files`, None when there is none."""
    files = split_files(folder, subject, split)
    return files[0] if files else None


def read_split(folder, subject: str, split: str,
               read_all: Callable[[list[Path]], list[dict[str, Any]]]) -> list[dict[str, str]]:
    """The rows of one subject's split as text, read with the job's `Dataset.read_all`."""
    return [{k: str(v) for k, v in r.items()}
            for r in read_all(split_files(folder, subject, split))]


def format_question(row: dict[str, str], with_answer: bool) -> str:
    text = row["question"].strip() + "\n" + "".join(
        f"{letter}. {row[letter].strip()}\n" for letter in LETTERS) + "答案："
    return text + (row["answer"].strip() + "\n\n" if with_answer else "")


# The official evaluator's patterns (hkust-nlp/ceval, evaluators/chatgpt.py extract_ans).
_OFFICIAL = [re.compile(p) for p in (
    r"^选([A-D])", r"^选项([A-D])", r"答案是\s?选?项?\s?([A-D])", r"答案为\s?选?项?\s?([A-D])",
    r"答案应为\s?选?项?\s?([A-D])", r"答案选\s?选?项?\s?([A-D])", r"答案是:\s?选?项?\s?([A-D])",
    r"答案应该是:\s?选?项?\s?([A-D])", r"正确的一项是\s?([A-D])", r"答案为:\s?选?项?\s?([A-D])",
    r"答案应为:\s?选?项?\s?([A-D])", r"答案:\s?选?项?\s?([A-D])", r"答案是：\s?选?项?\s?([A-D])",
    r"答案应该是：\s?选?项?\s?([A-D])", r"答案为：\s?选?项?\s?([A-D])",
    r"答案应为：\s?选?项?\s?([A-D])", r"答案：\s?选?项?\s?([A-D])")]
_LEADING = re.compile(r"^([A-D])(?![A-Za-z])")
_LEADING_LOWER = re.compile(r"^([a-d])(?:[).:：）]|$)")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9])([A-D])(?![A-Za-z0-9])")


def extract_letter(reply: str) -> str:
    """The option letter of a generated reply ('' when there is none).

    In order: a reply that starts with the letter (the official evaluator's first
    rule; "A. 安培", "d)"), the official Chinese answer patterns ("答案是C", "选B"), then
    the first standalone capital A-D (not part of a word: "Correct option: D" gives D,
    "I choose A" gives A, "BAD" gives nothing).
    """
    text = (reply or "").strip()
    match = _LEADING.match(text) or _LEADING_LOWER.match(text)
    if match:
        return match.group(1).upper()
    for pattern in _OFFICIAL:
        found = pattern.findall(text)
        if found:
            return found[-1]
    match = _STANDALONE.search(text)
    return match.group(1) if match else ""


@register
class CEval(Dataset):
    name = "ceval"
    description = ("C-Eval: Chinese exam multiple choice over 52 subjects; accuracy per "
                   "subject and category, scored by answer-letter log-likelihood.")
    cache_mode = CacheMode.CACHED
    cost = "52 subjects, 1346 val questions; one forward pass each"
    Params = CEvalParams
    hub = HubSource("ceval/ceval-exam", files=("*/dev-*.parquet", "*/val-*.parquet",
                                                "*/test-*.parquet"),
                    part_files=("{part}/*.parquet",),
                    configs=tuple(SUBJECTS), splits=("dev", "val", "test"))

    has_data_parts = True

    def data_parts(self, folder) -> list[tuple[str, str, list]]:
        """(subject, split, files) of every split file in a data folder."""
        return [(s, split, files) for s in SUBJECTS for split in ("dev", "val", "test")
                if (files := split_files(folder, s, split))]

    def _subjects(self, params: CEvalParams):
        folder = self.data_folder(params.data_dir, parts=params.subjects)
        subjects = params.subjects or [s for s in SUBJECTS
                                       if split_file(folder, s, params.split)]
        if not subjects:
            raise ParamError("data_dir", f"no {params.split} files (<subject>_{params.split}"
                                         f".csv) in {folder / params.split}")
        return folder, subjects

    def check(self, params: CEvalParams, model: Any) -> None:
        folder, subjects = self._subjects(params)
        missing = [s for s in subjects if not split_file(folder, s, params.split)]
        if missing:
            raise ParamError("subjects", f"no {params.split} file for: {', '.join(missing)} "
                                         f"in {folder / params.split}")

    def _questions(self, params: CEvalParams) -> list[tuple[str, dict[str, str], str]]:
        """(subject, row, user message) of every question of the job."""
        folder, subjects = self._subjects(params)
        found = []
        for subject in subjects:
            zh, _ = SUBJECTS[subject]
            header = f"以下是中国关于{zh}考试的单项选择题，请选出其中的正确答案。\n\n"
            dev = read_split(folder, subject, "dev", self.read_all)
            shots = "".join(format_question(r, True) for r in dev[:params.shots])
            rows = read_split(folder, subject, params.split, self.read_all)[:params.max_samples]
            found += [(subject, row, header + shots + format_question(row, False))
                      for row in rows]
        return found

    def worst_batches(self, params: CEvalParams, model_max: int | None) -> list[BatchPlan]:
        """A batch of the longest question (with its shots) as bounded by `token_bound`:
        by log-likelihood its answer letters are read off the last position (one
        position's logits), and the questions of a batch share the subject's header
        (and shots), which the runner may compute once; or max_new_tokens generated."""
        longest = max((token_bound(m) for _, _, m in self._questions(params)), default=0)
        longest = min(longest, model_max or longest)
        rows = batch_rows(params)
        if params.method == "loglikelihood":
            return [BatchPlan("loglikelihood", rows, longest, 1,
                              shared_prefix=1 if rows > 1 else 0, padded=rows > 1)]
        return [BatchPlan("generate", rows, longest, params.max_new_tokens, padded=rows > 1)]

    def chat_template(self, params: CEvalParams) -> bool:
        return params.use_chat_template

    def build_items(self, params: CEvalParams, tokenizer: PromptTokenizer) -> list[Item]:
        items = []
        for subject, row, message in self._questions(params):
            category = SUBJECTS[subject][1]
            prompt = tokenizer.render(message)
            items.append(Item(
                idx=len(items), prompt=prompt, prompt_tokens=tokenizer.count_prompt(prompt),
                max_new_tokens=params.max_new_tokens,
                reference=row.get("answer", "").strip().upper(),
                fields={"subject": subject, "category": category, "id": row.get("id")},
                choices=LETTERS if params.method == "loglikelihood" else None,
                labels=LETTERS if params.method == "loglikelihood" else None))
        return items

    breakdowns = [
        {"kind": "figures", "key": "averages", "title": "Averages", "rows": [
            {"key": "overall", "title": "Macro average",
             "help": "mean of the subject accuracies (the official C-Eval figure)"},
            {"key": "micro", "title": "Micro average",
             "help": "accuracy over all questions together"}]},
        {"kind": "table", "key": "categories", "title": "By category",
         "columns": [{"key": "category", "title": "Category"}]},
        {"kind": "table", "key": "subjects", "title": "By subject",
         "columns": [{"key": "subject", "title": "Subject"},
                     {"key": "category", "title": "Category"}]},
    ]
    sample_columns = [{"key": "subject", "title": "Subject", "filter": True},
                      {"key": "category", "title": "Category", "filter": True},
                      {"key": "extracted", "title": "Answer letter"},
                      {"key": "logprobs", "title": "Choice log-likelihoods"}]

    def explain(self, item: Item, prediction: str) -> dict[str, Any]:
        letter = extract_letter(prediction)
        why = (f"answered {letter or 'no letter'}, the reference is {item.reference}"
               + (" (the likeliest of A-D)" if item.choices else ""))
        return {"reference": item.reference, "extracted": letter, "why": why}

    def score(self, item: Item, prediction: str) -> float:
        return 1.0 if extract_letter(prediction) == item.reference else 0.0

    def aggregate(self, scored: list[tuple[dict[str, Any], float]]) -> list[ScoreEntry]:
        by_subject: dict[str, list[float]] = {}
        for fields, value in scored:
            by_subject.setdefault(fields["subject"], []).append(value)
        by_category: dict[str, list[list[float]]] = {}
        for subject, values in by_subject.items():
            by_category.setdefault(SUBJECTS[subject][1], []).append(values)
        total = [v for _, v in scored]
        # The overall and category scores are macro averages over subjects (the
        # official leaderboard's); their counts are questions, as every count is.
        entries = [ScoreEntry.macro("overall", list(by_subject.values()), len(total))]
        entries += [ScoreEntry.macro("category", groups, sum(map(len, groups)),
                                     {"category": c})
                    for c, groups in sorted(by_category.items())]
        entries += [ScoreEntry.mean("subject", by_subject[s],
                                    {"subject": s, "category": SUBJECTS[s][1]})
                    for s in sorted(by_subject)]
        entries.append(ScoreEntry.mean("micro", total))
        return entries
