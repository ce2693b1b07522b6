"""Task examples: prompt/completion and chat records turned into token ids and the mask of the tokens trained on.

Records follow TRL's dataset conventions, so users' files work as they are:

- ``text``: {"text": str}; every token is trained on.
- ``prompt_completion``: {"prompt": str, "completion": str}, tokenized without a template (prompt,
  then completion, then EOS); or conversational, prompt and completion each a list of messages,
  rendered through the chat template, the loss on the completion's assistant turns only.
- ``messages``: {"messages": [{role, content}, ...]}, roles system / user / assistant / tool,
  rendered through the chat template, every assistant turn trained.

A message's content is a string or OpenAI-style text parts ([{"type": "text", "text": ...}],
joined by newlines); an assistant turn may carry `tool_calls` and a record a `tools` list (the
function schemas), both passed to the template as transformers' tool use does, the calls trained
as part of the answer. The answers are found as templates.py says: each trained turn's text and
the marker that ends it. A conversation too long for the block loses whole leading exchanges
(the system turn kept) and is rendered again; only when its last exchange alone is too long is
one turn cut, its prompt's text from the left, the turn's header kept. A record whose answers the
template cannot show is skipped and counted, like one whose answer does not fit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
from transformers import PreTrainedTokenizerBase

from ..errors import UserError
from . import templates
from .sources import TASK_FIELDS

FORMATS = ("text", "prompt_completion", "messages")
LOSS_ON = ("answers", "all")
ROLES = ("system", "user", "assistant", "tool")
# What of a message reaches the template besides role and content (tool use, as transformers'
# chat templates take it).
MESSAGE_KEYS = ("tool_calls", "name", "tool_call_id")
# The fields each format needs, in the order detect_format tries them: a record with messages is
# chat data even if it also carries a text field (some datasets keep a rendered copy).
FORMAT_FIELDS = {**TASK_FIELDS, "text": ("text",)}
# Bumped when the same records would become other examples: part of the prepared data's key.
ENCODING = 2


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


def _content(value: object, where: str) -> str:
    """A message's content as text: a string, or text parts joined by newlines (None: empty)."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(isinstance(p, Mapping) for p in value):
        kinds = {p.get("type", "text") for p in value}
        if kinds - {"text"} or not all(isinstance(p.get("text"), str) for p in value):
            raise UserError(
                f"{where}.content holds parts of type {', '.join(sorted(map(str, kinds - {'text'}))) or 'text'} "
                "without text: only text parts (type text, with a text field) can be trained on; drop the others"
            )
        return "\n".join(p["text"] for p in value)
    raise UserError(f"{where}.content is a {type(value).__name__}, not a string: give the content as text")


def _message(message: object, where: str) -> dict:
    """A checked copy of one message: role, content as text, and the tool-use keys it has."""
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        if not (isinstance(message, Mapping) and "role" in message and message.get("tool_calls")):
            raise UserError(f"{where} is not a {{role, content}} message: give each message a role and a content")
    role = message["role"]
    if role not in ROLES:
        raise UserError(f"{where} has role {role!r}: roles are system, user, assistant or tool; map or drop the others")
    out = {"role": role, "content": _content(message.get("content"), where)}
    out |= {key: message[key] for key in MESSAGE_KEYS if message.get(key) is not None}
    if "tool_calls" in out and (role != "assistant" or not isinstance(out["tool_calls"], list)):
        raise UserError(f"{where}.tool_calls: only an assistant message calls tools, with a list of calls")
    if role == "assistant" and not out["content"].strip() and not out.get("tool_calls"):
        raise UserError(f"{where} is an empty assistant message: fill in the answer or drop the record")
    return out


def _messages(value: object, name: str, index: int | None) -> list[dict]:
    """A checked list of messages (copies holding what the template reads)."""
    if not isinstance(value, list):
        raise UserError(
            f"{_at(index)}{name} is a {type(value).__name__}, not a list: give a list of {{role, content}} messages"
        )
    return [_message(message, f"{_at(index)}{name}[{i}]") for i, message in enumerate(value)]


def _tools(record: Mapping, index: int | None) -> list | None:
    tools = record.get("tools")
    if tools is None or tools == []:
        return None
    if isinstance(tools, str):  # datasets often keep the schemas as one JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise UserError(
                f"{_at(index)}tools is a string that is not JSON: give a list of function schemas"
            ) from None
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
        raise UserError(f"{_at(index)}tools is not a list of function schemas: give one ({{type: function, ...}})")
    return tools


@dataclass(frozen=True)
class Conversation:
    """A chat record's messages (cut after the last trained turn), the tools it declares, and the
    index of the first message every kept part must start at or before (truncation never drops
    it: the first trained turn of a completion, the last answer of a conversation)."""

    messages: list[dict]
    tools: list | None
    trained: list[int]
    keep: int


