"""Prepared preference pairs served: the memory-mapped pairs, and the collator that packs a batch of them into rows.

On disk a pair is one item of the shards (preference.py writes it): the prompt's ids once, then
the chosen answer's, then the rejected answer's, and beside them a code per token
(preference.CODES). `Pairs` serves them from the memory maps with the reference model's
log-probabilities once they are computed (train/reference.py caches them beside the data).

A batch is per_device_train_batch_size pairs, as in TRL. `PairCollator` makes each pair's two
sequences, prompt + chosen and prompt + rejected, and packs the batch's 2 x pairs sequences into
rows of at most data.block_size tokens (packing.pack: best fit, no padding but the rows' ends),
each sequence attending only to itself: the position ids restart at 0 for each, as the isolated
packing of task data does (packing.IsolatedCollator), and transformers builds the
block-diagonal mask from them. TRL pads each sequence to the batch's longest instead (it turns
padding-free off for DPO). The model is asked for the logits of the positions whose next token
is scored only (`logits_to_keep`, a boolean mask: the answers, and for ORPO's language-model
term the chosen sequence's prompt too), and `PairTargets`, the batch's `labels`, says which
sequence each of those belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import UserError
from . import packing, preference, shards
from .config import DataConfig
from .shards import SPLITS


class PairItem(NamedTuple):
    """One pair as the collator takes it."""

    index: int  # its position in its split
    prompt: np.ndarray
    chosen: np.ndarray
    chosen_trained: np.ndarray
    rejected: np.ndarray
    rejected_trained: np.ndarray
    reference: np.ndarray | None  # (chosen, rejected) summed log-probabilities of the reference model


class Pairs(torch.utils.data.Dataset):
    """A split's pairs, read from the memory maps as they are needed (two index arrays held, and
    the reference's log-probabilities as a memory-mapped array of the whole split)."""

    def __init__(self, tokens: shards.Tokens, codes: shards.Tokens, starts, lengths, indices=None, reference=None):
        self.tokens, self.codes, self.starts, self.lengths = tokens, codes, starts, lengths
        self.indices = np.arange(len(lengths)) if indices is None else np.asarray(indices, np.int64)
        self.reference = reference

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> PairItem:
        index = int(self.indices[i])
        start, stop = int(self.starts[index]), int(self.starts[index] + self.lengths[index])
        p = preference.parts(self.tokens.read(start, stop), self.codes.read(start, stop))
        ref = None if self.reference is None else np.asarray(self.reference[index], np.float64)
        return PairItem(index, p.prompt, p.chosen, p.chosen_trained, p.rejected, p.rejected_trained, ref)

    def select(self, indices) -> Pairs:
        """The pairs at `indices` (of this dataset), in that order."""
        return Pairs(
            self.tokens,
            self.codes,
            self.starts,
            self.lengths,
            self.indices[np.asarray(indices, np.int64)],
            self.reference,
        )

    def with_reference(self, reference) -> Pairs:
        """These pairs with the reference's log-probabilities ((split pairs, 2), by split index)."""
        return Pairs(self.tokens, self.codes, self.starts, self.lengths, self.indices, reference)

    @property
    def stored_tokens(self) -> np.ndarray:
        """Tokens each pair holds on disk (the prompt once)."""
        return np.asarray(self.lengths)[self.indices]


# ---------------------------------------------------------------- batches


@dataclass
class PairTargets:
    """A batch's `labels`, for the preference loss (train/preference_loss.py): for each position
    the model returns logits for (logits_to_keep, row after row), the next token and the
    sequence it belongs to. Sequence k < pairs is pair k's chosen one, pairs + k its rejected one
    (TRL's order). A plain object, not a tensor or a mapping: the stock Trainer hands it to
    compute_loss_func as it is, and counts no tokens in it."""

    targets: torch.Tensor  # (N,) int64: the token each kept position predicts
    sequence: torch.Tensor  # (N,) int64: the sequence it belongs to
    answer: torch.Tensor  # (N,) bool: the target is an answer token (else a prompt token: ORPO's LM term)
    keep: torch.Tensor  # (rows, width) bool: the kept positions
    pairs: int
    tokens: int  # real tokens in the batch (padding left out)
    indices: torch.Tensor  # (pairs,) int64: each pair's index in its split
    reference: torch.Tensor | None = None  # (pairs, 2) float64: the reference's log-probabilities

    def to(self, device, non_blocking: bool = False) -> PairTargets:
        moved = {
            name: getattr(self, name).to(device, non_blocking=non_blocking)
            for name in ("targets", "sequence", "answer", "keep", "indices", "reference")
            if getattr(self, name) is not None
        }
        return replace(self, **moved)


