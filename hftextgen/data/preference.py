"""Preference records: pairs of answers to one prompt checked, their prompt found, and both sides encoded as one item.

Records follow TRL's preference conventions, so files made for TRL work as they are:

- explicit prompt: {"prompt", "chosen", "rejected"}, three strings (the answers continue the
  prompt, no template), or three lists of {role, content} messages (the conversation so far, then
  each side's answer: the assistant's message, or messages);
- implicit prompt: {"chosen", "rejected"}, two whole conversations (or two strings) that begin
  alike: the prompt is their shared beginning, in whole messages (for strings: up to where they
  part, a space they share going with the answers, as TRL's extract_prompt does).

Each side is encoded by the task data's tasks.ExampleEncoder as the prompt/completion record
{prompt, completion: answer}, so chat templates, answer masks, end-of-turn tokens and the
truncation of long prompts are exactly those of supervised task data. The two encodings become
one item (`Pair`): the prompt's ids once, then the chosen answer's, then the rejected one's, with
one byte per token (CODES) saying which part a token belongs to and whether it is trained. When
the encoder cut the prompt for one side (its answer is the longer), both sides take that shorter
prompt, so the pair shares one. A pair whose answer does not fit is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from . import tasks

FIELDS = ("chosen", "rejected")
# Bump when a change here alters the pair items the same records make (part of the data's cache key).
ENCODING = 1
PROMPT, CHOSEN, REJECTED, CHOSEN_CONTEXT, REJECTED_CONTEXT = range(5)
CODES = {
    PROMPT: "the prompt (context)",
    CHOSEN: "a trained token of the chosen answer",
    REJECTED: "a trained token of the rejected answer",
    CHOSEN_CONTEXT: "an untrained token of the chosen answer (a user turn inside it)",
    REJECTED_CONTEXT: "an untrained token of the rejected answer",
}
NEEDS = "preference needs chosen and rejected (and a prompt, or two conversations that begin alike)"


def _at(index: int | None) -> str:
    return "" if index is None else f"record {index}: "


def _found(record: Mapping) -> str:
    return "fields found: " + (", ".join(str(key) for key in record) or "none")


def is_preference(record: object) -> bool:
    """Whether a record holds a preference pair (a chosen and a rejected answer)."""
    return isinstance(record, Mapping) and all(name in record for name in FIELDS)


def detect_format(record: Mapping, index: int | None = None, text_field: str = "text") -> str:
    """tasks.detect_format, with preference pairs: a record holding chosen and rejected is one."""
    if is_preference(record):
        return "preference"
    try:
        return tasks.detect_format(record, index, text_field)
    except UserError as e:
        raise UserError(f"{e}; {NEEDS}") from None


def plain_text(record: Mapping) -> str:
    """The words of a pair without template or markup (what a tokenizer is trained on)."""
    out = []
    for name in ("prompt", *FIELDS):
        part = record.get(name)
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, list):
            out += [m["content"] for m in part if isinstance(m, Mapping) and isinstance(m.get("content"), str)]
    return "\n".join(out)


# ---------------------------------------------------------------- records


def _check_messages(value: list, name: str, index: int | None) -> list[dict]:
    """The messages checked by the task encoder's own rules (tasks._messages), named as here."""
    return tasks._messages(value, name, index)


