"""Preparing data of any size: pieces cut where the ids cannot change, tiny shards (a test-only
size) that a small corpus spans by the dozen, the same bytes with any number of processes, a
prepare killed or stopped and run again, streamed hub data held out by hash, and the capped
evaluation subsets. No timings: bench/scale.py measures speed and memory."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_text, write_corpus
from oracle import split_texts

from hftextgen import data
from hftextgen.data import DataConfig, encoders, preparation, shards, sources
from hftextgen.data.split import held_out_by_hash
from hftextgen.errors import RunStopped
from hftextgen.model import tokenizer

ROOT = Path(__file__).resolve().parents[1]

# Test-only sizes: units of work of a few hundred bytes, shards of a few hundred tokens, texts
# sent to the tokenizer in pieces of ~100 characters and read 333 bytes at a time.
TINY = {"UNIT_BYTES": (700, 700), "SHARD_TOKENS": 150, "PIECE_CHARS": 97, "BATCH_CHARS": 500}


@pytest.fixture
def tiny(monkeypatch):
    for name, value in TINY.items():
        monkeypatch.setattr(preparation, name, value)
    monkeypatch.setattr(sources, "READ_BYTES", 333)


@pytest.fixture(scope="module")
def gpt2():
    tok = tokenizer.ready_for_lm(tokenizer.bundled_gpt2(), "the bundled GPT-2 tokenizer")
    return tok, tokenizer.fingerprint(tok)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A byte-level BPE trained here: the Rust backend route, cut like GPT-2's."""
    texts = [make_text(i, 20) for i in range(30)]
    tok = tokenizer.ready_for_lm(tokenizer.train_bpe(texts, vocab_size=400, min_frequency=2), "trained")
    return tok, tokenizer.fingerprint(tok)


def prepare(cfg: DataConfig, tok_fp, **kw) -> data.Prepared:
    tok, fp = tok_fp
    return data.prepare(data.Corpus(cfg), tok, fp, **kw)


def files_of(path: Path) -> dict[str, str]:
    """Every file of a prepared entry and the SHA-256 of its bytes."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def odd_corpus(folder: Path) -> Path:
    """Documents that exercise the cuts: long ones (several units, many pieces), CRLF line ends,
    whitespace runs at the cuts, other scripts, a special token inside the text."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        (folder / f"d{i}.txt").write_text(make_text(i, 30 + 40 * i) + " tail  \n\n\n  x\ty  \n", encoding="utf-8")
    big = "".join(make_text(100 + i, 30) + "\n" for i in range(12))
    (folder / "big.txt").write_text(big + "Ünïcödé 😀 漢字 <|endoftext|> in the text\r\nCRLF\r\n", encoding="utf-8")
    (folder / "crlf.txt").write_text(make_text(7, 50).replace("\n", "\r\n"), encoding="utf-8")
    return folder


def expected_documents(cfg: DataConfig, tok, split: str) -> tuple[list[str], list[str], list[list[int]]]:
    docs = getattr(split_texts(cfg), split)
    eos = [tok.eos_token_id] if cfg.add_eos else []
    return list(docs["id"]), list(docs["text"]), [tok(t)["input_ids"] + eos for t in docs["text"]]


def check_documents(packed: data.Prepared, cfg: DataConfig, tok) -> None:
    """Every document's ids, bytes, words and id in the prepared data are those of
    tokenizer(text) + EOS, and the split is their concatenation."""
    for split in shards.SPLITS:
        ids, texts, expected = expected_documents(cfg, tok, split)
        table = np.load(packed.cache_path / f"{split}.docs.npy")
        names = [json.loads(line) for line in (packed.cache_path / f"{split}.ids.jsonl").read_text().splitlines()]
        assert names == ids
        assert table["tokens"].tolist() == [len(e) for e in expected]
        assert table["bytes"].tolist() == [len(t.encode("utf-8")) for t in texts]
        assert table["words"].tolist() == [len(t.split()) for t in texts]
        stream = packed.tokens[split].read(0, len(packed.tokens[split])).tolist()
        assert stream == [t for e in expected for t in e]
        n = len(stream) // cfg.block_size
        blocks = getattr(packed, split)[:]["input_ids"]
        assert blocks.shape == (n, cfg.block_size) and blocks.reshape(-1).tolist() == stream[: n * cfg.block_size]


# ---------------------------------------------------------------- cutting texts for the tokenizer


