"""data.mixture: weights give the drawn proportions and repeat counts (seeded), the report says
them, a text + chat mixture trains every token of the text and the answers of the chat, the bad
inputs are one line before any work, and a two-source mixture runs through `hftextgen finetune`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ANSWERS, TINY_MODEL, TINY_TRAIN, chat_records, pc_records, write_corpus, write_jsonl

from hftextgen.data import DataConfig, Mixture, MixtureSource, describe_report, open_corpus, prepare, report_table
from hftextgen.data.mixture import draw, draw_counts
from hftextgen.data.packing import IGNORE
from hftextgen.data.templates import DEFAULT_CHAT_TEMPLATE
from hftextgen.errors import ConfigError, UserError
from hftextgen.model import fingerprint


def test_weights_give_the_shares_and_the_repeats():
    counts = draw_counts(np.array([100, 900]), np.array([3.0, 1.0]))
    # An epoch holds as many items as both sources: 1,000, three quarters from the first.
    assert counts.tolist() == [750, 250]
    rng = np.random.default_rng(0)
    first, second = draw(100, 750, rng), draw(900, 250, rng)
    # 7.5x: every item 7 times, half of them an 8th time; 0.28x: a subset, none twice.
    assert np.bincount(first, minlength=100).min() == 7 and np.bincount(first).max() == 8
    assert len(np.unique(second)) == 250 and second.max() < 900
    again = draw(100, 750, np.random.default_rng(0))
    assert np.array_equal(first, again)  # seeded


def mixture(*entries: dict, **data) -> DataConfig:
    return DataConfig(mixture=[MixtureSource(**e) for e in entries], **{"block_size": 64, **data})


def prepared(tok, cfg: DataConfig):
    corpus = open_corpus(cfg)
    corpus.check(None)
    if corpus.uses_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return prepare(corpus, tok, fingerprint(tok))


@pytest.fixture
def sources(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_records(60))
    text = write_corpus(tmp_path / "text", n_docs=8, lines=20)
    return chat, text


def test_a_text_and_chat_mixture_trains_the_answers_and_all_the_text(sources, gpt2):
    chat, text = sources
    cfg = mixture({"paths": [str(chat)], "weight": 3}, {"paths": [f"{text}/*.txt"], "weight": 1})
    packed = prepared(gpt2, cfg)
    assert isinstance(packed, Mixture) and packed.packing == "isolated"  # a task source: isolated
    rows = packed.report["mixture"]
    total = sum(r["available"] for r in rows)
    assert [r["drawn"] for r in rows] == [round(total * 3 / 4), round(total / 4)]
    assert [r["format"] for r in rows] == ["messages", "text"]
    assert rows[0]["repeat"] == round(rows[0]["drawn"] / rows[0]["available"], 3)
    # Every row's labels: chat examples train their answers alone, text examples every token
    # (but each example's first, which nothing before it predicts).
    collate = packed.collate(gpt2.pad_token_id)
    items = packed.train.examples
    kinds = {0: 0, 1: 0}
    for r in range(len(packed.train)):
        for i in packed.train.rows[r]:
            ex = items[int(i)]
            kinds[int(items.source[i])] += 1
            if items.source[i] == 1:
                assert ex.trained.all()
            else:
                assert set(gpt2.decode(ex.ids[ex.trained]).split(gpt2.eos_token)) <= set(ANSWERS) | {""}
    assert kinds[0] == rows[0]["drawn"] and kinds[1] == rows[1]["drawn"]
    batch = collate([packed.train[r] for r in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape
    row = collate.row(packed.train[0])
    starts = np.flatnonzero(row["position_ids"] == 0)
    assert (row["labels"][starts] == IGNORE).all()
    # The evaluator scores the chat source; the Trainer's evaluations take both.
    assert packed.evaluated is packed.sources[0] and "[0]" in packed.report["evaluator"]
    assert all(r["eval_tokens"] > 0 for r in rows)
    assert packed.eval_items.n_tokens == sum(r["eval_tokens"] for r in rows)


def test_concat_mixes_blocks_with_labels_for_every_source(sources, gpt2):
    chat, text = sources
    cfg = mixture({"paths": [str(chat)]}, {"paths": [f"{text}/*.txt"]}, packing="concat")
    packed = prepared(gpt2, cfg)
    blocks = packed.train
    text_block = next(i for i in range(len(blocks)) if blocks.source[i] == 1)
    item = blocks[text_block]
    assert torch.equal(item["labels"], item["input_ids"])  # text: every token
    chat_block = next(i for i in range(len(blocks)) if blocks.source[i] == 0)
    assert (blocks[chat_block]["labels"] == IGNORE).any()  # chat: the prompts are not trained
    batch = packed.collate(gpt2.pad_token_id)([blocks[text_block], blocks[chat_block]])
    assert batch["labels"].shape == (2, 64)


def test_padded_mixture_orders_examples_by_length(sources, gpt2):
    chat, text = sources
    packed = prepared(gpt2, mixture({"paths": [str(chat)]}, {"paths": [f"{text}/*.txt"]}, packing="padded"))
    ordered = packed.ordered(4, seed=0)
    assert len(ordered) == len(packed.train) and sorted(ordered.lengths) == sorted(packed.train.lengths)
    assert packed.eval_items.lengths[0] == packed.eval_items.lengths.max()


def test_the_draw_is_seeded_and_the_report_says_it(sources, gpt2):
    chat, text = sources
    cfg = mixture({"paths": [str(chat)], "weight": 1}, {"paths": [f"{text}/*.txt"], "weight": 2.5})
    one, two = prepared(gpt2, cfg), prepared(gpt2, cfg)
    assert np.array_equal(one.train.examples.index, two.train.examples.index)
    entries = [{"paths": [str(chat)], "weight": 1}, {"paths": [f"{text}/*.txt"], "weight": 2.5}]
    other = prepared(gpt2, mixture(*entries, split_seed=7))
    assert not np.array_equal(one.train.examples.index, other.train.examples.index)
    head, rows = report_table(one.report)
    assert head[:6] == ("source", "format", "weight", "share", "examples", "drawn")
    assert rows[0][2:4] == ("1", "29%") and rows[1][2:4] == ("2.5", "71%")
    text_out = describe_report(one.report)
    assert "data.mixture[0]" in text_out and "x" in rows[0][6] and "evaluator at the end" in text_out
    json.dumps(one.report)  # data_report.json


def test_padded_task_data_reports_its_examples(tmp_path, gpt2):
    path = write_jsonl(tmp_path / "pc.jsonl", pc_records(20))
    corpus = open_corpus(DataConfig(paths=[str(path)], packing="padded", block_size=64))
    report = prepare(corpus, gpt2, fingerprint(gpt2)).report
    assert report["train"]["examples"]["examples"] == 19 and "examples" in describe_report(report)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"mixture": [{"weight": 0}, {"weight": 1}]}, "data.mixture[0].weight must be above 0"),
        ({"mixture": [{"weight": -2}, {"weight": 1}]}, "data.mixture[0].weight must be above 0"),
        ({"mixture": [{"weight": 1}]}, "use data.source / data.paths without data.mixture"),
        ({"mixture": [{}, {}], "paths": ["x.txt"]}, "data.paths: with data.mixture"),
        ({"mixture": [{}, {}], "source": "shakespeare"}, "data.source: with data.mixture"),
        ({"mixture": [{}, {"source": "files"}]}, "data.mixture[1]: data.source=files needs data.paths"),
    ],
)
def test_bad_mixtures_are_one_line(data, message):
    entries = [MixtureSource(**e) for e in data.pop("mixture")]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        DataConfig(mixture=entries, **data)


def test_a_mixture_entrys_keys_are_the_data_sections():
    """An entry's keys besides its weight are the data section's own: the keys that name its source
    of the same type and default (unset in the data section with a mixture), the others unset by
    default so that the data section's value holds. The two lists are read off the fields."""
    import dataclasses
    import typing

    from hftextgen.data import config

    def default(cls, name: str):
        f = cls.__dataclass_fields__[name]
        return f.default_factory() if callable(f.default_factory) else f.default

    entry, data = typing.get_type_hints(MixtureSource), typing.get_type_hints(DataConfig)
    keys = [f.name for f in dataclasses.fields(MixtureSource) if f.name != "weight"]
    assert sorted(keys) == sorted(config.SOURCE_KEYS + config.OVERRIDES) and "loss_on" in config.OVERRIDES
    for key in config.SOURCE_KEYS:
        assert entry[key] == data[key] and default(MixtureSource, key) == default(DataConfig, key), key
    for key in config.OVERRIDES:
        assert entry[key] in (data[key], data[key] | None) and default(MixtureSource, key) is None, key
    given = MixtureSource(paths=["a.jsonl"], add_eos=False)
    source = DataConfig(mixture=[given, MixtureSource()], validation_fraction=0.2).source_configs()[0]
    assert (source.paths, source.add_eos, source.validation_fraction) == (["a.jsonl"], False, 0.2)


