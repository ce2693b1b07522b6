"""Task data through the whole data stage: prompt/completion and chat files prepared out of core
into shards with their masks, packed concat, isolated or padded, and read back: the trained
tokens are exactly the answers, whatever the tokenizer, the packing or the number of processes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ANSWERS, chat_records, pc_records, write_jsonl
from oracle import score_conversations
from transformers import AutoConfig, AutoModelForCausalLM

from hftextgen.data import Corpus, DataConfig, prepare
from hftextgen.data.templates import DEFAULT_CHAT_TEMPLATE
from hftextgen.evaluate.answers import Examples, score_answers
from hftextgen.model import ModelConfig, TokenizerConfig, fingerprint
from hftextgen.model.tokenizer import build_tokenizer


def prepared(tok, cfg: DataConfig):
    corpus = Corpus(cfg)
    if corpus.uses_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return corpus, prepare(corpus, tok, fingerprint(tok))


def answers_of(packed, split: str, tok) -> list[str]:
    items, _, _ = packed.eval_examples(split)
    out = []
    for i in range(len(items)):
        ex = items[i]
        # Each run of trained tokens is one answer and its EOS.
        edges = np.flatnonzero(np.diff(np.concatenate([[0], ex.trained.astype(int), [0]])))
        out += [tok.decode(ex.ids[a:b]) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    return out


@pytest.mark.parametrize("kind", ["prompt_completion", "messages"])
def test_the_trained_tokens_are_the_answers_and_their_eos(tmp_path, gpt2, kind):
    records = pc_records() if kind == "prompt_completion" else chat_records()
    path = write_jsonl(tmp_path / "tasks.jsonl", records)
    cfg = DataConfig(source="files", paths=[str(path)], block_size=64, max_eval_tokens=1 << 20)
    corpus, packed = prepared(gpt2, cfg)
    assert corpus.format == kind and corpus.found.endswith(f"reading {kind} records")
    got = answers_of(packed, "train", gpt2) + answers_of(packed, "validation", gpt2)
    per_record = 1 if kind == "prompt_completion" else 2
    assert len(got) == len(records) * per_record
    assert set(got) == {a + gpt2.eos_token for a in ANSWERS}
    report = packed.report
    assert report["task"] == {"format": kind, "loss_on": "answers"}
    assert report["train"]["examples"]["examples"] + report["validation"]["examples"]["examples"] == len(records)
    assert report["packing"] == "isolated"


def test_a_trained_bpe_and_a_template_file_without_generation_marks(tmp_path):
    """A Llama-3-style template of the user's (no {% generation %}) on a BPE trained on the
    examples' text, which knows none of the template's markers as special tokens: the marker
    that closes a turn is then the template's text after each answer."""
    template = tmp_path / "llama3.jinja"
    template.write_text(
        "{% for m in messages %}<|start|>{{ m['role'] }}<|sep|>{{ m['content'] }}<|eot|>{% endfor %}"
        "{% if add_generation_prompt %}<|start|>assistant<|sep|>{% endif %}"
    )
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records())
    # Long enough for whole conversations (the markers are several tokens each in this BPE).
    cfg = DataConfig(source="files", paths=[str(path)], block_size=160, max_eval_tokens=1 << 20)
    corpus = Corpus(cfg)
    tok = build_tokenizer(
        TokenizerConfig(source="train", vocab_size=300, chat_template=str(template)), ModelConfig(), corpus
    )
    assert tok.chat_template == template.read_text()
    packed = prepare(corpus, tok, fingerprint(tok))
    got = answers_of(packed, "train", tok) + answers_of(packed, "validation", tok)
    # The end of turn is the template's marker, trained with the answer.
    assert {g.replace(" ", "") for g in got} == {a.replace(" ", "") + "<|eot|>" for a in ANSWERS}


def test_long_prompts_are_cut_from_the_left_and_long_answers_dropped(tmp_path, gpt2):
    records = [
        {"prompt": "word " * 200 + "end?", "completion": " yes"},
        {"prompt": "Short?", "completion": " no " * 100},
        *pc_records(10),
    ]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    cfg = DataConfig(source="files", paths=[str(path)], block_size=32, max_eval_tokens=1 << 20)
    _, packed = prepared(gpt2, cfg)
    counts = [packed.report[s]["examples"] for s in ("train", "validation")]
    assert sum(c["truncated"] for c in counts) == 1 and sum(c["dropped_too_long"] for c in counts) == 1
    assert sum(c["examples"] for c in counts) == 11
    assert " yes" + gpt2.eos_token in answers_of(packed, "train", gpt2) + answers_of(packed, "validation", gpt2)


