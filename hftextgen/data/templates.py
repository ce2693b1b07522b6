"""Chat templates: which one a run uses, and where the answers are in a conversation it renders.

The tokens trained are what the model's own template renders for the whole conversation; the
answers are each trained assistant turn's text plus the special token that ends the turn
(<|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>, </s>, EOS, ...). A template that marks its answers
with {% generation %} (DEFAULT_CHAT_TEMPLATE does) gives them itself, as stock
`return_assistant_tokens_mask` reads them. Most models' templates do not, and many render earlier
turns differently as a conversation grows (Qwen3's empty think block on the last turn only,
GPT-OSS's <|return|> that becomes <|end|>, DeepSeek dropping earlier reasoning, Phi-3's closing
EOS), so rendering prefixes cannot find the answers. Instead the conversation is rendered twice,
as it is and with each trained answer's content replaced by a unique placeholder: the
placeholder rendering cut at its placeholders gives the text the template writes around the
answers, and finding those pieces, in order, in the real rendering gives each answer's place,
whatever the template did to other turns. The closing marker is the first special token the
template writes after the answer (after its tool calls, for a turn that calls tools).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from ..errors import UserError

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
# Two answers, for the markers that end a turn: some templates end the last one differently.
_TWO_TURNS = [*_PROBE, {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Good night."}]
# What a template can raise on a conversation it does not take (roles out of order, a system
# turn it refuses, a content of the wrong type).
TEMPLATE_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)
_PLACEHOLDER = "@@hftextgen-answer-{}@@"


class Unmaskable(Exception):
    """A conversation whose answers this template hides or renders out of place: skipped and
    counted, never a stop of the whole corpus."""


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


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


def render(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    messages: Sequence[dict],
    tools: list | None = None,
    prompt: bool = False,
) -> str:
    """The template's text for `messages`, with the variables apply_chat_template passes (the
    special tokens: bos_token, eos_token, ...); `prompt`: ending with the generation prompt."""
    rendered, _ = render_jinja_template(
        conversations=[list(messages)],
        tools=tools,
        chat_template=template,
        add_generation_prompt=prompt,
        **tokenizer.special_tokens_map,
    )
    return rendered[0]


def check_template(tokenizer: PreTrainedTokenizerBase, template: str) -> None:
    """A one-line UserError when the template does not render a tiny conversation, or leaves the answer out."""
    try:
        text = render(tokenizer, template, _PROBE)
        render(tokenizer, template, _PROBE[:1], prompt=True)
    except TEMPLATE_ERRORS as error:
        raise UserError(
            f"the chat template does not render a conversation ({_one_line(error)}): fix tokenizer.chat_template"
        ) from None
    if _PROBE[-1]["content"] not in text:
        raise UserError(
            "the chat template leaves the assistant's answer out of a conversation: fix tokenizer.chat_template"
        )


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> re.Pattern:
    """A pattern matching the tokenizer's special tokens (the markers a template ends turns with),
    longest first."""
    names = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    names |= {t for t in tokenizer.all_special_tokens if t}
    return re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) or r"(?!)")


@dataclass(frozen=True)
class Rendered:
    """A conversation as the template renders it, and its trained answers: per answer the
    character span trained (its text and closing marker) and the answer's text alone."""

    text: str
    spans: list[tuple[int, int]]
    answers: list[str]


