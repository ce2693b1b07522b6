"""From a recipe to a ready stock Trainer: the checks before any work, then tokenizer, data, model
and Trainer. finetune and validate both start here, so they refuse the same recipes and train
the same thing."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from .. import __version__, data, generate, hub, model, progress
from ..config import Recipe
from ..errors import UserError
from . import callbacks, fused_loss, precision, rundir
from . import preference as preference_stage
from .config import PreferenceConfig


@dataclass
class Built:
    """What a recipe builds before training."""

    tok: PreTrainedTokenizerBase
    corpus: data.Corpus | data.MixedCorpus
    prepared: data.Prepared | data.Mixture | data.PreparedPairs
    lm: PreTrainedModel
    preference: PreferenceConfig | None = None
    """Set for a preference run (data.format preference): its section."""
    reference: dict | None = None
    """A preference run's reference model and the cache of its log-probabilities."""


def preflight(recipe: Recipe) -> str | None:
    """The checks that stop a run before any work (finetune and validate make the same ones).
    Returns the checkpoint to resume from, if any."""
    args = recipe.train
    output_dir = Path(args.output_dir)
    resume = rundir.resolve_resume(
        args.resume_from_checkpoint, output_dir, not args.save_only_model, args.process_index == 0
    )
    rundir.check_output_dir(output_dir, resume is not None, args.overwrite_output_dir, args.process_index == 0)
    model.check_source(recipe.model.name_or_path)
    if not recipe.model.from_scratch:
        model.pretrained_overrides(recipe.model)  # a dropout the architecture lacks
    if recipe.peft.lora:
        check_lora(recipe)
    check_cache(recipe)
    generate.read_prompts(recipe.generate)  # a missing or empty prompts file, before hours of training
    if "tensorboard" in args.report_to and not callbacks.tensorboard_available():
        raise UserError(
            "train.report_to includes tensorboard, which is not installed: pip install tensorboard, or set "
            "train.report_to none"
        )
    hub.check_push(args)
    return resume


def check_cache(recipe: Recipe) -> None:
    """train.use_cache with isolated packing: refused. The examples of a row are kept apart by
    position ids that restart, which transformers turns into a block-diagonal mask only without
    a KV cache; with one they silently see each other. Refused rather than turned off: a cache
    does nothing for a training step, so the setting can only be a mistake, and a recipe that
    says one thing while the run does another is worse than a one-line error."""
    if getattr(recipe.train, "use_cache", False) and data.open_corpus(recipe.data).packing == "isolated":
        raise UserError(
            "train.use_cache true lets the examples packed into a row see each other (data.packing isolated keeps "
            "them apart only without a KV cache): drop train.use_cache, or set data.packing padded"
        )


def check_lora(recipe: Recipe) -> None:
    """LoRA's own checks: peft installed, the target modules in the model, and no FSDP."""
    if uses_fsdp(recipe.train):
        raise UserError(
            "peft.method=lora under FSDP (launch/fsdp.yaml) has not been run here: LoRA's training state is small, "
            "so use data parallel instead (launch/multi_gpu.yaml)"
        )
    model.check_lora_recipe(recipe.peft, recipe.model)


def uses_fsdp(args: TrainingArguments) -> bool:
    """FSDP from the recipe (train.fsdp) or from accelerate launch's config."""
    return bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def build(recipe: Recipe) -> Built:
    """Tokenizer, prepared data and model. Under several processes the first one of each
    machine prepares the data while the others wait, then read what it wrote."""
    corpus = data.open_corpus(recipe.data)  # one source, or a mixture: one tokenizer for all
    preference_stage.check_data(recipe, corpus)
    with recipe.train.main_process_first(desc="preprocessing"):
        tok = model.build_tokenizer(recipe.tokenizer, recipe.model, corpus)
        if preference_stage.is_pairs(corpus):
            preference_stage.check_reference(recipe.preference, tok)
        prepared = data.prepare(corpus, tok, model.fingerprint(tok))
    lm = model.build_model(recipe.model, tok, recipe.data.block_size)
    # The template the conversations were rendered with is the tokenizer's (build_tokenizer set it).
    ends = data.end_of_turn_ids(tok, tok.chat_template) if corpus.uses_template else []
    model.set_generation(lm, tok, ends, corpus.prompt_context, recipe.generate.settings())
    tok.model_max_length = model.context_length(lm)  # saved with the run: pipelines read it
    built = Built(tok, corpus, prepared, lm)
    if getattr(prepared, "pairs", False):
        # Before LoRA's adapters: the reference is these weights.
        built.preference, built.reference = recipe.preference, preference_stage.prepare(recipe, built)
    if recipe.peft.lora:
        built.lm = model.wrap_lora(lm, recipe.peft, recipe.model.name_or_path)
    return built


