"""The generate section of a recipe: GenerateConfig (prompts and decoding settings) and the named
presets, with their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import require

# Named decoding settings; a recipe picks one with generate.preset and overrides any field.
PRESETS: dict[str, dict] = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "beam": {"do_sample": False, "num_beams": 4, "no_repeat_ngram_size": 3},
    "precise": {"do_sample": True, "temperature": 0.5, "top_k": 0, "top_p": 0.9, "repetition_penalty": 1.1},
    "balanced": {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95},
    "creative": {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 0.98},
}
# What a preset leaves unset: no filtering and no penalties.
NEUTRAL = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "typical_p": 1.0,
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
}
# The values each decoding setting takes: the check, and how the error says it.
LIMITS = {
    "temperature": (lambda v: v > 0, "> 0"),
    "top_k": (lambda v: v >= 0, ">= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "typical_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "num_beams": (lambda v: v >= 1, ">= 1"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
    "no_repeat_ngram_size": (lambda v: v >= 0, ">= 0"),
}


@dataclass
class GenerateConfig:
    """Generation: prompts and decoding settings, for `hftextgen generate`, evaluation samples and
    the samples written during training. Unset decoding fields take the preset's value."""

    preset: Literal["greedy", "beam", "precise", "balanced", "creative"] = "balanced"
    """Named decoding settings. greedy: the most likely token. beam: 4 beams, no repeated
    3-grams. precise: temperature 0.5, top_p 0.9, repetition_penalty 1.1. balanced: temperature
    0.8, top_k 50, top_p 0.95. creative: temperature 1.0, top_p 0.98."""

    prompts: list[str] = field(default_factory=list)
    """Prompts to continue. An empty string starts a new document from nothing. Unset: one
    unconditional sample."""

    prompts_file: str | None = None
    """A file of prompts, used instead of `prompts`: .jsonl (a "prompt" field per line) or text
    (one prompt per non-empty line)."""

    max_new_tokens: int = 128
    """Tokens to generate per sample. A model with a short context keeps generating by sliding
    its window over the text so far."""

    do_sample: bool | None = None
    """Sample from the distribution (true) or pick the most likely tokens (false)."""

    temperature: float | None = None
    """Divides the logits before sampling: below 1 sharper, above 1 flatter. Must be > 0."""

    top_k: int | None = None
    """Sample among the k most likely tokens only; 0 turns the filter off."""

    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1 turns it off."""

    typical_p: float | None = None
    """Locally typical sampling mass; 1 turns it off."""

    num_beams: int | None = None
    """Beam search width; 1 turns beam search off. Beam search does not sample."""

    repetition_penalty: float | None = None
    """Divides the logits of tokens already in the text (CTRL); 1 turns it off."""

    no_repeat_ngram_size: int | None = None
    """Never repeat an n-gram of this many tokens; 0 turns it off."""

    stop: list[str] = field(default_factory=list)
    """Strings that end a sample; the sample is cut before the first one. EOS always ends a sample."""

    num_return_sequences: int = 1
    """Samples per prompt (sampling or beam search)."""

    seed: int = 1234
    """Seed of the first sample; sample i uses seed + i, and is reproducible alone with that seed."""

    batch_size: int = 16
    """Prompts generated together (left-padded)."""

    cache: Literal["dynamic", "static"] = "dynamic"
    """KV cache. static: preallocated key/value buffers; a GPT-2 decodes through
    hftextgen/generate/static.py, each step replayed as one CUDA graph on a GPU; other models use
    transformers' static cache (compiled on a GPU). Same text either way."""

    def __post_init__(self) -> None:
        for key, (ok, valid) in LIMITS.items():
            value = getattr(self, key)
            require(value is None or ok(value), f"generate.{key} must be {valid} (got {value})")
        for key in ("max_new_tokens", "num_return_sequences", "batch_size"):
            require(getattr(self, key) >= 1, f"generate.{key} must be >= 1 (got {getattr(self, key)})")
        require(all(self.stop), "generate.stop: an empty stop string would end every sample at once: remove it")
        settings = self.settings()
        if settings["num_beams"] > 1:
            require(
                not settings["do_sample"],
                "generate: beam search (num_beams > 1) does not sample: set generate.do_sample false, "
                "or generate.num_beams 1",
            )
            require(
                self.num_return_sequences <= settings["num_beams"],
                f"generate.num_return_sequences ({self.num_return_sequences}) must be <= generate.num_beams "
                f"({settings['num_beams']})",
            )
        elif not settings["do_sample"]:
            require(
                self.num_return_sequences == 1,
                "generate.num_return_sequences > 1 with greedy decoding gives the same text each time: "
                "pick a sampling preset (balanced, creative, precise) or set generate.do_sample true",
            )

    def settings(self) -> dict:
        """The decoding settings in effect: neutral values, then the preset, then the set fields."""
        chosen = {**NEUTRAL, **PRESETS[self.preset]}
        for key in NEUTRAL:
            if getattr(self, key) is not None:
                chosen[key] = getattr(self, key)
        return chosen
