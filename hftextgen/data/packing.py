"""Packing task examples into training rows: isolated (several examples a row, each attending
only to itself) or padded (one example a row, batches grouped by length).

An example is its token ids and a boolean mask of the tokens trained on; its labels are the ids
where trained and -100 elsewhere, aligned with the ids (the model shifts them: position t
predicts token t+1).

isolated: `pack` assigns examples to rows of at most block_size tokens, `PackedRows` serves a
row's examples, and `IsolatedCollator` concatenates them with position ids that restart at 0 per
example and no attention mask. From such position ids transformers builds a block-diagonal
causal mask itself (masking_utils.find_packed_sequence_indices; sdpa and eager, and flex where
the model has it: Llama, not GPT-2; several rows a batch), provided the model runs without a KV
cache: with `use_cache=True` (most configs' default; the Trainer sets False) the detection is
skipped and the examples silently see each other. Flash-attention detects packing from position
ids only at batch size 1, so for it the collator can add the varlen boundaries (`cu_seq_lens_q`
...) itself, which work at any batch size.

padded: `PaddedCollator` right-pads one example a row with an attention mask, and
`length_grouped_order` / `LengthGroupedOrder` order the examples so that a batch holds examples
of similar lengths.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DataCollatorWithFlattening

from .shards import Example

IGNORE = -100  # the label that the loss skips (torch's cross_entropy ignore_index)


def collate_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """concat: stack the blocks. Labels are the inputs (the model shifts them), or for task data
    the inputs where trained: no padding, so EOS stays a target and the model learns to end
    documents."""
    input_ids = torch.stack([e["input_ids"] for e in examples])
    if "labels" in examples[0]:
        return {"input_ids": input_ids, "labels": torch.stack([e["labels"] for e in examples])}
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def real_tokens(item) -> int:
    """The tokens of one training item as a collator takes it, never padding: a block's
    (concat: all of it), an example's (padded), its examples' (isolated: a row), or a preference
    pair's (pairs.PairItem: the prompt once with each answer)."""
    if hasattr(item, "rejected"):
        return 2 * len(item.prompt) + len(item.chosen) + len(item.rejected)
    if isinstance(item, Example):
        return len(item.ids)
    if isinstance(item, dict):
        return len(item["input_ids"])
    return sum(len(example.ids) for example in item)


def labels_of(example: Example) -> np.ndarray:
    """The ids where trained, -100 elsewhere."""
    return np.where(np.asarray(example.trained, dtype=bool), example.ids, IGNORE).astype(np.int64)


# ---------------------------------------------------------------- isolated: assigning rows


@dataclass(frozen=True)
class Rows:
    """Examples assigned to rows, as two index arrays (no Python object per example or row):
    row r holds the examples order[bounds[r]:bounds[r + 1]]."""

    order: np.ndarray  # example indices, row after row
    bounds: np.ndarray  # len(rows) + 1 offsets into order

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, row: int) -> np.ndarray:
        return self.order[self.bounds[row] : self.bounds[row + 1]]

    def tokens(self, lengths: np.ndarray) -> np.ndarray:
        """The number of tokens in each row."""
        return np.add.reduceat(np.asarray(lengths)[self.order], self.bounds[:-1]) if len(self) else np.zeros(0, int)


class _RowsByFree:
    """The open rows grouped by their free space, first in first out within a group.

    Best-fit decreasing only ever asks "the rows with exactly f tokens free", so rows with the
    same free space are interchangeable and kept as chunks of row ids, not one by one."""

    def __init__(self, block_size: int):
        self.chunks: list[deque[np.ndarray]] = [deque() for _ in range(block_size + 1)]
        self.count = np.zeros(block_size + 1, dtype=np.int64)

    def add(self, free: int, rows: np.ndarray) -> None:
        if len(rows):
            self.chunks[free].append(rows)
            self.count[free] += len(rows)

    def take(self, free: int, k: int) -> np.ndarray:
        taken, chunks, need = [], self.chunks[free], k
        while need:
            chunk = chunks.popleft()
            if len(chunk) > need:
                chunks.appendleft(chunk[need:])
                chunk = chunk[:need]
            taken.append(chunk)
            need -= len(chunk)
        self.count[free] -= k
        return np.concatenate(taken) if len(taken) > 1 else taken[0]


