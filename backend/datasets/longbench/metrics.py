"""LongBench's metrics, written to give the numbers its authors' eval.py gives.

Each takes (prediction, ground_truth, all_classes) and returns 0-1; a sample's
score is the best over its reference answers (see `score_sample`).
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable

_ZH_PUNCT = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀"
             "｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙"
             "〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
_EN_PUNCT = set(string.punctuation)
_ALL_PUNCT = set(string.punctuation + _ZH_PUNCT)


def _cut(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return list(jieba.cut(text, cut_all=False))


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD)."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower case, Chinese and English punctuation and all whitespace removed."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ALL_PUNCT).split())


def _f1(pred: list[str], truth: list[str]) -> float:
    same = sum((Counter(pred) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: object) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    pred = [t for t in (normalize_zh_answer(w) for w in _cut(prediction)) if t]
    truth = [t for t in (normalize_zh_answer(w) for w in _cut(ground_truth)) if t]
    return _f1(pred, truth)


def rouge_score(prediction: str, ground_truth: str, **_: object) -> float:
    """ROUGE-L F from the `rouge` package, as LongBench uses it (0 when it cannot score,
    e.g. an empty prediction)."""
    from rouge import Rouge

    try:
        return float(Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"])
    except (ValueError, RecursionError, ZeroDivisionError):
        return 0.0


def rouge_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    return rouge_score(" ".join(_cut(prediction)), " ".join(_cut(ground_truth)))


def classification_score(prediction: str, ground_truth: str,
                         all_classes: list[str] | None = None, **_: object) -> float:
    """Classes named in the prediction, minus those that are only part of the true
    class's name; 1/len(matches) when the true class is among them, else 0. (The
    official code's similarity fallback never runs, so none is applied here either.)"""
    matches = [c for c in all_classes or [] if c in prediction]
    matches = [c for c in matches if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _count_of(number: str, prediction: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == number for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, ground_truth: str, **_: object) -> float:
    return _count_of(str(ground_truth), prediction)


def retrieval_score(prediction: str, ground_truth: str, **_: object) -> float:
    return _count_of(re.findall(r"Paragraph (\d+)", ground_truth)[0], prediction)


def retrieval_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    return _count_of(re.findall(r"段落(\d+)", ground_truth)[0], prediction)


def code_sim_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Similarity (Levenshtein-based ratio, rounded to a percent as fuzzywuzzy does) of
    the first line of the prediction that is not a comment or a code fence."""
    from rapidfuzz import fuzz

    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return round(fuzz.ratio(line, ground_truth)) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score, "qa_f1_zh": qa_f1_zh_score, "rouge": rouge_score,
    "rouge_zh": rouge_zh_score, "classification": classification_score,
    "count": count_score, "retrieval": retrieval_score, "retrieval_zh": retrieval_zh_score,
    "code_sim": code_sim_score,
}


def score_sample(metric: str, prediction: str, answers: list[str],
                 all_classes: list[str] | None = None, first_line: bool = False) -> float:
    """Best score over the reference answers; `first_line` keeps only the reply's first
    line (trec, triviaqa, samsum, lsht in the official evaluation)."""
    if first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = METRICS[metric]
    return max((fn(prediction, answer, all_classes=all_classes) for answer in answers),
               default=0.0)
