"""Model stage: a GPT-2 built from a GPT2Config, or a pretrained causal LM loaded by name or path."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedModel, PreTrainedTokenizerBase

from .config import ModelConfig
from .errors import UserError
from .hub import load_from_hub


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, block_size: int) -> PreTrainedModel:
    model = _from_scratch(cfg, tokenizer, block_size) if cfg.from_scratch else _pretrained(cfg)
    context = context_length(model)
    if context is not None and block_size > context:
        raise UserError(
            f"data.block_size ({block_size}) is longer than the model's context ({context} positions): "
            f"set data.block_size to {context} or less"
        )
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} rows: "
            f"use the model's own tokenizer (tokenizer.source=auto)"
        )
    model.loss_type = "ForCausalLM"  # transformers can't infer it from the name GPT2LMHeadModel, and warns
    model.config.pad_token_id = tokenizer.pad_token_id  # else the Trainer sets it, with a warning
    ignore_padding_warning()
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    if rows > len(tokenizer):
        # Rows past the tokenizer (model.vocab_size padded for speed) are never targets, and an id
        # the tokenizer cannot decode must never be generated.
        generation.suppress_tokens = list(range(len(tokenizer), rows))
    return model


class _NoPaddingWarning(logging.Filter):
    """transformers warns that input starting or ending with the pad id may be padded and wants
    an attention mask. Our pad id is EOS, which starts and ends documents inside packed blocks;
    they are never padded, and a mask of ones would only slow every step."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask` since your input_ids may be padded" not in record.getMessage()


def ignore_padding_warning() -> None:
    logger = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, _NoPaddingWarning) for f in logger.filters):
        logger.addFilter(_NoPaddingWarning())


def context_length(model: PreTrainedModel) -> int | None:
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def check_source(cfg: ModelConfig) -> None:
    """Fail before any data work when model.name_or_path is a local folder that holds no model."""
    name = cfg.name_or_path
    if name is not None and os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise UserError(
            f"model.name_or_path: {name} is not a model (no config.json): point it at a directory written by "
            f"save_pretrained, such as a run directory or a checkpoint-N folder inside one"
        )


def _from_scratch(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, block_size: int) -> PreTrainedModel:
    given = {k: getattr(cfg, k) for k in cfg.ARCHITECTURE + cfg.DROPOUTS if getattr(cfg, k) is not None}
    given.setdefault("vocab_size", len(tokenizer))
    if given["vocab_size"] < len(tokenizer):
        raise UserError(
            f"model.vocab_size ({given['vocab_size']}) is smaller than the tokenizer ({len(tokenizer)} tokens): "
            f"raise it to at least {len(tokenizer)}, or leave it unset"
        )
    # A scratch model only ever sees block_size positions; more would be untrained rows.
    given.setdefault("n_positions", block_size)
    config = GPT2Config(**given, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)


def _pretrained(cfg: ModelConfig) -> PreTrainedModel:
    name = cfg.name_or_path
    kwargs = {k: getattr(cfg, k) for k in cfg.DROPOUTS if getattr(cfg, k) is not None}
    # Mixed precision wants fp32 master weights, whatever dtype the checkpoint was saved in.
    kwargs.update(attn_implementation=cfg.attn_implementation, dtype=torch.float32)
    if not os.path.isdir(name):
        return load_from_hub(
            AutoModelForCausalLM.from_pretrained, name, "model", "model.name_or_path", revision=cfg.revision, **kwargs
        )
    check_source(cfg)
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"model.name_or_path: cannot load {name} as a causal language model ({str(exc).splitlines()[0]})"
        ) from None
