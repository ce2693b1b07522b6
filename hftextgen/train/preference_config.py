"""The `preference` recipe section: which preference objective trains on pairs (data.format preference), and its knobs.

A section of its own beside the train stage it configures, importing nothing heavy (parsing a
recipe must not load torch). Checks that involve this section alone live here; those that need
the model or data sections live in config.Recipe, and those that need the data itself in
train/preference.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

OBJECTIVES = ("dpo", "ipo", "simpo", "orpo")
# Objectives whose reward is measured against a frozen reference model (the starting model).
REFERENCE_BASED = ("dpo", "ipo")
# beta when unset: TRL's DPOConfig (0.1, DPO's and IPO's tau), the SimPO paper's 2.0 (Meng et
# al. 2024, its recommended range 2.0-2.5; TRL's CPOConfig keeps 0.1 for every loss), ORPO's
# lambda of 0.1 (Hong et al. 2024, and TRL's ORPOConfig).
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}
# SimPO's target margin gamma when unset: gamma / beta = 0.5, the SimPO paper's default ratio.
SIMPO_GAMMA_RATIO = 0.5


@dataclass
class PreferenceConfig:
    """Preference tuning: with pairs of answers to the same prompt, one chosen and one rejected
    (data.format preference), the model learns to prefer the chosen one. Every field is TRL's
    name for it, so TRL recipes translate key for key."""

    loss_type: Literal["dpo", "ipo", "simpo", "orpo"] | None = None
    """The objective. dpo: Direct Preference Optimization (TRL's loss_type sigmoid): the log-odds
    that the chosen answer gains more log-probability over the reference model than the rejected
    one. ipo: its squared, length-normalised form (Azar et al. 2023). Both measure against the
    reference, the starting model frozen, whose log-probabilities of every pair are computed once
    before training and cached with the data. simpo: reference-free, the answers' mean
    log-probability per token with a target margin (simpo_gamma). orpo: reference-free, the
    odds ratio of the answers' mean token probabilities plus the language-model loss on the
    chosen sequence (prompt and answer, as TRL computes it). Unset: dpo for preference data."""

    beta: float | None = None
    """The objective's temperature: DPO's and SimPO's beta, IPO's tau, ORPO's lambda (the weight
    of the odds-ratio term). Unset: 0.1 (dpo, ipo, orpo, as TRL and the papers), 2.0 (simpo, the
    SimPO paper). More than 0."""

    simpo_gamma: float | None = None
    """SimPO's target reward margin, in reward units. Unset: 0.5 x beta (the SimPO paper's ratio)."""

    ref_model: str | None = None
    """The reference model of dpo and ipo (a local folder or hub name), when it is not the
    starting model: e.g. the supervised model a LoRA run's base was tuned from. It must use the
    model's tokenizer. Unset: the starting model (model.name_or_path; with LoRA, the base model
    without the adapter)."""

    max_train_pairs: int | None = None
    """Train on a seeded subset of at most this many training pairs (data.split_seed), the same
    every run: the reference's log-probabilities are then computed for those only. Unset: all."""

    def __post_init__(self) -> None:
        if self.beta is not None and not self.beta > 0:
            raise ConfigError(
                f"preference.beta must be > 0 (got {self.beta}): it scales the reward, and at 0 or below the "
                "objective prefers nothing or the rejected answer"
            )
        if self.simpo_gamma is not None and self.loss_type not in (None, "simpo"):
            raise ConfigError(
                f"preference.simpo_gamma is SimPO's margin, and preference.loss_type is {self.loss_type}: drop it, "
                "or set preference.loss_type simpo"
            )
        if self.ref_model is not None and self.objective not in REFERENCE_BASED:
            raise ConfigError(
                f"preference.ref_model is the reference of dpo and ipo, and {self.objective} has none: drop it"
            )
        if self.max_train_pairs is not None and self.max_train_pairs < 1:
            raise ConfigError(f"preference.max_train_pairs must be >= 1 (got {self.max_train_pairs})")

    @property
    def objective(self) -> str:
        """loss_type, dpo when unset."""
        return self.loss_type or "dpo"

    @property
    def reference_based(self) -> bool:
        return self.objective in REFERENCE_BASED

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.objective]

    @property
    def gamma_value(self) -> float:
        """SimPO's margin (0 for the other objectives)."""
        if self.objective != "simpo":
            return 0.0
        return self.simpo_gamma if self.simpo_gamma is not None else SIMPO_GAMMA_RATIO * self.beta_value
