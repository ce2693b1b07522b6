"""The reference model's log-probabilities of the pairs: computed once before training, cached beside the data.

dpo and ipo measure the model against a frozen reference: the starting model (with LoRA, the base
without the adapter, which is the same weights), or preference.ref_model. Rather than holding a
second copy of the model through training, as TRL does by default, each pair's reference
log-probabilities (its chosen and rejected answers, summed over their tokens) are computed before
the first step, in the run's precision, and ride in the batches (data.pairs.PairTargets). The
held-out pairs' are computed for every objective: they are the "before" of the evaluation.

The cache entry is keyed on the prepared data (its cache entry's name: the data's content, the
tokenizer, the settings), the reference model (its files' SHA-256, or its hub name and revision)
and the precision: `<cache>/reference/<key>/<split>.logps.npy`, one float64 pair a row for the
whole split, NaN where not computed yet. Only the pairs a run uses are computed; a run stopped by
SIGTERM or Ctrl-C keeps the batches it finished (written as they are done) and the same command
computes the rest. One process at a time fills an entry (a file lock); under several processes
the first one computes while the others wait, then all read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

import numpy as np

from .. import cache, evaluate
from ..errors import RunStopped
from ..runtime import eval_mode

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

VERSION = 1
# Pairs scored between two writes of the cache (and checks for a signal: after every batch).
CHUNK_PAIRS = 1024
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt")


def model_identity(name_or_path: str, revision: str | None, cache_dir: str | None) -> dict:
    """What identifies a model's weights: a local folder's files by content (remembered by size
    and modification time, so a cache hit reads nothing), else its hub name and revision."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return {"hub": name_or_path, "revision": revision}
    memo = cache.root(cache_dir, "digests")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return {"files": [(p.name, cache.file_digest(p, memo)) for p in files]}


def entry_folder(data_cache: Path, identity: dict, precision: str, cache_dir: str | None) -> Path:
    key = cache.key(version=VERSION, data=Path(data_cache).name, model=identity, precision=precision)
    return cache.root(cache_dir, "reference") / key


@contextlib.contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class _Signals:
    """SIGTERM and Ctrl-C while computing: finish the batch, keep what is done, then stop."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _store(folder: Path, split: str, rows: int) -> np.memmap:
    """The split's array of (chosen, rejected) log-probabilities, made (all NaN) if new."""
    path = folder / f"{split}.logps.npy"
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        made = np.lib.format.open_memmap(tmp, "w+", np.float64, (rows, 2))
        made[:] = np.nan
        made.flush()
        del made
        os.replace(tmp, path)
    stored = np.load(path, mmap_mode="r+")
    if stored.shape != (rows, 2):
        raise ValueError(f"{path} holds {stored.shape} log-probabilities for a split of {rows} pairs")
    return stored


def fill(
    folder: Path, split: str, pairs, model, collator, batch_size: int, bf16: bool, split_rows: int, about: dict
) -> np.ndarray:
    """The reference's log-probabilities of `pairs` (by split index, the split's whole array),
    computing the ones the cache lacks with `model()` (called only then: it may load one);
    RunStopped on a signal, what was done kept. `about`: what entry.json records (the data's
    cache entry, the model)."""
    with _locked(folder):
        stored = _store(folder, split, split_rows)
        missing = pairs.select(np.flatnonzero(np.isnan(stored[pairs.indices, 0])))
        if len(missing):
            _compute(stored, missing, model(), collator, batch_size, bf16, split)
        (folder / "entry.json").write_text(json.dumps({"version": VERSION, **about}, sort_keys=True) + "\n")
    return np.load(folder / f"{split}.logps.npy", mmap_mode="r")


def _compute(stored: np.memmap, missing, lm, collator, batch_size: int, bf16: bool, split: str) -> None:
    done, total = 0, len(missing)
    desc = f"Reference log-probabilities ({split}, {total:,} pairs)"
    with _Signals() as signals, eval_mode(lm):
        for start in range(0, total, CHUNK_PAIRS):
            chunk = missing.select(np.arange(start, min(start + CHUNK_PAIRS, total)))
            scores = evaluate.score_pairs(lm, chunk, collator, batch_size, bf16, desc, stop=lambda: signals.received)
            finished = ~np.isnan(scores[:, 0])
            stored[chunk.indices[finished]] = scores[finished, :2]
            stored.flush()
            done += int(finished.sum())
            if signals.received is not None:
                raise RunStopped(
                    f"stopped by {signal.Signals(signals.received).name} while computing the reference's "
                    f"log-probabilities; {done:,} of {total:,} {split} pairs are done and kept: the same command "
                    f"continues from there",
                    128 + signals.received,
                )


def saved_reference(run_dir: Path, packed) -> bool:
    """Put a finished run's reference log-probabilities beside `packed`'s held-out pairs, for
    `hftextgen evaluate` to show the "before" (run_info.json names the cache entry). False when
    they are gone, or are of other data."""
    try:
        folder = Path(json.loads((Path(run_dir) / "run_info.json").read_text())["reference"]["cache"])
        about = json.loads((folder / "entry.json").read_text())
        stored = np.load(folder / "validation.logps.npy", mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError):
        return False
    pairs = packed.eval_items
    if about.get("data") != Path(packed.cache_path).name or np.isnan(stored[pairs.indices]).any():
        return False
    packed.eval_items = pairs.with_reference(stored)
    return True