class PairCollator:
    """A batch of pairs -> input_ids, position_ids and logits_to_keep, all (rows, width), and
    labels (PairTargets); no attention_mask (the restarting position ids are the mask). Rows
    hold at most `block_size` tokens, padded to the batch's longest row rounded up to
    pad_to_multiple_of; the padding is a segment of its own and is never scored.
    prompt_targets: keep the chosen sequences' prompt positions too (ORPO's language-model term).
    flash_attn_kwargs: as packing.IsolatedCollator."""

    def __init__(
        self,
        pad_id: int,
        block_size: int,
        *,
        prompt_targets: bool = False,
        pad_to_multiple_of: int = 1,
        flash_attn_kwargs: bool = False,
    ):
        self.pad_id, self.block_size, self.prompt_targets = pad_id, block_size, prompt_targets
        self.multiple, self.flash = pad_to_multiple_of, flash_attn_kwargs

    def sequences(self, items: list[PairItem]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids, trained, scored) of each sequence, chosen ones first: trained marks answer
        tokens, scored the tokens whose prediction the loss reads."""
        out = []
        for side in ("chosen", "rejected"):
            for item in items:
                answer, trained = getattr(item, side), getattr(item, f"{side}_trained")
                ids = np.concatenate([item.prompt, answer])
                marked = np.r_[np.zeros(len(item.prompt), bool), trained]
                scored = marked.copy()
                if self.prompt_targets and side == "chosen":
                    scored[1:] = True
                out.append((ids, marked, scored))
        return out

    def __call__(self, items: list[PairItem]) -> dict[str, Any]:
        seqs = self.sequences(items)
        lengths = np.array([len(s[0]) for s in seqs])
        if lengths.max() > self.block_size:
            raise ValueError(f"a sequence of {lengths.max()} tokens is longer than block_size {self.block_size}")
        rows = packing.pack(lengths, self.block_size)
        width = -(-int(rows.tokens(lengths).max()) // self.multiple) * self.multiple
        ids = np.full((len(rows), width), self.pad_id, np.int64)
        positions = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))  # padding: 0, 1, ...
        next_token = np.zeros((len(rows), width), np.int64)
        keep = np.zeros((len(rows), width), bool)
        answer = np.zeros((len(rows), width), bool)
        owner = np.full((len(rows), width), -1, np.int64)
        for r in range(len(rows)):
            at = 0
            for s in rows[r]:
                seq_ids, marked, scored = seqs[int(s)]
                n = len(seq_ids)
                ids[r, at : at + n], positions[r, at : at + n] = seq_ids, np.arange(n)
                # Position t predicts token t + 1 of its own sequence.
                next_token[r, at : at + n - 1] = seq_ids[1:]
                keep[r, at : at + n - 1], answer[r, at : at + n - 1] = scored[1:], marked[1:]
                owner[r, at : at + n] = s
                at += n
        labels = PairTargets(
            targets=torch.from_numpy(next_token[keep]),
            sequence=torch.from_numpy(owner[keep]),
            answer=torch.from_numpy(answer[keep]),
            keep=torch.from_numpy(keep),
            pairs=len(items),
            tokens=int(lengths.sum()),
            indices=torch.tensor([item.index for item in items], dtype=torch.long),
            reference=torch.from_numpy(np.stack([i.reference for i in items]))
            if items[0].reference is not None
            else None,
        )
        out = {
            "input_ids": torch.from_numpy(ids),
            "position_ids": torch.from_numpy(positions),
            "logits_to_keep": torch.from_numpy(keep),
            "labels": labels,
        }
        if self.flash:
            out.update(packing.flash_attn_kwargs(positions))
        return out


# ---------------------------------------------------------------- the prepared data


class PreparedPairs:
    """Prepared pairs, memory-mapped, as a run uses them: `train` (the training pairs),
    `eval_items` (the held-out pairs the Trainer's evaluations and the evaluator score:
    data.max_eval_tokens of them, a seeded subset of whole pairs, the same every time), the
    data report, and where it lives. The counterpart of corpus.Packed for data.format preference."""

    pairs = True

    def __init__(self, path: Path, cfg: DataConfig, cache_hit: bool, counts, for_training: bool = True):
        """`counts`: the data report's numbers from a manifest (prepared.py's, whose prepare() makes this)."""
        self.cache_path, self.cache_hit, self.cfg = path, cache_hit, cfg
        self.manifest = shards.read_manifest(path)
        if self.manifest.get("format") != shards.LAYOUT_VERSION:
            raise UserError(f"{path} holds prepared data of another layout: delete it and run again")
        self.task = {"format": "preference", "loss_on": "answers"}
        self.packing = "pairs"
        self.split = {}
        for split in SPLITS:
            listed = self.manifest["splits"][split]["shards"]
            tokens = shards.Tokens(path, listed, self.manifest["dtype"])
            codes = shards.Tokens(path, listed, "uint8", shards.MASK_SUFFIX)
            problem = tokens.check() or codes.check()
            if problem:
                raise UserError(f"the prepared data is damaged ({problem}): delete {path} and prepare it again")
            found = shards.examples(path, split, tokens, codes, cfg.block_size)
            self.split[split] = Pairs(tokens, codes, found.starts, found.lengths)
        self.report = counts(self.manifest, cfg.block_size, self.task)
        for split in SPLITS if self.manifest["hold_out"] else ("train",):
            if not len(self.split[split]) and for_training:
                raise UserError(f"the {split} split holds no pairs: {_why_none(self.report[split], cfg)}")
        self.train = self.split["train"]
        held = self.split["validation"]
        self.eval_items = held.select(shards.choose_documents(held.stored_tokens, cfg.max_eval_tokens, cfg.split_seed))
        for split in SPLITS:
            self.report[split].pop("blocks", None)
            self.report[split].pop("tokens_dropped", None)
        self.report["packing"] = "pairs"
        self.report["eval"] = {
            "max_tokens": cfg.max_eval_tokens,
            "blocks": len(self.eval_items),
            "tokens": int(self.eval_items.stored_tokens.sum()),
        }

    def limit_train(self, most: int | None, seed: int) -> None:
        """Train on a seeded subset of at most `most` training pairs (preference.max_train_pairs)."""
        if most is not None and most < len(self.train):
            chosen = np.sort(np.random.default_rng(seed).choice(len(self.train), most, replace=False))
            self.train = self.train.select(chosen)
            self.report["train"]["pairs_trained"] = most

    @property
    def evaluated(self) -> PreparedPairs:
        return self

    @property
    def validation_ids(self) -> list[str]:
        return shards.read_ids(self.cache_path / "validation.ids.jsonl")

    def names(self, pairs: Pairs, split: str = "validation") -> list[str]:
        """Where each of `pairs` came from (file and record)."""
        return shards.read_names(self.cache_path / f"{split}.ids.jsonl", pairs.indices) if len(pairs) else []

    def ordered(self, batch_size: int, seed: int) -> Pairs:
        return self.train


def _why_none(split: dict, cfg: DataConfig) -> str:
    counts = split.get("examples") or {}
    if counts.get("dropped_too_long"):
        return (
            f"{counts['dropped_too_long']:,} pairs had an answer longer than data.block_size={cfg.block_size}: raise "
            f"data.block_size, or give shorter answers"
        )
    return "give it more pairs (or raise data.validation_fraction)"