def make_trainer(built: Built, args: TrainingArguments) -> Trainer:
    """A stock Trainer over the prepared data, with the training loss fused when asked and, on a
    CPU, the precision the run's own step measured faster (precision.py)."""
    args.disable_tqdm = progress.mode() != "bars"  # the progress display is callbacks.install's
    if built.preference is not None:  # its loss reads the logits (no fused loss), its batch is pairs (no probe)
        return preference_stage.make_trainer(built, args)
    fused = fuse_loss(built, args)
    prepared = built.prepared
    if prepared.packing == "padded":
        # Batches of similar lengths: the examples come grouped, and the Trainer keeps their order.
        args.train_sampling_strategy = "sequential"
    collate = prepared.collate(
        built.tok.pad_token_id, "flash" in str(getattr(built.lm.config, "_attn_implementation", ""))
    )
    train = prepared.ordered(args.per_device_train_batch_size * args.world_size, args.seed)
    if getattr(args, "bf16_from_hardware", False):
        # Half a micro-batch: the probe then never holds more than a training step does.
        batch = precision.first_batch(train, collate, max(1, args.per_device_train_batch_size // 2))
        note = precision.choose(args, built.lm, batch, fused, built.corpus.cfg.cache_dir)
        if note:
            print(note, flush=True)
    # The training batches' real tokens, for the logged tokens/s (callbacks.RunMetrics).
    counted = callbacks.RealTokens(train, collate)
    return Trainer(
        model=built.lm,
        args=args,
        data_collator=counted.collate,
        train_dataset=counted.dataset,
        eval_dataset=prepared.eval_items,  # data.max_eval_tokens of the validation items
        processing_class=built.tok,
    )


def tokens_per_step(recipe: Recipe, built: Built) -> int:
    """Tokens a step holds: recipe.tokens_per_step, or for pairs their tokens on average."""
    if built.preference is None:
        return recipe.tokens_per_step
    return round(recipe.effective_batch_size * preference_stage.tokens_per_pair(built.prepared.train))


def fuse_loss(built: Built, args: TrainingArguments) -> str | None:
    """train.fused_loss applied to the model; the kernel its training loss runs through, or None."""
    setting = getattr(args, "fused_loss", False)
    # With LoRA the adapters sit inside the base model, whose forward the fused loss replaces.
    target = built.lm.get_base_model() if model.is_peft(built.lm) else built.lm
    if setting is not False:
        # Evaluation keeps the loss alone (prediction_loss_only): no logits there either.
        rows = args.per_device_train_batch_size * built.corpus.cfg.block_size
        note = fused_loss.setup(target, setting, args.device, evaluation=args.prediction_loss_only, rows=rows)
        if note:
            print(note, flush=True)
    return fused_loss.installed(target)


def run_info(recipe: Recipe, built: Built) -> dict:
    """What run_info.json records: versions, device, precision, parameters and the batch."""
    args, lm = recipe.train, built.lm
    pairs = {"batch_unit": "pairs", **built.reference} if built.preference is not None else {}
    return {
        "hftextgen": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(args.device),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        **({"precision_probe": args.precision_probe} if getattr(args, "precision_probe", None) else {}),
        "parameters": lm.num_parameters(),
        "trainable_parameters": model.lora_parameters(lm)[0],
        "per_device_batch_size": args.per_device_train_batch_size,
        "processes": args.world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "effective_batch_size": recipe.effective_batch_size,
        "tokens_per_step": tokens_per_step(recipe, built),
        "data_cache": str(built.prepared.cache_path),
        **pairs,
    }


def describe_batch(info: dict) -> str:
    """The batch line of finetune and validate, from run_info's batch fields."""
    return (
        f"batch: {info['effective_batch_size']} {info.get('batch_unit', 'blocks')} = {info['per_device_batch_size']} "
        f"per device x "
        f"{info['processes']} processes x {info['gradient_accumulation_steps']} accumulation "
        f"({info['tokens_per_step']:,} tokens per step)"
    )
