"""The split rule: which split (train or validation) a document goes to, written once.

Four modes: none (all train), fixed (the split its source names: data.validation_paths, a hub
split), seeded (a seeded shuffle of the document indices holds out a fraction) and hash (a hash
of the text holds out a fraction: streamed data, where the documents are not counted first).
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import UserError


def split_of(mode: str, fixed: str, index: int, text: str | None, held: np.ndarray | None, fraction: float) -> str:
    """The split of document number `index`: `fixed` is the split its segment names (mode fixed),
    `held` the sorted indices held out (mode seeded: held_out_indices)."""
    if mode == "none":
        return "train"
    if mode == "fixed":
        return fixed
    if mode == "seeded":
        at = int(np.searchsorted(held, index))
        return "validation" if at < len(held) and held[at] == index else "train"
    return "validation" if held_out_by_hash(text or "", fraction) else "train"


def held_out_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the documents a seeded shuffle holds out: round(fraction * n) of them,
    at least one, never all. The same as np.random.default_rng(seed).permutation(n)[:k], with
    4 bytes a document while it is drawn (shuffle draws the same numbers for any dtype)."""
    if n < 2:
        raise UserError(
            f"the data holds {n} document(s), too few to hold out whole documents for validation: "
            f"give data.validation_paths, or split files into documents with data.sample_by=paragraph"
        )
    k = min(n - 1, max(1, round(n * fraction)))
    order = np.arange(n, dtype=np.uint32 if n < 2**32 else np.int64)
    np.random.default_rng(seed).shuffle(order)
    return np.sort(order[:k]).astype(np.int64)


def held_out_by_hash(text: str, fraction: float) -> bool:
    """Whether a streamed document is held out: by a hash of its text, so the same documents are
    held out on every run, in any order, and exact duplicates land on the same side."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2.0**64
