"""The generate stage: decoding presets, batched, seeded and streamed generation, and GPT-2's static decoder.

The rest of the house uses only the names below; the modules behind them are the stage's own.
"""

from .. import stage_exports

_EXPORTS = {
    "Generator": "generator",
    "read_prompts": "generator",
    "samples_markdown": "generator",
    "write_samples": "generator",
}
__all__ = sorted(_EXPORTS)
__getattr__ = stage_exports(__name__, _EXPORTS)
