"""Model stage: build the model a recipe trains (any causal-LM architecture from scratch, or a
pretrained one), or load a trained one (or a LoRA adapter on its base) for generation and evaluation."""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .. import progress, runtime
from ..errors import UserError
from ..hub import load_from_hub
from ..runtime import ignore_padding_warning
from . import architecture, lora
from . import tokenizer as tokenizer_stage
from .config import ModelConfig


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
    generation.eos_token_id = _unique([tokenizer.eos_token_id, *_ids(generation.eos_token_id)])
    generation.pad_token_id = tokenizer.pad_token_id
    if rows > len(tokenizer):
        # Rows past the tokenizer (model.vocab_size padded for speed) are never targets, and an id
        # the tokenizer cannot decode must never be generated.
        generation.suppress_tokens = list(range(len(tokenizer), rows))
    return model


# The sampling settings that only a sampling decoder reads: cleared for a recipe that does not
# sample (transformers refuses to save them beside do_sample false), and set by one that does.
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "typical_p", "min_p", "top_h", "epsilon_cutoff", "eta_cutoff")


def _ids(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value or [])


def _unique(ids) -> list[int]:
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


# generation_config.json's own entry of hftextgen: what a prompt follows in training
# (data.Corpus.prompt_context), which hftextgen's decoders read; stock loaders ignore it.
PROMPT_CONTEXT = "hftextgen_prompt_context"


def set_generation(
    lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, end_of_turn, prompt_context: str, decoding: dict
) -> None:
    """What generation_config.json tells every loader (stock `pipeline`, `transformers serve`,
    hftextgen's decoders): eos_token_id, every token that ends an answer, as a list as Llama 3's
    own config has it (the EOS, the chat template's end of turn `end_of_turn`, a pretrained model's
    own); `decoding`, the recipe's preset (GenerateConfig.settings()), so that stock loaders
    sample as the recipe says and serve takes a client's temperature; and what a prompt follows
    in training (`prompt_context`, data.Corpus.prompt_context), under PROMPT_CONTEXT."""
    generation = lm.generation_config
    generation.eos_token_id = _unique([tokenizer.eos_token_id, *end_of_turn, *_ids(generation.eos_token_id)])
    for key in SAMPLING_ONLY:  # a pretrained model's own sampling must not outlive the recipe's
        setattr(generation, key, None)
    sampling = bool(decoding.get("do_sample"))
    for key, value in decoding.items():
        if sampling or key not in SAMPLING_ONLY:
            setattr(generation, key, value)
    setattr(generation, PROMPT_CONTEXT, prompt_context)
    # Made by hand now, not derived from config.json: loading keeps its own entry (PROMPT_CONTEXT).
    generation._from_model_config = False


def context_length(model: PreTrainedModel) -> int | None:
    """Positions the model knows: GPT-2's n_positions, max_position_embeddings elsewhere (RoPE
    models included: beyond what they were trained on they degrade, so generation slides)."""
    return architecture.shape(model.config)["n_positions"]


def check_source(name: str | None, key: str = "model.name_or_path", adapter_ok: bool = False) -> None:
    """Fail before any work when `name` is a local folder that holds no model (an adapter folder
    is one, where `adapter_ok`: generate and evaluate load it on its base model)."""
    if name is None or not os.path.isdir(name) or os.path.isfile(os.path.join(name, "config.json")):
        return
    if adapter_ok and lora.is_adapter(name):
        return
    if lora.is_adapter(name):
        raise UserError(
            f"{key}: {name} holds a LoRA adapter, not a whole model: fine-tune the merged model of its run "
            f"(the run directory) instead"
        )
    raise UserError(
        f"{key}: {name} is not a model (no config.json): point it at a directory written by "
        f"save_pretrained, such as a run directory or a checkpoint-N folder inside one, or a hub name"
    )


def load(name_or_path: str, key: str = "--model", device: torch.device | str | None = None):
    """A trained causal LM and its tokenizer, for generation and evaluation, from a run
    directory, any save_pretrained folder, a LoRA adapter folder (loaded on its base model and
    merged) or a hub name; in eval mode on `device`."""
    check_source(name_or_path, key, adapter_ok=True)
    adapter = os.path.isdir(name_or_path) and lora.is_adapter(name_or_path)
    base = lora.base_of(name_or_path, key) if adapter else name_or_path
    try:
        with progress.transformers_bars_off():  # a bar per load of a few tensors is noise
            lm = load_from_hub(AutoModelForCausalLM.from_pretrained, base, "model", key)
            if adapter:
                lm = lora.load_merged(lm, name_or_path)
    except (OSError, ValueError, KeyError) as exc:  # a local folder with broken files
        raise UserError(f"{key}: cannot load {name_or_path} as a causal language model ({exc})") from None
    has_tokenizer = not adapter or lora.has_tokenizer(name_or_path)
    tok_source = name_or_path if has_tokenizer else base
    tok = tokenizer_stage.ready_for_lm(tokenizer_stage.load_pretrained(tok_source, key), tok_source)
    ignore_padding_warning()
    lm.to(device or runtime.default_device()).eval()
    return lm, tok


def _from_scratch(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, block_size: int) -> PreTrainedModel:
    settings = cfg.scratch_settings()
    cls = architecture.config_class(cfg.architecture)
    vocab_key, positions_key = (architecture.own_name(cls, k) for k in ("vocab_size", "n_positions"))
    settings.setdefault(vocab_key, len(tokenizer))
    if settings[vocab_key] < len(tokenizer):
        raise UserError(
            f"model.vocab_size ({settings[vocab_key]}) is smaller than the tokenizer ({len(tokenizer)} tokens): "
            f"raise it to at least {len(tokenizer)}, or leave it unset"
        )
    # A scratch model only ever sees block_size positions; more would be untrained rows (GPT-2)
    # or positions it never learned to use (RoPE).
    if positions_key is not None:
        settings.setdefault(positions_key, block_size)
    settings.update(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = architecture.build_config(cfg.architecture, settings)
    try:
        return AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    except (ValueError, ImportError) as exc:  # e.g. an attention kernel this architecture lacks
        raise UserError(
            f"model: cannot build a {cfg.architecture} model ({str(exc).splitlines()[0]}): "
            f"try model.attn_implementation eager"
        ) from None


def pretrained_overrides(cfg: ModelConfig) -> dict:
    """The dropouts the recipe sets for a pretrained model, in its config's own names (reads
    config.json only); a one-line error for a dropout the architecture does not have."""
    dropouts = cfg.common(cfg.DROPOUTS)
    if not dropouts:
        return {}
    try:
        config = load_from_hub(
            AutoConfig.from_pretrained, cfg.name_or_path, "model", "model.name_or_path", revision=cfg.revision
        )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"model.name_or_path: cannot read the config of {cfg.name_or_path} ({exc})") from None
    return architecture.pretrained_overrides(config, dropouts)


def _pretrained(cfg: ModelConfig) -> PreTrainedModel:
    name = cfg.name_or_path
    # Mixed precision wants fp32 master weights, whatever dtype the checkpoint was saved in.
    kwargs = {"attn_implementation": cfg.attn_implementation, "dtype": torch.float32, **pretrained_overrides(cfg)}
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