def random_text(rng: random.Random, n: int) -> str:
    alphabet = list("abcdefghij  ABC0123") + [" ", "  ", "\n", "\n\n", "\t", " \n", "\r\n", "'s", "'ll", "!?", ".", ","]
    alphabet += ["é", "漢", "😀", "\u00a0", "\u3000", "<|endoftext|>", "_x", "\x1c", "٣"]
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("which", ["gpt2", "trained"])
def test_texts_cut_at_safe_points_give_the_ids_of_the_whole(which, gpt2, trained):
    tok, _ = gpt2 if which == "gpt2" else trained
    spec = tokenizer.encoder_spec(tok)
    assert spec["route"] == ("tiktoken" if which == "gpt2" else "backend") and spec["cuttable"]
    encode = encoders.build_encoder(spec)
    rng = random.Random(0)
    cuts_tried = 0
    for _ in range(100):
        text = random_text(rng, 150)
        whole = encode([text])[0].tolist()
        assert whole == tok(text)["input_ids"]
        for cut in preparation.SAFE_CUT.finditer(text):
            a, b = text[: cut.start()], text[cut.start() :]
            assert encode([a])[0].tolist() + encode([b])[0].tolist() == whole, (a, b)
            cuts_tried += 1
        pieces = list(preparation.pieces(text, 7))
        assert "".join(pieces) == text
        assert [t for p in encode(pieces) for t in p.tolist()] == whole
    assert cuts_tried > 400


def test_words_are_counted_as_str_split_counts_them():
    wide = [c for c in map(chr, range(0x80, 0x110000)) if c.isspace()]
    assert all(preparation._WIDE_SPACE.fullmatch(c) for c in wide)
    assert [c for c in map(chr, range(0x80)) if c.isspace()] == [
        chr(b) for b in np.flatnonzero(preparation._ASCII_SPACE)
    ]
    rng = random.Random(2)
    for text in [
        "",
        " ",
        "a",
        " a b  ",
        "\x1cx\x1fy\n",
        "é ü\tz",
        "a\u3000b c",
        *(random_text(rng, 80) for _ in range(200)),
    ]:
        assert preparation.count_words(text, text.encode()) == len(text.split()), repr(text)


def test_a_tokenizer_that_cannot_be_cut_is_never_cut(gpt2):
    tok, _ = gpt2
    other = tokenizer.bundled_gpt2()
    other.add_special_tokens({"additional_special_tokens": ["<|two words|>"]})
    assert tokenizer.encoder_spec(tokenizer.ready_for_lm(other, "x"))["cuttable"] is False
    assert tokenizer.encoder_spec(tok)["cuttable"] is True


# ---------------------------------------------------------------- tiny shards


@pytest.mark.parametrize("sample_by", ["document", "paragraph", "line"])
def test_tiny_shards_keep_every_documents_ids(tiny, tmp_path, gpt2, sample_by):
    folder = odd_corpus(tmp_path / "corpus")
    cfg = DataConfig(source="files", paths=[str(folder)], block_size=16, validation_fraction=0.3, sample_by=sample_by)
    cfg.num_proc = 1
    packed = prepare(cfg, gpt2)
    manifest = packed.manifest
    assert len(manifest["splits"]["train"]["shards"]) > 10 and len(manifest["splits"]["validation"]["shards"]) > 1
    assert manifest["dtype"] == "uint16"
    for split in shards.SPLITS:
        listed = manifest["splits"][split]
        assert sum(s["tokens"] for s in listed["shards"]) == listed["tokens"] == len(packed.tokens[split])
        for shard in listed["shards"]:
            raw = (packed.cache_path / shard["file"]).read_bytes()
            assert len(raw) == 2 * shard["tokens"] and hashlib.sha256(raw).hexdigest() == shard["sha256"]
    check_documents(packed, cfg, gpt2[0])


