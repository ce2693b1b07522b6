"""Task examples: the tokens trained on are exactly the answers and their end tokens, whatever the
tokenizer and template; truncation keeps the answer; bad records are one line each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
from conftest import make_text
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hftextgen.data import tasks, templates
from hftextgen.errors import UserError
from hftextgen.model.tokenizer import bundled_gpt2

SYSTEM = {"role": "system", "content": "You answer in the words of the plays."}

# One file of every format a task file can mix (the text record is not a task example).
MIXED = [
    {"prompt": "Who is the prince of Denmark?", "completion": " Hamlet, son of the late king."},
    {
        "prompt": [{"role": "user", "content": "Speak of the king."}],
        "completion": [{"role": "assistant", "content": "The king doth speak of war and peace."}],
    },
    {
        "prompt": [SYSTEM, {"role": "user", "content": "Good night?"}],
        "completion": [{"role": "assistant", "content": "Good night, sweet prince."}],
    },
    {
        "messages": [
            SYSTEM,
            {"role": "user", "content": "What a noble mind is here."},
            {"role": "assistant", "content": "O, what a noble mind is here o'erthrown!"},
            {"role": "user", "content": "And love?"},
            {"role": "assistant", "content": "I shall love thee well, my lord."},
        ]
    },
]

# Llama 3's template as models ship it: no {% generation %}, so the answers are found by prefixes.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# The default template with its answer marks taken out: the same text, through the prefix path.
UNMARKED_DEFAULT = templates.DEFAULT_CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{% endgeneration %}", "")


def _trained_bpe(specials: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few hundred lines of the test corpus."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    lines = make_text(0, lines=120).splitlines() + [json.dumps(r) for r in MIXED]
    bpe.train_from_iterator(lines, vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    if specials:
        tokenizer.add_tokens(specials, special_tokens=True)
    return tokenizer


def _llama_style() -> PreTrainedTokenizerFast:
    tokenizer = _trained_bpe(LLAMA3_SPECIALS)
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def gpt2():
    return bundled_gpt2()


@pytest.fixture(scope="module")
def bpe():
    return _trained_bpe()


@pytest.fixture(scope="module", params=["gpt2", "trained_bpe", "llama_style"])
def any_tokenizer(request):
    return {"gpt2": bundled_gpt2, "trained_bpe": _trained_bpe, "llama_style": _llama_style}[request.param]()


def _answers(record: dict) -> list[str]:
    """The answers of a record, in order."""
    if isinstance(record.get("completion"), str):
        return [record["completion"]]
    messages = record.get("messages") or record["prompt"] + record["completion"]
    return [m["content"] for m in messages if m["role"] == "assistant"]


def _runs(mask: np.ndarray) -> list[np.ndarray]:
    """The indices of each run of trained tokens."""
    idx = np.flatnonzero(mask)
    return np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if len(idx) else []


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _encode_one(tokenizer, record: dict, **settings) -> tasks.Example | None:
    return tasks.ExampleEncoder(tokenizer, tasks.detect_format(record), **settings)([record]).examples[0]


def _long_chat(turns: int) -> dict:
    messages = [SYSTEM]
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"Question {i}: " + make_text(i, lines=2).replace("\n", " ")},
            {"role": "assistant", "content": f"Answer {i}: good night sweet prince."},
        ]
    return {"messages": messages}


# ---------------------------------------------------------------- the mask


def test_trained_tokens_are_exactly_the_answers(any_tokenizer, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MIXED), encoding="utf-8")
    end = any_tokenizer.eos_token  # <|endoftext|>, or Llama's <|eot_id|> that ends each turn
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        example = _encode_one(any_tokenizer, record)
        runs = [_decode(any_tokenizer, example.input_ids[run]) for run in _runs(example.trained)]
        assert runs == [answer + end for answer in _answers(record)], record
        assert example.input_ids.dtype == np.int64 and example.trained.dtype == bool


@pytest.mark.parametrize("name", ["gpt2", "bpe"])
def test_default_template_mask_is_stock_assistant_mask(name, request):
    tokenizer = request.getfixturevalue(name)
    for record in MIXED[1:]:
        messages = record.get("messages") or record["prompt"] + record["completion"]
        stock = tokenizer.apply_chat_template(
            messages,
            chat_template=templates.DEFAULT_CHAT_TEMPLATE,
            return_dict=True,
            return_assistant_tokens_mask=True,
            tokenize=True,
        )
        # Through stock masks (the marks), and through the prefix path on the same text.
        for template in (templates.DEFAULT_CHAT_TEMPLATE, UNMARKED_DEFAULT):
            example = _encode_one(tokenizer, record, chat_template=template)
            assert example.input_ids.tolist() == stock["input_ids"]
            assert example.trained.tolist() == [bool(m) for m in stock["assistant_masks"]]


def test_prompt_completion_strings_tokenize_the_prompt_alone(gpt2):
    record = MIXED[0]
    example = _encode_one(gpt2, record)
    prompt = gpt2(record["prompt"])["input_ids"]
    assert example.input_ids.tolist()[: len(prompt)] == prompt
    assert example.input_ids[-1] == gpt2.eos_token_id
    assert not example.trained[: len(prompt)].any() and example.trained[len(prompt) :].all()


def test_loss_on_all_trains_every_token(bpe):
    for record in MIXED:
        example = _encode_one(bpe, record, loss_on="all")
        assert example.trained.all()
    example = _encode_one(bpe, {"text": "good night"}, loss_on="all")
    assert _decode(bpe, example.input_ids) == "good night<|endoftext|>" and example.trained.all()


def test_turns_after_the_last_answer_are_left_out(bpe):
    record = {"messages": MIXED[3]["messages"] + [{"role": "user", "content": "And then?"}]}
    assert _encode_one(bpe, record).input_ids.tolist() == _encode_one(bpe, MIXED[3]).input_ids.tolist()


def test_a_template_whose_earlier_turns_change_still_trains_exactly_its_answers(bpe):
    """Rendering prefixes cannot find these answers (the last turn is rendered differently once
    it is no longer last); placeholders in the whole conversation can."""
    template = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] + eos_token }}{% endfor %}"
    example = _encode_one(bpe, MIXED[3], chat_template=template)
    runs = [_decode(bpe, example.input_ids[run]) for run in _runs(example.trained)]
    assert runs == [answer + bpe.eos_token for answer in _answers(MIXED[3])]
    assert example.answers == tuple(_answers(MIXED[3]))  # the bytes counted: no EOS


def test_a_record_the_template_cannot_show_is_skipped_and_counted_not_a_stop(bpe):
    """A template that renders one record's answer out of place (here: upper-cased) skips that
    record, counted; the others are encoded."""
    template = (
        "{% for m in messages %}{% if 'SHOUT' in m['content'] %}{{ m['content'] | upper }}"
        "{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
    )
    shout = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "SHOUT it out"}]}
    encoded = tasks.encode([shout, MIXED[3]], bpe, "messages", chat_template=template)
    assert encoded.examples[0] is None and encoded.examples[1] is not None
    assert encoded.counts.skipped_unmaskable == 1 and encoded.counts.examples == 1


# ---------------------------------------------------------------- truncation


def test_a_long_prompt_is_cut_from_the_left(gpt2):
    record = {"prompt": make_text(1, lines=20), "completion": " Good night, sweet prince."}
    whole = _encode_one(gpt2, record)
    answer = int(whole.trained.sum())
    encoded = tasks.ExampleEncoder(gpt2, "prompt_completion", max_length=answer + 5)([record])
    example = encoded.examples[0]
    assert example.truncated and encoded.counts.truncated == 1 and encoded.counts.examples == 1
    assert example.input_ids.tolist() == whole.input_ids[-(answer + 5) :].tolist()
    assert _decode(gpt2, example.input_ids[example.trained]) == record["completion"] + gpt2.eos_token


def test_a_long_conversation_loses_whole_leading_exchanges_and_keeps_its_system_turn(bpe):
    record = _long_chat(turns=4)
    whole = _encode_one(bpe, record)
    last_two = {"messages": [SYSTEM, *record["messages"][-4:]]}
    expected = _encode_one(bpe, last_two)  # the system turn and the last two exchanges, rendered anew
    encoded = tasks.encode([record], bpe, "messages", max_length=len(expected.input_ids))
    example = encoded.examples[0]
    assert len(example.input_ids) < len(whole.input_ids) and example.truncated
    assert example.input_ids.tolist() == expected.input_ids.tolist()
    assert example.trained.tolist() == expected.trained.tolist()
    assert _decode(bpe, example.input_ids).startswith("<|system|>\n" + SYSTEM["content"])
    assert encoded.counts == tasks.Counts(examples=1, truncated=1, exchanges_dropped=1)


def test_a_single_over_long_prompt_turn_is_cut_from_the_left_its_header_kept(bpe):
    question = "Question: " + make_text(3, lines=12).replace("\n", " ")
    record = {"messages": [SYSTEM, {"role": "user", "content": question}, {"role": "assistant", "content": "No."}]}
    whole = _encode_one(bpe, record)
    encoded = tasks.encode([record], bpe, "messages", max_length=len(whole.input_ids) - 20)
    example = encoded.examples[0]
    text = _decode(bpe, example.input_ids)
    assert len(example.input_ids) <= len(whole.input_ids) - 20
    assert text.startswith("<|system|>\n" + SYSTEM["content"] + "\n<|user|>\n")  # both headers kept
    assert "Question:" not in text and text.endswith(question[-30:] + "\n<|assistant|>\nNo.<|endoftext|>\n")
    assert _decode(bpe, example.input_ids[example.trained]) == "No.<|endoftext|>"
    assert encoded.counts == tasks.Counts(examples=1, truncated=1, turn_cut=1)


def test_an_answer_that_does_not_fit_is_dropped_and_counted(bpe):
    fits = {"prompt": "Speak.", "completion": " Good night."}
    too_long = {"prompt": "Speak.", "completion": " " + make_text(2, lines=10)}
    chat = _long_chat(turns=2)
    answer = int(_encode_one(bpe, fits).trained.sum())
    encoded = tasks.ExampleEncoder(bpe, "prompt_completion", max_length=answer + 1)([fits, too_long])
    assert encoded.examples[0] is not None and encoded.examples[1] is None
    assert encoded.counts == tasks.Counts(examples=1, truncated=1, turn_cut=1, dropped_too_long=1)
    assert _decode(bpe, encoded.examples[0].input_ids) == ". Good night.<|endoftext|>"  # "Speak" cut
    # An answer filling the whole window has no token to be predicted from: dropped too.
    assert tasks.ExampleEncoder(bpe, "prompt_completion", max_length=answer)([fits]).counts.dropped_too_long == 1
    assert tasks.encode([chat], bpe, "messages", max_length=4).counts.dropped_too_long == 1


def test_counts_add_up(bpe):
    encoder = tasks.ExampleEncoder(bpe, "messages")
    no_answer = {"messages": [{"role": "user", "content": "Hello?"}]}
    total = encoder([MIXED[3], no_answer]).counts + encoder([no_answer]).counts
    assert total == tasks.Counts(examples=1, skipped_no_assistant=2)


# ---------------------------------------------------------------- formats and bad input


def test_detect_format():
    assert [tasks.detect_format(r) for r in MIXED] == ["prompt_completion"] * 3 + ["messages"]
    assert tasks.detect_format({"text": "x", "id": 3}) == "text"
    with pytest.raises(UserError, match=r"record 7: .*fields found: question, answer.*prompt and completion"):
        tasks.detect_format({"question": "q", "answer": "a"}, index=7)


def test_check_format_names_the_fields_found():
    tasks.check_format(MIXED[0], "prompt_completion")
    with pytest.raises(UserError, match=r"record 2: format messages needs messages \(fields found: text\)"):
        tasks.check_format({"text": "x"}, "messages", index=2)
    with pytest.raises(UserError, match="unknown data format 'chat'"):
        tasks.check_format({"text": "x"}, "chat")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "narrator", "content": "x"}]}, r"record 5: messages\[0\] has role 'narrator'"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]}, r"parts of type image"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, r"only an assistant message calls"),
        ({"messages": MIXED[3]["messages"], "tools": "{"}, r"record 5: tools is a string that is not JSON"),
        ({"prompt": "Speak.", "completion": "  "}, r"record 5: the completion is empty"),
        ({"prompt": [{"role": "user", "content": "Hi"}], "completion": []}, r"record 5: the completion is empty"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}, r"empty assistant"),
        ({"prompt": 3, "completion": "x"}, r"record 5: prompt is a int and completion a str"),
        ({"prompt": "Hi", "completion": [{"role": "assistant", "content": "x"}]}, r"both as strings"),
        ({"messages": "Hi"}, r"record 5: messages is a str, not a list"),
        ({"messages": [{"role": "user"}]}, r"record 5: messages\[0\] is not a \{role, content\} message"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, r"messages\[0\].content is a list, not a string"),
    ],
)
def test_bad_records_are_one_line(bpe, record, message):
    encoder = tasks.ExampleEncoder(bpe, tasks.detect_format(record))
    with pytest.raises(UserError, match=message) as caught:
        encoder([record], first_index=5)
    assert "\n" not in str(caught.value)


def test_bad_settings(bpe):
    with pytest.raises(UserError, match="loss_on answers needs prompt/completion or messages records"):
        tasks.ExampleEncoder(bpe, "text")
    with pytest.raises(UserError, match="unknown data.loss_on 'prompts'"):
        tasks.ExampleEncoder(bpe, "messages", loss_on="prompts")
    with pytest.raises(UserError, match="text is a int"):
        tasks.encode([{"text": 3}], bpe, "text", loss_on="all")


def test_a_conversation_without_answer_is_skipped_and_counted(bpe):
    records = [{"messages": [SYSTEM, {"role": "user", "content": "Hello?"}]}, {"messages": []}]
    encoded = tasks.encode(records, bpe, "messages")
    assert encoded.examples == [None, None] and encoded.counts.skipped_no_assistant == 2


# ---------------------------------------------------------------- templates


def test_resolve_template(bpe, tmp_path):
    assert templates.resolve_template(bpe, None) == templates.DEFAULT_CHAT_TEMPLATE  # no template of its own
    assert templates.resolve_template(_llama_style(), None) == LLAMA3_TEMPLATE  # the model's own
    assert (
        templates.resolve_template(_llama_style(), templates.DEFAULT_CHAT_TEMPLATE) == templates.DEFAULT_CHAT_TEMPLATE
    )
    path = tmp_path / "chat.jinja"
    path.write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    assert templates.resolve_template(bpe, str(path)) == LLAMA3_TEMPLATE
    with pytest.raises(UserError, match=f"tokenizer.chat_template: {tmp_path}/missing.jinja does not exist"):
        templates.resolve_template(bpe, str(tmp_path / "missing.jinja"))
    with pytest.raises(UserError, match="neither a Jinja template nor a .jinja file"):
        templates.resolve_template(bpe, "chat.txt")


def test_a_template_that_does_not_render_is_one_line(bpe):
    with pytest.raises(UserError, match=r"does not render a conversation \(TemplateSyntaxError: ") as caught:
        templates.check_template(bpe, "{% for m in messages %}{{ m['content'] }}")
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="UndefinedError"):
        templates.check_template(bpe, "{{ messages[0]['content'] + nothing.here }}")
    with pytest.raises(UserError, match="leaves the assistant's answer out"):
        templates.check_template(bpe, "{% for m in messages %}{{ m['role'] }}{% endfor %}")
    with pytest.raises(UserError, match="does not render"):
        tasks.ExampleEncoder(bpe, "messages", chat_template="{{ raise_exception('no chat here') }}")


def test_the_template_saved_with_the_tokenizer_round_trips(tmp_path):
    tokenizer = _trained_bpe()
    tokenizer.chat_template = templates.resolve_template(tokenizer, None)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == templates.DEFAULT_CHAT_TEMPLATE
    messages = MIXED[3]["messages"]
    out = loaded.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True, tokenize=True)
    example = _encode_one(tokenizer, MIXED[3])
    assert out["input_ids"] == example.input_ids.tolist()
    assert [bool(m) for m in out["assistant_masks"]] == example.trained.tolist()
    prompt = loaded.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|user|>\nWhat a noble mind is here.\n<|assistant|>\n")


def test_a_template_whose_marks_hold_no_answer_skips_the_record(bpe):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% generation %}{% endgeneration %}"
    encoded = tasks.encode([MIXED[3]], bpe, "messages", chat_template=template)
    assert encoded.examples == [None] and encoded.counts.skipped_unmaskable == 1


def test_chatml_answers_end_at_their_marker():
    """ChatML writes a newline after <|im_end|>: the prefix path trains up to the marker, as the
    template's own generation marks would."""
    tokenizer = _trained_bpe(["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    example = _encode_one(tokenizer, MIXED[3])
    runs = [_decode(tokenizer, example.input_ids[run]) for run in _runs(example.trained)]
    assert runs == [answer + "<|im_end|>" for answer in _answers(MIXED[3])]


def test_an_earlier_answer_cut_by_the_truncation_is_not_trained(gpt2):
    """The prompt side of a long conversation loses tokens from the left; an earlier answer the
    cut falls inside loses its trained tail too (it answers nothing that is kept)."""
    tok = gpt2
    first = "word " * 30
    record = {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."},
    ]}  # fmt: skip
    whole = tasks.ExampleEncoder(tok, "messages")([record]).examples[0]
    start = int(np.flatnonzero(whole.trained)[0])  # the first answer's first token
    cut = tasks.ExampleEncoder(tok, "messages", max_length=len(whole.input_ids) - start - 5)([record]).examples[0]
    assert tok.decode(cut.input_ids[cut.trained]) == "Yes." + tok.eos_token
