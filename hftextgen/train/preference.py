"""Preference tuning's part in a run: its checks, the reference, the Trainer with its loss, the final evaluation.

A run is a preference run when its data holds pairs (data.format preference, or auto finding
chosen and rejected fields); the `preference` section picks the objective. Everything else is a
supervised run's: the recipe, the run directory, resume, LoRA, several processes, bf16, the
guards, the model card. The Trainer is the stock one, with the pairs' collator
(data.PairCollator) and the objective as its compute_loss_func (preference_loss.py). As TRL's
trainers do by default (disable_dropout), the model trains without dropout: the log-probabilities
the rewards compare would otherwise be noisy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, Trainer

from .. import data, evaluate, model
from ..config import Recipe
from ..errors import UserError
from . import callbacks, reference
from .config import PreferenceConfig
from .preference_loss import PreferenceLoss, PreferenceMetrics


def is_pairs(corpus) -> bool:
    """The data holds preference pairs (a mixture never does: check_data refuses one)."""
    return getattr(corpus, "format", None) == "preference"


def check_data(recipe: Recipe, corpus) -> None:
    """What needs the data's format (data.format auto reads the first record): one line before
    any work."""
    pref, cfg = recipe.preference, recipe.data
    sources = getattr(corpus, "corpora", None)
    if sources is not None:
        if any(is_pairs(c) for c in sources) or pref.loss_type:
            raise UserError(
                "data.mixture: preference pairs train on their own, not mixed with other data: give the pairs as "
                "data.paths (or data.dataset) without data.mixture"
            )
        return
    if not is_pairs(corpus):
        if pref.loss_type:
            raise UserError(
                f"preference.loss_type={pref.loss_type} trains on pairs of answers, and the data holds "
                f"{corpus.format} records: give records with chosen and rejected answers (data.format preference), "
                f"or drop preference.loss_type"
            )
        return
    for key in ("loss_on", "packing"):
        if getattr(cfg, key) is not None:
            raise UserError(
                f"data.{key}: preference pairs are scored on their answers, each sequence packed apart from the "
                f"others: drop data.{key}"
            )
    if pref.reference_based and recipe.model.from_scratch:
        raise UserError(
            f"preference.loss_type={pref.objective}{'' if pref.loss_type else ' (the default)'} measures the model "
            f"against a reference, the starting model, and this model is built from scratch: set model.name_or_path "
            f"(e.g. a supervised run's directory), or use a reference-free objective (preference.loss_type simpo or "
            f"orpo)"
        )


def check_reference(pref: PreferenceConfig, tok) -> None:
    """preference.ref_model exists and spells text as the model's tokenizer does."""
    if pref.ref_model is None:
        return
    model.check_source(pref.ref_model, "preference.ref_model")
    from transformers import AutoTokenizer

    from ..hub import load_from_hub

    theirs = load_from_hub(AutoTokenizer.from_pretrained, pref.ref_model, "tokenizer", "preference.ref_model")
    if theirs.get_vocab() != tok.get_vocab() or theirs.eos_token != tok.eos_token:
        raise UserError(
            f"preference.ref_model: {pref.ref_model}'s tokenizer is not the model's ({len(theirs):,} tokens against "
            f"{len(tok):,}, or other ids): the reference must score the same token ids; use a reference trained with "
            f"the model's tokenizer"
        )


def disable_dropout(lm: PreTrainedModel) -> None:
    """Every dropout layer off (TRL's disable_dropout, on by default for its preference trainers)."""
    for module in lm.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _precision(args) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def _load_reference(name: str, device) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    from ..hub import load_from_hub

    lm = load_from_hub(AutoModelForCausalLM.from_pretrained, name, "model", "preference.ref_model", dtype=torch.float32)
    return lm.to(device).eval()


