"""Token-weighted perplexity, bits-per-byte and word perplexity from per-document NLL sums.

An `evaluate` module kept in the package and loaded by path (`evaluate.load(<this folder>)`), so
it works offline. The model scoring happens in hftextgen.evaluate; this module owns the
arithmetic peers get wrong: every total is a sum over tokens (never a mean of per-batch means),
and bits-per-byte divides by the UTF-8 bytes of the text, which makes models with different
tokenizers comparable. The caller counts each document's bytes and words (from its text, or
from the prepared data's document table, which counted them from the text).
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Perplexity, bits-per-byte and word perplexity of documents from their summed NLL."
_KWARGS_DESCRIPTION = """
Args:
    nll: per document, the summed negative log-likelihood of its scored tokens, in nats.
    tokens: per document, how many tokens were scored.
    bytes: per document, the UTF-8 bytes of the text that was scored.
    words: per document, its whitespace-separated words (len(text.split())).
Returns:
    loss (nats per token), perplexity, bits_per_byte, word_perplexity, and the totals behind
    them: tokens, bytes, words, nll.
"""


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "nll": datasets.Value("float64"),
                    "tokens": datasets.Value("int64"),
                    "bytes": datasets.Value("int64"),
                    "words": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, nll, tokens, bytes, words):  # noqa: A002  (the input's name)
        total = math.fsum(nll)
        n_tokens = sum(tokens)
        n_bytes = sum(bytes)
        n_words = sum(words)

        def exp(x):
            return math.exp(x) if x < 700 else math.inf

        return {
            "loss": total / n_tokens if n_tokens else math.nan,
            "perplexity": exp(total / n_tokens) if n_tokens else math.nan,
            "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else math.nan,
            "word_perplexity": exp(total / n_words) if n_words else math.nan,
            "nll": total,
            "tokens": n_tokens,
            "bytes": n_bytes,
            "words": n_words,
        }