def _place(rows: _RowsByFree, length: int, count: int, block_size: int, opened: int) -> tuple[list[np.ndarray], int]:
    """Best fit for `count` examples of one length: each goes to the open row with the least free
    space that still holds it, else to a new row. The row an example filled stays the tightest
    fit for the next one of the same length, so a row with f free takes f // length of them at
    once. Returns the row of each example (in chunks) and the number of rows opened so far."""
    placed: list[np.ndarray] = []
    for free in length + np.flatnonzero(rows.count[length:]):  # tightest fit first
        free, per_row = int(free), int(free) // length
        full = min(int(rows.count[free]), count // per_row)
        if full:
            taken = rows.take(free, full)
            placed.append(np.repeat(taken, per_row))
            rows.add(free - per_row * length, taken)
            count -= full * per_row
        if 0 < count < per_row and rows.count[free]:  # the rest fits into one more of these rows
            taken = rows.take(free, 1)
            placed.append(np.repeat(taken, count))
            rows.add(free - count * length, taken)
            count = 0
        if not count:
            return placed, opened
    per_row = block_size // length
    new = np.arange(opened, opened + -(-count // per_row))
    placed.append(np.repeat(new, per_row)[:count])
    rest = count - (len(new) - 1) * per_row  # in the last new row
    rows.add(block_size - per_row * length, new[:-1] if rest < per_row else new)
    if rest < per_row:
        rows.add(block_size - rest * length, new[-1:])
    return placed, opened + len(new)


def pack(lengths: np.ndarray, block_size: int) -> Rows:
    """Assigns examples (given their lengths) to rows of at most block_size tokens, never
    splitting one: best-fit decreasing, exact, and deterministic (no randomness; ties keep the
    input order). Shuffling the rows is the sampler's job.

    Lengths are at most block_size, so best fit works on counts per length and per free space:
    O(n log n) for the sort plus O(block_size^2) small steps, whatever n; memory is a few
    index arrays of n. Examples longer than block_size are the caller's to cut or drop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or (len(lengths) and (lengths.min() < 1 or lengths.max() > block_size)):
        raise ValueError(f"pack needs lengths of 1..{block_size} (block_size) tokens; cut or drop the others first")
    by_length = np.argsort(-lengths, kind="stable")  # longest first
    counts = np.bincount(lengths, minlength=block_size + 1)
    row_of = np.empty(len(lengths), dtype=np.int64)  # the row of by_length[i]
    rows, opened, start = _RowsByFree(block_size), 0, 0
    for length in np.flatnonzero(counts)[::-1]:
        placed, opened = _place(rows, int(length), int(counts[length]), block_size, opened)
        count = int(counts[length])
        row_of[start : start + count] = np.concatenate(placed)
        start += count
    within = np.argsort(row_of, kind="stable")  # rows in the order opened, longest example first
    bounds = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=opened))])
    return Rows(order=by_length[within], bounds=bounds)


class PackedRows(torch.utils.data.Dataset):
    """The rows as a dataset: item r is the list of row r's examples, for `IsolatedCollator`."""

    def __init__(self, examples: Sequence[Example], rows: Rows):
        self.examples, self.rows = examples, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int) -> list[Example]:
        return [self.examples[int(i)] for i in self.rows[row]]

    def select(self, indices) -> PackedRows:
        """The rows at `indices`, in that order (as BlockDataset.select: validate times a few)."""
        chosen = np.asarray(indices, dtype=np.int64)
        sizes = np.diff(self.rows.bounds)[chosen]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        at = np.repeat(self.rows.bounds[chosen] - bounds[:-1], sizes) + np.arange(int(bounds[-1]))
        return PackedRows(self.examples, Rows(order=self.rows.order[at], bounds=bounds))

    @property
    def n_tokens(self) -> int:
        """Real tokens in the rows (every example is in one)."""
        if hasattr(self.examples, "lengths"):
            return int(self.examples.lengths[self.rows.order].sum())
        return sum(len(self.examples[int(i)].ids) for i in self.rows.order)


# ---------------------------------------------------------------- isolated: building batches


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class IsolatedCollator:
    """A batch of rows (each a list of examples) -> input_ids, labels and position_ids, all
    (rows, width), and no attention_mask: the restarting position ids are the mask.

    Each row is flattened by transformers' DataCollatorWithFlattening, which restarts the
    position ids at 0 per example and sets the label of each example's first token to -100, so
    that no label is predicted across a boundary. Rows are then right-padded to the longest row
    of the batch, rounded up to pad_to_multiple_of (block_size gives every row exactly
    block_size, for static shapes). The padding is a segment of its own (positions 0, 1, ...,
    labels -100), so it attends only to itself and no real token attends to it.

    flash_attn_kwargs adds cu_seq_lens_q/k and max_length_q/k over the whole batch flattened
    (rows after rows, padding segments included): flash-attention's variable-length kernels
    then keep the examples apart at any batch size (from position ids alone it does so only
    for one row a batch). sdpa and eager ignore them."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1, flash_attn_kwargs: bool = False):
        self.pad_id, self.multiple, self.flash = pad_id, pad_to_multiple_of, flash_attn_kwargs
        self.flatten = DataCollatorWithFlattening(return_tensors="np", separator_id=IGNORE)

    def row(self, examples: Sequence[Example]) -> dict[str, np.ndarray]:
        """One row, unpadded: input_ids, labels, position_ids, each of shape (tokens,)."""
        flat = self.flatten([{"input_ids": e.ids, "labels": labels_of(e)} for e in examples])
        return {key: flat[key][0] for key in ("input_ids", "labels", "position_ids")}

    def __call__(self, rows: Sequence[Sequence[Example]]) -> dict[str, Any]:
        built = [self.row(examples) for examples in rows]
        width = _round_up(max(len(b["input_ids"]) for b in built), self.multiple)
        batch = {
            "input_ids": np.full((len(built), width), self.pad_id, dtype=np.int64),
            "labels": np.full((len(built), width), IGNORE, dtype=np.int64),
            "position_ids": np.tile(np.arange(width, dtype=np.int64), (len(built), 1)),  # padding: 0, 1, ...
        }
        for i, b in enumerate(built):
            for key in batch:
                batch[key][i, : len(b[key])] = b[key]
        out: dict[str, Any] = {key: torch.from_numpy(value) for key, value in batch.items()}
        if self.flash:
            out.update(flash_attn_kwargs(batch["position_ids"]))
        return out


def flash_attn_kwargs(position_ids: np.ndarray) -> dict[str, Any]:
    """The sequence boundaries of flash-attention's varlen kernels for (rows, width) position
    ids that restart at 0 per sequence, over the rows flattened one after the other (the
    kernels see the batch as one long row): int32 cumulative offsets and Python-int maxima, as
    DataCollatorWithFlattening gives them for one row."""
    flat = position_ids.reshape(-1)
    cu = np.append(np.flatnonzero(flat == 0), len(flat)).astype(np.int32)
    longest = int(np.diff(cu).max())
    cu_t = torch.from_numpy(cu)
    return {"cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t, "max_length_q": longest, "max_length_k": longest}


# ---------------------------------------------------------------- padded


class PaddedCollator:
    """A batch of examples, one a row -> input_ids, attention_mask and labels (-100 on untrained
    tokens and on padding), right-padded to the longest example, rounded up to
    pad_to_multiple_of. Written here rather than transformers' padding collators, which pad
    through a tokenizer; this needs only the pad id."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id, self.multiple = pad_id, pad_to_multiple_of

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        width = _round_up(max(len(e.ids) for e in examples), self.multiple)
        ids = np.full((len(examples), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(examples), width), IGNORE, dtype=np.int64)
        mask = np.zeros((len(examples), width), dtype=np.int64)
        for i, e in enumerate(examples):
            ids[i, : len(e.ids)], labels[i, : len(e.ids)], mask[i, : len(e.ids)] = e.ids, labels_of(e), 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return {key: torch.from_numpy(value) for key, value in batch.items()}


def length_grouped_order(lengths: np.ndarray, batch_size: int, seed: int, megabatch: int | None = 50) -> np.ndarray:
    """An order of the examples in which each run of batch_size holds examples of similar
    lengths: the Trainer's group_by_length (get_length_grouped_indices) in numpy, so that 10M
    examples cost index arrays, not Python lists; plus a seeded shuffle of the batches, where
    the Trainer keeps each megabatch's batches longest first.

    A seeded permutation is cut into megabatches of megabatch * batch_size examples (None: one
    megabatch, the least padding but the same batches every epoch up to ties), each sorted by
    length, longest first, and cut into batches; the full batches are shuffled, the one with the
    longest example first (an out-of-memory shows at once), and a last partial batch stays last
    so that a DataLoader cutting every batch_size indices cuts these batches."""
    lengths = np.asarray(lengths)
    n, rng = len(lengths), np.random.default_rng(seed)
    perm = rng.permutation(n)
    group = np.arange(n) // (megabatch * batch_size if megabatch else max(n, 1))
    order = perm[np.lexsort((-lengths[perm], group))]
    full = n // batch_size
    batches = rng.permutation(full)
    if full:  # the batch holding the longest example first
        longest = int(np.argmax(lengths[order[: full * batch_size]])) // batch_size
        batches = np.concatenate([[longest], batches[batches != longest]])
    rank = np.empty(full + 1, dtype=np.int64)
    rank[batches], rank[full] = np.arange(full), full  # the partial batch (if any) last
    return order[np.argsort(rank[np.arange(n) // batch_size], kind="stable")]


class LengthGroupedOrder(torch.utils.data.Sampler[int]):
    """`length_grouped_order` as a sampler, a new order each epoch (seed + epoch)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, megabatch: int | None = 50):
        self.lengths, self.batch_size, self.seed, self.megabatch = np.asarray(lengths), batch_size, seed, megabatch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = length_grouped_order(self.lengths, self.batch_size, self.seed + self.epoch, self.megabatch)
        return iter(order.tolist())
