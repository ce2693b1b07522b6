"""Token shards: the prepared data's layout on disk, and what reads it: memory-mapped blocks for
the Trainer, whole documents for the evaluator, each with a seeded subset capped in tokens.

An entry of the data cache holds
  manifest.json          format (LAYOUT_VERSION), tokenizer fingerprint, dtype, EOS; per split:
                         documents, characters, bytes, tokens, and its shards in order, each with
                         its token count and SHA-256; the data report
  train/*.bin            token ids of the split's documents one after another (EOS after each,
  validation/*.bin       with data.add_eos): raw little-endian integers of the smallest unsigned
                         type that holds the vocabulary (uint16 up to 65,536 tokens), no header
  <split>.docs.npy       a row per document, in order: tokens, UTF-8 bytes, whitespace-separated
                         words (for bits-per-byte and word perplexity without the text)
  <split>.ids.jsonl      the documents' ids (file, file:line, play, split:row), one a line

Raw files read through np.memmap, not Arrow: 2 bytes a GPT-2 token and nothing else, a block
is one slice of one or two maps (no per-row conversion), blocks of any size come from the same
files, and nothing but numpy is needed to read them (bench/RESULTS.md measures both).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

# The version of this layout on disk (the manifest's "format"): bump when it changes.
LAYOUT_VERSION = 1
SPLITS = ("train", "validation")
# Task data: beside each shard, one byte per token, 1 where the token is trained on.
MASK_SUFFIX = ".mask"
DOCS = np.dtype([("tokens", "<i8"), ("bytes", "<i8"), ("words", "<i8")])
# A part's rows, before they are joined: `continues` marks a row that goes on with the document
# of the row before it (a long document cut between units of work).
PART_DOCS = np.dtype([("tokens", "<i8"), ("bytes", "<i8"), ("words", "<i8"), ("continues", "u1")])


def dtype_for(vocabulary: int) -> str:
    """The smallest unsigned type that holds every token id."""
    return "uint16" if vocabulary <= 1 << 16 else "uint32"


class Tokens:
    """A split's token ids across its shards: any range [start, stop) read from the memory maps,
    found by the shards' cumulative token counts (no scan)."""

    def __init__(self, root: Path, shards: list[dict], dtype: str, suffix: str | None = None):
        self.files = [Path(root) / s["file"] for s in shards]
        if suffix is not None:  # the masks beside the shards: the same counts, another file
            self.files = [f.with_suffix(suffix) for f in self.files]
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.offsets = np.cumsum([0, *(s["tokens"] for s in shards)])
        self._maps: list | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def check(self) -> str | None:
        """What is wrong with the shard files (a missing or cut-short file), without reading them."""
        for path, tokens in zip(self.files, np.diff(self.offsets), strict=True):
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != tokens * self.dtype.itemsize:
                return f"{path} holds {path.stat().st_size:,} bytes, not the {tokens * self.dtype.itemsize:,} listed"
        return None

    def _map(self, shard: int) -> np.memmap:
        if self._maps is None:
            self._maps = [None] * len(self.files)
        if self._maps[shard] is None:
            self._maps[shard] = np.memmap(self.files[shard], self.dtype, mode="r")
        return self._maps[shard]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64."""
        out = np.empty(stop - start, np.int64)
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        at = start
        while at < stop:
            first, end = self.offsets[shard], self.offsets[shard + 1]
            take = min(stop, end) - at
            out[at - start : at - start + take] = self._map(shard)[at - first : at - first + take]
            at += take
            shard += 1
        return out

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn get the file names, never a copy of the data.
        return {**self.__dict__, "_maps": None}


class Blocks:
    """What the block datasets share: item i (negative counts from the end) from `_item`, a
    slice of them stacked into one batch, and their tokens."""

    block_size: int

    def _item(self, i: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, item):
        import torch

        if isinstance(item, slice):
            rows = [self._item(i) for i in range(*item.indices(len(self)))]
            if not rows:
                return {"input_ids": torch.empty((0, self.block_size), dtype=torch.long)}
            return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
        if item < 0:
            item += len(self)
        if not 0 <= item < len(self):
            raise IndexError(f"block {item} of {len(self)}")
        return self._item(item)

    @property
    def n_tokens(self) -> int:
        return len(self) * self.block_size


class BlockDataset(Blocks):
    """Blocks of `block_size` tokens of a split, as the Trainer takes them: item i is
    {"input_ids": LongTensor[block_size]}, tokens [b * block_size, (b + 1) * block_size) of the
    split for block b = indices[i] (all blocks, in order, without indices). Only the final
    partial block is left out, as the packing of the whole split into blocks always did."""

    def __init__(self, tokens: Tokens, block_size: int, indices: np.ndarray | None = None, masks: Tokens | None = None):
        self.tokens, self.block_size, self.indices, self.masks = tokens, block_size, indices, masks

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.tokens) // self.block_size

    def _block(self, i: int, tokens: Tokens | None = None) -> np.ndarray:
        b = int(self.indices[i]) if self.indices is not None else i
        return (tokens or self.tokens).read(b * self.block_size, (b + 1) * self.block_size)

    def _item(self, i: int) -> dict:
        import torch

        ids = self._block(i)
        if self.masks is None:
            return {"input_ids": torch.from_numpy(ids)}
        # Task data packed as concat: the loss only where the mask says (the answers).
        labels = np.where(self._block(i, self.masks).astype(bool), ids, -100)
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}

    def select(self, indices) -> BlockDataset:
        """The blocks at `indices` (of this dataset), in that order."""
        chosen = np.asarray(indices, np.int64)
        base = self.indices[chosen] if self.indices is not None else chosen
        return BlockDataset(self.tokens, self.block_size, base, self.masks)


class Example(NamedTuple):
    """One example as the packers take it: its token ids and which of them are trained on."""

    ids: np.ndarray
    trained: np.ndarray


class Examples:
    """A split's examples for isolated and padded packing, read from the memory maps as they
    are needed: example i is tokens [starts[i], starts[i] + lengths[i]) with their mask (task
    data) or all trained (text). Only the two index arrays are held, 16 bytes an example."""

    def __init__(self, tokens: Tokens, masks: Tokens | None, starts: np.ndarray, lengths: np.ndarray):
        self.tokens, self.masks, self.starts, self.lengths = tokens, masks, starts, lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> Example:
        start, stop = int(self.starts[i]), int(self.starts[i] + self.lengths[i])
        ids = self.tokens.read(start, stop)
        trained = self.masks.read(start, stop).astype(bool) if self.masks is not None else np.ones(len(ids), bool)
        return Example(ids, trained)

    def select(self, indices) -> Examples:
        chosen = np.asarray(indices, np.int64)
        return Examples(self.tokens, self.masks, self.starts[chosen], self.lengths[chosen])

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


def examples(root: Path, split: str, tokens: Tokens, masks: Tokens | None, block_size: int) -> Examples:
    """The examples of a split: its documents (task data: each one example, at most block_size
    long since preparing cut or dropped longer ones); a text document longer than block_size
    is cut into pieces of block_size, each an example of its own."""
    lengths = np.asarray(load_table(root / f"{split}.docs.npy")["tokens"], np.int64)
    starts = np.cumsum(lengths) - lengths
    pieces = -(-lengths // block_size)
    if masks is not None or not len(lengths) or pieces.max() <= 1:
        return Examples(tokens, masks, starts, lengths)
    doc = np.repeat(np.arange(len(lengths)), pieces)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece number within its document
    piece_starts = starts[doc] + k * block_size
    return Examples(tokens, None, piece_starts, np.minimum(block_size, starts[doc] + lengths[doc] - piece_starts))


def sample_examples(items: Examples, max_tokens: int, seed: int) -> Examples:
    """A fixed, seeded subset of whole examples holding at most `max_tokens` tokens (at least
    one), in the split's order; all of them when they fit."""
    return items.select(choose_documents(items.lengths, max_tokens, seed))


