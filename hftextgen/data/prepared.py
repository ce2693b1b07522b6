"""Prepared data and its cache: `prepare` finds a corpus's token shards in the cache, or prepares
them (preparation.py) and keeps them there; `Prepared` serves them, memory-mapped, as data.packing
packs them: the training items and the Trainer's evaluation subset with the collator and order
that batch them, whole documents or examples for the evaluator, and the data report's counts.

The cache key is made of the documents' content (the corpus's split fingerprint), the
tokenizer's files, the libraries that apply them and the settings that change what is prepared,
so a re-run with the same inputs finds the data at once and any changed input prepares it anew.
Preparing is resumable: a run stopped part way continues where it was.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import signal
from functools import cached_property
from pathlib import Path

import numpy as np

from .. import cache
from .. import model as model_stage
from ..errors import RunStopped, UserError
from . import packing, preparation, shards, sources, tasks
from .config import ITEMS, DataConfig
from .corpus import PREPROCESS_VERSION, Corpus

SPLITS = shards.SPLITS


class Served:
    """What the Trainer takes of prepared data, one source's (`Prepared`) or a mixture's:
    `train` and `eval_items` packed as `packing` says, the collator that batches them and the
    order the training items are read in."""

    packing: str
    train: object
    eval_items: object

    def collate(self, pad_id: int, flash_attention: bool = False):
        """The Trainer's data_collator for these batches. flash_attention: the model attends
        with flash-attention's kernels, which keep packed examples apart only when given their
        boundaries (from position ids alone, only at one row a batch)."""
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
        return self.train.select(packing.length_grouped_order(self.train.lengths, batch_size, seed))


class Prepared(Served):
    """One source's prepared data, memory-mapped: `train` (blocks, rows of isolated examples, or
    examples to pad, as data.packing says) and `eval_items` (the Trainer's capped evaluation
    subset, packed the same way) with the `collate` that batches them, `eval_documents()` and
    `eval_examples()` (the evaluator's), the data report, and where it lives."""

    def __init__(self, path: Path, cfg: DataConfig, cache_hit: bool, for_training: bool = True):
        self.cache_path, self.cache_hit, self.cfg = path, cache_hit, cfg
        self.manifest = shards.read_manifest(path)
        if self.manifest.get("format") != shards.LAYOUT_VERSION:
            raise UserError(f"{path} holds prepared data of another layout: delete it and run again")
        self.task = self.manifest.get("task")
        if self.task:  # the prepared masks mark the answers; loss_on says what trains
            self.task = {**self.task, "loss_on": cfg.resolved_loss_on(task=True)}
        self.packing = cfg.resolved_packing(task=bool(self.task))
        self.tokens, self.masks = {}, {}
        for split in SPLITS:
            listed = self.manifest["splits"][split]["shards"]
            tokens = shards.Tokens(path, listed, self.manifest["dtype"])
            masks = shards.Tokens(path, listed, "uint8", shards.MASK_SUFFIX) if self.task else None
            problem = tokens.check() or (masks.check() if masks is not None else None)
            if problem:
                raise UserError(f"the prepared data is damaged ({problem}): delete {path} and prepare it again")
            self.tokens[split], self.masks[split] = tokens, masks
        self.report = _counts(self.manifest, cfg.block_size, self.task)
        # What the rows train on: the answers' masks, or (loss_on all, and text) every token.
        self.trained = self.masks if self.task and self.task["loss_on"] == "answers" else dict.fromkeys(SPLITS)
        if self.packing == "concat":
            self._blocks(for_training)
        else:
            self._examples(for_training)
        self.report["packing"] = self.packing
        self.report["eval"] = {
            "max_tokens": cfg.max_eval_tokens,
            "blocks": len(self.eval_items),  # the file's name for the items (blocks, rows or examples)
            "tokens": self.eval_items.n_tokens,
        }

    def _blocks(self, for_training: bool) -> None:
        """concat: the split's tokens cut into blocks of block_size."""
        cfg = self.cfg
        self.train = shards.BlockDataset(self.tokens["train"], cfg.block_size, masks=self.trained["train"])
        self.validation = shards.BlockDataset(
            self.tokens["validation"], cfg.block_size, masks=self.trained["validation"]
        )
        for split in SPLITS if self.manifest["hold_out"] else ("train",):
            if self.report[split]["blocks"] == 0 and for_training:
                raise UserError(
                    f"the {split} split holds {self.report[split]['tokens']} tokens, fewer than one block of "
                    f"data.block_size={cfg.block_size}: lower data.block_size, or give it more text"
                    + (" (raise data.validation_fraction)" if split == "validation" else "")
                )
        self.eval_items = shards.sample_blocks(self.validation, cfg.max_eval_tokens, cfg.split_seed)

    def _examples(self, for_training: bool) -> None:
        """isolated and padded: whole examples, several a row or one a row."""
        cfg, found = self.cfg, {}
        for split in SPLITS:
            found[split] = shards.examples(
                self.cache_path, split, self.tokens[split], self.trained[split], cfg.block_size
            )
        for split in SPLITS if self.manifest["hold_out"] else ("train",):
            if not len(found[split]) and for_training:
                raise UserError(f"the {split} split holds no examples: {_why_none(self.report[split], cfg)}")
        # The held-out tokens in blocks too, as concat has them (validate times scoring on them).
        self.validation = shards.BlockDataset(self.tokens["validation"], cfg.block_size)
        evaluated = shards.sample_examples(found["validation"], cfg.max_eval_tokens, cfg.split_seed)
        if self.packing == "isolated":
            self.train = packing.PackedRows(found["train"], packing.pack(found["train"].lengths, cfg.block_size))
            self.eval_items = packing.PackedRows(evaluated, packing.pack(evaluated.lengths, cfg.block_size))
        else:
            self.train = found["train"]
            # Longest first: the least padding, and an out-of-memory shows at the first batch.
            self.eval_items = evaluated.select(np.argsort(-evaluated.lengths, kind="stable"))
        for split, items in (("train", self.train), ("validation", None)):
            rows = len(items) if items is not None else None
            if not (self.task and self.packing == "padded"):  # task data counts its examples already
                self.report[split][ITEMS[self.packing]] = rows or len(found[split])
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

    @property
    def evaluated(self) -> Prepared:
        """The prepared data the evaluator scores: this (a mixture's: one of its sources)."""
        return self

    @cached_property
    def validation_ids(self) -> list[str]:
        return shards.read_ids(self.cache_path / "validation.ids.jsonl")

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


def _counts(manifest: dict, block_size: int, task: dict | None = None) -> dict:
    """The data report's numbers, per split, from the manifest (as if packed in blocks: _examples
    replaces the blocks with its items)."""
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
    cfg = corpus.cfg
    spec = model_stage.encoder_spec(tokenizer)
    segments, mode, every = corpus.segments(spec["cuttable"], hold_out)
    units = preparation.group(segments, every)
    dtype = shards.dtype_for(_vocabulary(tokenizer))
    settings = preparation.Settings(
        data=corpus.resolved,
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
        "format": shards.LAYOUT_VERSION,
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


def prepare(corpus, tokenizer, tokenizer_fingerprint: str, hold_out: bool = True, for_training: bool = True):
    """The prepared data of a corpus for a tokenizer: from the cache when the inputs are
    unchanged, else prepared (continuing an earlier run stopped part way). `hold_out` false:
    every document in train, none held out (to evaluate on all of them). `for_training`: a split
    too small for one training item is an error (not for the evaluator, which scores documents).
    Returns a Prepared; a mixture's corpus (mixture.MixedCorpus) prepares each of its sources
    so, and draws them into a Mixture."""
    if not isinstance(corpus, Corpus):
        return corpus.prepare(tokenizer, tokenizer_fingerprint, hold_out, for_training)
    cfg = corpus.cfg
    key = cache.key(
        version=PREPROCESS_VERSION,
        format=shards.LAYOUT_VERSION,  # the key's name for it, kept: caches already made stay found
        documents=corpus.split_fingerprint,
        tokenizer=tokenizer_fingerprint,
        tokenizers=_version("tokenizers"),  # the libraries that apply those files
        tiktoken=_version("tiktoken"),
        add_eos=cfg.add_eos,
        hold_out=hold_out,
        shard_tokens=preparation.SHARD_TOKENS,
        # Task data: how records become examples (the template is in the tokenizer's files).
        **(
            {"task": [corpus.format, cfg.block_size, tasks.ENCODING, *_pairs_encoding(corpus)]}
            if corpus.is_task
            else {}
        ),
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
                    shutil.rmtree(work, ignore_errors=True)
                    raise
        path = root / key
    if corpus.format == "preference":
        from .pairs import PreparedPairs

        return PreparedPairs(path, cfg, cache_hit, _counts, for_training)
    return Prepared(path, cfg, cache_hit, for_training)


def _pairs_encoding(corpus) -> list:
    """Preference pairs: how two sides become one item (preference.ENCODING), in the key too."""
    if corpus.format != "preference":
        return []
    from .preference import ENCODING

    return [ENCODING]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _stopped_message(stop: preparation.Stopped, work: Path) -> str:
    return (
        f"stopped by {signal.Signals(stop.signum).name} while preparing the data; {stop.kept} of {stop.total} units "
        f"of work are done and kept in {work}: the same command continues from there"
    )
