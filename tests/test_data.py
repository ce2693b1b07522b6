"""Data stage: sources and formats, document-level splits, packing accounting, the cache, and
every bad input's one-line error."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_text, write_corpus
from oracle import read_file, split_texts

from hftextgen import cache, data
from hftextgen.data import DataConfig, sources
from hftextgen.data.split import held_out_indices
from hftextgen.errors import UserError
from hftextgen.model.tokenizer import bundled_gpt2, fingerprint


@pytest.fixture(scope="module")
def gpt2():
    tokenizer = bundled_gpt2()
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, fingerprint(tokenizer)


def files_cfg(*paths, **kw) -> DataConfig:
    return DataConfig(source="files", paths=[str(p) for p in paths], **kw)


def prepare(cfg, gpt2):
    tokenizer, fp = gpt2
    return data.prepare(data.Corpus(cfg), tokenizer, fp)


def flat(ds) -> list[int]:
    return ds[:]["input_ids"].reshape(-1).tolist()


# ---------------------------------------------------------------- packing


def test_packing_keeps_every_token_in_order_but_the_tail(corpus, gpt2):
    tokenizer, _ = gpt2
    cfg = files_cfg(corpus / "*.txt", block_size=50, validation_fraction=0.25)
    packed = prepare(cfg, gpt2)
    docs = split_texts(cfg)
    for split in ("train", "validation"):
        texts = getattr(docs, split)["text"]
        expected = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
        blocks = getattr(packed, split)
        report = packed.report[split]
        assert blocks[:]["input_ids"].shape == (len(blocks), 50)
        assert flat(blocks) == expected[: len(blocks) * 50]
        assert report["tokens"] == len(expected)
        assert report["tokens_dropped"] == len(expected) - len(blocks) * 50 < 50
        assert report["documents"] == len(texts)
        assert report["characters"] == sum(len(t) for t in texts)


def test_packing_spans_map_batches(tmp_path, gpt2):
    # Many short documents: a per-batch packer (transformers#18167) would drop a tail per batch.
    folder = tmp_path / "short"
    folder.mkdir()
    (folder / "rows.jsonl").write_text("".join(json.dumps({"text": f"line number {i}."}) + "\n" for i in range(1000)))
    packed = prepare(files_cfg(folder, block_size=64), gpt2)
    for split in ("train", "validation"):
        assert packed.report[split]["tokens_dropped"] < 64


def test_add_eos_false_joins_documents_without_separator(corpus, gpt2):
    tokenizer, _ = gpt2
    packed = prepare(files_cfg(corpus / "*.txt", block_size=16, add_eos=False), gpt2)
    assert tokenizer.eos_token_id not in flat(packed.train)


# ---------------------------------------------------------------- splits


def test_hold_out_is_seeded_and_a_fraction_of_the_documents():
    held = held_out_indices(40, 0.1, seed=7)
    assert held.tolist() == held_out_indices(40, 0.1, seed=7).tolist()
    assert len(held) == 4 and held.tolist() == sorted(set(held.tolist())) and 0 <= held.min() and held.max() < 40
    assert held.tolist() != list(range(36, 40))  # not the tail of the data
    assert held.tolist() != held_out_indices(40, 0.1, seed=8).tolist()
    assert held.tolist() == np.sort(np.random.default_rng(7).permutation(40)[:4]).tolist()
    assert len(held_out_indices(2, 0.01, seed=0)) == 1 and len(held_out_indices(3, 0.99, seed=0)) == 2


def test_hold_out_needs_two_documents():
    with pytest.raises(UserError, match="too few to hold out whole documents"):
        held_out_indices(1, 0.1, seed=0)


def test_shakespeare_corpus_is_38_plays_split_by_play():
    docs = split_texts(DataConfig())
    assert len(docs.train) + len(docs.validation) == 38 and len(docs.validation) == 2
    assert not set(docs.train["id"]) & set(docs.validation["id"])
    plays = {
        **dict(zip(docs.train["id"], docs.train["text"], strict=True)),
        **dict(zip(docs.validation["id"], docs.validation["text"], strict=True)),
    }
    hamlet = plays["tragedies/hamlet"]
    assert hamlet.startswith("Hamlet") and "HAMLET:\nTo be, or not to be" in hamlet
    assert "**" not in hamlet and "  \n" not in hamlet and "_" not in hamlet


def test_play_to_text():
    markdown = (
        "# As You Like It\n\n## ACT I\n\n_Enter ORLANDO_\n\n"
        "**ORLANDO**  \nAs I remember, Adam,  \n_\\[Aside]_ it was\n\n\n\n**ADAM**  \nYonder."
    )
    assert data.play_to_text(markdown) == (
        "As You Like It\n\nACT I\n\nEnter ORLANDO\n\nORLANDO:\nAs I remember, Adam,\n[Aside] it was\n\nADAM:\nYonder.\n"
    )


def test_validation_paths_replace_the_hold_out(corpus, tmp_path, gpt2):
    val = write_corpus(tmp_path / "val", n_docs=2)
    packed = prepare(files_cfg(corpus / "*.txt", validation_paths=[str(val)]), gpt2)
    assert packed.report["train"]["documents"] == 8 and packed.report["validation"]["documents"] == 2
    assert all(i.startswith(str(val)) for i in packed.validation_ids)


# ---------------------------------------------------------------- formats


def test_every_file_format_and_text_field(tmp_path):
    texts = [make_text(i, 3) for i in range(4)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": t, "n": 1}) for t in texts) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"body": t} for t in texts]))
    with open(tmp_path / "c.csv", "w", newline="") as f:
        import csv

        writer = csv.DictWriter(f, fieldnames=["n", "body"])
        writer.writeheader()
        writer.writerows({"n": i, "body": t} for i, t in enumerate(texts))
    pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet")
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*")], text_field="body")
    docs = split_texts(cfg)
    got = sorted(list(docs.train["text"]) + list(docs.validation["text"]))
    assert got == sorted(texts * 4)
    ids = set(docs.train["id"]) | set(docs.validation["id"])
    assert f"{tmp_path / 'a.jsonl'}:1" in ids and f"{tmp_path / 'd.parquet'}:0" in ids


def test_sample_by_paragraph_and_line(tmp_path):
    (tmp_path / "one.txt").write_text("first para\nstill first\n\nsecond para\n\n\nthird\n")
    by_para = read_file(tmp_path / "one.txt", DataConfig(source="files", paths=["x"], sample_by="paragraph"))
    assert [t.strip() for _, t in by_para if t.strip()] == ["first para\nstill first", "second para", "third"]
    by_line = read_file(tmp_path / "one.txt", DataConfig(source="files", paths=["x"], sample_by="line"))
    assert [t for _, t in by_line if t] == ["first para", "still first", "second para", "third"]


def test_directories_are_searched_recursively(tmp_path):
    write_corpus(tmp_path / "top" / "deep", n_docs=3)
    (tmp_path / "top" / "notes.bin").write_bytes(b"\x00\x01")
    assert len(data.expand_paths([str(tmp_path / "top")], "data.paths")) == 3


# ---------------------------------------------------------------- cache


def test_cache_hit_and_every_invalidation(corpus, gpt2):
    tokenizer, fp = gpt2
    cfg = files_cfg(corpus / "*.txt", block_size=32)
    first = prepare(cfg, gpt2)
    second = prepare(cfg, gpt2)
    assert not first.cache_hit and second.cache_hit and second.cache_path == first.cache_path
    assert flat(first.train) == flat(second.train)

    # Same file names and sizes, one character changed: must rebuild.
    doc = corpus / "doc3.txt"
    original = doc.read_text()
    doc.write_text(
        original.replace("HAMLET", "HAMLEX", 1) if "HAMLET" in original else original.replace("KING", "KINX", 1)
    )
    edited = prepare(cfg, gpt2)
    assert not edited.cache_hit and edited.cache_path != first.cache_path
    doc.write_text(original)
    assert prepare(cfg, gpt2).cache_hit

    # The shards hold the split's tokens, not blocks: another block size reads the same ones.
    other_blocks = prepare(files_cfg(corpus / "*.txt", block_size=33), gpt2)
    assert other_blocks.cache_hit and other_blocks.report["train"]["tokens"] == first.report["train"]["tokens"]
    assert other_blocks.report["train"]["blocks"] == first.report["train"]["tokens"] // 33
    for changed in (
        files_cfg(corpus / "*.txt", block_size=32, add_eos=False),
        files_cfg(corpus / "*.txt", block_size=32, split_seed=99),
        files_cfg(corpus / "*.txt", block_size=32, validation_fraction=0.3),
        files_cfg(corpus / "*.txt", block_size=32, sample_by="paragraph"),
    ):
        assert not prepare(changed, gpt2).cache_hit

    other = bundled_gpt2()
    other.add_special_tokens({"additional_special_tokens": ["<|speaker|>"]})
    other.pad_token = other.eos_token
    assert fingerprint(other) != fp
    assert not data.prepare(data.Corpus(cfg), other, fingerprint(other)).cache_hit


def test_an_unfinished_cache_entry_is_never_used(corpus, gpt2, tmp_path):
    cfg = files_cfg(corpus / "*.txt", block_size=32)
    first = prepare(cfg, gpt2)
    (first.cache_path / "COMPLETE").unlink()
    (first.cache_path / "manifest.json").write_text("{broken")
    again = prepare(cfg, gpt2)
    assert not again.cache_hit and flat(again.train) == flat(first.train)


def test_cached_prepare_does_not_read_documents(corpus, gpt2, monkeypatch):
    for path in corpus.glob("*.txt"):  # not written a moment ago (see cache.RACY_SECONDS)
        os.utime(path, (time.time() - 60, time.time() - 60))
    cfg = files_cfg(corpus / "*.txt", block_size=32)
    prepare(cfg, gpt2)
    monkeypatch.setattr(sources, "records", lambda *a: pytest.fail("a cache hit parsed a file"))
    monkeypatch.setattr(cache.hashlib, "file_digest", lambda *a: pytest.fail("a cache hit hashed a file again"))
    packed = prepare(cfg, gpt2)
    assert packed.cache_hit and len(packed.train) > 0


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: [str(d / "missing.txt")], "no such file or directory: .*missing.txt"),
        (lambda d: [str(d / "*.nothing")], "matches no .* files"),
        (lambda d: (d / "empty.txt").write_text("  \n") and [str(d / "empty.txt")], "is empty: remove it"),
        (lambda d: (d / "x.docx").write_text("x") and [str(d / "x.docx")], "supported endings are"),
        (
            lambda d: (d / "latin.txt").write_bytes("caf\xe9 ok".encode("latin-1")) and [str(d / "latin.txt")],
            r"latin.txt is not valid utf-8 \(byte 3\): set data.encoding",
        ),
        (
            lambda d: (d / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"\n') and [str(d / "bad.jsonl")],
            r"bad.jsonl:2: not valid JSON",
        ),
        (
            lambda d: (d / "f.jsonl").write_text('{"body": "a", "id": 1}\n') and [str(d / "f.jsonl")],
            r"f.jsonl:1 has no field 'text' \(fields: body, id\): set data.text_field",
        ),
        (
            lambda d: (d / "f.csv").write_text("body,id\nx,1\n") and [str(d / "f.csv")],
            r"has no column 'text' \(columns: body, id\)",
        ),
        (
            lambda d: pq.write_table(pa.table({"body": ["x"]}), d / "f.parquet") or [str(d / "f.parquet")],
            r"has no column 'text' \(columns: body\)",
        ),
        (lambda d: (d / "n.jsonl").write_text('{"text": 5}\n') and [str(d / "n.jsonl")], "holds int, not text"),
        (
            lambda d: (d / "one.txt").write_text("a single document") and [str(d / "one.txt")],
            "too few to hold out whole documents",
        ),
    ],
    ids=[
        "missing",
        "glob",
        "empty",
        "suffix",
        "not-utf8",
        "broken-jsonl",
        "jsonl-field",
        "csv-field",
        "parquet-field",
        "not-text",
        "one-document",
    ],
)
def test_bad_inputs_raise_one_line_errors(tmp_path, gpt2, setup, match):
    folder = tmp_path / "in"
    folder.mkdir()
    paths = setup(folder)
    with pytest.raises(UserError, match=match) as info:
        prepare(DataConfig(source="files", paths=paths, format="text"), gpt2)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache").rglob("*.tmp")), "a failed build left a partial cache entry"
    assert not list((tmp_path / "cache").rglob(".*.partial")), "a bad input left a work folder to continue"


def test_encoding_option_reads_other_encodings(tmp_path, gpt2):
    for i in range(3):
        (tmp_path / f"l{i}.txt").write_bytes(f"caf\xe9 number {i} ".encode("latin-1") * 20)
    docs = split_texts(files_cfg(tmp_path / "*.txt", encoding="latin-1"))
    assert "café" in docs.train["text"][0]


def test_split_too_small_for_one_block(corpus, gpt2):
    with pytest.raises(
        UserError, match=r"validation split holds \d+ tokens, fewer than one block of data.block_size=4096"
    ):
        prepare(files_cfg(corpus / "*.txt", block_size=4096), gpt2)


def test_blocks_are_int_tensors(corpus, gpt2):
    packed = prepare(files_cfg(corpus / "*.txt", block_size=32), gpt2)
    example = packed.train[0]["input_ids"]
    assert example.shape == (32,) and example.dtype.is_floating_point is False
    assert np.all(np.asarray(example) < 50257)


def test_hub_code_path_with_a_local_dataset_folder(tmp_path, gpt2):
    # load_dataset reads a folder of split files the way it reads a hub repo: the hub path
    # (splits, text_field, ids, empty rows, validation_split) runs offline.
    folder = tmp_path / "hubdata"
    folder.mkdir()
    for split, n in (("train", 6), ("validation", 2)):
        rows = [{"body": make_text(i, 5)} for i in range(n)] + [{"body": ""}]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source="hub", dataset=str(folder), validation_split="validation", text_field="body", block_size=16)
    packed = prepare(cfg, gpt2)
    assert packed.report["train"]["documents"] == 6 and packed.report["validation"]["documents"] == 2
    assert packed.validation_ids == ["validation:0", "validation:1"]
    assert prepare(cfg, gpt2).cache_hit

    with pytest.raises(UserError, match=r"has no column 'text' \(columns: body\)"):
        split_texts(DataConfig(source="hub", dataset=str(folder), format="text"))
    with pytest.raises(UserError, match=r"data.format auto: train:0: the record holds none of the formats"):
        split_texts(DataConfig(source="hub", dataset=str(folder)))
    held_out = split_texts(DataConfig(source="hub", dataset=str(folder), text_field="body"))
    assert len(held_out.train) + len(held_out.validation) == 6