def files_of(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


@pytest.mark.slow  # worker processes
def test_the_same_shards_and_masks_whatever_the_number_of_processes(tmp_path, gpt2):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(200))
    entries = []
    for procs in (1, 2):
        cfg = DataConfig(
            source="files", paths=[str(path)], block_size=64, num_proc=procs, cache_dir=str(tmp_path / f"c{procs}")
        )
        _, packed = prepared(gpt2, cfg)
        entries.append(files_of(packed.cache_path))
    assert entries[0] == entries[1]
    assert any(name.endswith(".mask") for name in entries[0])


def tiny_model(vocab: int, positions: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", n_layer=2, n_head=2, n_embd=16, vocab_size=vocab, n_positions=positions)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def rows_nll(lm, packed, pad_id: int, see_each_other: bool = False) -> tuple[float, int]:
    """Summed NLL (nats) and count of the labelled tokens of the Trainer's evaluation rows, batched
    by the Trainer's collator. `see_each_other`: position ids made contiguous, as a packing that
    failed to keep a row's examples apart would leave them (the control that this can tell)."""
    rows, collate = packed.eval_items, packed.collate(pad_id)
    total, count = 0.0, 0
    for start in range(0, len(rows), 4):
        batch = collate([rows[i] for i in range(start, min(start + 4, len(rows)))])
        labels = batch.pop("labels")[:, 1:]
        if see_each_other and "position_ids" in batch:
            batch["position_ids"] = torch.arange(labels.shape[1] + 1).expand_as(batch["position_ids"])
        with torch.no_grad():
            logits = lm(**batch, use_cache=False).logits[:, :-1].double()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        total, count = total + loss.item(), count + int((labels != -100).sum())
    return total, count


@pytest.mark.parametrize("kind", ["prompt_completion", "messages"])
def test_each_packing_trains_the_answers_alone_and_the_trainer_sees_what_the_scorer_scores(tmp_path, gpt2, kind):
    """What the Trainer's evaluation computes on each packing's rows equals the answer scorer's
    sum on the same held-out examples, each scored alone: rows that let examples see each other
    (or lose or add a trained token) would not."""
    path = write_jsonl(tmp_path / "tasks.jsonl", chat_records(40) if kind == "messages" else pc_records(40))
    lm = tiny_model(len(gpt2), positions=128)
    for packing in ("concat", "isolated", "padded"):
        cfg = DataConfig(
            source="files", paths=[str(path)], block_size=128, packing=packing, validation_fraction=0.25,
            max_eval_tokens=1 << 20,
        )  # fmt: skip
        _, packed = prepared(gpt2, cfg)
        assert packed.packing == packing and packed.report["packing"] == packing
        batch = packed.collate(gpt2.eos_token_id)([packed.train[i] for i in range(2)])
        labels = batch["labels"][batch["labels"] != -100]
        pieces = set(gpt2.decode(labels).split(gpt2.eos_token)) - {""}
        if packing == "concat":  # blocks cut anywhere, an answer too; each holds the examples before it
            assert all(any(piece in a for a in ANSWERS) for piece in pieces)
            continue
        assert pieces <= set(ANSWERS)
        items, names, answer_bytes = packed.eval_examples("validation")
        examples = Examples(
            ids=[items[i].ids for i in range(len(items))],
            masks=[items[i].trained for i in range(len(items))],
            names=names,
            answer_bytes=[int(b) for b in answer_bytes],
            split_examples=len(items),
            split_tokens=items.n_tokens,
        )
        scored = score_answers(lm, examples, batch_size=4)
        nll, count = rows_nll(lm, packed, gpt2.eos_token_id)
        assert count == scored["answer_tokens"] and nll == pytest.approx(scored["nll"], rel=1e-6)
        if packing == "isolated":
            assert len(packed.eval_items) < len(items)  # several examples a row: isolation is at stake
            leaky, _ = rows_nll(lm, packed, gpt2.eos_token_id, see_each_other=True)
            assert leaky != pytest.approx(scored["nll"], rel=1e-4)


def test_loss_on_all_trains_every_token_and_the_answers_are_still_scored(tmp_path, gpt2):
    path = write_jsonl(tmp_path / "pc.jsonl", pc_records(12))
    answers_only = None
    for loss_on in ("answers", "all"):
        cfg = DataConfig(source="files", paths=[str(path)], block_size=64, loss_on=loss_on, max_eval_tokens=1 << 20)
        _, packed = prepared(gpt2, cfg)
        assert packed.report["task"]["loss_on"] == loss_on
        rows = [packed.train[i] for i in range(len(packed.train))]
        trained = [bool(t) for row in rows for e in row for t in e.trained]
        assert all(trained) == (loss_on == "all")
        # The evaluator scores the answers whatever trained: the same prepared masks.
        items, _, _ = packed.eval_examples("validation")
        masks = [items[i].trained.tolist() for i in range(len(items))]
        assert not any(all(m) for m in masks)
        answers_only = answers_only or masks
        assert masks == answers_only


def test_the_plays_as_dialogue_hold_out_the_default_runs_plays(gpt2):
    text = Corpus(DataConfig(source="shakespeare"))
    dialogue = Corpus(DataConfig(source="shakespeare", format="messages"))
    segments, mode, _ = dialogue.segments(False)
    assert mode == "fixed" and text.format == "text" and dialogue.uses_template is not False
    held = {s.source for s in segments if s.split == "validation"}
    assert held == {"histories/henry-v", "histories/henry-viii"}
    # The text run's seeded draw over the 38 plays picks the same two.
    assert {i for i, _ in text.texts("validation")} == held


def test_isolated_text_cuts_long_documents_into_examples_of_block_size(tmp_path, gpt2):
    (tmp_path / "a.txt").write_text("word " * 300)
    (tmp_path / "b.txt").write_text("short text")
    (tmp_path / "c.txt").write_text("another short one")
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.txt")], block_size=64, packing="isolated")
    _, packed = prepared(gpt2, cfg)
    rows = [packed.train[i] for i in range(len(packed.train))]
    assert all(sum(len(e.ids) for e in row) <= 64 for row in rows)
    assert sum(len(e.ids) for row in rows for e in row) == packed.report["train"]["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["isolated", "padded"])
def test_the_logged_tokens_are_the_real_ones(tmp_path, run_cli, packing):
    """Rows and padded examples are not full: the tokens a run counts are its examples' (two
    epochs: every training token twice), not its batches' widths."""
    from conftest import TINY_MODEL, TINY_TRAIN

    run = tmp_path / "run"
    data = write_jsonl(tmp_path / "data.jsonl", pc_records(40))
    argv = [
        "finetune", *TINY_MODEL, *TINY_TRAIN, "--data.source", "files", "--data.paths", f"[{data}]",
        "--data.format", "prompt_completion", "--data.packing", packing, "--data.validation_fraction", "0.2",
        "--train.max_steps", "-1", "--train.num_train_epochs", "2", "--evaluate.at_end_of_training", "false",
        "--train.output_dir", str(run),
    ]  # fmt: skip
    code, _, err = run_cli(*argv)
    assert code == 0, err
    real = json.loads((run / "data_report.json").read_text())["train"]["tokens"]
    results = json.loads((run / "train_results.json").read_text())
    state = json.loads((run / "trainer_state.json").read_text())
    assert results["train_tokens"] == state["num_input_tokens_seen"] == 2 * real
    assert results["train_tokens"] < state["global_step"] * 4 * 32  # what the batches' widths hold


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["chat", "prompt-completion"])
def test_a_custom_task_recipe_end_to_end(tmp_path, run_cli, recipe):
    """LoRA on a (tiny) pretrained model, the user's file, the recipe as shipped: the run directory
    chats through stock transformers with the template it trained with, and `hftextgen evaluate`
    scores its answers as finetune did."""
    from conftest import save_tiny_pretrained
    from transformers import AutoTokenizer, pipeline

    base, run = tmp_path / "base", tmp_path / "run"
    save_tiny_pretrained(base)
    records = chat_records(60) if recipe == "chat" else pc_records(60)
    data = write_jsonl(tmp_path / "data.jsonl", records)
    argv = [
        "finetune", "--config", f"recipes/custom/{recipe}.yaml", "--model.name_or_path", str(base),
        "--data.paths", f"[{data}]", "--data.block_size", "64", "--train.output_dir", str(run),
        "--train.max_steps", "4", "--train.eval_steps", "2", "--train.save_steps", "2", "--train.bf16", "false",
        "--generate.max_new_tokens", "8", "--evaluate.max_answers", "3",
    ]  # fmt: skip
    code, out, err = run_cli(*argv)
    assert code == 0, err
    result = json.loads((run / "eval.json").read_text())
    assert result["answers"] >= 1 and result["samples"]["count"] == 3
    assert len((run / "samples.jsonl").read_text().splitlines()) == 3
    code, _, err = run_cli("evaluate", "--model", str(run), "--evaluate.output_dir", str(tmp_path / "again"))
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert again["answers"] == result["answers"] and again["nll"] == pytest.approx(result["nll"], rel=1e-5)
    if recipe != "chat":
        return
    # The answers' bits per byte as an independent scorer counts them: the answers' text, not the
    # EOS that ends each (the evaluator counted those bytes too, 8% low on the dialogue recipe).
    held_out = set(json.loads((run / "validation_documents.json").read_text()))
    by_id = {f"{data}:{n}": r["messages"] for n, r in enumerate(records, start=1)}
    oracle = score_conversations(run, [by_id[i] for i in sorted(held_out)])
    assert result["answer_bytes"] == oracle["answer_bytes"] and result["answer_tokens"] == oracle["answer_tokens"]
    assert result["bits_per_byte"] == pytest.approx(oracle["bits_per_byte"], rel=1e-5)
    # Stock transformers: the saved template's assistant mask is the one trained with.
    tok = AutoTokenizer.from_pretrained(run)
    messages = records[0]["messages"]
    stock = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(stock["input_ids"], stock["assistant_masks"], strict=True) if m]
    assert tok.decode(trained) == messages[2]["content"] + tok.eos_token + messages[4]["content"] + tok.eos_token
    chat = pipeline("text-generation", model=str(run))(messages[:2], max_new_tokens=4, do_sample=False)
    assert chat[0]["generated_text"][-1]["role"] == "assistant"
    asked = write_jsonl(tmp_path / "ask.jsonl", [{"messages": messages[:2]}])
    code, _, err = run_cli("generate", "--model", str(run), "--messages", str(asked))
    assert code == 0, err
    (answered,) = [json.loads(line) for line in (tmp_path / "ask.answers.jsonl").read_text().splitlines()]
    assert answered["messages"][-1]["role"] == "assistant"