def test_tiny_shards_of_rows_and_a_trained_tokenizer(tiny, tmp_path, trained):
    folder = tmp_path / "rows"
    folder.mkdir()
    texts = [make_text(i, 6) for i in range(40)] + ["", "   "]
    rows = "".join(json.dumps({"text": t}) + "\n" for t in texts) + "\n"
    (folder / "a.jsonl").write_text(rows)
    (folder / "b.json").write_text(rows)  # JSON lines under a .json name
    pq.write_table(pa.table({"text": texts}), folder / "c.parquet", row_group_size=5)
    with open(folder / "d.csv", "w", newline="") as f:
        import csv

        writer = csv.DictWriter(f, fieldnames=["text"])
        writer.writeheader()
        writer.writerows({"text": t} for t in texts[:10])
    cfg = DataConfig(source="files", paths=[str(folder)], block_size=8, num_proc=1)
    packed = prepare(cfg, trained)
    assert len(packed.manifest["splits"]["train"]["shards"]) > 10
    check_documents(packed, cfg, trained[0])
    assert f"{folder / 'a.jsonl'}:41" not in packed.validation_ids  # the empty rows count, but are no documents


def test_add_eos_false_joins_documents_across_shards(tiny, tmp_path, gpt2):
    cfg = DataConfig(source="files", paths=[str(odd_corpus(tmp_path / "c"))], block_size=8, add_eos=False, num_proc=1)
    packed = prepare(cfg, gpt2)
    check_documents(packed, cfg, gpt2[0])
    assert gpt2[0].eos_token_id not in packed.tokens["train"].read(0, 400).tolist()


@pytest.mark.slow
def test_the_number_of_processes_changes_no_byte(tiny, tmp_path, gpt2):
    folder = odd_corpus(tmp_path / "corpus")
    entries = []
    for num_proc in (1, 2):
        cfg = DataConfig(
            source="files", paths=[str(folder)], num_proc=num_proc, cache_dir=str(tmp_path / f"c{num_proc}")
        )
        entries.append(prepare(cfg, gpt2).cache_path)
    one, two = files_of(entries[0]), files_of(entries[1])
    assert len(one) > 20 and one == two


def test_resume_keeps_the_finished_shards_and_ends_the_same(tiny, tmp_path, gpt2, monkeypatch):
    folder = odd_corpus(tmp_path / "corpus")
    reference = prepare(
        DataConfig(source="files", paths=[str(folder)], num_proc=1, cache_dir=str(tmp_path / "ref")), gpt2
    )
    cfg = DataConfig(source="files", paths=[str(folder)], num_proc=1)

    real, calls = preparation.tokenize_unit, []

    def interrupted(unit):
        if len(calls) == 20:
            raise preparation._Signal(signal.SIGTERM)  # what the signal handler raises
        calls.append(unit.index)
        real(unit)

    monkeypatch.setattr(preparation, "tokenize_unit", interrupted)
    with pytest.raises(RunStopped) as stopped:
        prepare(cfg, gpt2)
    assert stopped.value.exit_code == 143
    assert re.fullmatch(
        r"stopped by SIGTERM while preparing the data; 20 of \d+ units of work are done and kept in \S+\.partial: "
        r"the same command continues from there",
        str(stopped.value),
    )
    work = next((tmp_path / "cache" / "data").glob(".*.partial"))
    assert not list(work.rglob("*.tmp"))
    finished = {p: p.stat().st_mtime_ns for p in (work / "train").glob("*.bin")}
    assert len(finished) >= 20

    monkeypatch.setattr(preparation, "tokenize_unit", real)
    resumed = prepare(cfg, gpt2)
    assert files_of(resumed.cache_path) == files_of(reference.cache_path)
    kept = {p.name: m for p, m in finished.items()}
    assert all((resumed.cache_path / "train" / n).stat().st_mtime_ns == m for n, m in kept.items())
    assert not work.exists()


# ---------------------------------------------------------------- killed, stopped: the command line

# The test-only sizes of the command-line tests, set by DRIVER in the subprocess.
SMALL = {"UNIT_BYTES": (2000, 2000), "SHARD_TOKENS": 300, "PIECE_CHARS": 300}
DRIVER = f"""
import sys
from hftextgen import cli
from hftextgen.data import preparation
from hftextgen.data import sources
for name, value in {SMALL!r}.items():
    setattr(preparation, name, value)
sources.READ_BYTES = 1000
sys.exit(cli.main(sys.argv[1:]))
"""


def start_prepare(corpus: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HFTEXTGEN_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
    }
    argv = ["prepare", "--data.source", "files", "--data.paths", f"[{corpus}]", "--progress", "plain", *extra]
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def big_corpus(folder: Path) -> Path:
    """~1.2 MB in 120 files: ~600 units of work of the driver's 2,000 bytes."""
    return write_corpus(folder, n_docs=120, lines=200)