class AnswerFinder:
    """Where a template puts the answers of the conversations it renders (the module says how).

    An answer's closing marker is what the template writes both after an earlier answer and after
    the last one (an earlier answer's text goes on into the next turn's header): its special
    tokens (Cohere's <|END_RESPONSE|><|END_OF_TURN_TOKEN|>; not Phi-3's newline and the EOS closing
    the whole conversation), or, where the tokenizer lacks the template's special tokens, its
    text up to the first whitespace. A template that ends its last turn differently (GPT-OSS's
    <|end|>, then <|return|>) has none: each answer closes with the first special token after it
    (the last, with the special tokens that follow that one).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str):
        self.tokenizer, self.template = tokenizer, template
        self.specials = special_tokens(tokenizer)
        self.marked = has_generation_marks(template)
        self.closing = None if self.marked else self._closing()

    def _render(self, messages: Sequence[dict], tools: list | None = None) -> str:
        return render(self.tokenizer, self.template, messages, tools)

    def _run(self, text: str, at: int) -> int:
        """The end of the special tokens that follow one another from `at`."""
        while (marker := self.specials.match(text, at)) and marker.end() > at:
            at = marker.end()
        return at

    def _closing(self) -> str | None:
        try:
            held = [dict(m) for m in _TWO_TURNS]
            held[1]["content"], held[3]["content"] = _PLACEHOLDER.format(0), _PLACEHOLDER.format(1)
            _, earlier, last = _cut_at_placeholders(self._render(held), [_PLACEHOLDER.format(k) for k in (0, 1)])
        except (Unmaskable, *TEMPLATE_ERRORS):
            return None
        common = os.path.commonprefix([earlier, last])
        if self.specials.match(earlier) or self.specials.match(last):
            return common[: self._run(common, 0)] or None
        # A marker of plain text (a tokenizer without the template's special tokens): up to the
        # whitespace the template writes after it.
        return common.split()[0] if common.strip() and not common[0].isspace() else None

    def find(self, messages: Sequence[dict], trained: Sequence[int], tools: list | None = None) -> Rendered:
        """The rendering of `messages` and the spans of the assistant turns at indices `trained`
        (ascending). Raises Unmaskable, or what the template raises (TEMPLATE_ERRORS)."""
        if self.marked:
            return self._marked(messages, trained, tools)
        text = self._render(messages, tools)
        if _PLACEHOLDER.format("") in text:
            raise Unmaskable("the conversation holds hftextgen's placeholder text")
        starts = self._placed(text, messages, trained, tools)
        for n, i in enumerate(trained):  # a call without content: its content is not rendered
            if n not in starts:
                starts[n] = self._after_prompt(text, messages[:i], tools)
        order = sorted(starts, key=lambda n: starts[n][0])
        spans, answers = [], []
        for k, n in enumerate(order):
            start, search, stop = starts[n]
            stop = stop if stop is not None else starts[order[k + 1]][0] if k + 1 < len(order) else len(text)
            text_end, end = self._marker(text, search, stop, last=trained[n] == len(messages) - 1)
            if end > start:
                spans.append((start, end))
                answers.append(text[start:text_end])
        if not spans:
            raise Unmaskable("the template leaves the answers out")
        return Rendered(text, spans, answers)

    def _placed(self, text: str, messages, trained, tools) -> dict[int, tuple[int, int, int | None]]:
        """Per trained turn whose content the template renders: where its answer starts, and the
        span of the text the template writes after it (where its closing marker is)."""
        held = [dict(m) for m in messages]
        for n, i in enumerate(trained):
            held[i]["content"] = _PLACEHOLDER.format(n)
        rendering = self._render(held, tools)
        shown = [n for n in range(len(trained)) if _PLACEHOLDER.format(n) in rendering]
        if any(messages[trained[n]]["content"] for n in range(len(trained)) if n not in shown):
            raise Unmaskable("the template leaves an answer out")
        pieces = _cut_at_placeholders(rendering, [_PLACEHOLDER.format(n) for n in shown])
        if not text.startswith(pieces[0]):
            raise Unmaskable("the template renders the turns before the first answer differently")
        placed, at = {}, len(pieces[0])
        for k, n in enumerate(shown):
            content = messages[trained[n]]["content"]
            after, found = _find_after(text, pieces[k + 1], at, last=k == len(shown) - 1, empty=not content)
            seen = text[at:found].strip()
            if not (seen in content if content else not seen):
                raise Unmaskable("the template renders an answer out of place")
            placed[n] = (at, found, found + len(after))
            at = found + len(after)
        return placed

    def _after_prompt(self, text: str, before: Sequence[dict], tools) -> tuple[int, int, None]:
        """Where an answer whose content is not rendered (tool calls only) starts: after the
        generation prompt that follows the turns before it."""
        prompt = render(self.tokenizer, self.template, before, tools, prompt=True)
        if not text.startswith(prompt):
            raise Unmaskable("the template renders the turns before a tool call differently")
        return len(prompt), len(prompt), None

    def _marker(self, text: str, start: int, stop: int, last: bool) -> tuple[int, int]:
        """Where the closing marker of an answer followed by text[start:stop] starts and ends
        (both `start` when none: a template that ends turns with no special token)."""
        where = text.find(self.closing, start, stop) if self.closing else -1
        if where >= 0:
            return where, where + len(self.closing)
        marker = self.specials.search(text, start, stop)
        if marker is None:
            return start, start
        return marker.start(), self._run(text, marker.start()) if last else marker.end()

    def _marked(self, messages, trained, tools) -> Rendered:
        """The template's own {% generation %} spans, of the trained assistant turns."""
        rendered, indices = render_jinja_template(
            conversations=[list(messages)],
            tools=tools,
            chat_template=self.template,
            return_assistant_tokens_mask=True,
            **self.tokenizer.special_tokens_map,
        )
        text, spans = rendered[0], [tuple(s) for s in indices[0] if s[1] > s[0]]
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(trained) < len(assistants):  # a prompt's own answers: the span of each turn, in order
            if len(spans) != len(assistants):
                raise Unmaskable("the template's generation marks do not follow the assistant turns one to one")
            spans = [span for span, i in zip(spans, assistants, strict=True) if i in set(trained)]
        if not spans:
            raise Unmaskable("the template's generation marks leave the answers out")
        return Rendered(text, spans, [self.specials.sub("", text[s:e]) for s, e in spans])

    def end_of_turn_markers(self) -> list[str]:
        """The special tokens that end an assistant turn (what generation stops at, with the EOS),
        in order of appearance: those closing the answers of a two-turn conversation."""
        for probe in (_TWO_TURNS, _PROBE):
            try:
                rendered = self.find(probe, [1, 3][: len(probe) // 2])
            except (Unmaskable, *TEMPLATE_ERRORS):
                continue
            ends = [rendered.text[s:e][len(a) :] for (s, e), a in zip(rendered.spans, rendered.answers, strict=True)]
            return list(dict.fromkeys(m for end in ends for m in self.specials.findall(end)))
        return []


def _cut_at_placeholders(held: str, placeholders: Sequence[str]) -> list[str]:
    """The placeholder rendering's text before, between and after its placeholders, in order."""
    pieces, at = [], 0
    for placeholder in placeholders:
        where = held.find(placeholder, at)
        if where < 0 or held.count(placeholder) != 1:
            raise Unmaskable("the template writes an answer out of order, or more than once")
        pieces.append(held[at:where])
        at = where + len(placeholder)
    return [*pieces, held[at:]]


def _find_after(text: str, after: str, at: int, last: bool, empty: bool) -> tuple[str, int]:
    """Where the text the template writes after an answer starts in `text`, searching from `at`
    (the last answer's: the end of the text). `empty`: an answer without content (tool calls
    only), which some templates separate from a content by whitespace they then leave out."""
    for piece in (after, after.lstrip()) if empty else (after,):
        if last:
            found = len(text) - len(piece) if text.endswith(piece) else -1
            found = found if found >= at else -1
        else:
            found = text.find(piece, at) if piece else at
        if found >= 0:
            return piece, found
    raise Unmaskable("the template renders the text after an answer differently")


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, template: str) -> list[int]:
    """The token ids of the special tokens that end an assistant turn under `template`
    (AnswerFinder.end_of_turn_markers): what generation stops at, with the EOS."""
    markers = AnswerFinder(tokenizer, template).end_of_turn_markers()
    return [int(tokenizer.convert_tokens_to_ids(marker)) for marker in markers]
