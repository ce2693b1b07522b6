"""Data mixtures (data.mixture): several sources, each read, split and prepared on its own (and
cached as one source is), drawn by weight into one training set with one packing, and evaluated
on each source's held-out data.

The draw. Source i has N_i training items (blocks of block_size for concat packing; examples
for isolated and padded, a text document longer than block_size cut into several) and weight
w_i. An epoch of the mixture holds T = N_1 + ... + N_k items, as many as the sources together,
of which source i gives n_i = round(w_i / sum(w) * T), at least one. A source with n_i >= N_i is
repeated: floor(n_i / N_i) whole copies and a seeded subset (without replacement) for the rest;
one with n_i < N_i gives a seeded subset without replacement. Weights count items, not tokens:
the report gives the tokens drawn beside them. The draw is fixed (data.split_seed), the same
every epoch; the Trainer shuffles its order. The items are index arrays (source, item), never a
Python object each: ten million items cost ~170 MB of arrays.

Evaluation. The Trainer's evaluations take a seeded subset of each source's held-out items,
data.max_eval_tokens split between the sources by weight. The evaluator at the end of training
scores one source with the whole data.max_eval_tokens: the first task source (its held-out
answers), else the first source (its held-out documents); the report says which.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from functools import cached_property

import numpy as np

from .. import cache
from ..errors import UserError, warn
from . import packing as packer
from . import shards
from .config import ITEMS, DataConfig
from .corpus import Corpus
from .prepared import Prepared, Served, prepare

# A source drawn more than this many times an epoch is said to be (a warning).
REPEAT_WARNING = 10

# ---------------------------------------------------------------- the draw


def draw_counts(available: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Items drawn from each source: its share of the weight of as many items as all sources
    hold together, rounded, at least one."""
    available, weights = np.asarray(available, np.int64), np.asarray(weights, np.float64)
    total = int(available.sum())
    return np.maximum(1, np.rint(weights / weights.sum() * total)).astype(np.int64)