@pytest.mark.slow  # datasets builds the folder's dataset (and streams it)
@pytest.mark.parametrize("streaming", [False, True])
def test_hub_task_data_streamed_or_not(tmp_path, gpt2, streaming):
    """A hub dataset of conversations (a local folder: `datasets` reads it offline, streamed or
    not), with a column the format does not read."""
    folder = tmp_path / "hub"
    folder.mkdir()
    rows = [{**r, "source": "made up"} for r in chat_records(60)]
    for f in range(2):
        write_jsonl(folder / f"train-{f}.jsonl", rows[f::2])
    cfg = DataConfig(source="hub", dataset=str(folder), streaming=streaming, block_size=64, max_eval_tokens=1 << 20)
    corpus, packed = prepared(gpt2, cfg)
    assert corpus.format == "messages"
    got = answers_of(packed, "train", gpt2) + answers_of(packed, "validation", gpt2)
    assert len(got) == 2 * len(rows) and set(got) == {a + gpt2.eos_token for a in ANSWERS}


def test_parquet_prompt_completion(tmp_path, gpt2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = pc_records(30)
    table = pa.table({k: [r[k] for r in records] for k in ("prompt", "completion")} | {"id": list(range(30))})
    pq.write_table(table, tmp_path / "pairs.parquet", row_group_size=7)
    cfg = DataConfig(source="files", paths=[str(tmp_path / "pairs.parquet")], block_size=64, max_eval_tokens=1 << 20)
    corpus, packed = prepared(gpt2, cfg)
    assert corpus.format == "prompt_completion"
    got = answers_of(packed, "train", gpt2) + answers_of(packed, "validation", gpt2)
    assert sorted(got) == sorted(r["completion"] + gpt2.eos_token for r in records)