def conversation(record: Mapping, fmt: str, index: int | None = None) -> Conversation | None:
    """A chat record as a Conversation; None when it holds no answer to train."""
    if fmt == "messages":
        messages, first = _messages(record["messages"], "messages", index), 0
    else:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(completion, list) and not completion:
            raise UserError(f"{_at(index)}the completion is empty: fill in the answer or drop the record")
        messages = _messages(prompt, "prompt", index) + _messages(completion, "completion", index)
        first = len(prompt)  # conversational prompt/completion: the loss is on the completion only
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first]
    if not trained:
        return None
    # Turns after the last answer are never trained, and would make truncation cut the answer.
    keep = trained[0] if fmt == "prompt_completion" else trained[-1]
    return Conversation(messages[: trained[-1] + 1], _tools(record, index), trained, keep)


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


# ---------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One encoded record: its token ids (int64), which of them are trained on (bool), the text
    of each of its answers (what answer bits-per-byte divides by: the answers' words, without
    the markers that end them) and the UTF-8 bytes of its whole text (special tokens left out:
    what loss on every token divides by)."""

    input_ids: np.ndarray
    trained: np.ndarray
    truncated: bool = False
    answers: tuple[str, ...] = ()
    text_bytes: int = 0

    @property
    def labels(self) -> np.ndarray:
        """The Trainer's labels: the id where trained, -100 elsewhere."""
        return np.where(self.trained, self.input_ids, -100)


@dataclass
class Counts:
    """What became of the records, for the data report; counts of several batches add up."""

    examples: int = 0  # records encoded (truncated ones included)
    truncated: int = 0  # examples cut to fit: the two below, and prompts of strings cut from the left
    exchanges_dropped: int = 0  # conversations that lost whole leading exchanges (the system turn kept)
    turn_cut: int = 0  # examples whose one over-long prompt (turn) lost text from the left
    dropped_too_long: int = 0  # answers that alone do not fit
    skipped_no_assistant: int = 0  # conversations without an assistant turn
    skipped_unmaskable: int = 0  # conversations the template fails on, or whose answers it does not show

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass
class Encoded:
    """One Example per record, None where the record was dropped or skipped, and the counts."""

    examples: list[Example | None]
    counts: Counts


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
    longer one is cut as the module says, or dropped when its last answer alone does not fit.
    Text records are never cut here: a long document is split into blocks by the packer, like
    raw text. chat_template: a Jinja string or .jinja path, as templates.resolve_template takes
    it (None: the model's own template, else the default).
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
            self.template = templates.resolve_template(tokenizer, chat_template)
            templates.check_template(tokenizer, self.template)
        self.answers = templates.AnswerFinder(tokenizer, self.template) if self.template else None
        self.specials = templates.special_tokens(tokenizer)

    def __call__(self, records: Iterable[Mapping], first_index: int = 0) -> Encoded:
        """`first_index`: the index of the first record, for error messages."""
        counts, examples = Counts(), []
        for index, record in enumerate(records, start=first_index):
            examples.append(self.encode(record, index, counts))
        return Encoded(examples, counts)

    def encode(self, record: Mapping, index: int | None = None, counts: Counts | None = None) -> Example | None:
        """One record's Example, or None (dropped or skipped; `counts` says which)."""
        counts = counts if counts is not None else Counts()
        check_format(record, self.fmt, index)
        if self.fmt == "text":
            text = _text(record, "text", index)
            ids = self._tokens(text, True) + [self.tokenizer.eos_token_id]
            counts.examples += 1
            return Example(np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool), False, (text,), _bytes(text))
        if self.fmt == "prompt_completion" and not _is_conversational(record, index):
            example = self._strings(record, index)
            counts.turn_cut += isinstance(example, Example) and example.truncated
        else:
            chat = conversation(record, self.fmt, index)
            if chat is None:
                counts.skipped_no_assistant += 1
                return None
            example = self._chat(chat, counts)
        if example is None:
            return None
        if example == "long":
            counts.dropped_too_long += 1
            return None
        counts.examples += 1
        counts.truncated += example.truncated
        if self.loss_on == "all":
            return Example(example.input_ids, np.ones(len(example.input_ids), bool), *_tail(example))
        return example

    def _tokens(self, text: str, specials: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=specials)["input_ids"]

    def _strings(self, record: Mapping, index: int | None) -> Example | str:
        """Prompt/completion strings, no template: the prompt tokenized alone (with the BOS the
        tokenizer adds, if any), so a prompt given alone at inference gets the very same tokens;
        too long, the prompt loses tokens from the left after its BOS."""
        prompt = self._tokens(_text(record, "prompt", index), True)
        answer = self._tokens(_text(record, "completion", index), False) + [self.tokenizer.eos_token_id]
        lead = 1 if prompt and prompt[0] == self.tokenizer.bos_token_id and self.tokenizer.bos_token else 0
        room = (self.max_length or len(prompt) + len(answer)) - len(answer) - lead
        if room < 1:  # a token is trained by predicting it from the ones before it
            return "long"
        kept = prompt[:lead] + prompt[lead:][-room:] if len(prompt) - lead > room else prompt
        ids = np.asarray(kept + answer, dtype=np.int64)
        trained = np.r_[np.zeros(len(kept), dtype=bool), np.ones(len(answer), dtype=bool)]
        text = record["prompt"] + record["completion"]
        return Example(ids, trained, len(kept) < len(prompt), (record["completion"],), _bytes(text))

    def _chat(self, chat: Conversation, counts: Counts) -> Example | str | None:
        """A conversation's Example, cut by turns to fit; None when the template cannot show it."""
        try:
            fitted = _Fitter(self, chat).fit()
        except (templates.Unmaskable, *templates.TEMPLATE_ERRORS):
            counts.skipped_unmaskable += 1
            return None
        if fitted is None:
            return "long"
        example, cut = fitted
        counts.exchanges_dropped += cut == "exchanges"
        counts.turn_cut += cut == "turn"
        return example

    def rendered(self, messages: list[dict], tools: list | None, trained: list[int]) -> Example:
        """The tokens of a conversation as the template renders it, its trained answers marked."""
        shown = self.answers.find(messages, trained, tools)
        encoding = self.tokenizer(shown.text, add_special_tokens=False, return_offsets_mapping=True)
        mask = _overlap_mask(encoding["offset_mapping"], shown.spans)
        if not mask.any():
            raise templates.Unmaskable("no token of the answers")
        text_bytes = _bytes(self.specials.sub("", shown.text))
        ids = np.asarray(encoding["input_ids"], dtype=np.int64)
        return Example(ids, mask, False, tuple(shown.answers), text_bytes)