def draw(available: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` item indices of `available`: every item floor(count / available) times, and a
    seeded subset without replacement for the rest; sorted (reads in order on disk)."""
    whole, rest = divmod(count, available)
    extra = rng.choice(available, rest, replace=False) if rest else np.zeros(0, np.int64)
    return np.sort(np.concatenate([np.tile(np.arange(available, dtype=np.int64), whole), extra]))


def _mix(counts_of: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(source, item) index arrays of the drawn items, source after source."""
    source = np.repeat(np.arange(len(counts_of), dtype=np.int16), [len(c) for c in counts_of])
    index = np.concatenate(counts_of) if counts_of else np.zeros(0, np.int64)
    return source, index


# ---------------------------------------------------------------- mixed items


class MixedExamples:
    """Examples of several sources (isolated and padded packing): item i is example index[i] of
    source source[i]; `lengths` as `shards.Examples` has them, for the packer and the grouping."""

    def __init__(self, parts: list[shards.Examples], source: np.ndarray, index: np.ndarray, lengths=None):
        self.parts, self.source, self.index = parts, source, index
        if lengths is None:
            lengths = np.empty(len(index), np.int64)
            for s, part in enumerate(parts):
                mine = source == s
                lengths[mine] = part.lengths[index[mine]]
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> shards.Example:
        # A text source has no masks: its examples come all trained (Examples says so).
        return self.parts[int(self.source[i])][int(self.index[i])]

    def select(self, indices) -> MixedExamples:
        chosen = np.asarray(indices, np.int64)
        return MixedExamples(self.parts, self.source[chosen], self.index[chosen], self.lengths[chosen])

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


class MixedBlocks(shards.Blocks):
    """Blocks of several sources (concat packing): item i is block index[i] of source source[i].
    With a task source among them every item carries labels (a text block's are its inputs), so
    that any batch collates alike."""

    def __init__(self, parts: list[shards.BlockDataset], source: np.ndarray, index: np.ndarray):
        self.parts, self.source, self.index = parts, source, index
        self.block_size = parts[0].block_size
        self.labels = any(p.masks is not None for p in parts)

    def __len__(self) -> int:
        return len(self.index)

    def _item(self, i: int) -> dict:
        item = self.parts[int(self.source[i])][int(self.index[i])]
        if self.labels and "labels" not in item:
            item["labels"] = item["input_ids"].clone()
        return item

    def select(self, indices) -> MixedBlocks:
        chosen = np.asarray(indices, np.int64)
        return MixedBlocks(self.parts, self.source[chosen], self.index[chosen])


# ---------------------------------------------------------------- the sources


def open_corpus(cfg: DataConfig) -> Corpus | MixedCorpus:
    """The corpus a data section names: one source, or a mixture of several."""
    return MixedCorpus(cfg) if cfg.mixture else Corpus(cfg)


def describe_source(cfg: DataConfig) -> str:
    """A source in a few words: its files, its hub dataset, or the plays."""
    if cfg.source == "shakespeare":
        return "the bundled plays" + (f" as {cfg.format}" if cfg.format not in ("auto", "text") else "")
    if cfg.source == "hub":
        return f"hub {cfg.dataset}" + (f" {cfg.dataset_config}" if cfg.dataset_config else "")
    more = f" and {len(cfg.paths) - 2} more" if len(cfg.paths) > 2 else ""
    return ", ".join(cfg.paths[:2]) + more


@contextlib.contextmanager
def entry(i: int, cfg: DataConfig):
    """A problem with one source, said with the entry it is in."""
    try:
        yield
    except UserError as e:
        raise type(e)(f"data.mixture[{i}] ({describe_source(cfg)}): {e}") from None


class MixedCorpus:
    """The sources of data.mixture, each a Corpus of its own, as the tokenizer and `prepare` take
    a corpus: what they hold (`check`), whether any is a conversation, and (for a trained BPE)
    every source's training text, each source once (unweighted: the tokenizer should spell every
    source well, whatever its share of the training)."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.configs = cfg.source_configs()
        self.weights = np.array([e.weight for e in cfg.mixture], np.float64)
        self.names = [f"[{i}] {describe_source(c)}" for i, c in enumerate(self.configs)]
        self.corpora = []
        for i, c in enumerate(self.configs):
            with entry(i, c):
                self.corpora.append(Corpus(c))

    def check(self, chat_template: str | None = None) -> None:
        for i, corpus in enumerate(self.corpora):
            with entry(i, corpus.cfg):
                corpus.check(chat_template if corpus.uses_template else None)
        if chat_template is not None and not self.uses_template:
            raise UserError(
                "tokenizer.chat_template renders conversations, and no source of data.mixture holds them: use "
                "data.format messages in the entry that does, or drop tokenizer.chat_template"
            )

    @cached_property
    def uses_template(self) -> bool:
        return any(c.uses_template for c in self.corpora)

    @cached_property
    def is_task(self) -> bool:
        return any(c.is_task for c in self.corpora)

    @cached_property
    def packing(self) -> str:
        """One packing for the run: data.packing resolved as for one source, task data if any
        source is a task format."""
        return self.cfg.resolved_packing(self.is_task)

    @property
    def prompt_context(self) -> str:
        """What a prompt follows in the source the evaluator scores (the first task source, else
        the first): Corpus.prompt_context."""
        return next((c for c in self.corpora if c.is_task), self.corpora[0]).prompt_context

    @cached_property
    def split_fingerprint(self) -> str:
        return cache.key(mixture=[c.split_fingerprint for c in self.corpora])

    def texts(self, split: str):
        """(id, text) of every source's documents of `split`, source after source."""
        return itertools.chain.from_iterable(c.texts(split) for c in self.corpora)

    def prepare(self, tokenizer, tokenizer_fingerprint: str, hold_out: bool = True, for_training: bool = True):
        """Each source prepared (or found in the cache) on its own, then drawn into a Mixture."""
        # concat: each source's blocks; isolated and padded: each source's examples (a source
        # prepared padded keeps them as they are, to be packed across sources here).
        each = "concat" if self.packing == "concat" else "padded"
        prepared = []
        for i, corpus in enumerate(self.corpora):
            with entry(i, corpus.cfg):
                corpus.cfg = dataclasses.replace(corpus.cfg, packing=each)
                one = prepare(corpus, tokenizer, tokenizer_fingerprint, hold_out, for_training)
                if for_training and not len(one.train):
                    raise UserError("its training split holds no examples: give it data, or drop the entry")
            prepared.append(one)
        return mix(self, prepared, warn_repeats=for_training)


# ---------------------------------------------------------------- the mixture


def _eval_items(prepared: Prepared, max_tokens: int, seed: int):
    """A seeded subset of a source's held-out items holding at most max_tokens tokens."""
    cfg = prepared.cfg
    if prepared.packing == "concat":
        return shards.sample_blocks(prepared.validation, max_tokens, seed)
    found = shards.examples(
        prepared.cache_path, "validation", prepared.tokens["validation"], prepared.trained["validation"], cfg.block_size
    )
    return shards.sample_examples(found, max_tokens, seed)


def _combine(parts: list, counts_of: list[np.ndarray], packing: str, block_size: int):
    """The drawn items of every source, packed as the run packs them."""
    source, index = _mix(counts_of)
    if packing == "concat":
        return MixedBlocks(parts, source, index)
    items = MixedExamples(parts, source, index)
    if packing == "isolated":
        return packer.PackedRows(items, packer.pack(items.lengths, block_size))
    return items


def mix(mixed: MixedCorpus, prepared: list[Prepared], warn_repeats: bool = True) -> Mixture:
    """The prepared sources drawn by weight (module docstring) into one training set, and each
    source's share of the held-out evaluation."""
    cfg, packing = mixed.cfg, mixed.packing
    parts = [p.train for p in prepared]  # blocks (concat) or examples (each source prepared padded)
    available = np.array([len(p) for p in parts], np.int64)
    counts = draw_counts(np.maximum(available, 1), mixed.weights) * (available > 0)
    rng = np.random.default_rng(cfg.split_seed)
    drawn = [draw(int(n), int(k), rng) if n else np.zeros(0, np.int64) for n, k in zip(available, counts, strict=True)]
    train = _combine(parts, drawn, packing, cfg.block_size)
    shares = np.maximum(1, np.rint(mixed.weights / mixed.weights.sum() * cfg.max_eval_tokens)).astype(int)
    evaluated = [_eval_items(p, int(share), cfg.split_seed) for p, share in zip(prepared, shares, strict=True)]
    eval_items = _combine(evaluated, [np.arange(len(e)) for e in evaluated], packing, cfg.block_size)
    if packing == "padded":  # longest first, as one source's are
        eval_items = eval_items.select(np.argsort(-eval_items.lengths, kind="stable"))
    for name, n, k in zip(mixed.names, available, counts, strict=True):
        if warn_repeats and n and k > REPEAT_WARNING * n:
            warn(
                f"data.mixture{name} is repeated {k / n:.1f} times an epoch (its weight asks for {k:,} of its {n:,} "
                f"items): the model may learn it by heart; lower its weight, or give it more data"
            )
    table = [
        _source_row(name, w, p, part, d, e, share)
        for name, w, p, part, d, e, share in zip(
            mixed.names, mixed.weights, prepared, parts, drawn, evaluated, shares, strict=True
        )
    ]
    return Mixture(cfg, prepared, train, eval_items, packing, table)


def _tokens_of(part, chosen: np.ndarray) -> int:
    if isinstance(part, shards.BlockDataset):
        return len(chosen) * part.block_size
    return int(part.lengths[chosen].sum())


def _source_row(name, weight, prepared: Prepared, part, drawn, evaluated, share) -> dict:
    """What the report says of one source: its items, those drawn and how often, its evaluation."""
    n = int(len(part))
    return {
        "source": name,
        "format": prepared.task["format"] if prepared.task else "text",
        "weight": float(weight),
        "unit": ITEMS[prepared.packing],  # as prepared for the mixture: concat or padded
        "available": n,
        "drawn": int(len(drawn)),
        "tokens_drawn": _tokens_of(part, drawn),
        "repeat": round(len(drawn) / n, 3) if n else 0.0,
        "eval_max_tokens": int(share),
        "eval_tokens": evaluated.n_tokens,
        "cache": str(prepared.cache_path),
    }


def _evaluated(prepared: list[Prepared]) -> int:
    """The source the evaluator scores: the first task source, else the first."""
    return next((i for i, p in enumerate(prepared) if p.task), 0)


class Mixture(Served):
    """A mixture's prepared data, served as `Prepared` serves one source's: `train` (the drawn
    items, packed), `eval_items` (each source's share of the held-out items), `collate`,
    `ordered`, the report; with `sources` (each source's Prepared) and `evaluated` (the source
    the end-of-training evaluator scores, with the whole data.max_eval_tokens)."""

    def __init__(self, cfg: DataConfig, sources: list[Prepared], train, eval_items, packing: str, table: list[dict]):
        self.cfg, self.sources, self.train, self.eval_items, self.packing = cfg, sources, train, eval_items, packing
        self.cache_path = cache.root(cfg.cache_dir, "data")
        self.cache_hit = all(p.cache_hit for p in sources)
        self.evaluated_index = _evaluated(sources)
        self.evaluated = sources[self.evaluated_index]
        self.task = None  # the mixture as a whole has no one format: see `evaluated`
        self.report = self._report(table)

    def _report(self, table: list[dict]) -> dict:
        cfg, sources, ev = self.cfg, self.sources, self.evaluated
        held = [p.report["validation"] for p in sources]
        what = "held-out answers" if ev.task else "held-out documents"
        return {
            "block_size": cfg.block_size,
            "add_eos": cfg.add_eos,
            "packing": self.packing,
            "mixture": table,
            "sources": [p.report for p in sources],
            "train": {"tokens": sum(r["tokens_drawn"] for r in table), "items": len(self.train)},
            # Over every source's held-out split (the Trainer's evaluations take a part of each):
            # the tokens the loss is over and their bytes, for bits per byte.
            "validation": {
                "tokens": sum(h["tokens"] for h in held),
                "trained_tokens": sum(h.get("trained_tokens", h["tokens"]) for h in held),
                "bytes": sum(h["bytes"] for h in held),
            },
            "eval": {
                "max_tokens": cfg.max_eval_tokens,
                "blocks": len(self.eval_items),  # the file's name for the items (blocks, rows or examples)
                "tokens": self.eval_items.n_tokens,
            },
            "evaluated_source": self.evaluated_index,
            "evaluator": f"data.mixture{table[self.evaluated_index]['source']}: its {what}",
        }

    @property
    def validation(self) -> shards.BlockDataset:
        """The evaluated source's held-out tokens in blocks (what `validate` times scoring on)."""
        return self.evaluated.validation

    @cached_property
    def validation_ids(self) -> dict[str, list[str]]:
        return {
            f"data.mixture{row['source']}": p.validation_ids
            for row, p in zip(self.report["mixture"], self.sources, strict=True)
        }

    def eval_documents(self, split: str = "validation") -> shards.EvalDocuments:
        return self.evaluated.eval_documents(split)

    def eval_examples(self, split: str = "validation"):
        return self.evaluated.eval_examples(split)
