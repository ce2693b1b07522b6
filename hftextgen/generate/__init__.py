"""The generate stage: presets, batched, seeded and streamed generation, chat through a template, a static decoder.

The rest of the house uses only the names below; the modules behind them are the stage's own.
"""

from .. import stage_exports

_EXPORTS = {
    "GenerateConfig": "config",
    "Generator": "generator",
    "end_ids": "generator",
    "read_prompts": "generator",
    "samples_markdown": "generator",
    "write_samples": "generator",
    "converse": "chat",
    "SeededGumbel": "sampling",
    "UNSAMPLED": "sampling",
    "warpers": "sampling",
    "answer_file": "chat",
}
__all__ = sorted(_EXPORTS)
__getattr__ = stage_exports(__name__, _EXPORTS)
