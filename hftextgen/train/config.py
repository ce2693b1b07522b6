"""The train section of a recipe: TrainArguments, every transformers.TrainingArguments field with
hftextgen's defaults declared as field defaults (so `TrainArguments()` in Python and `hftextgen
finetune` agree) and a few fields of hftextgen's own, with their checks; and the preference
section (PreferenceConfig), the objective a preference run trains with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SchedulerType

from .. import runtime
from ..errors import ConfigError, require


def _default(name: str, value):
    """TrainingArguments field `name` with hftextgen's default, its help text kept (--help)."""
    return field(default=value, metadata=TrainingArguments.__dataclass_fields__[name].metadata)


@dataclass
class TrainArguments(TrainingArguments):
    """Training: every transformers.TrainingArguments field, with hftextgen's defaults.

    The subclass earns its place with a few fields: bf16 defaults to "where the hardware runs it
    natively", so one recipe is fast on a CPU and on a GPU without edits; dataloader_drop_last
    follows torch_compile (an incomplete batch would recompile the model); overwrite_output_dir
    and on_nan are hftextgen's (see rundir.py and guards.py), and logging_nan_inf_filter follows on_nan. It
    also rejects values TrainingArguments lets through (a learning rate or batch size <= 0).
    """

    # hftextgen's defaults for TrainingArguments fields: what a GPT-2 language-model run wants,
    # where HF's defaults are generic. A recipe or --train.x overrides any of them. (A
    # field declared again keeps its place among TrainingArguments' fields.)
    output_dir: str | None = _default("output_dir", "runs/default")
    learning_rate: float = _default("learning_rate", 6e-4)
    lr_scheduler_type: SchedulerType | str = _default("lr_scheduler_type", "cosine")
    warmup_steps: float = _default("warmup_steps", 0.05)
    weight_decay: float = _default("weight_decay", 0.1)
    adam_beta2: float = _default("adam_beta2", 0.95)
    eval_strategy: IntervalStrategy | str = _default("eval_strategy", "steps")
    eval_steps: float | None = _default("eval_steps", 500)
    save_steps: float = _default("save_steps", 500)
    save_total_limit: int | None = _default("save_total_limit", 3)
    logging_steps: float = _default("logging_steps", 10)
    logging_first_step: bool = _default("logging_first_step", True)
    # Else evaluation gathers every logit: GBs for a 50k vocabulary.
    prediction_loss_only: bool = _default("prediction_loss_only", True)
    # TensorBoard events in <output_dir>/tensorboard (`tensorboard --logdir runs/`); any other
    # reporter (wandb, mlflow, ...) or "none" replaces it.
    report_to: None | str | list[str] = _default("report_to", "tensorboard")
    # Several processes (accelerate launch): GPT-2 uses every parameter in every step, so DDP's
    # search for unused ones only costs time; and every process runs the same code, so only the
    # first one logs warnings (the others would repeat them once per process).
    ddp_find_unused_parameters: bool | None = _default("ddp_find_unused_parameters", False)
    log_level_replica: str = _default("log_level_replica", "error")
    log_on_each_node: bool = _default("log_on_each_node", False)

    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Unset: on when the hardware runs bf16 natively (CUDA "
            "GPUs with bf16, CPUs with AVX512-BF16 or AMX), off elsewhere."
        },
    )
    fused_loss: bool | Literal["auto", "liger"] = field(
        default="auto",
        metadata={
            "help": "Compute the training loss with the output layer and cross-entropy fused, a chunk of rows "
            "at a time, never holding the batch x block x vocabulary logits (hftextgen/train/fused_loss.py): "
            "the same loss in far less memory, for any model whose head is a plain linear layer (others keep "
            "their own, said once). auto: on when training on a CPU with more than 64 MiB of fp32 logits a "
            "micro-batch (there the stock loss's copies of them are most of a step's memory: "
            "bench/RESULTS.md); off on a GPU. liger: liger-kernel's Triton kernel, where that package and a "
            "CUDA GPU are there. Under train.torch_compile it runs outside the compiled graph."
        },
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an output_dir that holds an earlier run: its files are deleted once "
            "the new run has its data and model ready (a mistake in the recipe deletes nothing). Only a "
            "folder that looks like a run (recipe.yaml, run_info.json, trainer_state.json or checkpoint-N "
            "inside) is ever deleted."
        },
    )

    on_nan: Literal["stop", "skip"] = field(
        default="stop",
        metadata={
            "help": "What a NaN or infinite loss or gradient does. stop: end the run with a message naming "
            "the step and the likely cause; every checkpoint saved before it is good. skip: drop that step's "
            "update (weights and optimizer state unchanged, the schedule moves on) and go on, stopping after "
            "10 such steps in a row. stop checks at each logging step and before each evaluation and "
            "checkpoint; skip checks every step (one device-to-host sync each)."
        },
    )

    logging_nan_inf_filter: bool | None = field(
        default=None,
        metadata={
            "help": "Log a NaN or infinite loss as the average of the other losses. Unset: on with "
            "on_nan=skip (a skipped step does not spoil the logged mean), off otherwise (a NaN shows as NaN)."
        },
    )

    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop training once this many held-out evaluations in a row have not improved on the best one "
            "(metric_for_best_model, the held-out loss by default), with the stock EarlyStoppingCallback; the best "
            "checkpoint then becomes the final model (load_best_model_at_end is turned on). Needs held-out "
            "evaluation (eval_strategy steps or epoch) and a checkpoint at every evaluation (save_steps a "
            "multiple of eval_steps). Unset: train to the end."
        },
    )

    dataloader_drop_last: bool | None = field(
        default=None,
        metadata={
            "help": "Drop each epoch's last, incomplete batch. Unset: on under train.torch_compile, where a batch "
            "of another size recompiles the model (tens of seconds on a GPU, then a graph for any batch size), "
            "off otherwise. The blocks it drops change from epoch to epoch (the order is reshuffled)."
        },
    )

    early_stopping_threshold: float = field(
        default=0.0,
        metadata={
            "help": "How much better than the best so far an evaluation must be to count as an improvement "
            "(early_stopping_patience), in the metric's units (nats for the loss)."
        },
    )

    def __post_init__(self) -> None:
        require(self.learning_rate > 0, f"train.learning_rate must be > 0 (got {self.learning_rate})")
        require(
            not (
                self.overwrite_output_dir and str(self.resume_from_checkpoint or "").lower() not in ("", "false", "no")
            ),
            "train.overwrite_output_dir deletes the run that train.resume_from_checkpoint would continue: drop one",
        )
        if self.logging_nan_inf_filter is None:
            self.logging_nan_inf_filter = self.on_nan == "skip"
        if self.dataloader_drop_last is None:
            self.dataloader_drop_last = bool(self.torch_compile)
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            require(getattr(self, key) >= 1, f"train.{key} must be >= 1 (got {getattr(self, key)})")
        self._early_stopping()
        renamed = hasattr(self, "activation_checkpointing") and self.activation_checkpointing is None
        if renamed and self.gradient_checkpointing is not None:
            # The name every tutorial uses; later transformers 5 releases call it activation_checkpointing
            # and warn about the old name when only that one is set.
            self.activation_checkpointing = self.gradient_checkpointing
        runtime.settle_training_device(self)  # bf16 unset, use_cpu: the hardware's say
        super().__post_init__()

    def _early_stopping(self) -> None:
        """What EarlyStoppingCallback needs, set or said in one line before any work."""
        if self.early_stopping_patience is None:
            require(
                self.early_stopping_threshold == 0.0,
                "train.early_stopping_threshold is only read with train.early_stopping_patience: set that too",
            )
            return
        require(
            self.early_stopping_patience >= 1,
            f"train.early_stopping_patience must be >= 1 (got {self.early_stopping_patience})",
        )
        evaluation = str(getattr(self.eval_strategy, "value", self.eval_strategy))
        saving = str(getattr(self.save_strategy, "value", self.save_strategy))
        require(
            evaluation != "no",
            "train.early_stopping_patience watches held-out evaluations, and train.eval_strategy is no: set it to "
            "steps (or epoch)",
        )
        require(
            saving in (evaluation, "best"),
            f"train.early_stopping_patience keeps the best checkpoint, so checkpoints must follow the evaluations: "
            f"set train.save_strategy {evaluation} (it is {saving})",
        )
        eval_steps = self.eval_steps or self.logging_steps
        if evaluation == "steps" and saving == "steps" and eval_steps >= 1 and self.save_steps >= 1:
            require(
                self.save_steps % eval_steps == 0,
                f"train.early_stopping_patience keeps the best checkpoint, which needs a checkpoint at evaluation "
                f"steps: make train.save_steps ({self.save_steps:g}) a multiple of train.eval_steps ({eval_steps:g})",
            )
        self.load_best_model_at_end = True


# ---------------------------------------------------------------- the preference section

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
