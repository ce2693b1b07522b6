"""Diversity of generated texts: distinct-n and the share of repeated 4-grams.

An `evaluate` module kept in the package and loaded by path, so it works offline. Words are
whitespace-separated, so the numbers do not depend on the tokenizer.

distinct-n (Li et al., 2016): distinct n-grams / all n-grams, pooled over the samples.
repeated_4grams: of all 4-grams, the share that already occurred earlier in the same sample;
repetition loops, GPT-2's most common failure, push it towards 1.
"""

import datasets
import evaluate

_DESCRIPTION = "distinct-1/2/3 and the fraction of repeated 4-grams of generated texts."
_KWARGS_DESCRIPTION = """
Args:
    predictions: the generated texts.
Returns:
    distinct_1, distinct_2, distinct_3, repeated_4grams, samples, words.
"""


def ngrams(words, n):
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


class Diversity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions):
        texts = [p.split() for p in predictions]
        result = {"samples": len(texts), "words": sum(len(t) for t in texts)}
        for n in (1, 2, 3):
            grams = [g for t in texts for g in ngrams(t, n)]
            result[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
        repeated = total = 0
        for t in texts:
            grams = ngrams(t, 4)
            total += len(grams)
            repeated += len(grams) - len(set(grams))
        result["repeated_4grams"] = repeated / total if total else 0.0
        return result
