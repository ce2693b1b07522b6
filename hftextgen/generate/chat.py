"""Chat with a model through its chat template: a conversation in the terminal, or a file of conversations answered.

The prompt is the model's own template rendered with `add_generation_prompt=True`, tokenized as
`tokenizer.apply_chat_template` tokenizes it (no special tokens added, no EOS in front): the same
tokens `transformers serve` and `pipeline(...)` feed the model, and the ones it was fine-tuned on.
Decoding is hftextgen.generate's: the recipe's preset, one seeded draw per answer (answer i of a
file uses generate.seed + i, whatever the batch), EOS or an end-of-turn token ends the answer:
those generation_config.json lists, and the chat template's own (data.end_of_turn_ids).

A conversation longer than the model's context less max_new_tokens loses its oldest exchanges
(a system turn stays), rather than sliding the window mid-turn as plain generation does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import jinja2
from transformers import PreTrainedModel, TextStreamer

from ..errors import UserError
from ..files import append_lines, write_atomic
from . import generator as generate
from .config import GenerateConfig

ROLES = ("system", "user", "assistant")
HELP = "Type a message and press Enter; /reset starts a new conversation, /exit or Ctrl-D ends."

Message = dict[str, str]


def _stdout(text: str) -> None:
    print(text, end="", flush=True)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def require_template(tok, model_name: str, flag: str = "--chat") -> None:
    """Fail in one line when the tokenizer cannot turn messages into a prompt."""
    if not getattr(tok, "chat_template", None):
        raise UserError(
            f"{flag}: {model_name} has no chat template, so messages cannot become a prompt: fine-tune it with "
            f"a task format (data.format messages or prompt_completion), or set tokenizer.chat_template"
        )


class ChatGenerator(generate.Generator):
    """A Generator whose prompts are rendered conversations: tokenized as apply_chat_template does,
    with nothing put in front (the template starts the conversation), and ended by the template's
    end-of-turn token (Llama 3's <|eot_id|>, ChatML's <|im_end|>) as by the EOS."""

    chat = True

    def _ids(self, prompt: str) -> list[int]:
        return self.tok(prompt, add_special_tokens=False)["input_ids"]

    def prompt_length(self, prompt: str) -> int:
        return len(self._ids(prompt))


def generator(lm: PreTrainedModel, tok, cfg: GenerateConfig) -> ChatGenerator:
    """A ChatGenerator on a copy of cfg: one answer per conversation."""
    gen = ChatGenerator(lm, tok, replace(cfg, num_return_sequences=1))
    if cfg.max_new_tokens >= gen.context:
        raise UserError(
            f"generate.max_new_tokens ({cfg.max_new_tokens}) leaves no room for the conversation in the model's "
            f"context ({gen.context} tokens): lower it"
        )
    return gen


def render(tok, messages: list[Message]) -> str:
    """The prompt text: the conversation and the header of the assistant's turn."""
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except jinja2.TemplateError as exc:  # a template that rejects the conversation (raise_exception)
        raise UserError(f"the chat template cannot render this conversation ({exc}): fix the messages") from None


def fit(gen: ChatGenerator, messages: list[Message]) -> tuple[list[Message], str] | None:
    """The conversation cut from the left until its prompt and max_new_tokens fit the context, and
    its prompt. Whole exchanges go, oldest first, so the kept part still starts with a user turn
    (templates that check alternation accept it); a system turn stays. None: the last user turn
    alone does not fit."""
    room = gen.context - gen.cfg.max_new_tokens
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system) :]
    while True:
        prompt = render(gen.tok, [*system, *rest])
        if gen.prompt_length(prompt) <= room:
            return [*system, *rest], prompt
        following = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), None)
        if following is None:
            return None
        rest = rest[following:]


def record(gen: ChatGenerator, messages: list[Message], sample: generate.Sample, model_name: str) -> dict:
    """A JSONL record: the conversation with its answer, then generate's record of the sample
    (seed, settings, how it ended), whose `prompt` is the rendered template the model continued and
    `completion` the answer: generations.jsonl's readers find the fields they know."""
    answer = {"role": "assistant", "content": sample.completion}
    return {"messages": [*messages, answer], **gen.record(sample, model_name)}


class _Echo(TextStreamer):
    """TextStreamer that hands the answer's text to `write` as it comes, special tokens left out
    (an EOS or end-of-turn token ends the turn; it is not part of what the model said)."""

    def __init__(self, tok, write: Callable[[str], None]):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.write = write

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.write(text + ("\n" if stream_end else ""))


