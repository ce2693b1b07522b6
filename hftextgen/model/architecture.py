"""Model shapes across architectures: the recipe's common names (model.n_layer, model.n_head, ...)
mapped to each transformers config class's own attributes, their checks, and the same names read
back from any model's config (validate, the model card, resume).

Every causal-LM architecture transformers ships has a config class (LlamaConfig, GPT2Config, ...)
with its own attribute names for the same things: GPT-2's n_embd is Llama's hidden_size, GPT-2's
attn_pdrop is Llama's attention_dropout. A recipe uses one set of names whatever the
architecture (COMMON and DROPOUTS); anything else goes through model.config in the class's own
names, checked against the class.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import warnings

from ..errors import ConfigError, UserError

DEFAULT_TYPE = "gpt2"
# GPT-2's n_positions: its tokenizer's model_max_length, and the context assumed for a model that states none.
DEFAULT_CONTEXT = 1024

# Recipe name -> the config attributes that may hold it, in order of preference. Names in a
# class's attribute_map (GPT-2's hidden_size -> n_embd) are followed to the real attribute.
COMMON = {
    "n_layer": ("num_hidden_layers",),
    "n_head": ("num_attention_heads",),
    "n_kv_head": ("num_key_value_heads",),
    "n_embd": ("hidden_size",),
    "n_inner": ("intermediate_size", "n_inner", "ffn_dim"),
    "n_positions": ("max_position_embeddings",),
    "vocab_size": ("vocab_size",),
    "tie_word_embeddings": ("tie_word_embeddings",),
    "activation_function": ("activation_function", "hidden_act", "hidden_activation"),
    "layer_norm_epsilon": ("layer_norm_epsilon", "rms_norm_eps", "layer_norm_eps"),
    "initializer_range": ("initializer_range",),
}
DROPOUTS = {
    "resid_pdrop": ("resid_pdrop", "hidden_dropout", "resid_dropout", "hidden_dropout_prob", "dropout"),
    "embd_pdrop": ("embd_pdrop", "embed_dropout", "embedding_dropout"),
    "attn_pdrop": ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob"),
}
WHAT = {
    "n_layer": "layer count",
    "n_head": "attention head count",
    "n_kv_head": "key/value head setting (every query head has its own key and value)",
    "n_embd": "width",
    "n_inner": "MLP width setting",
    "n_positions": "context length",
    "vocab_size": "vocabulary size",
    "tie_word_embeddings": "embedding tying setting",
    "activation_function": "activation setting",
    "layer_norm_epsilon": "normalisation epsilon",
    "initializer_range": "initialisation setting",
    "resid_pdrop": "dropout on residual branches",
    "embd_pdrop": "dropout on embeddings",
    "attn_pdrop": "dropout on attention weights",
}
# hftextgen sets these from the tokenizer; a recipe never does.
FROM_TOKENIZER = ("bos_token_id", "eos_token_id", "pad_token_id")


@functools.cache
def causal_lm_types() -> tuple[str, ...]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return tuple(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))


def config_class(model_type: str) -> type:
    """The config class of a causal-LM architecture, or a one-line error with the closest name."""
    from transformers import CONFIG_MAPPING

    if model_type not in causal_lm_types():
        close = difflib.get_close_matches(model_type, causal_lm_types(), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "e.g. gpt2, llama, qwen3, mistral, gpt_neox"
        if model_type in CONFIG_MAPPING:
            raise ConfigError(
                f"model.model_type: {model_type} is not a causal language model (transformers has no "
                f"AutoModelForCausalLM for it): pick one that is, {hint}"
            )
        raise ConfigError(f"model.model_type: unknown architecture {model_type!r}: {hint}")
    return CONFIG_MAPPING[model_type]


@functools.cache
def _defaults(cls: type) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls().to_dict()


@functools.cache
def _known(cls: type) -> set[str]:
    signature = inspect.signature(cls.__init__).parameters
    named = {p for p, v in signature.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)} - {"self"}
    return set(_defaults(cls)) | set(cls.attribute_map) | named


def _default(cls: type, name: str):
    """A setting's default as the class's signature states it: None where the class derives it
    (LlamaConfig: key/value heads = heads), unlike the value a default instance holds."""
    parameter = inspect.signature(cls.__init__).parameters.get(name)
    if parameter is not None and parameter.default is not inspect.Parameter.empty:
        return parameter.default
    return _defaults(cls).get(name)


def own_name(cls: type, common: str) -> str | None:
    """The attribute of config class `cls` that holds the recipe's `common` name, or None when the
    architecture has no such setting."""
    known = _known(cls)
    for name in {**COMMON, **DROPOUTS}[common]:
        if name in known:
            return cls.attribute_map.get(name, name)
    return None


def _accepts(cls: type, key: str, value) -> bool:
    """Whether the class takes `key` although it is no attribute: an older name it converts
    (LlamaConfig turns rope_theta into rope_parameters)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = cls(**{key: value}).to_dict()
    except Exception:  # the class refuses the value: the build later says why
        return True
    built.pop(key, None)
    return built != _defaults(cls)