def test_a_source_without_examples_is_named(tmp_path, gpt2):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    text = write_corpus(tmp_path / "text", n_docs=4, lines=10)
    cfg = mixture({"paths": [f"{text}/*.txt"]}, {"paths": [str(empty)], "format": "messages"})
    with pytest.raises(UserError, match=r"data\.mixture\[1\] \(.*empty\.jsonl\)"):
        prepared(gpt2, cfg)


def test_a_trained_tokenizer_learns_from_every_source(sources):
    chat, text = sources
    corpus = open_corpus(mixture({"paths": [str(chat)]}, {"paths": [f"{text}/*.txt"]}))
    texts = [t for _, t in corpus.texts("train")]
    alone = [[t for _, t in c.texts("train")] for c in corpus.corpora]
    assert texts == alone[0] + alone[1] and alone[0] and alone[1]


@pytest.mark.slow
def test_finetune_runs_on_a_two_source_mixture(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "chat.jsonl", chat_records(80))
    write_corpus(tmp_path / "text", n_docs=8, lines=20)
    (tmp_path / "recipe.yaml").write_text(
        "data:\n  mixture:\n    - {paths: [chat.jsonl], weight: 3}\n    - {paths: [text/*.txt], weight: 1}\n"
    )
    out = tmp_path / "run"
    steps = ["--train.max_steps", "3", "--evaluate.max_answers", "2", "--evaluate.sample_every", "0"]
    code, stdout, err = run_cli(
        "finetune", "--config", "recipe.yaml", *TINY_MODEL, *TINY_TRAIN, *steps, "--train.output_dir", out
    )
    assert code == 0, err
    assert "mixture (an epoch" in stdout and "held-out answers" in stdout
    report = json.loads((out / "data_report.json").read_text())
    assert [r["format"] for r in report["mixture"]] == ["messages", "text"]
    assert json.loads((out / "eval.json").read_text())["answers"] > 0
    assert "a mixture of" in (out / "README.md").read_text()