def converse(
    lm: PreTrainedModel,
    tok,
    cfg: GenerateConfig,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = _stdout,
    note: Callable[[str], None] = _stderr,
    *,
    output: Path | None = None,
    model_name: str | None = None,
) -> list[Message]:
    """A conversation in the terminal: each line read is a user turn, the answer is streamed to
    `write` and becomes the assistant turn. /reset starts over, /exit or EOF ends. Answer n of
    the session is drawn with generate.seed + n; with `output`, each answer's record is appended
    there. Returns the conversation as it stands at the end."""
    name = model_name or lm.name_or_path
    require_template(tok, name)
    gen = generator(lm, tok, cfg)
    start = [{"role": "system", "content": system}] if system else []
    messages, answers = list(start), 0
    note(HELP)
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(start)
            note("(a new conversation)")
            continue
        if not line.strip():
            continue
        fitted = fit(gen, [*messages, {"role": "user", "content": line}])
        if fitted is None:
            note(
                f"(that message does not fit the model's context of {gen.context} tokens with "
                f"max_new_tokens {gen.cfg.max_new_tokens}: send a shorter one)"
            )
            continue
        kept, prompt = fitted
        if len(kept) <= len(messages):
            note(f"(the oldest turns were left out: the conversation outgrew the context of {gen.context} tokens)")
        gen.cfg.seed = cfg.seed + answers  # a new draw each answer; the record keeps its seed
        sample = _answer(gen, prompt, write)
        messages = [*kept, {"role": "assistant", "content": sample.completion}]
        if output is not None:
            append_lines(output, [json.dumps(record(gen, kept, sample, name), ensure_ascii=False)])
        answers += 1
    if output is not None and answers:
        note(f"{answers} answers appended to {output}")
    return messages


def _answer(gen: ChatGenerator, prompt: str, write: Callable[[str], None]) -> generate.Sample:
    """One answer, its tokens written as they come (beam search cannot stream: written at the end)."""
    if gen.settings["num_beams"] > 1:
        sample = gen([prompt])[0]
        write(sample.completion + "\n")
        return sample
    return gen([prompt], streamer=_Echo(gen.tok, write))[0]


def read_conversations(path: Path) -> list[tuple[int, list[Message]]]:
    """The conversations of a JSONL file, {"messages": [{role, content}, ...]} per line, each
    ending with the user turn to answer, with their line numbers; all checked before any work."""
    if not path.is_file():
        raise UserError(f"--messages: no such file: {path}")
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"--messages: {path} line {number}"
        try:
            messages = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f'{where} is not a JSON object with a "messages" list: write one {{"messages": [{{"role": ..., '
                f'"content": ...}}, ...]}} per line'
            ) from None
        _check(messages, where)
        conversations.append((number, messages))
    if not conversations:
        raise UserError(f'--messages: {path} holds no conversations: write one {{"messages": [...]}} per line')
    return conversations


def _check(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f'{where}: each message must be an object with a "role" and a string "content"')
        if message.get("role") not in ROLES:
            raise UserError(f"{where}: role {message.get('role')!r} is not one of {', '.join(ROLES)}: fix that role")
    if messages[-1]["role"] != "user":
        raise UserError(
            f"{where}: the conversation ends with a {messages[-1]['role']} turn: end it with the user turn "
            f"to answer (drop the last {messages[-1]['role']} turn)"
        )


def answer_file(
    lm: PreTrainedModel,
    tok,
    cfg: GenerateConfig,
    path: Path,
    output: Path,
    *,
    model_name: str | None = None,
) -> int:
    """Answer each conversation of a JSONL file (read_conversations) and write one record per
    conversation to `output` (put in place whole): its messages plus the assistant's answer.
    Conversation i is drawn with generate.seed + i, so the same file gives the same answers,
    batched or not. Returns the number of answers."""
    name = model_name or lm.name_or_path
    require_template(tok, name, "--messages")
    conversations = read_conversations(Path(path))
    gen = generator(lm, tok, cfg)
    prompts, dropped = [], []  # dropped: the oldest messages left out for the context
    for number, messages in conversations:  # every conversation checked before the first answer
        try:
            fitted = fit(gen, messages)
        except UserError as exc:
            raise UserError(f"--messages: {path} line {number}: {exc}") from None
        if fitted is None:
            raise UserError(
                f"--messages: {path} line {number}: its last user turn does not fit the model's context "
                f"({gen.context} tokens) with max_new_tokens {gen.cfg.max_new_tokens}: shorten it, or lower "
                f"generate.max_new_tokens"
            )
        prompts.append(fitted[1])
        dropped.append(len(messages) - len(fitted[0]))
    samples = gen(prompts, desc="Answering")
    lines = [
        json.dumps({**record(gen, messages, sample, name), "line": number, "dropped": cut}, ensure_ascii=False)
        for (number, messages), sample, cut in zip(conversations, samples, dropped, strict=True)
    ]
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(output), "".join(line + "\n" for line in lines))
    return len(lines)