def check_config_keys(model_type: str, given: dict) -> None:
    """model.config: every key a setting of the architecture's config class, and none that a common
    name or the tokenizer sets."""
    cls = config_class(model_type)
    known = _known(cls)
    taken = {own_name(cls, common): common for common in {**COMMON, **DROPOUTS}}
    for key, value in given.items():
        real = cls.attribute_map.get(key, key)
        if real in taken:
            raise ConfigError(f"model.config.{key} is a shape every architecture has: set model.{taken[real]} instead")
        if key in FROM_TOKENIZER:
            raise ConfigError(f"model.config.{key} comes from the tokenizer: remove it")
        if key not in known and not _accepts(cls, key, value):
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean model.config.{close[0]}?" if close else f"see {cls.__name__}'s documentation"
            raise ConfigError(f"model.config: {cls.__name__} ({model_type}) has no setting {key!r}: {hint}")


def scratch_settings(model_type: str, common: dict, extra: dict) -> dict:
    """The config class's keyword arguments for a model built from scratch: the common names set
    in the recipe (`common`: recipe name -> value) under the class's own names, then
    model.config (`extra`). Raises a one-line error for what the architecture cannot take."""
    cls = config_class(model_type)
    kwargs = {}
    for key, value in common.items():
        name = own_name(cls, key)
        if name is None:
            if key in DROPOUTS and value == 0:
                continue  # no such dropout: already none
            raise ConfigError(f"model.{key}: {model_type} has no {WHAT[key]}: {_instead(cls, key)}")
        kwargs[name] = value
    kv = own_name(cls, "n_kv_head")
    if kv is not None and "n_head" in common and "n_kv_head" not in common:
        # Classes default to their full-size model's count (mistral: 8, qwen3: 32), which a recipe's
        # own head count need not be a multiple of: unset means every head has its own.
        kwargs[kv] = common["n_head"]
    kwargs.update(extra)
    _check_heads(cls, model_type, kwargs, common)
    return kwargs


def _instead(cls: type, key: str) -> str:
    if key in DROPOUTS:
        present = [k for k in DROPOUTS if own_name(cls, k)]
        return f"remove it (its dropouts: {', '.join('model.' + k for k in present)})" if present else "remove it"
    if key == "n_kv_head":
        return "remove it"
    return f"remove it, or set {cls.__name__}'s own key in model.config"


