"""The evaluate section of a recipe: EvaluateConfig (what is scored, how, and the samples), with its
checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import require


@dataclass
class EvaluateConfig:
    """Evaluation: perplexity and bits-per-byte on held-out text, and samples."""

    split: Literal["validation", "train", "all"] = "validation"
    """Documents of the data section to score: validation (the documents held out in training),
    train, or all."""

    stride: int | None = None
    """Documents longer than the context are scored with windows that advance by stride tokens:
    every token is scored once, with at least context - stride tokens before it. stride = context
    gives disjoint windows. Unset: half the context."""

    context: int | None = None
    """Window length in tokens. Unset: the model's context (n_positions)."""

    batch_size: int = 8
    """Windows scored together."""

    bf16: bool | None = None
    """Score in bf16 autocast. Unset: on for CUDA GPUs with bf16, off elsewhere (fp32 on CPU,
    so results compare exactly across runs)."""

    samples: bool = True
    """Write samples (generate section: prompts and preset) to samples.jsonl and samples.md.
    Task data: answers generated for held-out prompts, beside their references."""

    max_answers: int = 64
    """Task data: held-out prompts answered by generation (the generate section's preset, a
    seed each), scored by exact match and F1 against their reference answers: the first this
    many of the evaluated examples (0: none)."""

    at_end_of_training: bool = True
    """finetune: evaluate the final model on the validation documents and write samples."""

    sample_every: int = 0
    """finetune: every this many steps, print samples of the generate prompts and append them to
    training_samples.jsonl (0: never)."""

    output_dir: str | None = None
    """Where eval.json, eval.md and the samples go. Unset: the model's directory when it is a
    local one, else eval/<model name>."""

    def __post_init__(self) -> None:
        for key in ("stride", "context"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"evaluate.{key} must be >= 1 (got {value})")
        if self.stride is not None and self.context is not None:
            require(
                self.stride <= self.context,
                f"evaluate.stride ({self.stride}) must be <= evaluate.context ({self.context})",
            )
        require(self.batch_size >= 1, f"evaluate.batch_size must be >= 1 (got {self.batch_size})")
        require(self.sample_every >= 0, f"evaluate.sample_every must be >= 0 (got {self.sample_every})")
        require(self.max_answers >= 0, f"evaluate.max_answers must be >= 0 (got {self.max_answers})")