def sample_blocks(blocks: BlockDataset, max_tokens: int, seed: int) -> BlockDataset:
    """A fixed, seeded subset of whole blocks holding at most `max_tokens` tokens (at least one
    block), in the split's order; all of them when they fit."""
    n, k = len(blocks), max(1, max_tokens // blocks.block_size)
    if n <= k:
        return blocks
    return blocks.select(np.sort(np.random.default_rng(seed).choice(n, k, replace=False)))


@dataclass
class EvalDocuments:
    """Whole documents for the evaluator: each as it scores them, [EOS] + the document's tokens
    as they were trained, with its UTF-8 bytes and words; and the size of the split they were
    drawn from."""

    ids: list[list[int]]
    names: list[str]
    bytes: list[int]
    words: list[int]
    split_documents: int
    split_tokens: int
    cut: bool = False
    """One document longer than data.max_eval_tokens, of which only its first max_eval_tokens
    tokens are scored; its bytes and words are then those of the whole document until the
    evaluator counts them from the text it scores (`count_cut`)."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        """Tokens scored: each document's own, its final EOS included."""
        return sum(len(d) - 1 for d in self.ids)


def load_table(path: Path) -> np.ndarray:
    table = np.load(path, mmap_mode=None) if path.stat().st_size < 1 << 20 else np.load(path, mmap_mode="r")
    return table


def choose_documents(lengths: np.ndarray, max_tokens: int, seed: int) -> np.ndarray:
    """Indices of whole documents holding at most `max_tokens` tokens, drawn in a seeded order
    (a document that does not fit is passed over), in the split's order; all when they fit. At
    least one document, even if it alone is longer."""
    n = len(lengths)
    if n == 0 or int(lengths.sum()) <= max_tokens:
        return np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    budget, chosen, shortest = max_tokens, [], int(lengths.min())
    for i in order:
        length = int(lengths[i])
        if length <= budget:
            chosen.append(i)
            budget -= length
            if budget < shortest:
                break
    return np.sort(np.asarray(chosen or [order[0]], np.int64))


def read_ids(path: Path) -> list[str]:
    """Every document's name a split's ids file holds, in order."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_names(path: Path, chosen: np.ndarray) -> list[str]:
    wanted, names = set(chosen.tolist()), []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i in wanted:
                names.append(json.loads(line))
    return names


def documents(
    root: Path, split: str, tokens: Tokens, eos: int, add_eos: bool, max_tokens: int, seed: int
) -> EvalDocuments:
    """The evaluator's documents of a split. With add_eos the documents are separate texts: a
    seeded subset of whole documents (choose_documents). Without it they are pieces of one text
    (lines of an article): the first ones that fit, scored as one text."""
    table = load_table(root / f"{split}.docs.npy")
    lengths = np.asarray(table["tokens"])
    starts = np.cumsum(lengths) - lengths
    if add_eos:
        chosen = choose_documents(lengths, max_tokens, seed)
        ids = [[eos, *tokens.read(int(starts[i]), int(starts[i] + lengths[i])).tolist()] for i in chosen]
        n_bytes = [int(table["bytes"][i]) for i in chosen]
        words = [int(table["words"][i]) for i in chosen]
    else:
        fit = int(np.searchsorted(np.cumsum(lengths), max_tokens, side="right"))
        chosen = np.arange(max(1, fit) if len(lengths) else 0)
        end = int(lengths[chosen].sum())
        ids = [[eos, *tokens.read(0, end).tolist()]] if len(chosen) else []
        n_bytes = [int(table["bytes"][chosen].sum())] if len(chosen) else []
        words = [int(table["words"][chosen].sum())] if len(chosen) else []
    names = read_names(root / f"{split}.ids.jsonl", chosen)
    # The cap bounds the work even when no whole document fits in it: then one document's first
    # max_tokens tokens are scored (choose_documents and the pieces above keep one at least).
    cut = len(ids) == 1 and len(ids[0]) - 1 > max_tokens
    if cut:
        ids = [ids[0][: max_tokens + 1]]
    return EvalDocuments(ids, names, n_bytes, words, len(lengths), int(lengths.sum()), cut)


def read_manifest(root: Path) -> dict:
    return json.loads((Path(root) / "manifest.json").read_text())