def _check_heads(cls: type, model_type: str, kwargs: dict, common: dict) -> None:
    """Heads must split the width evenly (unless model.config sets head_dim), and key/value heads
    must split the heads."""

    def value(key: str):
        name = own_name(cls, key)
        return None if name is None else kwargs.get(name, _default(cls, name))

    def shown(key: str) -> str:
        return f"{value(key)}" if key in common else f"{value(key)}, {model_type}'s default"

    width, heads, kv = value("n_embd"), value("n_head"), value("n_kv_head")
    if width and heads and "head_dim" not in kwargs and width % heads:
        raise ConfigError(f"model.n_embd ({shown('n_embd')}) must be divisible by model.n_head ({shown('n_head')})")
    if heads and kv and heads % kv:
        raise ConfigError(
            f"model.n_head ({shown('n_head')}) must be divisible by model.n_kv_head ({shown('n_kv_head')}): "
            f"each key/value head serves the same number of query heads"
        )


def build_config(model_type: str, kwargs: dict):
    """The config object; a per-head width the class fixes (Qwen3: 128) follows the recipe's
    width and heads instead, as in most architectures, unless model.config sets head_dim."""
    cls = config_class(model_type)
    kwargs = dict(kwargs)
    if "head_dim" in _defaults(cls) and "head_dim" not in kwargs:
        width = kwargs.get(own_name(cls, "n_embd"), _default(cls, own_name(cls, "n_embd")))
        heads = kwargs.get(own_name(cls, "n_head"), _default(cls, own_name(cls, "n_head")))
        if width and heads:
            kwargs["head_dim"] = width // heads
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # the class's own validation
        detail = " ".join(str(exc).split())
        raise ConfigError(f"model: {cls.__name__} refuses these settings ({detail})") from None


def pretrained_overrides(config, common: dict) -> dict:
    """Dropouts a recipe sets for a pretrained model, under the loaded config's own names."""
    out = {}
    for key, value in common.items():
        name = own_name(type(config), key)
        if name is None:
            if value == 0:
                continue
            raise UserError(f"model.{key}: {config.model_type} has no {WHAT[key]}: {_instead(type(config), key)}")
        out[name] = value
    return out


def shape(config) -> dict:
    """The common names read from a model's config (or a config.json dict): model_type, n_layer,
    n_head, n_kv_head, n_embd, n_inner, n_positions, vocab_size, tie_word_embeddings; None where
    the architecture has no such setting. GPT-2's unset n_inner is its 4 x n_embd."""
    if isinstance(config, dict):
        from transformers import CONFIG_MAPPING

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out = {"model_type": config.model_type}
    for key in ("n_layer", "n_head", "n_kv_head", "n_embd", "n_inner", "n_positions", "vocab_size"):
        out[key] = next((getattr(text, n) for n in COMMON[key] if getattr(text, n, None) is not None), None)
    out["tie_word_embeddings"] = getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", None))
    if out["n_inner"] is None and out["model_type"] == "gpt2" and out["n_embd"]:
        out["n_inner"] = 4 * out["n_embd"]
    return out


def describe_shape(shape: dict) -> str:
    """A shape (the common names, as `shape` returns them) in words, leaving out what the
    architecture does not have: "2 layers, 4 heads, 2 key/value heads, width 64, MLP 256,
    context 128 tokens, vocabulary 50,257, tied embeddings"."""
    parts = []
    for key, label in (("n_layer", "layers"), ("n_head", "heads")):
        if shape.get(key):
            parts.append(f"{shape[key]} {label}")
    if shape.get("n_kv_head") and shape["n_kv_head"] != shape.get("n_head"):
        parts.append(f"{shape['n_kv_head']} key/value heads")
    if shape.get("n_embd"):
        parts.append(f"width {shape['n_embd']}")
    if shape.get("n_inner"):
        parts.append(f"MLP {shape['n_inner']}")
    if shape.get("n_positions"):
        parts.append(f"context {shape['n_positions']} tokens")
    if shape.get("vocab_size"):
        parts.append(f"vocabulary {shape['vocab_size']:,}")
    if shape.get("tie_word_embeddings"):
        parts.append("tied embeddings")
    return ", ".join(parts)