def wait_for_parts(cache: Path, process: subprocess.Popen, at_least: int) -> Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        works = list((cache / "data").glob(".*.partial"))
        if works and len(list((works[0] / "parts").glob("*.json"))) >= at_least:
            return works[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    pytest.fail("no parts recorded in 120 s")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive_after(pids: list[int], seconds: float = 10) -> list[int]:
    """The processes still there after waiting up to `seconds` for them to end."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)
    return [p for p in pids if Path(f"/proc/{p}").exists()]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc")
def test_prepare_killed_then_run_again_is_byte_identical(tmp_path, gpt2, monkeypatch):
    corpus = big_corpus(tmp_path / "corpus")
    for name, value in SMALL.items():
        monkeypatch.setattr(preparation, name, value)
    monkeypatch.setattr(sources, "READ_BYTES", 1000)
    cfg = DataConfig(source="files", paths=[str(corpus)], num_proc=1, cache_dir=str(tmp_path / "ref"))
    expected = prepare(cfg, gpt2).cache_path  # uninterrupted, in this process, one process

    process = start_prepare(corpus, tmp_path / "cache", "--data.num_proc", "2")
    work = wait_for_parts(tmp_path / "cache", process, at_least=30)
    workers = children(process.pid)
    process.kill()
    process.wait()
    assert len(workers) >= 2 and not alive_after(workers)  # the workers die with it (PR_SET_PDEATHSIG)
    assert not [p for p in (tmp_path / "cache" / "data").iterdir() if not p.name.startswith(".")]
    done = len(list((work / "parts").glob("*.json")))

    again = start_prepare(corpus, tmp_path / "cache", "--data.num_proc", "2")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err.decode()
    assert re.search(r"units left", out.decode()), out.decode()
    (entry,) = [p for p in (tmp_path / "cache" / "data").iterdir() if not p.name.startswith(".")]
    assert entry.name == expected.name and done >= 30 and files_of(entry) == files_of(expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.extended)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_stops_prepare_within_seconds_with_one_line(tmp_path, signum):
    corpus = big_corpus(tmp_path / "corpus")
    process = start_prepare(corpus, tmp_path / "cache", "--data.num_proc", "2")
    work = wait_for_parts(tmp_path / "cache", process, at_least=10)
    workers = children(process.pid)
    sent = time.monotonic()
    process.send_signal(signum)
    out, err = process.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    assert process.returncode == 128 + signum, err.decode()
    lines = [line for line in err.decode().splitlines() if line.startswith("hftextgen:")]
    name = signal.Signals(signum).name
    assert len(lines) == 1 and lines[0].startswith(f"hftextgen: stopped by {name} while preparing the data; "), lines
    assert "Traceback" not in err.decode()
    assert len(workers) >= 2 and not alive_after(workers)
    assert not list(work.rglob("*.tmp")) and not (work / "COMPLETE").exists()
    assert not [p for p in (tmp_path / "cache" / "data").iterdir() if not p.name.startswith(".")]


# ---------------------------------------------------------------- streamed hub data


def stream_folder(folder: Path, n_files: int = 3, rows: int = 40) -> list[str]:
    folder.mkdir(parents=True)
    texts = []
    for f in range(n_files):
        batch = [make_text(1000 * f + i, 3) for i in range(rows)] + [""]
        texts += batch
        (folder / f"train-{f}.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in batch))
    return [t for t in texts if t]


@pytest.mark.slow
@pytest.mark.parametrize("num_proc", [1, pytest.param(2, marks=pytest.mark.extended)])
def test_streamed_hub_data_is_held_out_by_a_hash_of_each_document(tmp_path, gpt2, num_proc):
    texts = stream_folder(tmp_path / "hub")
    cfg = DataConfig(
        source="hub", dataset=str(tmp_path / "hub"), streaming=True, text_field="body", block_size=16, num_proc=num_proc
    )
    packed = prepare(cfg, gpt2)
    held = [t for t in texts if held_out_by_hash(t, cfg.validation_fraction)]
    assert 0 < len(held) < len(texts) / 4
    assert packed.report["validation"]["documents"] == len(held)
    assert packed.report["train"]["documents"] == len(texts) - len(held)
    assert all(re.fullmatch(r"train:\d:\d+", i) for i in packed.validation_ids)
    tok = gpt2[0]
    assert packed.tokens["validation"].read(0, len(packed.tokens["validation"])).tolist() == [
        t for text in held for t in tok(text)["input_ids"] + [tok.eos_token_id]
    ]
    assert prepare(cfg, gpt2).cache_hit

    # The same documents, in other files and another order: the same ones are held out.
    shuffled = tmp_path / "hub2"
    shuffled.mkdir()
    order = random.Random(1).sample(texts, len(texts))
    for f in range(2):
        rows = order[f::2]
        (shuffled / f"train-{f}.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in rows))
    again = prepare(DataConfig(source="hub", dataset=str(shuffled), streaming=True, text_field="body"), gpt2)
    table = np.load(again.cache_path / "validation.docs.npy")
    assert sorted(table["tokens"].tolist()) == sorted(len(tok(t)["input_ids"]) + 1 for t in held)


def test_streamed_hub_data_with_a_validation_split(tmp_path, gpt2):
    folder = tmp_path / "hub"
    stream_folder(folder, n_files=1)
    (folder / "validation.jsonl").write_text("".join(json.dumps({"body": make_text(i, 4)}) + "\n" for i in range(3)))
    cfg = DataConfig(
        source="hub",
        dataset=str(folder),
        streaming=True,
        text_field="body",
        validation_split="validation",
        block_size=16,
        num_proc=1,
    )
    packed = prepare(cfg, gpt2)
    assert packed.report["validation"]["documents"] == 3 and packed.report["train"]["documents"] == 40
    assert packed.validation_ids == ["validation:0:0", "validation:0:1", "validation:0:2"]


# ---------------------------------------------------------------- evaluation subsets


def test_max_eval_tokens_caps_both_evaluation_subsets(tmp_path, gpt2):
    folder = write_corpus(tmp_path / "corpus", n_docs=40, lines=30)
    cfg = DataConfig(source="files", paths=[str(folder)], block_size=16, validation_fraction=0.25, max_eval_tokens=700)
    packed = prepare(cfg, gpt2)
    val = packed.report["validation"]
    assert val["tokens"] > 2000
    blocks = packed.eval_items
    assert len(blocks) == 700 // 16 and blocks.n_tokens <= 700 < val["tokens"]
    assert np.all(np.diff(blocks.indices) > 0)  # in the split's order
    again = prepare(cfg, gpt2)
    assert np.array_equal(again.eval_items.indices, blocks.indices)  # the same every time
    assert packed.report["eval"] == {"max_tokens": 700, "blocks": 43, "tokens": 688}

    docs = packed.eval_documents()
    assert 0 < docs.tokens <= 700 and docs.split_tokens == val["tokens"] and docs.split_documents == 10
    assert docs.names == again.eval_documents().names
    validation = split_texts(cfg).validation
    held = list(validation["id"])
    assert set(docs.names) < set(held) and docs.names == [n for n in held if n in docs.names]
    tok = gpt2[0]
    texts = dict(zip(held, validation["text"], strict=True))
    for name, ids, n_bytes in zip(docs.names, docs.ids, docs.bytes, strict=True):
        assert ids == [tok.eos_token_id, *tok(texts[name])["input_ids"], tok.eos_token_id]
        assert n_bytes == len(texts[name].encode())

    # Under the cap: everything, in order (the default recipe scores all its held-out tokens).
    whole = prepare(DataConfig(source="files", paths=[str(folder)], block_size=16, validation_fraction=0.25), gpt2)
    assert len(whole.eval_items) == len(whole.validation) and whole.eval_documents().names == held


def test_one_document_longer_than_the_cap_is_still_scored():
    lengths = np.array([500, 400, 900])
    assert shards.choose_documents(lengths, 100, seed=0).tolist() in ([0], [1], [2])
    assert shards.choose_documents(lengths, 1000, seed=0).tolist() in ([0, 1], [2])
    assert shards.choose_documents(lengths, 1800, seed=0).tolist() == [0, 1, 2]


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("command", ["prepare", "finetune"])
def test_the_large_corpus_recipe_stops_offline_in_one_line(command, run_cli, tmp_path):
    argv = [command, "--config", ROOT / "recipes/gpt2/fineweb-edu-10b.yaml", "--train.output_dir", tmp_path / "run"]
    code, out, err = run_cli(*argv)
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("hftextgen:")] == [
        "hftextgen: error: data.dataset: the dataset 'HuggingFaceFW/fineweb-edu' is not a local directory and the "
        "Hugging Face Hub cannot be reached (no network, or HF_HUB_OFFLINE=1): save its splits as .jsonl or .parquet "
        "files where there is internet and read them with data.source=files"
    ]
    assert not (tmp_path / "run").exists() and "Tokenizing" not in out + err


def test_prepare_command_then_finetune_finds_the_data(run_cli, corpus, tmp_path):
    data_args = ["--data.source", "files", "--data.paths", f"[{corpus}/*.txt]", "--data.validation_fraction", "0.25"]
    code, out, err = run_cli("prepare", *data_args, "--data.block_size", "32", "--progress", "plain")
    assert code == 0, err
    assert re.search(r"^data: prepared at \S+$", out, re.M) and "Tokenizing 8 documents" in out
    assert re.search(r"^validation +2 +[\d,]+ +[\d,]+ +\d+ +\d+$", out, re.M), out
    code, again, err = run_cli("prepare", *data_args, "--data.block_size", "64")
    assert code == 0 and "data: cached at" in again and "Tokenizing" not in again


@pytest.mark.slow
def test_max_eval_tokens_in_a_run_and_in_evaluate(run_cli, tmp_path):
    from conftest import files_args

    corpus = write_corpus(tmp_path / "corpus", n_docs=24, lines=10)  # 6 held out, ~150 tokens each
    run_dir = tmp_path / "run"
    argv = files_args(
        corpus, run_dir, "--train.max_steps", "4", "--train.eval_steps", "2", "--data.max_eval_tokens", "400"
    )
    code, out, err = run_cli(*argv)
    assert code == 0, err
    (line,) = re.findall(r"^held-out loss .*$", out, re.M)
    assert re.fullmatch(
        r"held-out loss [\d.]+, perplexity [\d.]+ over packed blocks \(384 of [\d,]+ validation tokens\)", line
    )
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["eval"] == {"max_tokens": 400, "blocks": 12, "tokens": 384}
    at_end = json.loads((run_dir / "eval.json").read_text())
    assert 0 < at_end["tokens"] <= 400 < at_end["split_tokens"] and "seeded sample" in at_end["data"]
    code, _, err = run_cli("evaluate", "--model", run_dir, "--evaluate.output_dir", tmp_path / "again")
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert (again["tokens"], again["documents"], again["data"]) == (
        at_end["tokens"],
        at_end["documents"],
        at_end["data"],
    )
    assert again["perplexity"] == pytest.approx(at_end["perplexity"], rel=1e-6)


# ---------------------------------------------------------------- the report


def test_the_report_keeps_its_columns_at_any_size():
    big = {"documents": 321_118, "characters": 8_952_508_741_123, "tokens": 2_103_511_992, "blocks": 16_433_687}
    report = {
        "block_size": 128,
        "add_eos": True,
        "train": {**big, "tokens_dropped": 56},
        "validation": {"documents": 2, "characters": 9, "tokens": 3, "blocks": 0, "tokens_dropped": 3},
    }
    lines = data.describe_report(report).splitlines()
    header, train, validation = lines[:3]
    assert len(header) == len(train) == len(validation)
    assert train.split() == ["train", "321,118", "8,952,508,741,123", "2,103,511,992", "16,433,687", "56"]
    for column in header.split()[1:]:  # each number ends under the end of its column's title
        end = header.index(column) + len(column)
        assert train[end - 1] != " " and (end == len(train) or train[end] == " ")


def test_a_worker_receives_the_data_section_itself_without_transformers(tmp_path):
    """What a preparation worker process unpickles, its initializer and its Settings (the
    DataConfig itself among them), imports neither transformers nor torch: the data section's
    module is a schema, and a text worker starts without them."""
    import pickle

    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.txt")], format="text")
    settings = preparation.Settings(
        data=cfg, split_mode="seeded", work=str(tmp_path), spec={}, eos=0, dtype="uint16",
        shard_tokens=1, piece_chars=1, batch_chars=1,
    )  # fmt: skip
    code = (
        "import pickle, sys; init, settings = pickle.loads(sys.stdin.buffer.read()); "
        "heavy = [m for m in ('transformers', 'torch') if m in sys.modules]; "
        "print(type(settings.data).__name__, settings.data.paths, heavy)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps((preparation._init_worker, settings)), capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["DataConfig", f"['{tmp_path}/*.txt']", "[]"]
