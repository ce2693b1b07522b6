"""Model stage: build the model a recipe trains (from scratch or pretrained), or load a trained
one for generation and evaluation."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedModel, PreTrainedTokenizerBase

from . import progress
from . import tokenizer as tokenizer_stage
from .config import ModelConfig
from .errors import UserError
from .hub import load_from_hub
from .runtime import ignore_padding_warning


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


def context_length(model: PreTrainedModel) -> int | None:
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def check_source(name: str | None, key: str = "model.name_or_path") -> None:
    """Fail before any work when `name` is a local folder that holds no model."""
    if name is not None and os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise UserError(
            f"{key}: {name} is not a model (no config.json): point it at a directory written by "
            f"save_pretrained, such as a run directory or a checkpoint-N folder inside one, or a hub name"
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(name_or_path: str, key: str = "--model", device: torch.device | str | None = None):
    """A trained causal LM and its tokenizer, for generation and evaluation, from a run
    directory, any save_pretrained folder or a hub name; in eval mode on `device`."""
    check_source(name_or_path, key)
    try:
        with progress.transformers_bars_off():  # a bar per load of a few tensors is noise
            lm = load_from_hub(AutoModelForCausalLM.from_pretrained, name_or_path, "model", key)
    except (OSError, ValueError, KeyError) as exc:  # a local folder with broken files
        raise UserError(f"{key}: cannot load {name_or_path} as a causal language model ({exc})") from None
    tok = tokenizer_stage.ready_for_lm(tokenizer_stage.load_pretrained(name_or_path, key), name_or_path)
    ignore_padding_warning()
    lm.to(device or default_device()).eval()
    return lm, tok


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
    check_source(name)
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"model.name_or_path: cannot load {name} as a causal language model ({str(exc).splitlines()[0]})"
        ) from None
