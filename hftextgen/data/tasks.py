"""Task examples: prompt/completion and chat records turned into token ids and the mask of the tokens trained on.

Records follow TRL's dataset conventions, so users' files work as they are:

- ``text``: {"text": str}; every token is trained on.
- ``prompt_completion``: {"prompt": str, "completion": str}, tokenized without a template (prompt,
  then completion, then EOS); or conversational, prompt and completion each a list of
  {role, content} messages, joined and rendered through the chat template.
- ``messages``: {"messages": [{role, content}, ...]}, roles system / user / assistant, rendered
  through the chat template.

The tokens trained on ("answers") are the completion and its EOS, or every assistant turn of a
conversation with the end-of-turn marker that closes it. With a template that marks the answers
with ``{% generation %}`` (DEFAULT_CHAT_TEMPLATE does), the mask is stock transformers'
``return_assistant_tokens_mask``; with one that does not (most models' own templates), the
answers are found by rendering the conversation's prefixes.

Of hftextgen it imports only the errors and the fields each format reads (sources.TASK_FIELDS): the
preparation workers build their ExampleEncoder from it alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import jinja2
import numpy as np
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from ..errors import UserError
from .sources import TASK_FIELDS

FORMATS = ("text", "prompt_completion", "messages")
LOSS_ON = ("answers", "all")
ROLES = ("system", "user", "assistant")
# The fields each format needs, in the order detect_format tries them: a record with messages is
# chat data even if it also carries a text field (some datasets keep a rendered copy).
FORMAT_FIELDS = {**TASK_FIELDS, "text": ("text",)}

# For models trained from scratch and base models without a template of their own. The markers
# are plain text, so no token is added to the vocabulary (the embeddings keep their shape). Each
# assistant turn, with the EOS that ends it, is inside {% generation %}: exactly what is trained,
# and what stock `apply_chat_template(..., return_assistant_tokens_mask=True)` returns. The
# newline after the EOS is outside: generation stops at the EOS, so it is never predicted.
# Rendered: "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!<|endoftext|>\n", and with
# add_generation_prompt a conversation ends in "<|assistant|>\n" for the model to answer.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\\n' }}"
    "{%- generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# What check_template renders: the turns every template supports (some refuse a system turn).
_PROBE = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hello there."}]


def _at(index: int | None) -> str:
    return "" if index is None else f"record {index}: "


def _found(record: Mapping) -> str:
    names = ", ".join(str(key) for key in record) or "none"
    return f"fields found: {names}"


def _needs(text_field: str = "text") -> str:
    needed = {**FORMAT_FIELDS, "text": (text_field,)}
    return "; ".join(f"{fmt} needs {' and '.join(needed[fmt])}" for fmt in FORMATS) + " (data.text_field names text's)"


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


# ---------------------------------------------------------------- formats and validation


def detect_format(record: Mapping, index: int | None = None, text_field: str = "text") -> str:
    """The format a record holds: "messages", "prompt_completion" or "text" (its text in
    `text_field`)."""
    if not isinstance(record, Mapping):
        raise UserError(
            f"{_at(index)}a record is a {type(record).__name__}, not an object with fields: {_needs(text_field)}"
        )
    for fmt, needed in {**FORMAT_FIELDS, "text": (text_field,)}.items():
        if all(name in record for name in needed):
            return fmt
    raise UserError(f"{_at(index)}the record holds none of the formats ({_found(record)}): {_needs(text_field)}")


def plain_text(record: Mapping) -> str:
    """The words of a task record without template or markup (what a tokenizer is trained on):
    prompt and completion, or the messages' contents, one after another."""
    parts = [record.get("prompt"), record.get("completion")] if "prompt" in record else [record.get("messages")]
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, list):
            out += [m["content"] for m in part if isinstance(m, Mapping) and isinstance(m.get("content"), str)]
    return "\n".join(out)


def check_format(record: Mapping, fmt: str, index: int | None = None) -> None:
    """A one-line UserError when the record lacks the fields of `fmt`."""
    if fmt not in FORMAT_FIELDS:
        raise UserError(f"unknown data format {fmt!r}: use one of {', '.join(FORMATS)}")
    if not isinstance(record, Mapping) or not all(name in record for name in FORMAT_FIELDS[fmt]):
        found = _found(record) if isinstance(record, Mapping) else f"a {type(record).__name__}"
        needed = " and ".join(FORMAT_FIELDS[fmt])
        raise UserError(f"{_at(index)}format {fmt} needs {needed} ({found}): set data.format to the records' format")