def prepare(recipe: Recipe, built) -> dict:
    """Before the first step: the training pairs (preference.max_train_pairs), dropout off, and
    the reference's log-probabilities of the pairs the run uses, computed or found in the cache,
    put beside the pairs. Returns what run_info.json records of it."""
    pref, args, packed = recipe.preference, recipe.train, built.prepared
    packed.limit_train(pref.max_train_pairs, recipe.data.split_seed)
    disable_dropout(built.lm)
    source = pref.ref_model or recipe.model.name_or_path
    splits = [("validation", packed.eval_items)]
    if pref.reference_based:
        splits.insert(0, ("train", packed.train))
    collator = data.PairCollator(built.tok.pad_token_id, recipe.data.block_size)
    device = torch.device(str(args.device))
    bf16 = bool(args.bf16)
    if source is None:  # a model built from scratch (simpo, orpo): "before" is its initial weights
        built.lm.to(device)
        scores = evaluate.score_pairs(built.lm, packed.eval_items, collator, args.per_device_eval_batch_size, bf16)
        whole = np.full((len(packed.split["validation"]), 2), np.nan)
        whole[packed.eval_items.indices] = scores[:, :2]
        packed.eval_items = packed.eval_items.with_reference(whole)
        return {"reference": None}
    identity = reference.model_identity(
        source, recipe.model.revision if source == recipe.model.name_or_path else None, recipe.data.cache_dir
    )
    folder = reference.entry_folder(packed.cache_path, identity, _precision(args), recipe.data.cache_dir)
    loaded = []

    def scorer() -> PreTrainedModel:  # the reference, loaded (or moved) only when a pair needs it
        if not loaded:
            loaded.append(_load_reference(pref.ref_model, device) if pref.ref_model else built.lm.to(device))
        return loaded[0]

    with args.main_process_first(desc="reference log-probabilities"):
        for split, pairs in splits:
            rows = len(packed.split[split])
            about = {"data": packed.cache_path.name, "model": source}
            batch = args.per_device_eval_batch_size
            array = reference.fill(folder, split, pairs, scorer, collator, batch, bf16, rows, about)
            if split == "train":
                packed.train = packed.train.with_reference(array)
            else:
                packed.eval_items = packed.eval_items.with_reference(array)
    loaded.clear()
    return {"reference": {"model": source, "cache": str(folder)}}


def make_trainer(built, args) -> Trainer:
    """The stock Trainer over the pairs: their collator, and the objective as compute_loss_func."""
    pref: PreferenceConfig = built.preference
    flash = "flash" in str(getattr(built.lm.config, "_attn_implementation", ""))
    collator = data.PairCollator(
        built.tok.pad_token_id,
        built.prepared.cfg.block_size,
        prompt_targets=pref.objective == "orpo",
        flash_attn_kwargs=flash,
    )
    loss = PreferenceLoss(pref.objective, pref.beta_value, pref.gamma_value)
    counted = callbacks.RealTokens(built.prepared.train, collator)  # for the logged tokens/s
    trainer = Trainer(
        model=built.lm,
        args=args,
        data_collator=counted.collate,
        train_dataset=counted.dataset,
        eval_dataset=built.prepared.eval_items,
        processing_class=built.tok,
        compute_loss_func=loss,
    )
    trainer.loss_is_scaled_for_ga = False  # a mean over the batch's pairs: divided by the accumulation steps
    trainer.callback_handler.callbacks.insert(0, PreferenceMetrics(loss))
    return trainer


def tokens_per_pair(pairs, sample: int = 256) -> float:
    """Tokens the model reads for a pair, on average (the prompt twice, each answer once), over
    the first `sample` pairs."""
    items = [pairs[i] for i in range(min(sample, len(pairs)))]
    return float(np.mean([2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in items])) if items else 0.0


def held_out(trainer, prepared, metrics: dict, say) -> dict:
    """The Trainer's held-out preference loss and reward accuracy, saved and said."""
    trainer.save_metrics("eval", metrics)
    accuracy = metrics.get("eval_rewards/accuracies")
    shown = f", reward accuracy {accuracy:.1%}" if accuracy is not None else ""
    say(f"held-out preference loss {metrics['eval_loss']:.4f}{shown} ({len(prepared.eval_items):,} pairs)", flush=True)
    return metrics


def final_figures(scores: dict, step: int, tensorboard, output_dir: Path) -> dict:
    """The evaluator's figures after training into TensorBoard; those all_results.json keeps."""
    if tensorboard is not None:
        final = {f"final/{k}": v for k, v in scores["after"].items() if v is not None}
        tensorboard.log_final(step, final, {"final/samples": callbacks.samples_text(output_dir)})
    return {f"eval_preference_{k}": scores["after"][k] for k in ("accuracy", "chosen_bits_per_byte")}
