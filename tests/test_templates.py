"""The chat templates of the models people fine-tune, as those models ship them (TRL's copies of the
originals, and tests/data/templates/ for Mistral and ChatML): a multi-turn conversation with a
system turn trains exactly each answer and the marker that ends its turn, the tokens being what
the template renders for the whole conversation; generation stops at those markers; tool use and
content parts reach the template."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import trl

from hftextgen.data import tasks, templates
from hftextgen.model.tokenizer import bundled_gpt2

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
OUR_TEMPLATES = Path(__file__).parent / "data" / "templates"

LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GEMMA = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
PHI3 = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
DEEPSEEK = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
GPTOSS = ["<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"]
COHERE = [
    "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
    "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>",
]  # fmt: skip


@dataclass(frozen=True)
class Family:
    """A template as a model ships it, the special tokens of its tokenizer, and what must close
    each answer: `earlier` the turns before the last, `last` the last one."""

    template: str  # a file name in trl's chat_templates, or "ours:<name>" in tests/data/templates
    specials: list[str]
    bos: str | None
    eos: str
    earlier: str
    last: str
    system: bool = True  # the family has a system turn

    def text(self) -> str:
        if self.template.startswith("ours:"):
            return (OUR_TEMPLATES / f"{self.template[5:]}.jinja").read_text(encoding="utf-8")
        return (TRL_TEMPLATES / f"{self.template}.jinja").read_text(encoding="utf-8")


def _family(template, specials, bos, eos, end, last=None, system=True) -> Family:
    return Family(template, specials, bos, eos, end, last or end, system)


# Base tokenizers where the family ships one whose EOS is not the end of a turn (Qwen2.5 base,
# Llama-3 base): the answers must still end at the turn's marker.
FAMILIES = {
    "llama3": _family("llama3", LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    "llama3_1": _family("llama3_1", LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    "llama3_2": _family("llama3_2", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "qwen2_5": _family("qwen2_5", CHATML, None, "<|endoftext|>", "<|im_end|>"),
    "qwen3": _family("qwen3", CHATML, None, "<|im_end|>", "<|im_end|>"),
    "qwen3_instruct_2507": _family("qwen3_instruct_2507", CHATML, None, "<|im_end|>", "<|im_end|>"),
    "qwen3_5": _family("qwen3_5_think", CHATML, None, "<|im_end|>", "<|im_end|>"),
    "qwen3_6": _family("qwen3_6", CHATML, None, "<|im_end|>", "<|im_end|>"),
    "gemma2": _family("gemma", GEMMA, "<bos>", "<eos>", "<end_of_turn>", system=False),
    "gemma3": _family("gemma3", GEMMA, "<bos>", "<eos>", "<end_of_turn>"),
    "phi3": _family("phi3", PHI3, None, "<|endoftext|>", "<|end|>"),
    "phi3_5": _family("phi3_5", PHI3, None, "<|endoftext|>", "<|end|>"),
    "mistral": _family("ours:mistral", ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>"),
    "deepseek_v3": _family("deepseekv3", DEEPSEEK, DEEPSEEK[0], DEEPSEEK[1], DEEPSEEK[1]),
    "deepseek_r1_distill": _family("deepseek_r1_distill", DEEPSEEK, DEEPSEEK[0], DEEPSEEK[1], DEEPSEEK[1]),
    "gpt_oss": _family("gptoss", GPTOSS, None, "<|return|>", "<|end|>", last="<|return|>"),
    "cohere": _family("cohere", COHERE, "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
    "cohere2": _family(
        "cohere2", COHERE, "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"
    ),
    "chatml": _family("ours:chatml", CHATML, None, "<|endoftext|>", "<|im_end|>"),
    "hftextgen": _family(None, [], None, "<|endoftext|>", "<|endoftext|>"),
}


@functools.cache
def _gpt2():
    return bundled_gpt2()


def tokenizer_of(family: Family):
    """GPT-2's BPE with the family's special tokens added, its BOS and EOS, and its template."""
    tok = copy.deepcopy(_gpt2())
    tok.add_tokens(family.specials, special_tokens=True)
    tok.bos_token, tok.eos_token = family.bos, family.eos
    tok.chat_template = family.text() if family.template else templates.DEFAULT_CHAT_TEMPLATE
    return tok


def conversation(family: Family) -> list[dict]:
    """Three exchanges, with a system turn where the family has one."""
    messages = [{"role": "system", "content": "Answer in the words of the plays."}] if family.system else []
    for question, answer in [
        ("Who is the prince of Denmark?", "Hamlet, son of the late king."),
        ("And his love?", "Ophelia, fair and true."),
        ("How does it end?", "The rest is silence."),
    ]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def _runs(mask: np.ndarray) -> list[np.ndarray]:
    idx = np.flatnonzero(mask)
    return np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if len(idx) else []


def _decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param], tokenizer_of(FAMILIES[request.param])


def test_each_family_trains_exactly_its_answers_and_their_end_markers(family):
    name, fam, tok = family
    messages = conversation(fam)
    example = tasks.ExampleEncoder(tok, "messages")([{"messages": messages}]).examples[0]
    assert example is not None, name
    # The tokens are the template's rendering of the whole conversation, as stock transformers makes it.
    whole = tok.apply_chat_template(messages, tokenize=False)
    assert example.input_ids.tolist() == tok(whole, add_special_tokens=False)["input_ids"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    # (A token holding the space before an answer is trained with it: Mistral's " " + answer.)
    runs = [_decode(tok, example.input_ids[run]).lstrip(" ") for run in _runs(example.trained)]
    assert runs == [a + fam.earlier for a in answers[:-1]] + [answers[-1] + fam.last], name
    # Answer bytes are the answers' text, not their markers.
    assert example.answers == tuple(answers)


def test_generation_stops_at_the_families_end_of_turn_tokens(family):
    name, fam, tok = family
    expected = {fam.earlier, fam.last}
    markers = {m for end in expected for m in templates.special_tokens(tok).findall(end)}
    template = templates.resolve_template(tok)
    assert set(templates.end_of_turn_ids(tok, template)) == set(tok.convert_tokens_to_ids(sorted(markers))), name


def test_trl_training_copies_agree_where_they_render_the_same_text(family):
    """TRL's training copies of the templates mark their answers with {% generation %}; where a
    copy renders the very same text, each answer we train lies inside the span it marks (TRL's
    spans may add the turn's header or the newline after the marker, which generation never
    produces)."""
    name, fam, tok = family
    training = TRL_TEMPLATES / f"{fam.template}_training.jinja"
    if not fam.template or not training.is_file():
        pytest.skip(f"{name}: TRL ships no training copy")
    messages = conversation(fam)
    ours = templates.AnswerFinder(tok, templates.resolve_template(tok)).find(
        messages, [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    )
    theirs = templates.AnswerFinder(tok, training.read_text(encoding="utf-8")).find(
        messages, [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    )
    if ours.text != theirs.text:
        pytest.skip(f"{name}: TRL's training copy renders other text (it changes the conversation)")
    assert len(ours.spans) == 3  # (Phi-3's copy marks the EOS closing the whole conversation too)
    for start, end in ours.spans:
        assert any(their_start <= start < end <= their_end for their_start, their_end in theirs.spans), name


def test_qwen3_single_turn_trains_the_answer_not_the_empty_think_block():
    fam = FAMILIES["qwen3"]
    tok = tokenizer_of(fam)
    record = {"messages": [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "Good night."}]}
    example = tasks.ExampleEncoder(tok, "messages")([record]).examples[0]
    text = _decode(tok, example.input_ids)
    assert "<think>\n\n</think>\n\n" in text  # what the template renders...
    assert _decode(tok, example.input_ids[example.trained]) == "Good night.<|im_end|>"  # ...is not the answer


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize("name", ["qwen2_5", "qwen3", "llama3_1", "mistral"])
def test_tool_calls_are_trained_as_answers_and_tool_results_are_context(name):
    fam = FAMILIES[name]
    tok = tokenizer_of(fam)
    call = {
        "id": "call12345",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Elsinore"}},
    }
    record = {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Is it cold in Elsinore?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "bitter cold", "tool_call_id": "call12345", "name": "get_weather"},
            {"role": "assistant", "content": "'Tis bitter cold."},
        ],
    }
    example = tasks.ExampleEncoder(tok, "messages")([record]).examples[0]
    assert example is not None, name
    text = _decode(tok, example.input_ids)
    assert "The weather in a city." in text.split("Is it cold")[0]  # the schemas reach the template
    runs = [_decode(tok, example.input_ids[run]).lstrip(" ") for run in _runs(example.trained)]
    assert len(runs) == 2 and "get_weather" in runs[0] and "Elsinore" in runs[0], runs
    assert runs[0].endswith(fam.earlier) and runs[1] == "'Tis bitter cold." + fam.last
    assert not any("bitter cold" in run for run in runs[:1])  # the tool's result is context only


def test_content_parts_are_joined_to_text():
    tok = tokenizer_of(FAMILIES["chatml"])
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Speak"}, {"type": "text", "text": "of the king."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "He doth speak of war."}]},
        ]
    }
    plain = {
        "messages": [
            {"role": "user", "content": "Speak\nof the king."},
            {"role": "assistant", "content": "He doth speak of war."},
        ]
    }
    encoder = tasks.ExampleEncoder(tok, "messages")
    assert encoder([parts]).examples[0].input_ids.tolist() == encoder([plain]).examples[0].input_ids.tolist()


def test_conversational_prompt_completion_trains_the_completion_only():
    tok = tokenizer_of(FAMILIES["chatml"])
    messages = conversation(FAMILIES["chatml"])
    record = {"prompt": messages[:-1], "completion": messages[-1:]}
    example = tasks.ExampleEncoder(tok, "prompt_completion")([record]).examples[0]
    runs = [_decode(tok, example.input_ids[run]) for run in _runs(example.trained)]
    assert runs == ["The rest is silence.<|im_end|>"]  # not the prompt's own assistant turns


def test_a_truncated_conversation_starts_with_a_whole_turn(family):
    name, fam, tok = family
    messages = conversation(fam)
    whole = tasks.ExampleEncoder(tok, "messages")([{"messages": messages}]).examples[0]
    encoded = tasks.ExampleEncoder(tok, "messages", max_length=len(whole.input_ids) - 1)([{"messages": messages}])
    example = encoded.examples[0]
    assert example is not None and example.truncated and encoded.counts.exchanges_dropped == 1, name
    kept = messages[:1] + messages[3:] if fam.system else messages[2:]
    expected = tok(tok.apply_chat_template(kept, tokenize=False), add_special_tokens=False)["input_ids"]
    assert example.input_ids.tolist() == expected, name  # re-rendered: the system turn, then a whole exchange
