"""The whole recipe: one section a stage, each section's dataclass beside its stage (data/config.py,
model/config.py, train/config.py, generate/config.py, evaluate/config.py), and the checks that
span sections.

jsonargparse turns the sections into the YAML sections, the ``--section.key`` options and
``--help``. A check that involves one section lives in that section's ``__post_init__``; checks
across sections live in ``Recipe.__post_init__``; checks that need the tokenizer or a loaded
model live where those are built. Every check raises ``ConfigError`` naming the key and the fix.
A new section is a dataclass beside its stage and a field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .data import DataConfig
from .errors import require
from .evaluate import EvaluateConfig
from .generate import GenerateConfig
from .model import ModelConfig, PeftConfig, TokenizerConfig
from .train import PreferenceConfig, TrainArguments


@dataclass
class Recipe:
    """A whole run: the sections, with the checks that span them."""

    model: ModelConfig
    tokenizer: TokenizerConfig
    data: DataConfig
    train: TrainArguments
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    def __post_init__(self) -> None:
        self._check_preference()
        if self.peft.lora:
            require(
                not self.model.from_scratch,
                "peft.method=lora freezes pretrained weights and trains small adapters beside them, but a model "
                "built from scratch has only random weights to freeze: set model.name_or_path to a pretrained "
                "model, or drop peft.method to train every weight",
            )
        if self.tokenizer.source == "train":
            require(
                self.model.from_scratch,
                "tokenizer.source=train makes new token ids that a pretrained model has never seen: "
                "use tokenizer.source=auto, or train the model from scratch (drop model.name_or_path)",
            )
        if self.tokenizer.source == "pretrained":
            require(
                self.tokenizer.name_or_path is not None or not self.model.from_scratch,
                "tokenizer.source=pretrained needs tokenizer.name_or_path (or a model.name_or_path to take it from)",
            )
        if self.model.n_positions is not None:
            require(
                self.data.block_size <= self.model.n_positions,
                f"data.block_size ({self.data.block_size}) is larger than model.n_positions "
                f"({self.model.n_positions}): lower data.block_size or raise model.n_positions",
            )

    def _check_preference(self) -> None:
        """What the preference section needs of the others, where the recipe says it (data.format
        auto is checked once the records are read: train/preference.py)."""
        pref, fmt = self.preference, self.data.format
        require(
            pref.loss_type is None or fmt in ("auto", "preference") or bool(self.data.mixture),
            f"preference.loss_type={pref.loss_type} trains on pairs of answers, and data.format is {fmt}: use "
            f"data.format preference (chosen and rejected answers), or drop preference.loss_type",
        )
        if fmt == "preference" or pref.loss_type is not None:
            require(
                not (pref.reference_based and self.model.from_scratch),
                f"preference.loss_type={pref.objective}{'' if pref.loss_type else ' (the default)'} measures the "
                f"model against a reference, the starting model: set model.name_or_path (e.g. a supervised run's "
                f"directory), or use a reference-free objective (preference.loss_type simpo or orpo)",
            )

    @property
    def effective_batch_size(self) -> int:
        """Rows (blocks, packed rows or examples: data.packing) per optimizer step, over every process."""
        args = self.train
        return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps

    @property
    def tokens_per_step(self) -> int:
        """Tokens a step holds: exactly, for concat packing (blocks are never padded); at most, for
        isolated rows and padded examples (the data report says how full they are)."""
        return self.effective_batch_size * self.data.block_size
