"""The data stage: read a corpus (plays, files, hub datasets), split it, tokenize it into cached token shards;
a mixture of several, drawn by weight; preference pairs.

The rest of the house uses only the names below; the modules behind them are the stage's own.
"""

from .. import stage_exports

_EXPORTS = {
    "DataConfig": "config",
    "MixtureSource": "config",
    "Corpus": "corpus",
    "Prepared": "prepared",
    "prepare": "prepared",
    "describe_report": "report",
    "packing_line": "report",
    "report_table": "report",
    "Mixture": "mixture",
    "MixedCorpus": "mixture",
    "open_corpus": "mixture",
    "expand_paths": "sources",
    "play_to_text": "sources",
    "shakespeare_files": "sources",
    "EvalDocuments": "shards",
    "real_tokens": "packing",
    "SAFE_CUT": "preparation",
    "build_encoder": "encoders",
    "count_words": "preparation",
    "ExampleEncoder": "tasks",
    "DEFAULT_CHAT_TEMPLATE": "templates",
    "check_template": "templates",
    "end_of_turn_ids": "templates",
    "resolve_template": "templates",
    "special_tokens": "templates",
    "PairCollator": "pairs",
    "PairTargets": "pairs",
    "PreparedPairs": "pairs",
    "PairEncoder": "preference",
}
__all__ = sorted(_EXPORTS)
__getattr__ = stage_exports(__name__, _EXPORTS)
