"""Preparation: a corpus's segments tokenized by worker processes into token shards, resumable,
the same bytes whatever the number of processes, and the manifest that describes them.

The work goes into a folder beside the cache entry (`.<key>.partial`) in four steps:

  group     the segments (sources.py) grouped into units of work: consecutive segments of about
            1/UNITS of the corpus, between UNIT_BYTES; fixed by the data, never by num_proc
  count     where a split or an id needs it, each unit's records and documents are counted
            (a read without tokenizing), so every document has its global index
  tokenize  each unit, in a worker process, is read, split (held_out), tokenized in batches and
            written as it goes: per split a file of token ids (a shard), a table of its
            documents (tokens, bytes, words) and their ids. A unit closes a part (a shard) after
            the document that reaches SHARD_TOKENS. Each part is renamed into place, then
            recorded in parts/; a recorded part is never written again
  finish    the parts' tables joined into one per split, the manifest written, the folder
            renamed to the cache entry

A process killed at any moment leaves finished parts recorded and at most a temporary file
per worker; the next run removes those and tokenizes only the parts not recorded. Units,
parts and their bytes depend only on the data and the settings, so the result is the same
bytes whichever parts were done before a kill, and whatever the number of processes.

Long texts reach the tokenizer in pieces of about PIECE_CHARS cut at SAFE_CUT, where the ids of
the pieces, joined, are the ids of the whole (tokenizer.encoder_spec says when that holds; for
other tokenizers every document is tokenized whole).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import progress
from ..errors import UserError
from . import shards, sources
from .config import DataConfig
from .encoders import build_encoder
from .sources import Segment
from .split import held_out_indices, split_of

# A part (one shard per split) closes after the document that brings it to this many tokens.
SHARD_TOKENS = 100_000_000
# A unit of work is about 1/UNITS of the corpus, within UNIT_BYTES of text.
UNITS = 128
UNIT_BYTES = (8 << 20, 256 << 20)
# Texts longer than this go to the tokenizer in pieces (memory: the ids of one piece at a time).
PIECE_CHARS = 1 << 20
# Characters per tokenizer call.
BATCH_CHARS = 1 << 22

# Where a text may be cut with the same ids for the pieces as for the whole, for a byte-level
# BPE that pre-tokenizes with GPT-2's pattern,
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# BPE merges only inside a pre-token, so the pre-tokens must be the same. The pattern is
# matched left to right and looks at most one character past a match. X and Y below are
# letters, digits or printable ASCII: never whitespace, for Python's \s or Unicode's.
# - Between "X\n" and "Y": in the whole text "\n" is a pre-token of its own (\s+(?!\S) cannot
#   end before Y, and \s+ starts after X); at the end of the first piece it is one too
#   (\s+(?!\S) at the end of the text). Y starts the next pre-token.
# - Between "X" and " Y": X's pre-token ends before the space in the whole text and at the end
#   of the piece; " Y" starts a pre-token (the optional-space alternatives) in both.
# The second piece starts where a pre-token starts, and the pattern has no look-behind, so it
# is split the same from there. Special tokens are split off before pre-tokenizing and hold
# no whitespace (encoder_spec checks), so no cut falls inside one.
SAFE_CUT = re.compile(r"(?<=[\w!-~]\n)(?=[\w!-~])|(?<=[\w!-~])(?= [\w!-~])")
_TAIL_WINDOWS = (1 << 12, 1 << 16)


# str.split()'s whitespace beyond ASCII (str.isspace; tests/test_prepare.py checks the list).
_WIDE_SPACE = re.compile("[\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
_ASCII_SPACE = np.zeros(256, bool)
_ASCII_SPACE[[0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20]] = True


def count_words(text: str, utf8: bytes) -> int:
    """len(text.split()), from its UTF-8 bytes when it holds no whitespace beyond ASCII (a byte
    below 0x80 is always that character): several times faster, no list of words."""
    if _WIDE_SPACE.search(text):
        return len(text.split())
    space = _ASCII_SPACE[np.frombuffer(utf8, np.uint8)]
    if not len(space):
        return 0
    return int(np.count_nonzero(space[:-1] & ~space[1:])) + (not space[0])


def pieces(text: str, size: int) -> Iterator[str]:
    """`text` in pieces of at least `size` characters, cut at SAFE_CUT."""
    start = 0
    while len(text) - start > size:
        cut = SAFE_CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start : cut.start()]
        start = cut.start()
    yield text[start:]


def last_cut(text: str) -> int | None:
    """The last SAFE_CUT position in `text` (not 0), or None."""
    for window in (*_TAIL_WINDOWS, len(text)):
        starts = [m.start() for m in SAFE_CUT.finditer(text, max(1, len(text) - window))]
        if starts:
            return starts[-1]
        if window >= len(text):
            return None
    return None


# ---------------------------------------------------------------- group


@dataclass
class Settings:
    """What every unit's work needs besides its segments; sent once to each worker."""

    data: DataConfig  # data.format resolved (Corpus.resolved); unpickled without transformers
    split_mode: str  # none | fixed | seeded | hash
    work: str
    spec: dict
    eos: int
    dtype: str
    shard_tokens: int
    piece_chars: int
    batch_chars: int
    read_bytes: int = sources.READ_BYTES
    # Task data (data.format prompt_completion or messages): the tokenizer (its chat template
    # set), format, loss_on and block size the workers' ExampleEncoder is built from. None: text.
    task: dict | None = None