def _check_answer(value: str | list, name: str, index: int | None) -> None:
    """A one-line UserError for an answer that is empty, or (messages) holds no answer."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{_at(index)}the {name} answer is empty: fill it in, or drop the record")
        return
    if not value:
        raise UserError(f"{_at(index)}the {name} answer holds no message: fill it in, or drop the record")
    messages = _check_messages(value, name, index)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(
            f"{_at(index)}the {name} answer holds no assistant message (roles: "
            f"{', '.join(m['role'] for m in messages)}): the answer is the assistant's turn"
        )


def _shared_prefix(chosen: str | list, rejected: str | list) -> int:
    """How much of the two the implicit prompt is: leading messages equal in both, or (strings)
    leading characters, less a space the answers both start with (TRL's extract_prompt)."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return n


def _implicit(chosen, rejected, index: int | None) -> tuple:
    """(prompt, chosen answer, rejected answer) of a pair without a prompt field."""
    n = _shared_prefix(chosen, rejected)
    if n == 0:
        what = "conversations begin with different messages" if isinstance(chosen, list) else "texts begin differently"
        raise UserError(
            f"{_at(index)}the record has no prompt field and its chosen and rejected {what}, so they share no "
            f"prompt: give the prompt field, or chosen and rejected conversations that begin with the same turns"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def split_pair(record: Mapping, index: int | None = None) -> tuple[str | list, str | list, str | list]:
    """(prompt, chosen answer, rejected answer) of a preference record, checked: every bad
    record is a one-line UserError naming the record and the fix."""
    if not isinstance(record, Mapping) or not is_preference(record):
        found = _found(record) if isinstance(record, Mapping) else f"a {type(record).__name__}"
        raise UserError(f"{_at(index)}data.format preference needs chosen and rejected ({found})")
    chosen, rejected = record["chosen"], record["rejected"]
    kinds = {type(v) for v in (chosen, rejected, *([record["prompt"]] if "prompt" in record else []))}
    if not (kinds <= {str} or kinds <= {list}):
        names = ", ".join(f"{k} is a {type(record[k]).__name__}" for k in ("prompt", *FIELDS) if k in record)
        raise UserError(
            f"{_at(index)}{names}: give prompt, chosen and rejected all as strings, or all as lists of "
            f"{{role, content}} messages"
        )
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, list):
            _check_messages(prompt, "prompt", index)
    else:
        if isinstance(chosen, list):
            _check_messages(chosen, "chosen", index)
            _check_messages(rejected, "rejected", index)
        prompt, chosen, rejected = _implicit(chosen, rejected, index)
    _check_answer(chosen, "chosen", index)
    _check_answer(rejected, "rejected", index)
    if chosen == rejected:
        raise UserError(
            f"{_at(index)}chosen and rejected are the same answer, so neither can be preferred: drop the record, or "
            f"give a different rejected answer"
        )
    return prompt, chosen, rejected


# ---------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Pair:
    """One encoded pair: the prompt's ids, then the chosen answer's, then the rejected answer's
    (int64), and a code per token (CODES)."""

    input_ids: np.ndarray
    codes: np.ndarray
    truncated: bool = False
    answers: tuple[str, ...] = ()  # the chosen answers' texts, then the rejected ones' (tasks.Example's)
    text_bytes: int = 0  # both sides' tasks.Example.text_bytes

    @property
    def trained(self) -> np.ndarray:
        """The tokens the objective scores: both answers' trained tokens."""
        return (self.codes == CHOSEN) | (self.codes == REJECTED)


def _spans(trained: np.ndarray) -> list[int]:
    """Where each run of trained tokens starts."""
    edges = np.flatnonzero(np.diff(np.r_[0, trained.astype(np.int8)]) == 1)
    return edges.tolist()


def _answers_in(answer: str | list) -> int:
    """Runs of trained tokens an answer makes: one, or one per assistant message."""
    return 1 if isinstance(answer, str) else sum(m["role"] == "assistant" for m in answer)


def _answer_start(example: tasks.Example, answer: str | list) -> int | None:
    """Where the answer begins in an encoded side: its first trained run, counted from the end
    (the prompt's own assistant turns come before); None when the encoder's cut reached into it."""
    starts, wanted = _spans(example.trained), _answers_in(answer)
    return starts[-wanted] if len(starts) >= wanted else None


def _common(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _tail(example: tasks.Example, start: int, trained_code: int, context_code: int) -> tuple[np.ndarray, np.ndarray]:
    """An answer's ids from `start` to its last trained token, and their codes."""
    end = int(np.flatnonzero(example.trained)[-1]) + 1
    codes = np.where(example.trained[start:end], trained_code, context_code).astype(np.uint8)
    return example.input_ids[start:end], codes


def combine(chosen: tasks.Example, rejected: tasks.Example, starts: tuple[int, int], index: int | None) -> Pair:
    """One Pair of the two sides' encodings, whose answers begin at `starts`."""
    prompts = chosen.input_ids[: starts[0]], rejected.input_ids[: starts[1]]
    if not np.array_equal(*prompts) and (chosen.truncated or rejected.truncated):
        # The longer answer's side had its prompt cut to fit: both take that prompt.
        prompt = min(prompts, key=len)
    elif np.array_equal(*prompts):
        prompt = prompts[0]
    else:
        # A template that renders the end of the prompt differently before each answer: the
        # prompt is what the two share, the rest of each is its answer's untrained context.
        shared = _common(*prompts)
        if shared == 0:
            raise UserError(
                f"{_at(index)}the chat template renders the prompt differently before the chosen and the rejected "
                "answer, so they share no prompt: fix tokenizer.chat_template"
            )
        prompt, starts = prompts[0][:shared], (shared, shared)
    c_ids, c_codes = _tail(chosen, starts[0], CHOSEN, CHOSEN_CONTEXT)
    r_ids, r_codes = _tail(rejected, starts[1], REJECTED, REJECTED_CONTEXT)
    ids = np.concatenate([prompt, c_ids, r_ids]).astype(np.int64)
    codes = np.concatenate([np.full(len(prompt), PROMPT, np.uint8), c_codes, r_codes])
    cut = chosen.truncated or rejected.truncated or len(prompt) < max(map(len, prompts))
    return Pair(ids, codes, cut, chosen.answers + rejected.answers, chosen.text_bytes + rejected.text_bytes)


class PairEncoder:
    """Encodes preference records: `encode(record, index, counts)` -> Pair, or None when an
    answer does not fit max_length (counted as dropped). Each side's sequence, the prompt then
    its answer, holds at most max_length tokens; the prompt loses its start to fit, as task
    examples do. chat_template: as tasks.ExampleEncoder takes it."""

    def __init__(self, tokenizer, max_length: int | None = None, chat_template: str | None = None):
        self.sides = tasks.ExampleEncoder(tokenizer, "prompt_completion", "answers", max_length, chat_template)
        self.tokenizer, self.max_length = tokenizer, max_length

    def encode(self, record: Mapping, index: int | None = None, counts: tasks.Counts | None = None) -> Pair | None:
        counts = counts if counts is not None else tasks.Counts()
        prompt, chosen, rejected = split_pair(record, index)
        scratch, tools = tasks.Counts(), {"tools": record["tools"]} if record.get("tools") is not None else {}
        sides = [
            self.sides.encode({"prompt": prompt, "completion": answer, **tools}, index, scratch)
            for answer in (chosen, rejected)
        ]
        starts = [None if s is None else _answer_start(s, a) for s, a in zip(sides, (chosen, rejected), strict=True)]
        if None in starts:
            # A template that cannot show an answer, or an answer that does not fit.
            counts.skipped_unmaskable += scratch.skipped_unmaskable > 0
            counts.dropped_too_long += scratch.skipped_unmaskable == 0
            return None
        pair = combine(sides[0], sides[1], tuple(starts), index)
        counts.examples += 1
        counts.truncated += pair.truncated
        return pair


# ---------------------------------------------------------------- reading an item


@dataclass(frozen=True)
class Parts:
    """A prepared pair taken apart: the prompt's ids, and each answer's ids with the mask of its
    trained tokens."""

    prompt: np.ndarray
    chosen: np.ndarray
    chosen_trained: np.ndarray
    rejected: np.ndarray
    rejected_trained: np.ndarray


def parts(ids: np.ndarray, codes: np.ndarray) -> Parts:
    """A prepared item's prompt and answers (the layout `combine` writes)."""
    n_prompt = int(np.count_nonzero(codes == PROMPT))
    rejected_at = n_prompt + int(np.count_nonzero((codes == CHOSEN) | (codes == CHOSEN_CONTEXT)))
    return Parts(
        ids[:n_prompt],
        ids[n_prompt:rejected_at],
        codes[n_prompt:rejected_at] == CHOSEN,
        ids[rejected_at:],
        codes[rejected_at:] == REJECTED,
    )