def _bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _tail(example: Example) -> tuple:
    return example.truncated, example.answers, example.text_bytes


def _truncated(example: Example) -> Example:
    return Example(example.input_ids, example.trained, True, example.answers, example.text_bytes)


class _Fitter:
    """A conversation cut to the encoder's max_length by turns: whole leading exchanges dropped
    (the system turn kept), fewest first; when the last exchange alone is too long, its first
    prompt turn loses text from the left (its header kept). fit() -> (example, cut), cut None,
    "exchanges" or "turn" (the example then marked truncated); None when the last answer alone
    does not fit."""

    def __init__(self, encoder: ExampleEncoder, chat: Conversation):
        self.encoder, self.chat, self.limit = encoder, chat, encoder.max_length
        self.head = 1 if chat.messages[0]["role"] == "system" else 0

    def _kept_from(self, start: int) -> tuple[list[dict], list[int]]:
        """The system turn (if any) and the messages from `start` on, and their trained indices."""
        messages = self.chat.messages[: self.head] + self.chat.messages[start:]
        shift = start - self.head
        return messages, [i - shift for i in self.chat.trained if i >= start]

    def _encoded(self, start: int) -> Example:
        messages, trained = self._kept_from(start)
        return self.encoder.rendered(messages, self.chat.tools, trained)

    def fit(self):
        whole = self._encoded(self.head)
        if self.limit is None or len(whole.input_ids) <= self.limit:
            return whole, None
        starts = [i for i in range(self.head + 1, self.chat.keep + 1) if self.chat.messages[i]["role"] == "user"]
        low, high, best = 0, len(starts) - 1, None
        while low <= high:  # the fewest exchanges dropped that fit: lengths fall as more are dropped
            middle = (low + high) // 2
            example = self._encoded(starts[middle])
            if len(example.input_ids) <= self.limit:
                best, high = (example, starts[middle]), middle - 1
            else:
                low = middle + 1
        if best is not None:
            return _truncated(best[0]), "exchanges"
        cut = self._cut_turn(starts[-1] if starts else self.head)
        return None if cut is None else (_truncated(cut), "turn")

    def _cut_turn(self, start: int) -> Example | None:
        """The exchange from `start` with its first prompt turn cut from the left to fit."""
        messages, trained = self._kept_from(start)
        turn = next((i for i, m in enumerate(messages) if i >= self.head and m["role"] != "assistant"), None)
        if turn is None or turn > trained[0]:
            return None
        tok = self.encoder.tokenizer
        ids = tok(messages[turn]["content"], add_special_tokens=False)["input_ids"]
        example, drop = self.encoder.rendered(messages, self.chat.tools, trained), 0
        for _ in range(8):  # a cut changes how the text around it tokenizes: a few tries at most
            over = len(example.input_ids) - self.limit
            if over <= 0:
                return example
            if drop >= len(ids):
                return None
            drop = min(len(ids), drop + over)
            messages[turn] = {**messages[turn], "content": tok.decode(ids[drop:])}
            example = self.encoder.rendered(messages, self.chat.tools, trained)
        return example if len(example.input_ids) <= self.limit else None


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
