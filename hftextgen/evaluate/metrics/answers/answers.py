"""Exact match and token-overlap F1 of generated answers against reference answers, as SQuAD
defines them (Rajpurkar et al., 2016; the official evaluation script).

An `evaluate` module kept in the package and loaded by path, so it works offline: the hub's
"squad" metric needs a download, and wants SQuAD's id/answers records besides.

Both texts are normalized first: lowercased, ASCII punctuation removed, the articles a / an / the
removed, whitespace collapsed. exact match: 1 if the normalized texts are equal. F1: over the bags
of the normalized words, 2 * precision * recall / (precision + recall), where the overlap counts a
word as often as it occurs in both. When either text normalizes to no words, F1 is 1 if both do,
else 0 (SQuAD 2.0's rule; 1.1's script gave 0 even when both were empty, disagreeing with its own
exact match). Totals are means over the answers, in percent as SQuAD reports them; the per-answer
scores are kept as fractions for the samples.
"""

import re
import string
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "SQuAD's exact match and token-overlap F1 of predicted answers against one reference each."
_KWARGS_DESCRIPTION = """
Args:
    predictions: the generated answers.
    references: the reference answers, one per prediction.
Returns:
    exact_match, f1: means over the answers, in percent (0-100).
    answers: how many answers they cover.
    exact_match_each, f1_each: per answer, in [0, 1].
"""

PUNCTUATION = set(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD's normalize_answer: lower, punctuation out, articles out, whitespace collapsed (in
    that order: "the." loses its dot first and then its article)."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def f1(prediction: str, reference: str) -> float:
    predicted, wanted = normalize(prediction).split(), normalize(reference).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    same = sum((Counter(predicted) & Counter(wanted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


class Answers(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        em = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
        f = [f1(p, r) for p, r in zip(predictions, references, strict=True)]
        n = len(em)
        return {
            "exact_match": 100 * sum(em) / n if n else 0.0,
            "f1": 100 * sum(f) / n if n else 0.0,
            "answers": n,
            "exact_match_each": em,
            "f1_each": f,
        }
