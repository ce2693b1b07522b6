"""A content-addressed cache for derived data (prepared token shards, trained tokenizers).

An entry's key is a digest of everything that produced it, so a changed input can only miss,
never return stale data. Entries appear atomically: they are built in a temporary folder and
renamed into place, so a crash mid-write leaves nothing that a later run could mistake for an
entry. An entry that takes long to build (`building`) is built in a stable folder that a run
stopped part way leaves for the next run to continue.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock, one process at a time is then up to the user
    fcntl = None

COMPLETE = "COMPLETE"
# A digest remembered for a file is trusted while its size, modification time and inode stay,
# if it was computed this long after the file's last change (a change within the same clock
# tick would not move the modification time).
RACY_SECONDS = 2.0


def root(cache_dir: str | None, kind: str) -> Path:
    """Folder for one kind of entry: under data.cache_dir, else $HFTEXTGEN_CACHE, else
    ~/.cache/hftextgen."""
    base = cache_dir or os.environ.get("HFTEXTGEN_CACHE") or Path.home() / ".cache" / "hftextgen"
    return Path(base) / kind


def check_writable(cache_dir: str | None) -> None:
    """Make the cache's folder and a file in it now, so that a folder that cannot be written is
    one line before any work rather than a traceback after it. The folder stays (it is the
    cache); the probe file, named for this process, goes."""
    base = root(cache_dir, "")
    named = "data.cache_dir" if cache_dir else "$HFTEXTGEN_CACHE" if os.environ.get("HFTEXTGEN_CACHE") else "the cache"
    probe = base / f".probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as e:
        from .errors import UserError

        raise UserError(
            f"{named}: cannot write to {base} ({e.strerror or e}): set data.cache_dir (or $HFTEXTGEN_CACHE) to a "
            f"folder you can write"
        ) from None


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


def file_digest(path: Path, memo_root: str | Path | None = None) -> str:
    """SHA-256 of a file's content. With `memo_root`, remembered by (path, size, modification
    time, inode): an unchanged corpus is recognised without reading it again."""
    stat = path.stat()
    signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    memo = None
    if memo_root is not None:
        name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
        memo = Path(memo_root) / name[:2] / f"{name}.json"
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads(memo.read_text())
            if saved["signature"] == signature:
                return saved["sha256"]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if memo is not None and time.time() - stat.st_mtime > RACY_SECONDS:
        with contextlib.suppress(OSError):
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f"{memo.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps({"path": str(path), "signature": signature, "sha256": digest}))
            os.replace(tmp, memo)
    return digest


@contextlib.contextmanager
def building(root: str | Path, entry: str):
    """A work folder for `root/entry` that lasts across runs (`.<entry>.partial`): whatever a
    stopped run finished in it is there for the next. One process at a time builds it (a file
    lock: others wait, then find the entry). Yields None when the entry is (or meanwhile
    became) complete; on success the folder is renamed into the entry."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / f".{entry}.lock"
    with open(lock_path, "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if lookup(root, entry) is not None:
            yield None
            return
        work = root / f".{entry}.partial"
        work.mkdir(exist_ok=True)
        yield work
        (work / COMPLETE).touch()
        if lookup(root, entry) is None:
            shutil.rmtree(root / entry, ignore_errors=True)  # an incomplete leftover: nothing to keep
        try:
            os.replace(work, root / entry)
        except OSError:
            # Another machine sharing this cache put its copy in place first: keep theirs.
            if lookup(root, entry) is None:
                raise
            shutil.rmtree(work, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
