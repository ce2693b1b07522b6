"""Data at scale: memory, speed and disk of `hftextgen prepare` on corpora of 1 and 4 GB, and how
fast training starts on a prepared billion-token corpus.

    python -m bench.scale [--quick] [--keep DIR] [--out FILE]

It writes its corpora into a temporary folder (Shakespeare's plays, cut into speeches,
shuffled and written as ~2.5 MB .txt files; the same as one JSON-lines file) and measures
each configuration in a fresh process, with all cores:

  peak RSS        the largest sum of the resident memory of the process and all its
                  descendants (worker processes; proportional set sizes, so shared pages
                  count once), sampled every 0.1 s; and the largest single process's RSS
                  (wait4's ru_maxrss)
  tokenization    MB of text / seconds of prepare's tokenizing phase (reading, splitting,
                  tokenizing and writing shards in data.num_proc processes, as prepare itself
                  reports it), against the raw tokenizer in the same run: tiktoken's
                  encode_ordinary_batch with GPT-2's encoding, all cores as threads, over the
                  same texts (read beforehand, not timed); MB per CPU-second of both (what a
                  shared, loaded machine changes least); and MB / wall time of the whole
                  `hftextgen prepare` command, start-up (imports, workers) included
  disk            bytes of the prepared entry per token; and, for the storage choice, the
                  same tokens as a memory-mapped Arrow table (what datasets saves)
  block reads     random blocks per second through the Trainer's dataset: memmap shards
                  (ours) against an Arrow table read through datasets (with_format torch)
  start to step   seconds from `hftextgen finetune` starting to its first training step, on
                  the prepared 4 GB corpus (>1B tokens) against the bundled default corpus
                  (both already prepared)
  run_clm         transformers' run_clm.py preprocessing on the 1 GB corpus: load_dataset
                  ("text", one row per line), a batched datasets.map of the tokenizer, then
                  group_texts into 1024-token blocks (both with num_proc = all cores)

--quick writes 25 MB and 100 MB corpora instead of 1 GB and 4 GB (smoke run, a minute or two).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import common

MB = 1_000_000
FILE_BYTES = 2_500_000


# ---------------------------------------------------------------- corpora


def speeches() -> list[str]:
    from hftextgen.data import sources

    out = []
    for _, path in sources.shakespeare_files():
        out += [p for p in sources.play_to_text(path.read_text("utf-8")).split("\n\n") if p.strip()]
    return out


def write_txt(folder: Path, total: int, seed: int) -> Path:
    """The plays' speeches shuffled (a new order for each pass) into files of ~2.5 MB."""
    folder.mkdir(parents=True)
    parts, rng = speeches(), random.Random(seed)
    written, n, f, size = 0, 0, None, 0
    while written < total:
        rng.shuffle(parts)
        for part in parts:
            if f is None or size >= FILE_BYTES:
                if f is not None:
                    f.close()
                f, size, n = open(folder / f"part-{n:05d}.txt", "w", encoding="utf-8"), 0, n + 1
            data = part + "\n\n"
            f.write(data)
            size += len(data.encode())
            written += len(data.encode())
            if written >= total:
                break
    f.close()
    return folder


def write_jsonl(path: Path, txt_folder: Path) -> Path:
    """Each ~2.5 MB file's speeches, grouped ~25 to a document, as one JSON-lines file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for file in sorted(txt_folder.glob("*.txt")):
            chunks = file.read_text("utf-8").split("\n\n")
            for i in range(0, len(chunks), 25):
                out.write(json.dumps({"text": "\n\n".join(chunks[i : i + 25])}) + "\n")
    return path


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


# ---------------------------------------------------------------- measuring a process


def _memory(pid: int) -> int:
    """A process's proportional resident memory (PSS: a page shared by n processes counts 1/n
    in each), so that the sum over a tree counts every page once; VmRSS where PSS is missing."""
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        except OSError:
            continue
    return 0


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc). PSS, not RSS: a
    worker just forked from the main process shares all its pages until it execs, and RSS
    would count them twice."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += _memory(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def measured(argv: list[str], env: dict | None = None, until: str | None = None, limit: int | None = None) -> dict:
    """Run argv in a fresh process: wall seconds, peak RSS of its process tree (sampled) and of
    its largest process (wait4), stdout. `until`: also the seconds until a stdout line starts
    with it. `limit`: stop it once the tree holds more than that many bytes."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=common.ROOT,
        env={**os.environ, "PYTHONPATH": str(common.ROOT), **(env or {})},
        start_new_session=True,  # its own process group: a stop reaches its workers too
    )
    peak, lines, seen, killed = 0, [], {}, False

    def sample():
        nonlocal peak, killed
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            if limit and peak > limit and not killed:
                killed = True
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        lines.append(line)
        if until and until not in seen and line.startswith(until):
            seen[until] = time.perf_counter() - started
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,  # its own and its workers', as wait4 counts them
        "peak_tree_rss": peak,
        "peak_process_rss": usage.ru_maxrss * 1024,
        "returncode": proc.returncode,
        "killed_over": limit if killed else None,
        "until": seen.get(until),
        "output": "".join(lines)[-4000:],
    }


def hftextgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "hftextgen", *args]


# ---------------------------------------------------------------- children: the baselines


def raw_tiktoken(config: dict) -> dict:
    """encode_ordinary_batch over the corpus, a batch of files at a time; only the calls timed."""
    import tiktoken

    from hftextgen.model import tokenizer

    tok = tokenizer.ready_for_lm(tokenizer.bundled_gpt2(), "gpt2")
    ranks, special = tokenizer._tiktoken_tables(tok)
    enc = tiktoken.Encoding("gpt2", pat_str=tokenizer.GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    files = sorted(Path(config["folder"]).glob("*.txt"))
    threads = len(os.sched_getaffinity(0))
    seconds, cpu, n_bytes, tokens = 0.0, 0.0, 0, 0
    for i in range(0, len(files), 8):
        texts = [f.read_text("utf-8") for f in files[i : i + 8]]
        started, cpu_started = time.perf_counter(), time.process_time()
        ids = enc.encode_ordinary_batch(texts, num_threads=threads)
        seconds += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
        n_bytes += sum(len(t.encode()) for t in texts)
        tokens += sum(map(len, ids))
    return {"seconds": seconds, "encode_cpu_seconds": cpu, "bytes": n_bytes, "tokens": tokens, "threads": threads}


def run_clm(config: dict) -> dict:
    """transformers' run_clm.py preprocessing, its defaults: rows are lines (keep_linebreaks),
    tokenize in batches of 1000, group_texts in batches of 1000 into block_size blocks."""
    from itertools import chain

    import datasets

    from hftextgen.model import tokenizer

    datasets.disable_progress_bars()
    tok = tokenizer.ready_for_lm(tokenizer.bundled_gpt2(), "gpt2")
    files = [str(p) for p in sorted(Path(config["folder"]).glob("*.txt"))]
    cores = len(os.sched_getaffinity(0))
    started = time.perf_counter()
    raw = datasets.load_dataset("text", data_files={"train": files}, keep_linebreaks=True, cache_dir=config["cache"])
    tokenized = raw.map(
        lambda batch: tok(batch["text"]), batched=True, num_proc=cores, remove_columns=["text"], desc=None
    )
    block = config["block_size"]

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = len(concatenated["input_ids"]) // block * block
        result = {k: [t[i : i + block] for i in range(0, total, block)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = tokenized.map(group_texts, batched=True, num_proc=cores)
    return {"seconds": time.perf_counter() - started, "blocks": len(grouped["train"])}


def storage(config: dict) -> dict:
    """The prepared train tokens as an Arrow table of blocks, the way datasets keeps data: its
    bytes per token, and random block reads per second from it and from our shards."""
    import datasets
    import numpy as np
    import pyarrow as pa
    import torch

    from hftextgen.data import shards

    entry, block = Path(config["entry"]), config["block_size"]
    manifest = shards.read_manifest(entry)
    tokens = shards.Tokens(entry, manifest["splits"]["train"]["shards"], manifest["dtype"])
    ours = shards.BlockDataset(tokens, block)
    n = min(len(ours), config["max_blocks"])
    arrow_dir = Path(config["arrow"])
    arrow_dir.mkdir(parents=True)
    schema = pa.schema([("input_ids", pa.list_(pa.uint16(), block))])
    with pa.OSFile(str(arrow_dir / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, schema) as writer:
            for start in range(0, n, 65536):
                stop = min(n, start + 65536)
                flat = pa.array(tokens.read(start * block, stop * block).astype(np.uint16), pa.uint16())
                writer.write_table(pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(flat, block)}))
    table = datasets.table.MemoryMappedTable.from_file(str(arrow_dir / "data-00000-of-00001.arrow"))
    arrow = datasets.Dataset(table).with_format("torch")
    rng = np.random.default_rng(0)
    picks = rng.integers(0, n, config["reads"])
    rates = {}
    for name, ds in (("arrow", arrow), ("memmap", ours)):
        for i in picks[:100]:  # warm-up: the same pages for both
            ds[int(i)]["input_ids"].to(torch.long)
        started = time.perf_counter()
        for i in picks:
            ds[int(i)]["input_ids"].to(torch.long)
        rates[name] = len(picks) / (time.perf_counter() - started)
    return {
        "blocks": n,
        "arrow_bytes_per_token": folder_bytes(arrow_dir) / (n * block),
        "reads_per_s": rates,
    }


CHILDREN = {"raw_tiktoken": raw_tiktoken, "run_clm": run_clm, "storage": storage}


def child(name: str, config: dict, limit: int | None = None) -> dict:
    """A baseline in a fresh process, measured like the commands."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**config, "name": name}, f)
    out = Path(f.name).with_suffix(".out.json")
    result = measured([sys.executable, "-m", "bench.scale", "--child", f.name, str(out)], limit=limit)
    if out.is_file():
        result.update(json.loads(out.read_text()))
        out.unlink()
    os.unlink(f.name)
    return result


# ---------------------------------------------------------------- the benchmark


def prepare(corpus: Path, cache: Path, *extra: str) -> dict:
    argv = hftextgen("prepare", "--data.source", "files", "--data.paths", f"[{corpus}]", "--progress", "plain", *extra)
    result = measured(argv, env={"HFTEXTGEN_CACHE": str(cache)})
    if result["returncode"] != 0:
        raise SystemExit(f"prepare {corpus} failed:\n{result['output']}")
    entry = Path(next(line for line in result["output"].splitlines() if line.startswith("data: ")).split(" at ")[-1])
    manifest = json.loads((entry / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    phase = re.search(r"^tokenized .* in ([\d.]+) s", result["output"], re.M)
    text = sum(s["bytes"] for s in manifest["splits"].values())
    result.update(
        entry=str(entry),
        tokens=tokens,
        text_bytes=text,
        tokenize_seconds=float(phase.group(1)),
        disk=folder_bytes(entry),
        corpus_bytes=folder_bytes(corpus),
    )
    return result


def first_step(cache: Path, run_dir: Path, *data: str) -> dict:
    argv = hftextgen(
        "finetune",
        "--config",
        # The GPT-2 default's shape and bundled tokenizer, the one `prepare` above used (the
        # default recipe's own tokenizer is trained on the data, which would come first here).
        "bench/tiny-gpt2.yaml",
        *data,
        "--train.max_steps",
        "1",
        "--train.logging_steps",
        "1",
        "--train.eval_strategy",
        "no",
        "--train.save_strategy",
        "no",
        "--train.report_to",
        "none",
        "--evaluate.at_end_of_training",
        "false",
        "--evaluate.sample_every",
        "0",
        "--progress",
        "plain",
        "--train.output_dir",
        str(run_dir),
    )
    result = measured(argv, env={"HFTEXTGEN_CACHE": str(cache)}, until="step 1/1")
    if result["until"] is None:
        raise SystemExit(f"finetune did not reach its first step:\n{result['output']}")
    return result


def memory(what: str, baseline: dict, ours: dict, note: str = "", key: str = "peak_tree_rss") -> common.Row:
    return common.Row(what, baseline[key] / 1e9, ours[key] / 1e9, "GB", False, note)


def measure(quick: bool, keep: Path | None) -> tuple[list[common.Row], dict]:
    sizes = (25 * MB, 100 * MB) if quick else (1000 * MB, 4000 * MB)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=keep))
    extra: dict = {"sizes": sizes}
    try:
        small = write_txt(tmp / "small", sizes[0], seed=1)
        large = write_txt(tmp / "large", sizes[1], seed=2)
        jsonl = write_jsonl(tmp / "jsonl" / "corpus.jsonl", small)
        time.sleep(2.5)  # past cache.RACY_SECONDS: file digests are remembered from the first run on
        cache = tmp / "cache"
        runs = {
            "small": prepare(small, cache),
            "large": prepare(large, cache),
            "jsonl": prepare(jsonl.parent, cache),
        }
        raw = child("raw_tiktoken", {"folder": str(small)})
        clm = child("run_clm", {"folder": str(small), "cache": str(tmp / "clm"), "block_size": 1024}, limit=12 * 10**9)
        shutil.rmtree(tmp / "clm", ignore_errors=True)
        store = child(
            "storage",
            {
                "entry": runs["small"]["entry"],
                "arrow": str(tmp / "arrow"),
                "block_size": 1024,
                "max_blocks": 300_000,
                "reads": 20_000,
            },
        )
        default_start = first_step(cache, tmp / "run-default")
        default_start = first_step(cache, tmp / "run-default-2")  # the default corpus prepared by the first
        large_start = first_step(
            cache, tmp / "run-large", "--data.source", "files", "--data.paths", f"[{large}]", "--data.block_size", "128"
        )
        start = {"default": default_start, "large": large_start}
        extra.update(runs=runs, raw=raw, run_clm=clm, storage=store, start=start)
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    for r in [*extra["runs"].values(), raw, clm, store, default_start, large_start]:
        r.pop("output", None)

    def rate(run: dict) -> float:
        return run["corpus_bytes"] / MB / run["seconds"]

    def phase(run: dict) -> float:
        return run["text_bytes"] / MB / run["tokenize_seconds"]

    s, big, j = runs["small"], runs["large"], runs["jsonl"]
    label = ("25 MB", "100 MB") if quick else ("1 GB", "4 GB")
    rows = [
        memory(
            f"peak RSS of prepare, .txt: {label[0]} (baseline) vs {label[1]} (ours)",
            s,
            big,
            "all processes; target <= 2.5 GB both, large within 25% of small",
        ),
        memory(f"peak RSS, largest single process, {label[0]} vs {label[1]}", s, big, key="peak_process_rss"),
        memory(f"peak RSS of prepare, one {label[0]} .jsonl (ours) vs the {label[0]} .txt", s, j),
        common.Row(
            f"tokenizing MB/s, all cores: raw tiktoken encode_ordinary_batch vs prepare's tokenizing ({label[0]})",
            raw["bytes"] / MB / raw["seconds"],
            phase(s),
            "MB/s",
            True,
            f"{raw['threads']} threads / {raw['threads']} processes; target >= 0.85x",
        ),
        common.Row(
            f"the same, {label[1]}: raw tiktoken ({label[0]}) vs prepare's tokenizing",
            raw["bytes"] / MB / raw["seconds"],
            phase(big),
            "MB/s",
        ),
        common.Row(
            f"MB of text per CPU-second (load-independent): raw tiktoken's encode calls vs the whole prepare "
            f"command, workers and start-up included ({label[0]})",
            raw["bytes"] / MB / raw["encode_cpu_seconds"],
            s["text_bytes"] / MB / s["cpu_seconds"],
            "MB/s",
        ),
        common.Row(
            f"raw tiktoken vs the whole prepare command, start-up included: {label[0]} / {label[1]} / .jsonl",
            raw["bytes"] / MB / raw["seconds"],
            None,
            "MB/s",
            note=f"{rate(s):.2f} / {rate(big):.2f} / {rate(j):.2f} MB/s",
        ),
        common.Row(
            "bytes on disk per token: Arrow blocks (datasets) vs our shards",
            store["arrow_bytes_per_token"],
            s["disk"] / s["tokens"],
            "B",
            False,
            "ours: the whole entry (shards, document tables, ids, manifest); target <= 2.05",
        ),
        common.Row(
            "random 1024-token block reads/s: Arrow via datasets vs memmap shards",
            store["reads_per_s"]["arrow"],
            store["reads_per_s"]["memmap"],
            "/s",
        ),
        common.Row(
            f"finetune start to first step: default corpus vs prepared {label[1]} ({big['tokens'] / 1e9:.2f}B tokens)",
            default_start["until"],
            large_start["until"],
            "s",
            False,
            "target: <= 10 s more",
        ),
        common.Row(
            f"run_clm-style datasets.map + group_texts vs prepare, {label[0]}: time",
            clm["seconds"],
            s["seconds"],
            "s",
            False,
            "run_clm killed at 12 GB" if clm.get("killed_over") else "",
        ),
        memory(f"run_clm-style vs prepare, {label[0]}: peak RSS", clm, s),
    ]
    return rows, extra


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        config = json.loads(Path(argv[1]).read_text())
        Path(argv[2]).write_text(json.dumps(CHILDREN[config["name"]](config)))
        return
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--keep", type=Path, default=None, help="write the corpora under this folder and keep them")
    args = p.parse_args(argv)
    before = common.load()
    rows, extra = measure(args.quick, args.keep)
    common.report("scale", "Data at scale: prepare, storage and start of training", rows, args, before, **extra)


if __name__ == "__main__":
    main()