def _text(record: Mapping, name: str, index: int | None) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise UserError(f"{_at(index)}{name} is a {type(value).__name__}, not a string: give {name} as text")
    return value


def _messages(value: object, name: str, index: int | None) -> list[dict]:
    """A checked list of {role, content} messages (copies holding only role and content)."""
    if not isinstance(value, list):
        raise UserError(
            f"{_at(index)}{name} is a {type(value).__name__}, not a list: give a list of {{role, content}} messages"
        )
    out = []
    for i, message in enumerate(value):
        where = f"{_at(index)}{name}[{i}]"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise UserError(f"{where} is not a {{role, content}} message: give each message a role and a content")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise UserError(f"{where} has role {role!r}: roles are system, user or assistant; map or drop the others")
        if not isinstance(content, str):
            raise UserError(f"{where}.content is a {type(content).__name__}, not a string: give the content as text")
        if role == "assistant" and not content.strip():
            raise UserError(f"{where} is an empty assistant message: fill in the answer or drop the record")
        out.append({"role": role, "content": content})
    return out


def _conversation(record: Mapping, fmt: str, index: int | None) -> list[dict]:
    """The messages of a chat record: its messages, or its prompt messages then its completion messages."""
    if fmt == "messages":
        return _messages(record["messages"], "messages", index)
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(completion, list) and not completion:
        raise UserError(f"{_at(index)}the completion is empty: fill in the answer or drop the record")
    return _messages(prompt, "prompt", index) + _messages(completion, "completion", index)


def _is_conversational(record: Mapping, index: int | None) -> bool:
    """Whether a prompt/completion record holds messages (True) or strings (False); both alike."""
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise UserError(f"{_at(index)}the completion is empty: fill in the answer or drop the record")
        return False
    if isinstance(prompt, list) and isinstance(completion, list):
        return True
    raise UserError(
        f"{_at(index)}prompt is a {type(prompt).__name__} and completion a {type(completion).__name__}: "
        "give both as strings, or both as lists of {role, content} messages"
    )


# ---------------------------------------------------------------- templates


def _own_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates (e.g. "default", "tool_use")
        template = template.get("default")
    return template or None


def resolve_template(tokenizer: PreTrainedTokenizerBase, setting: str | None = None) -> str:
    """The chat template to use: `setting` when given (a Jinja string, or the path of a .jinja
    file), else the model's own template, else DEFAULT_CHAT_TEMPLATE."""
    if not setting:
        return _own_template(tokenizer) or DEFAULT_CHAT_TEMPLATE
    if setting.endswith(".jinja"):
        path = Path(setting).expanduser()
        if not path.is_file():
            raise UserError(f"tokenizer.chat_template: {path} does not exist: give an existing .jinja file")
        return path.read_text(encoding="utf-8")
    if "{{" not in setting and "{%" not in setting:
        # A template without a single Jinja tag renders the same text for every conversation:
        # most likely a path with another extension, or a typo.
        raise UserError(
            f"tokenizer.chat_template: {setting!r} is neither a Jinja template nor a .jinja file: give one of them"
        )
    return setting


def has_generation_marks(template: str) -> bool:
    """Whether the template marks the answers with {% generation %} (stock assistant masks work)."""
    return bool(_GENERATION_TAG.search(template))


def _render(tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict], prompt: bool = False) -> str:
    """The template's text for `messages` (empty ones too), with the variables
    apply_chat_template passes (the special tokens: bos_token, eos_token, ...)."""
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=prompt, **tokenizer.special_tokens_map
    )
    return rendered[0]


def check_template(tokenizer: PreTrainedTokenizerBase, template: str) -> None:
    """A one-line UserError when the template does not render a tiny conversation, or leaves the answer out."""
    try:
        text = _render(tokenizer, template, _PROBE)
        _render(tokenizer, template, _PROBE[:1], prompt=True)
    except (jinja2.TemplateError, TypeError, ValueError) as error:
        raise UserError(
            f"the chat template does not render a conversation ({_one_line(error)}): fix tokenizer.chat_template"
        ) from None
    if _PROBE[-1]["content"] not in text:
        raise UserError(
            "the chat template leaves the assistant's answer out of a conversation: fix tokenizer.chat_template"
        )