@dataclass
class Unit:
    index: int
    segments: list[Segment]
    numbers: list[int] | None = None  # per segment: lines/paragraphs of its file before it
    doc_starts: list[int] | None = None  # per segment: documents begun before it (seeded split)
    held_out: np.ndarray | None = None  # seeded: held-out document indices in this unit's range

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)


def unit_bytes(total: int, task: bool = False) -> int:
    """Bytes of text per unit of work. Task records (a template rendered and a mask found per
    record) take ~20x longer a byte than text: their units are that much smaller, so that a
    corpus of a few MB still spreads over every core."""
    low, high = UNIT_BYTES
    if task:
        low, high = low // 16, high // 16
    return min(high, max(low, total // UNITS))


def group(segments: list[Segment], every: int) -> list[Unit]:
    """Consecutive segments into units of at most `every` bytes (a bigger segment alone); each
    shard of a streamed dataset is a unit of its own."""
    units: list[Unit] = []
    current: list[Segment] = []
    size = 0
    for seg in segments:
        if current and (seg.kind == "stream" or current[-1].kind == "stream" or size + seg.size > every):
            units.append(Unit(len(units), current))
            current, size = [], 0
        current.append(seg)
        size += seg.size
    if current:
        units.append(Unit(len(units), current))
    return units


def _document_mode(seg: Segment, cfg) -> bool:
    return seg.kind == "play" or (seg.kind == "text" and cfg.sample_by == "document")


def _needs_count(seg: Segment, cfg, seeded: bool) -> bool:
    numbered = seg.kind in ("text", "jsonl") and not seg.first and not _document_mode(seg, cfg)
    return numbered or (seeded and not _document_mode(seg, cfg))


def count_unit(unit: Unit) -> list[tuple[int, int]]:
    """(records for numbering, documents begun) of each segment of a unit."""
    cfg, seeded = _settings.data, _settings.split_mode == "seeded"
    counts = []
    for seg in unit.segments:
        if not _needs_count(seg, cfg, seeded):
            counts.append((0, int(seg.first) if _document_mode(seg, cfg) else 0))
            continue
        reader, begun = sources.records(seg, cfg), 0
        while True:
            try:
                record = next(reader)
            except StopIteration as stop:
                counts.append((stop.value or 0, begun))
                break
            begun += record.begins and sources.is_document(record.text)
    return counts


def place(units: list[Unit], counts: list[list[tuple[int, int]]]) -> int:
    """Give each segment the numbers and document index it starts at; returns the documents."""
    previous_file, number, documents = None, 0, 0
    for unit, unit_counts in zip(units, counts, strict=True):
        unit.numbers, unit.doc_starts = [], []
        for seg, (records, begun) in zip(unit.segments, unit_counts, strict=True):
            if seg.path != previous_file or seg.first:
                number = 0
            unit.numbers.append(number)
            unit.doc_starts.append(documents)
            number += records
            documents += begun
            previous_file = seg.path
    return documents


# ---------------------------------------------------------------- tokenize one unit

_settings: Settings | None = None
_encode: Callable[[list[str]], list[np.ndarray]] | None = None
_examples = None  # task data's tasks.ExampleEncoder in this process
_done = None  # shared count of bytes tokenized, for the progress display


class _Counter:
    """The progress count in this process (no worker processes)."""

    def __init__(self):
        self.value = 0

    def get_lock(self):
        return contextlib.nullcontext()


def _part_name(unit: int, part: int) -> str:
    return f"{unit:06d}-{part:03d}"


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _write_file(path: Path, data: bytes) -> None:
    tmp = _tmp(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def committed_parts(work: Path, unit: int) -> list[dict]:
    """The records of a unit's finished parts, in order (parts are numbered from 0)."""
    records = []
    while (path := work / "parts" / f"{_part_name(unit, len(records))}.json").is_file():
        records.append(json.loads(path.read_text()))
    return records


class _Part:
    """One part of a unit as it is written: per split a token file and its checksum, and a row
    per document (tokens, bytes, words; `continues`: the row continues the document of the
    previous part), with the ids of the documents that begin here."""

    def __init__(self, s: Settings, unit: int, number: int):
        self.s, self.unit, self.number = s, unit, number
        self.name = _part_name(unit, number)
        self.work = Path(s.work)
        self.dtype = np.dtype(s.dtype)
        self.limit = np.iinfo(self.dtype).max
        self.files: dict = {}
        self.hashes: dict = {}
        self.tokens: dict[str, int] = {}
        self.rows: dict[str, dict] = {}
        self.ids: dict = {}
        self.chars: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        # Task data: per split a file of one byte per token (1: trained on), beside the shard,
        # and what became of the records read into this part.
        self.masks: dict = {}
        self.trained: dict[str, int] = {}
        self.text_bytes: dict[str, int] = {}
        self.examples: dict = {}  # split -> tasks.Counts

    def _open(self, split: str) -> None:
        if split in self.files:
            return
        shard = self.work / split / f"{self.name}.bin"
        ids = self.work / "parts" / f"{self.name}.{split}.ids.jsonl"
        if self.s.task is not None:
            mask = shard.with_suffix(shards.MASK_SUFFIX)
            self.masks[split] = (open(_tmp(mask), "wb"), mask, hashlib.sha256())
        self.files[split] = (open(_tmp(shard), "wb"), shard)
        self.ids[split] = (open(_tmp(ids), "w", encoding="utf-8"), ids)
        self.hashes[split] = hashlib.sha256()
        self.tokens[split] = self.chars[split] = self.bytes[split] = 0
        self.rows[split] = {k: array.array("q") for k in ("tokens", "bytes", "words")} | {"continues": bytearray()}

    def open_document(self, split: str, doc_id: str | None) -> int:
        """A new row: a document that begins here (its id), or continues from before (None)."""
        self._open(split)
        rows = self.rows[split]
        for key in ("tokens", "bytes", "words"):
            rows[key].append(0)
        rows["continues"].append(doc_id is None)
        if doc_id is not None:
            self.ids[split][0].write(json.dumps(doc_id, ensure_ascii=False) + "\n")
        return len(rows["continues"]) - 1

    def count_text(self, split: str, row: int, text: str) -> int:
        utf8 = text.encode("utf-8", "surrogatepass")
        n_bytes = len(utf8)
        rows = self.rows[split]
        rows["bytes"][row] += n_bytes
        rows["words"][row] += count_words(text, utf8)
        self.chars[split] += len(text)
        self.bytes[split] += n_bytes
        return n_bytes

    def write(self, split: str, row: int, ids: np.ndarray) -> None:
        if len(ids) and int(ids.max()) > self.limit:
            raise UserError(
                f"token id {int(ids.max())} does not fit the {self.dtype} shards sized for the tokenizer's "
                f"vocabulary: a tokenizer whose ids exceed its own vocabulary size is not supported"
            )
        data = ids.astype(self.dtype, copy=False).tobytes()
        self.files[split][0].write(data)
        self.hashes[split].update(data)
        self.tokens[split] += len(ids)
        self.rows[split]["tokens"][row] += len(ids)

    def write_mask(self, split: str, trained: np.ndarray, codes: np.ndarray | None = None) -> None:
        """One byte a token: 1 where trained, or `codes` (a preference pair's, preference.CODES)."""
        handle, _, digest = self.masks[split]
        data = (trained if codes is None else codes).astype(np.uint8).tobytes()
        handle.write(data)
        digest.update(data)
        self.trained[split] = self.trained.get(split, 0) + int(trained.sum())

    def count_answer(self, split: str, row: int, answers: tuple[str, ...], text_bytes: int) -> None:
        """A task example's bytes and words: those of its answers' text (markers left out), which
        answer bits-per-byte divides by; its characters: the whole record's; `text_bytes`: its
        whole text's (what loss on every token divides by)."""
        rows = self.rows[split]
        for text in answers:
            utf8 = text.encode("utf-8", "surrogatepass")
            rows["bytes"][row] += len(utf8)
            rows["words"][row] += count_words(text, utf8)
            self.bytes[split] += len(utf8)
        self.text_bytes[split] = self.text_bytes.get(split, 0) + text_bytes

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def commit(self, records: int, last: bool) -> None:
        """Rename the part's files into place, then record it: from then on it is done."""
        summary = {}
        for split, (handle, shard) in self.files.items():
            handle.close()
            if self.tokens[split]:
                os.replace(handle.name, shard)
            else:
                os.unlink(handle.name)
            if split in self.masks:
                mask_handle, mask, _ = self.masks[split]
                mask_handle.close()
                if self.tokens[split]:
                    os.replace(mask_handle.name, mask)
                else:
                    os.unlink(mask_handle.name)
            ids_handle, ids_path = self.ids[split]
            ids_handle.close()
            os.replace(ids_handle.name, ids_path)
            rows = self.rows[split]
            table = np.zeros(len(rows["continues"]), shards.PART_DOCS)
            for key in ("tokens", "bytes", "words"):
                table[key] = np.frombuffer(rows[key], np.int64)
            table["continues"] = np.frombuffer(bytes(rows["continues"]), np.uint8)
            docs_path = self.work / "parts" / f"{self.name}.{split}.docs.npy"
            with open(_tmp(docs_path), "wb") as f:
                np.save(f, table)
            os.replace(_tmp(docs_path), docs_path)
            summary[split] = {
                "tokens": self.tokens[split],
                "sha256": self.hashes[split].hexdigest(),
                "rows": len(table),
                "documents": int(len(table) - table["continues"].sum()),
                "characters": self.chars[split],
                "bytes": self.bytes[split],
            }
            if split in self.masks:
                summary[split]["mask_sha256"] = self.masks[split][2].hexdigest()
                summary[split]["trained_tokens"] = self.trained.get(split, 0)
                summary[split]["text_bytes"] = self.text_bytes.get(split, 0)
        record = {"unit": self.unit, "part": self.number, "records": records, "last": last, "splits": summary}
        if self.s.task is not None:
            record["examples"] = {split: asdict(counts) for split, counts in self.examples.items()}
        _write_file(self.work / "parts" / f"{self.name}.json", json.dumps(record, sort_keys=True).encode())


class _UnitWork:
    """Reads a unit's records, sends their text to the tokenizer in batches, writes parts."""

    def __init__(self, unit: Unit, s: Settings):
        self.unit, self.s = unit, s
        self.cfg = s.data
        self.cuttable = s.spec["cuttable"]
        self.eos = np.array([s.eos], np.int64) if self.cfg.add_eos else None
        done = committed_parts(Path(s.work), unit.index)
        self.skip = done[-1]["records"] if done else 0
        self.finished = bool(done) and done[-1]["last"]
        self.part = _Part(s, unit.index, len(done))
        self.pending: list[tuple[str, int, str | None]] = []
        self.pending_chars = self.pending_bytes = 0

    def split_of(self, seg: Segment, index: int, text: str | None) -> str:
        return split_of(self.s.split_mode, seg.split, index, text, self.unit.held_out, self.cfg.validation_fraction)

    def send(self, split: str, row: int, text: str) -> None:
        """Queue a text of a document for the tokenizer, cut into pieces where that is exact."""
        self.pending_bytes += self.part.count_text(split, row, text)
        for piece in pieces(text, self.s.piece_chars) if self.cuttable else (text,):
            self.pending.append((split, row, piece))
            self.pending_chars += len(piece)

    def flush(self) -> None:
        if not self.pending:
            return
        encoded = iter(_encode([text for _, _, text in self.pending if text is not None]))
        for split, row, text in self.pending:
            self.part.write(split, row, next(encoded) if text is not None else self.eos)
        with _done.get_lock():
            _done.value += self.pending_bytes
        self.pending.clear()
        self.pending_chars = self.pending_bytes = 0

    def end_document(self, split: str, row: int, records: int) -> None:
        if self.eos is not None:
            self.pending.append((split, row, None))
        if (
            self.pending_chars >= self.s.batch_chars
            or self.part.total_tokens + self.pending_chars >= self.s.shard_tokens
        ):
            self.flush()
        if self.part.total_tokens >= self.s.shard_tokens:
            self.part.commit(records, last=False)
            self.part = _Part(self.s, self.unit.index, self.part.number + 1)

    def next_part(self, records: int) -> None:
        if self.part.total_tokens >= self.s.shard_tokens:
            self.part.commit(records, last=False)
            self.part = _Part(self.s, self.unit.index, self.part.number + 1)

    def run_examples(self) -> None:
        """Task data: each record is one example, encoded alone (its template, its mask, its
        truncation) and written whole, or dropped and counted."""
        from .tasks import Counts

        records = 0
        for i, seg in enumerate(self.unit.segments):
            begun = 0
            for record in sources.records(seg, self.cfg, self.unit.numbers[i] if self.unit.numbers else 0):
                records += 1
                if not sources.is_document(record.text):
                    continue
                index = (self.unit.doc_starts[i] if self.unit.doc_starts else 0) + begun
                begun += 1
                if records <= self.skip:  # done in a part recorded before an interruption
                    continue
                split = self.split_of(seg, index, record.text)
                counts = self.part.examples.setdefault(split, Counts())
                try:
                    example = _examples.encode(json.loads(record.text), None, counts)
                except UserError as e:
                    raise UserError(f"{record.id}: {e}") from None
                if example is None:
                    continue
                row = self.part.open_document(split, record.id)
                self.part.chars[split] += len(record.text)
                self.part.write(split, row, example.input_ids)
                self.part.write_mask(split, example.trained, getattr(example, "codes", None))
                self.part.count_answer(split, row, example.answers, example.text_bytes)
                self.next_part(records)
            with _done.get_lock():
                _done.value += seg.size
        self.part.commit(records, last=True)

    def run(self) -> None:
        if self.finished:
            return
        if self.s.task is not None:
            return self.run_examples()
        records, current = 0, None  # current: (split, row) of the document being read
        for i, seg in enumerate(self.unit.segments):
            document_mode = _document_mode(seg, self.cfg)
            begun, carry = 0, ""
            numbers = self.unit.numbers[i] if self.unit.numbers else 0
            for record in sources.records(seg, self.cfg, numbers):
                records += 1
                begins = record.begins and (document_mode or sources.is_document(record.text))
                if record.begins and not begins:
                    continue  # an empty record: numbered, not a document
                index = (self.unit.doc_starts[i] if self.unit.doc_starts else 0) + begun - (0 if begins else 1)
                begun += begins
                if records <= self.skip:  # done in a part recorded before an interruption
                    continue
                if current is None:  # a document begins, or continues from the segment before
                    split = self.split_of(seg, index, record.text)
                    current = (split, self.part.open_document(split, record.id if begins else None))
                text = carry + (record.text or "")
                carry = ""
                if not record.ends:
                    cut = last_cut(text) if self.cuttable else None
                    if cut is None:
                        carry = text
                        continue
                    text, carry = text[:cut], text[cut:]
                self.send(*current, text)
                if record.ends:
                    self.end_document(*current, records)
                    current = None
                elif self.pending_chars >= self.s.batch_chars:
                    self.flush()
            if carry:  # a document that goes on in the next segment; segments end at safe cuts
                self.send(*current, carry)
        self.flush()
        self.part.commit(records, last=True)


def tokenize_unit(unit: Unit) -> None:
    _UnitWork(unit, _settings).run()


def _init_worker(settings: Settings, done, parent: int) -> None:
    """A worker process: leaves Ctrl-C to the main process (which stops it), dies with it, and
    tokenizes on one core (there is one worker per core)."""
    global _settings, _encode, _done
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    sources.READ_BYTES = settings.read_bytes
    _settings, _done = settings, done
    _encode = build_encoder(settings.spec)
    _init_examples(settings)


def _init_here(settings: Settings, threads: int) -> None:
    global _settings, _encode, _done
    _settings, _done = settings, _Counter()
    _encode = build_encoder(settings.spec, threads)
    _init_examples(settings)


def _init_examples(settings: Settings) -> None:
    global _examples
    task = settings.task
    if task is not None:
        from . import tasks  # imports transformers: text workers do without

        # Examples are cut to block_size by the encoder itself: the tokenizer's own limit (the
        # model's context, saved with it) would only warn about the whole rendered record.
        task["tokenizer"].model_max_length = int(1e30)
        if task["format"] == "preference":
            from .preference import PairEncoder

            _examples = PairEncoder(task["tokenizer"], task["max_length"])
        else:
            _examples = tasks.ExampleEncoder(task["tokenizer"], task["format"], task["loss_on"], task["max_length"])


# ---------------------------------------------------------------- the main process


class Stopped(Exception):
    """SIGTERM or Ctrl-C while preparing: the finished parts are kept."""

    def __init__(self, signum: int, kept: int, total: int):
        super().__init__(signum)
        self.signum, self.kept, self.total = signum, kept, total


@contextlib.contextmanager
def _signals_raise():
    """SIGTERM and SIGINT raise _Signal in the main thread; a second one during the cleanup that
    follows is ignored (it takes a moment: stopping the workers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = (signal.SIGINT, signal.SIGTERM)

    def handle(signum, frame):
        for s in caught:
            signal.signal(s, signal.SIG_IGN)
        raise _Signal(signum)

    previous = {s: signal.signal(s, handle) for s in caught}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _Signal(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _remove_temporaries(work: Path) -> None:
    for tmp in work.rglob("*.tmp"):
        tmp.unlink(missing_ok=True)


class Runner:
    """Runs unit tasks in worker processes (or here, for one unit or num_proc 1), with progress
    and a clean stop."""

    def __init__(self, settings: Settings, processes: int):
        self.settings, self.processes = settings, processes
        self.pool = None
        self.done = None

    def __enter__(self):
        if self.processes > 1:
            context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
            self.done = context.Value("q", 0)
            self.pool = context.Pool(
                self.processes, _init_worker, (self.settings, self.done, os.getpid()), maxtasksperchild=None
            )
        else:
            _init_here(self.settings, threads=cores())
            self.done = _done
        return self

    def __exit__(self, kind, exc, tb):
        if self.pool is not None:
            if kind is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
        if kind is not None:
            _remove_temporaries(Path(self.settings.work))

    def map(self, fn, units: list[Unit], bar=None) -> list:
        """fn(unit) -> (unit.index, result) for each unit; the results in the order of `units`."""
        results: dict[int, object] = {}
        shown = self.done.value

        def show() -> None:
            nonlocal shown
            if bar is not None:
                now = self.done.value
                bar.update(now - shown)
                shown = now

        if self.pool is None:
            for unit in units:
                results[unit.index] = fn(unit)[1]
                show()
        else:
            pending = self.pool.imap_unordered(fn, units)
            while len(results) < len(units):
                try:
                    index, value = pending.next(timeout=0.5)
                    results[index] = value
                except multiprocessing.TimeoutError:
                    pass
                show()
        return [results[u.index] for u in units]


def cores() -> int:
    """The cores this process may run on: data.num_proc's default."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _count_task(unit: Unit) -> tuple[int, list[tuple[int, int]]]:
    return unit.index, count_unit(unit)


def _tokenize_task(unit: Unit) -> tuple[int, None]:
    return unit.index, tokenize_unit(unit)


def run(settings: Settings, units: list[Unit], processes: int) -> None:
    """Count where needed, then tokenize every unit not done yet; raises Stopped on a signal."""
    work = Path(settings.work)
    for folder in ("parts", "train", "validation"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    _remove_temporaries(work)
    seeded = settings.split_mode == "seeded"
    to_count = [u for u in units if any(_needs_count(s, settings.data, seeded) for s in u.segments)]
    todo = [u for u in units if not (committed_parts(work, u.index) or [{"last": False}])[-1]["last"]]
    workers = max(1, min(processes, max(len(todo), len(to_count))))
    try:
        with _signals_raise(), Runner(settings, workers) as runner:
            counts = _counts(work, units, to_count, runner, settings)
            documents = place(units, counts)
            if seeded and documents < 2:
                # Too few to hold one out: a broken file says so first (documents of a
                # document-mode file are counted without reading it).
                for unit in units:
                    for _ in sources.read_all(unit.segments, settings.data):
                        pass
            if seeded:
                _assign_held_out(units, documents, settings.data)
            if todo:
                _tokenize(todo, units, runner, workers, documents if seeded else None)
    except _Signal as stop:
        done = sum(1 for u in units if (committed_parts(work, u.index) or [{"last": False}])[-1]["last"])
        raise Stopped(stop.signum, done, len(units)) from None


def _counts(work: Path, units, to_count, runner, settings) -> list[list[tuple[int, int]]]:
    """Each unit's counts, from counts.json when an earlier run got that far."""
    path = work / "counts.json"
    if path.is_file():
        return [[tuple(c) for c in unit] for unit in json.loads(path.read_text())]
    counted = dict(zip((u.index for u in to_count), runner.map(_count_task, to_count), strict=True))
    seeded = settings.split_mode == "seeded"
    counts = []
    for unit in units:
        if unit.index in counted:
            counts.append(counted[unit.index])
        else:
            counts.append(
                [
                    (0, int(s.first) if _document_mode(s, settings.data) else 0)
                    if not _needs_count(s, settings.data, seeded)
                    else (0, 0)
                    for s in unit.segments
                ]
            )
    _write_file(path, json.dumps(counts).encode())
    return counts


def _assign_held_out(units: list[Unit], documents: int, cfg) -> None:
    held = held_out_indices(documents, cfg.validation_fraction, cfg.split_seed)
    ends = [u.doc_starts[0] for u in units[1:]] + [documents]
    for unit, end in zip(units, ends, strict=True):
        first = unit.doc_starts[0] - 1 if unit.doc_starts[0] else 0  # a document continued from before
        unit.held_out = held[np.searchsorted(held, first) : np.searchsorted(held, end)]


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


def _tokenize(todo: list[Unit], units: list[Unit], runner: Runner, workers: int, documents: int | None) -> None:
    work = _plural(len(units), "unit") if len(todo) == len(units) else f"{len(todo):,} of {len(units):,} units left"
    what = f" {_plural(documents, 'document')}" if documents is not None else ""
    desc = f"Tokenizing{what} ({work}, {_plural(workers, 'process', 'processes')})"
    streamed = any(s.kind == "stream" for u in todo for s in u.segments)  # of a size known only once read
    started, before = time.perf_counter(), runner.done.value
    with progress.bar(None if streamed else sum(u.size for u in todo), desc, "B", scale=True) as bar:
        runner.map(_tokenize_task, todo, bar)
    seconds, done = time.perf_counter() - started, runner.done.value - before
    progress.write(f"tokenized {progress.size(done)} of text in {seconds:.1f} s ({done / 1e6 / seconds:.1f} MB/s)")


# ---------------------------------------------------------------- finish


def finish(work: Path, units: list[Unit], settings: Settings) -> dict:
    """Join the parts' document tables and ids into one per split and return the manifest's
    splits (shards in order, with their token counts and checksums, and the totals)."""
    records = [r for u in units for r in committed_parts(work, u.index)]
    splits = {}
    for split in shards.SPLITS:
        parts = [r for r in records if split in r["splits"]]
        rows = sum(r["splits"][split]["rows"] for r in parts)
        continued = rows - sum(r["splits"][split]["documents"] for r in parts)
        docs_tmp = _tmp(work / f"{split}.docs.npy")
        if rows - continued:
            table = np.lib.format.open_memmap(docs_tmp, "w+", shards.DOCS, (rows - continued,))
        else:
            with open(docs_tmp, "wb") as f:  # a file, not a name: np.save would add ".npy" to it
                np.save(f, np.zeros(0, shards.DOCS))
        at = 0  # rows written: a row that continues a document adds to the row before it
        with open(_tmp(work / f"{split}.ids.jsonl"), "wb") as ids:
            for r in parts:
                name = _part_name(r["unit"], r["part"])
                part = np.load(work / "parts" / f"{name}.{split}.docs.npy")
                target = at - 1 + np.cumsum(1 - part["continues"].astype(np.int64))
                for key in ("tokens", "bytes", "words"):
                    np.add.at(table[key], target, part[key])
                at += int(len(part) - part["continues"].sum())
                with open(work / "parts" / f"{name}.{split}.ids.jsonl", "rb") as part_ids:
                    shutil.copyfileobj(part_ids, ids)
        if rows - continued:
            table.flush()
            del table
        os.replace(_tmp(work / f"{split}.docs.npy"), work / f"{split}.docs.npy")
        os.replace(_tmp(work / f"{split}.ids.jsonl"), work / f"{split}.ids.jsonl")
        stats = [r["splits"][split] for r in parts]
        if settings.task is not None:
            from .tasks import Counts

            counts = [Counts(**r["examples"][split]) for r in records if split in r.get("examples", {})]
            splits[split] = {
                "examples": asdict(sum(counts, Counts())),
                "trained_tokens": sum(s.get("trained_tokens", 0) for s in stats),
                "text_bytes": sum(s.get("text_bytes", 0) for s in stats),
            }
        splits[split] = splits.get(split, {}) | {
            "documents": sum(s["documents"] for s in stats),
            "characters": sum(s["characters"] for s in stats),
            "bytes": sum(s["bytes"] for s in stats),
            "tokens": sum(s["tokens"] for s in stats),
            "shards": [
                {
                    "file": f"{split}/{_part_name(r['unit'], r['part'])}.bin",
                    "tokens": s["tokens"],
                    "sha256": s["sha256"],
                }
                | ({"mask_sha256": s["mask_sha256"]} if "mask_sha256" in s else {})
                for r, s in zip(parts, stats, strict=True)
                if s["tokens"]
            ],
        }
    return splits


def clean(work: Path) -> None:
    """What only the work needed: the parts' records and tables, the counts."""
    for path in (work / "parts").iterdir():
        path.unlink()
    (work / "parts").rmdir()
    (work / "counts.json").unlink(missing_ok=True)
