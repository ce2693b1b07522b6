"""The evaluate stage: exact perplexity, bits-per-byte and word perplexity of documents, and samples.

The rest of the house uses only the names below; the modules behind them are the stage's own.
"""

from .. import stage_exports

_EXPORTS = {
    "EvaluateConfig": "config",
    "evaluate_prepared": "evaluator",
    "evaluate_documents": "run",
    "evaluate_answers": "answers",
    "answer_examples": "answers",
    "score_answers": "answers",
    "score": "run",
    "scoring_settings": "run",
    "windows": "run",
    "evaluate_pairs": "preference",
    "pairs_markdown": "preference",
    "score_pairs": "preference",
    "sequence_logps": "preference",
}
__all__ = sorted(_EXPORTS)
__getattr__ = stage_exports(__name__, _EXPORTS)
