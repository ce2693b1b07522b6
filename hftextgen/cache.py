"""A content-addressed cache for derived data (packed blocks, trained tokenizers).

An entry's key is a digest of everything that produced it, so a changed input can only miss,
never return stale data. Entries appear atomically: they are built in a temporary folder and
renamed into place, so a crash mid-write leaves nothing that a later run could mistake for an
entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

COMPLETE = "COMPLETE"


def root(cache_dir: str | None, kind: str) -> Path:
    """Folder for one kind of entry: under data.cache_dir, else $HFTEXTGEN_CACHE, else
    ~/.cache/hftextgen."""
    base = cache_dir or os.environ.get("HFTEXTGEN_CACHE") or Path.home() / ".cache" / "hftextgen"
    return Path(base) / kind


def key(**parts) -> str:
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def lookup(root: str | Path, entry: str) -> Path | None:
    path = Path(root) / entry
    return path if (path / COMPLETE).exists() else None


@contextlib.contextmanager
def writing(root: str | Path, entry: str):
    """Yield a temporary folder to fill; on success it becomes the entry `root/entry`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{entry}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / COMPLETE).touch()
        final = root / entry
        if lookup(root, entry) is None:  # else another process finished it first: keep theirs
            shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:
                # Another machine sharing this cache (multi-node runs prepare data once per
                # machine) renamed its copy into place since the check: keep theirs.
                if lookup(root, entry) is None:
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
