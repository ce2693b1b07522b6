"""Chat through the template: the terminal conversation (driven by a fake read), a file of
conversations answered, seeding, cutting from the left, and the one-line errors. A tiny GPT-2 with
random weights: the mechanics, not the answers' quality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import save_chat_model, save_tiny_pretrained

import hftextgen.generate.chat as chat
from hftextgen.errors import UserError
from hftextgen.generate import GenerateConfig
from hftextgen.model import load


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(str(save_chat_model(tmp_path_factory.mktemp("chat") / "run")), device="cpu")


def talk(model, lines: list[str], system: str | None = None, output: Path | None = None, **settings):
    """chat() fed `lines` then EOF; returns (conversation, what was written, notes)."""
    lm, tok = model
    queue, written, notes = list(lines), [], []

    def read(prompt: str) -> str:
        assert prompt == "> "
        if not queue:
            raise EOFError
        return queue.pop(0)

    cfg = GenerateConfig(**{"max_new_tokens": 8, **settings})
    messages = chat.converse(lm, tok, cfg, system, read, written.append, notes.append, output=output)
    return messages, written, notes


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_line_is_a_user_turn_answered_through_the_template_and_streamed(model, tmp_path):
    out = tmp_path / "gen.jsonl"
    messages, written, _ = talk(model, ["hello there", "and again"], system="Be brief.", output=out)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    # Streamed piece by piece (more writes than answers), and the pieces are the answers.
    assert len(written) > 3
    assert "".join(written) == answers[0] + "\n" + answers[1] + "\n" + "\n"
    first, second = records(out)
    _, tok = model
    assert first["prompt"] == "<|system|>\nBe brief.\n<|user|>\nhello there\n<|assistant|>\n"
    # The second prompt holds the first exchange, the answer ended by EOS as in training.
    expected = tok.apply_chat_template(messages[:4], add_generation_prompt=True, tokenize=False)
    assert second["prompt"] == expected
    assert f"{answers[0]}{tok.eos_token}\n<|user|>\nand again" in second["prompt"]
    assert second["messages"] == messages and second["completion"] == answers[1]
    assert [first["seed"], second["seed"]] == [1234, 1235]  # a new draw each answer


def test_the_prompt_is_the_templates_tokens_without_an_eos_in_front(model):
    lm, tok = model
    gen = chat.generator(lm, tok, GenerateConfig(max_new_tokens=8))
    messages = [{"role": "user", "content": "hi"}]
    prompt = chat.render(tok, messages)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert gen._ids(prompt) == ids and ids[0] != tok.eos_token_id


def test_same_seed_same_answers_and_the_file_agrees_with_the_terminal(model, tmp_path):
    lines = ["what is love", "say more"]
    one, _, _ = talk(model, lines, preset="creative", seed=7)
    two, _, _ = talk(model, lines, preset="creative", seed=7)
    other, _, _ = talk(model, lines, preset="creative", seed=8)
    assert one == two and one != other
    # The terminal's first answer (seed 7) is the file's first conversation's (seed 7 + 0).
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "what is love"}]}) + "\n")
    lm, tok = model
    chat.answer_file(lm, tok, GenerateConfig(preset="creative", seed=7, max_new_tokens=8), path, tmp_path / "o.jsonl")
    assert records(tmp_path / "o.jsonl")[0]["messages"][-1] == one[1]


def test_reset_starts_over_keeping_the_system_turn_and_exit_ends(model, tmp_path):
    out = tmp_path / "gen.jsonl"
    messages, _, notes = talk(model, ["first", "/reset", "second", "/exit", "never read"], "Sys.", out)
    assert [m["content"] for m in messages if m["role"] != "assistant"] == ["Sys.", "second"]
    assert records(out)[1]["prompt"] == "<|system|>\nSys.\n<|user|>\nsecond\n<|assistant|>\n"
    assert "(a new conversation)" in notes


def test_a_long_conversation_loses_its_oldest_exchanges_and_keeps_the_system_turn(model, tmp_path):
    lm, tok = model
    out = tmp_path / "gen.jsonl"
    lines = [f"line {i} thou art my lord" for i in range(5)]
    messages, _, notes = talk(model, lines, "Sys.", out, max_new_tokens=16)
    room = 64 - 16
    prompts = [r["prompt"] for r in records(out)]
    assert all(len(tok(p, add_special_tokens=False)["input_ids"]) <= room for p in prompts)
    assert all(p.startswith("<|system|>\nSys.\n<|user|>\n") for p in prompts)
    assert "line 0" not in prompts[-1] and "line 4" in prompts[-1]
    assert any("oldest turns were left out" in n for n in notes)
    # The conversation kept is what was cut: it starts again with a user turn after the system's.
    assert messages[0]["role"] == "system" and messages[1]["role"] == "user" and len(messages) < 11


def test_a_message_longer_than_the_context_is_refused_and_the_chat_goes_on(model):
    messages, _, notes = talk(model, ["word " * 80, "short"], max_new_tokens=16)
    assert any("does not fit the model's context of 64 tokens" in n for n in notes)
    assert [m["content"] for m in messages if m["role"] == "user"] == ["short"]


def conversations_file(path: Path) -> Path:
    rows = [
        [{"role": "user", "content": "hello"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
        [{"role": "user", "content": "third"}],
    ]
    lines = [json.dumps({"messages": rows[0]}), "", *(json.dumps({"messages": r}) for r in rows[1:])]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_file_of_conversations_is_answered_one_record_each_seeded_per_record(model, tmp_path):
    lm, tok = model
    path = conversations_file(tmp_path / "m.jsonl")
    cfg = GenerateConfig(preset="balanced", max_new_tokens=8)
    assert chat.answer_file(lm, tok, cfg, path, tmp_path / "a.jsonl") == 3
    chat.answer_file(lm, tok, cfg, path, tmp_path / "b.jsonl")
    chat.answer_file(
        lm, tok, GenerateConfig(preset="balanced", max_new_tokens=8, batch_size=1), path, tmp_path / "c.jsonl"
    )
    a = (tmp_path / "a.jsonl").read_text()
    assert a == (tmp_path / "b.jsonl").read_text() == (tmp_path / "c.jsonl").read_text()
    rows = records(tmp_path / "a.jsonl")
    inputs = [json.loads(line)["messages"] for line in path.read_text().splitlines() if line]
    assert [r["messages"][:-1] for r in rows] == inputs
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert [r["seed"] for r in rows] == [1234, 1235, 1236] and [r["line"] for r in rows] == [1, 3, 4]
    assert all(r["new_tokens"] <= 8 and r["dropped"] == 0 for r in rows)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("", "holds no conversations"),
        ('{"messages": [{"role": "user", "content": "a"}]}\nnot json\n', "line 2 is not a JSON object"),
        ('{"prompt": "a"}\n', 'line 1 is not a JSON object with a "messages" list'),
        ('{"messages": [{"role": "bot", "content": "a"}]}\n', "line 1: role 'bot' is not one of system, user"),
        ('{"messages": [{"role": "user", "content": 3}]}\n', 'a string "content"'),
        (
            '\n{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
            "line 2: the conversation ends with a assistant turn: end it with the user turn",
        ),
    ],
)
def test_bad_messages_files_are_one_line_naming_the_line(model, tmp_path, content, message):
    lm, tok = model
    path = tmp_path / "m.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        chat.answer_file(lm, tok, GenerateConfig(), path, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_model_without_a_chat_template_is_one_line(tmp_path):
    lm, tok = load(str(save_tiny_pretrained(tmp_path / "plain") and tmp_path / "plain"), device="cpu")
    assert not tok.chat_template
    with pytest.raises(UserError, match="--chat: .* has no chat template.*set tokenizer.chat_template"):
        chat.converse(lm, tok, GenerateConfig(), read=lambda _: "hi")
    path = conversations_file(tmp_path / "m.jsonl")
    with pytest.raises(UserError, match="--messages: .* has no chat template"):
        chat.answer_file(lm, tok, GenerateConfig(), path, tmp_path / "o.jsonl")


def test_too_many_new_tokens_for_the_context_and_a_too_long_conversation_in_a_file(model, tmp_path):
    lm, tok = model
    with pytest.raises(UserError, match=r"max_new_tokens \(64\) leaves no room .* context \(64 tokens\)"):
        chat.generator(lm, tok, GenerateConfig(max_new_tokens=64))
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 80}]}) + "\n")
    with pytest.raises(UserError, match="line 1: its last user turn does not fit"):
        chat.answer_file(lm, tok, GenerateConfig(max_new_tokens=8), path, tmp_path / "o.jsonl")


def test_end_of_turn_tokens_other_than_eos_end_the_answer(model):
    lm, tok = model
    cfg = GenerateConfig(preset="greedy", max_new_tokens=8)
    prompt = chat.render(tok, [{"role": "user", "content": "hi"}])
    (free,) = chat.generator(lm, tok, cfg)([prompt])
    ids = tok(free.completion, add_special_tokens=False)["input_ids"]
    assert free.finish == "length" and len(ids) == 8
    k = next(k for k in range(1, 8) if ids[k] not in ids[:k])  # a token new at k stands for an <|eot_id|>
    saved = lm.generation_config.eos_token_id
    lm.generation_config.eos_token_id = [tok.eos_token_id, ids[k]]
    try:
        (cut,) = chat.generator(lm, tok, cfg)([prompt])
    finally:
        lm.generation_config.eos_token_id = saved
    assert cut.finish == "eos" and cut.new_tokens == k and cut.completion == tok.decode(ids[:k])