# ---------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One encoded record: its token ids (int64) and which of them are trained on (bool)."""

    input_ids: np.ndarray
    trained: np.ndarray
    truncated: bool = False

    @property
    def labels(self) -> np.ndarray:
        """The Trainer's labels: the id where trained, -100 elsewhere."""
        return np.where(self.trained, self.input_ids, -100)


@dataclass
class Counts:
    """What became of the records, for the data report; counts of several batches add up."""

    examples: int = 0  # records encoded (truncated ones included)
    truncated: int = 0  # prompts cut from the left to fit
    dropped_too_long: int = 0  # answers that alone do not fit
    skipped_no_assistant: int = 0  # conversations without an assistant turn

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass
class Encoded:
    """One Example per record, None where the record was dropped or skipped, and the counts."""

    examples: list[Example | None]
    counts: Counts


def _last_answer_start(answer: np.ndarray) -> int:
    """Where the last run of answer tokens starts."""
    last = int(np.flatnonzero(answer)[-1])
    before = np.flatnonzero(~answer[:last])
    return int(before[-1]) + 1 if len(before) else 0


def _fit(ids: np.ndarray, answer: np.ndarray, max_length: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The last `max_length` tokens when the last answer fits whole in them, after at least one
    token of context (a token is trained by predicting it from the ones before it); None when it
    does not fit. Earlier turns and the prompt are cut from the left."""
    if max_length is None or len(ids) <= max_length:
        return ids, answer
    if len(ids) - _last_answer_start(answer) >= max_length:
        return None
    kept = answer[-max_length:].copy()
    if answer[-max_length - 1] and kept[0]:
        # An earlier answer cut in two: its tail alone is not an answer to anything kept.
        kept[: int(np.argmin(kept))] = False
    return ids[-max_length:], kept


def _overlap_mask(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """Tokens overlapping any character span: the rule of stock return_assistant_tokens_mask."""
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(bounds), dtype=bool)
    for start, end in spans:
        mask |= (bounds[:, 1] > start) & (bounds[:, 0] < end)
    return mask


def _check_settings(tokenizer: PreTrainedTokenizerBase, fmt: str, loss_on: str, max_length: int | None) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r}: use one of {', '.join(FORMATS)}")
    if loss_on not in LOSS_ON:
        raise UserError(f"unknown data.loss_on {loss_on!r}: use answers or all")
    if fmt == "text" and loss_on == "answers":
        raise UserError("data.loss_on answers needs prompt/completion or messages records, not text: set it to all")
    if max_length is not None and max_length < 2:
        raise UserError(f"the maximum example length is {max_length}: an example needs at least 2 tokens")
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, which ends each answer: use a tokenizer with one")
    if fmt != "text" and not tokenizer.is_fast:
        raise UserError("task data needs a fast tokenizer (its character offsets find the answers): use one")


class ExampleEncoder:
    """Encodes records of one format: `encoder(records)` -> Encoded.

    loss_on "answers" trains the completions / assistant turns and the token ending each; "all"
    trains every token (text records always). max_length None keeps every example whole; else a
    longer one keeps its (last) answer and loses tokens from the left, or is dropped when that
    answer alone does not fit. Text records are never cut here: a long document is split into
    blocks by the packer, like raw text. chat_template: a Jinja string or .jinja path, as
    resolve_template takes it (None: the model's own template, else the default).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        fmt: str,
        loss_on: str = "answers",
        max_length: int | None = None,
        chat_template: str | None = None,
    ):
        _check_settings(tokenizer, fmt, loss_on, max_length)
        self.tokenizer, self.fmt, self.loss_on, self.max_length = tokenizer, fmt, loss_on, max_length
        self.template = None
        if fmt != "text":
            self.template = resolve_template(tokenizer, chat_template)
            check_template(tokenizer, self.template)
        # The end-of-turn markers (EOS, <|im_end|>, <|eot_id|>, ...): whitespace a template writes
        # after one is not part of the answer, since generation stops at the marker.
        added = {token.content for token in tokenizer.added_tokens_decoder.values()}
        self._markers = tuple(added | {tokenizer.eos_token})

    def __call__(self, records: Iterable[Mapping], first_index: int = 0) -> Encoded:
        """`first_index`: the index of the first record, for error messages."""
        counts, examples = Counts(), []
        for index, record in enumerate(records, start=first_index):
            example = self.encode(record, index, counts)
            examples.append(example)
        return Encoded(examples, counts)

    def encode(self, record: Mapping, index: int | None = None, counts: Counts | None = None) -> Example | None:
        """One record's Example, or None (dropped or skipped; `counts` says which)."""
        counts = counts if counts is not None else Counts()
        check_format(record, self.fmt, index)
        if self.fmt == "text":
            ids = self._tokens(_text(record, "text", index), True) + [self.tokenizer.eos_token_id]
            counts.examples += 1
            return Example(np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool))
        pair = self._answers(record, index)
        if pair is None:
            counts.skipped_no_assistant += 1
            return None
        if not pair[1].any():  # a template that drops or hides this conversation's answers
            raise UserError(f"{_at(index)}the chat template marks no answer in this conversation: fix the template")
        fitted = _fit(*pair, self.max_length)
        if fitted is None:
            counts.dropped_too_long += 1
            return None
        ids, answer = fitted
        truncated = len(ids) < len(pair[0])
        counts.examples += 1
        counts.truncated += truncated
        trained = answer if self.loss_on == "answers" else np.ones(len(ids), dtype=bool)
        return Example(ids, trained, truncated)

    def _tokens(self, text: str, specials: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=specials)["input_ids"]

    def _answers(self, record: Mapping, index: int | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The record's ids and its answer mask, untruncated; None for a conversation without an answer."""
        if self.fmt == "prompt_completion" and not _is_conversational(record, index):
            # No template: the prompt is tokenized alone (with the BOS the tokenizer adds, if any),
            # so a prompt given alone at inference gets the very same tokens.
            prompt = self._tokens(record["prompt"], True)
            answer = self._tokens(record["completion"], False) + [self.tokenizer.eos_token_id]
            mask = np.r_[np.zeros(len(prompt), dtype=bool), np.ones(len(answer), dtype=bool)]
            return np.asarray(prompt + answer, dtype=np.int64), mask
        messages = _conversation(record, self.fmt, index)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None
        # Turns after the last answer are never trained, and would make truncation cut the answer.
        messages = messages[: last + 1]
        try:
            if has_generation_marks(self.template):
                return self._marked(messages)
            return self._by_prefixes(messages, index)
        except (jinja2.TemplateError, TypeError) as error:
            raise UserError(f"{_at(index)}the chat template fails on this conversation ({_one_line(error)})") from None

    def _marked(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Stock transformers' assistant mask, from the template's {% generation %} spans."""
        out = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        return np.asarray(out["input_ids"], dtype=np.int64), np.asarray(out["assistant_masks"], dtype=bool)

    def _by_prefixes(self, messages: list[dict], index: int | None) -> tuple[np.ndarray, np.ndarray]:
        """The answers of a template without {% generation %}: assistant turn i is what rendering
        messages[:i+1] adds to messages[:i] with the generation prompt (its end-of-turn marker
        included), mapped to tokens by the fast tokenizer's character offsets."""
        text = _render(self.tokenizer, self.template, messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = _render(self.tokenizer, self.template, messages[:i], prompt=True)
            through = _render(self.tokenizer, self.template, messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise UserError(
                    f"{_at(index)}the chat template renders earlier turns differently as the conversation grows, "
                    "so its answers cannot be found: set tokenizer.chat_template to one that marks them with "
                    "{% generation %}"
                )
            spans.append(self._trim(text, len(before), len(through)))
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoding["input_ids"], dtype=np.int64)
        return ids, _overlap_mask(encoding["offset_mapping"], spans)

    def _trim(self, text: str, start: int, end: int) -> tuple[int, int]:
        """The span without the whitespace after its end-of-turn marker (ChatML's newline after
        <|im_end|>); kept where no marker ends the turn, as it is then the only end there is."""
        kept = text[start:end].rstrip()
        return (start, start + len(kept)) if kept and kept.endswith(self._markers) else (start, end)


def encode(
    records: Iterable[Mapping],
    tokenizer: PreTrainedTokenizerBase,
    fmt: str,
    loss_on: str = "answers",
    max_length: int | None = None,
    chat_template: str | None = None,
) -> Encoded:
    """ExampleEncoder(tokenizer, fmt, loss_on, max_length, chat_template)(records)."""
    return ExampleEncoder(tokenizer, fmt, loss_on, max_length, chat_template)(records)
