"""Preprocessing: tokenize and pack the bundled Shakespeare corpus, run_clm-style vs prepare().

    python -m bench.preprocess [--quick] [--repeats N] [--out FILE]

Baseline: what transformers' examples/pytorch/language-modeling/run_clm.py does, on the same
documents and tokenizer: a batched datasets.map that calls the tokenizer, then a batched
group_texts map that concatenates and cuts blocks (input_ids, attention_mask and labels).
Ours: hftextgen.data.prepare() with an empty cache (cold) and again on its cache (warm).
Both produce the same blocks; every repeat checks that they do.

Rows: tokenize + pack with the documents already in memory (the stage the two share), then end
to end from the plays on disk. Ours always includes the tokenizer fingerprint that its cache
key needs and writing the blocks to the cache; the baseline keeps its blocks in memory. Every
repeat builds a fresh tokenizer, so neither side finds BPE merges cached by the other. Times
are medians over the repeats.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time

from bench import common


def measure(repeats: int, block_size: int) -> tuple[list[common.Row], dict]:
    import datasets

    from hftextgen import data
    from hftextgen.data import DataConfig, shards
    from hftextgen.model import tokenizer
    from tests.oracle import blocks_array, run_clm_blocks, split_texts  # the tests' reference too

    datasets.disable_progress_bars()
    cfg = DataConfig(source="shakespeare", block_size=block_size)
    times: dict[str, list[float]] = {k: [] for k in ("clm_mem", "ours_mem", "clm_disk", "ours_cold", "ours_warm")}
    checked = {}

    def fresh_tokenizer():
        return tokenizer.ready_for_lm(tokenizer.bundled_gpt2(), "the bundled GPT-2 tokenizer")

    def timed(key, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        times[key].append(time.perf_counter() - start)
        return result

    def clm_splits(docs, tok):
        return {s: run_clm_blocks(getattr(docs, s), tok, block_size) for s in shards.SPLITS}

    def clm_from_disk(tok):
        return clm_splits(split_texts(cfg), tok)

    def ours(corpus, tok):
        return data.prepare(corpus, tok, tokenizer.fingerprint(tok))

    for _ in range(repeats):
        tmp = tempfile.mkdtemp(prefix="bench-preprocess-")
        try:
            # Documents in memory: both sides start from the same read and split documents.
            corpus = data.Corpus(DataConfig(**{**cfg.__dict__, "cache_dir": f"{tmp}/mem"}))
            clm = timed("clm_mem", clm_splits, split_texts(corpus.cfg), fresh_tokenizer())
            packed = timed("ours_mem", ours, corpus, fresh_tokenizer())
            for split in shards.SPLITS:
                a, b = blocks_array(clm[split]), blocks_array(getattr(packed, split))
                checked[split] = {"blocks": int(len(b)), "identical": bool(a.shape == b.shape and (a == b).all())}
                if not checked[split]["identical"]:
                    raise SystemExit(f"{split}: prepare() and the run_clm reference disagree ({a.shape} vs {b.shape})")

            # End to end from the plays on disk.
            timed("clm_disk", clm_from_disk, fresh_tokenizer())
            disk = DataConfig(**{**cfg.__dict__, "cache_dir": f"{tmp}/disk"})
            timed("ours_cold", ours, data.Corpus(disk), fresh_tokenizer())
            assert timed("ours_warm", ours, data.Corpus(disk), fresh_tokenizer()).cache_hit
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    note = f"median of {repeats}"
    rows = [
        common.Row("tokenize + pack, documents in memory", med["clm_mem"], med["ours_mem"], "s", False, note),
        common.Row("end to end from the plays on disk, cold", med["clm_disk"], med["ours_cold"], "s", False, note),
        common.Row("end to end, ours cached (warm re-run)", med["clm_disk"], med["ours_warm"], "s", False, note),
    ]
    return rows, {"times_s": times, "output_check": checked}


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default 5, quick 1)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block (the tiny recipe's 128)")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    before = common.load()
    rows, extra = measure(repeats, args.block_size)
    common.report(
        "preprocess",
        f"Preprocessing the bundled Shakespeare corpus (block {args.block_size}); times, lower is better",
        rows,
        args,
        before,
        **extra,
    )


if __name__ == "__main__":
    main()
