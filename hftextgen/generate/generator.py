"""Generate stage: decoding presets, batched generation with a seed per sample, and streaming.

A prompt follows what it followed in training, as the run saved it in generation_config.json
(model.set_generation): a text model's after an EOS (a new document, as in training: an empty
prompt is an unconditional sample), a prompt/completion model's after the tokenizer's special
tokens (its BOS, where it adds one), a conversation after nothing (the template starts it). A
sample ends at any of generation_config.eos_token_id (the EOS, a chat template's end of turn).

Sampling draws each sample from its own seed: argmax(logits + Gumbel noise) is an exact draw
from softmax(logits), and the noise for sample i at step t is a hash of (seed + i, t, token).
So a sample does not depend on which other prompts shared its batch, or on the batch size:
its JSONL record reproduces it alone (`--generate.seed <its seed>`).

A model whose context is shorter than prompt + max_new_tokens keeps generating by sliding its
window: it continues from the last context - context // 2 tokens, half a context at a time. The
context is the positions the model was built for (model.context_length: GPT-2's n_positions,
max_position_embeddings elsewhere); RoPE models could run past it, but on positions they never
trained on, so they slide too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel

from .. import model as model_stage
from .. import progress
from ..data import end_of_turn_ids
from ..errors import UserError
from ..files import append_lines, write_atomic
from .config import NEUTRAL, GenerateConfig
from .sampling import UNSAMPLED, SeededGumbel, warpers


@dataclass
class Sample:
    """One generated text and everything needed to generate it again."""

    prompt: str
    completion: str
    seed: int
    """The seed this sample was drawn with (generate.seed + its index)."""
    index: int
    new_tokens: int
    finish: str
    """eos (the model ended the document), stop (a stop string), or length (max_new_tokens)."""


def read_prompts(cfg: GenerateConfig) -> list[str]:
    """generate.prompts_file's prompts, else generate.prompts; none: one unconditional sample."""
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        prompts = []
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise UserError(f"generate.prompts_file: no such file: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    prompts.append(record["prompt"] if isinstance(record, dict) else record)
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(
                        f'generate.prompts_file: {path} line {number} is not a JSON object with a "prompt" '
                        f"field: fix that line, or use a .txt file with one prompt per line"
                    ) from None
        else:
            prompts += [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UserError(
                f"generate.prompts_file: {path} holds no prompts: write one per line (or a JSONL "
                f'"prompt" field per line), or drop the option'
            )
    return prompts if prompts else [""]


def end_ids(lm: PreTrainedModel, tok, chat: bool = False) -> list[int]:
    """The tokens that end a sample: the tokenizer's EOS and generation_config.eos_token_id (a
    run's holds its chat template's end of turn too); with `chat`, the end of turn of the
    tokenizer's chat template as well (a model saved before its config listed it, or given a
    template of its own)."""
    own = lm.generation_config.eos_token_id if lm.generation_config is not None else None
    ends = [tok.eos_token_id, *([own] if isinstance(own, int) else own or [])]
    if chat and getattr(tok, "chat_template", None):
        ends += end_of_turn_ids(tok, tok.chat_template)
    return list(dict.fromkeys(int(i) for i in ends if i is not None))


class Generator:
    """Batched generation for one model and one set of decoding settings."""

    chat = False  # whether the prompts are conversations (ChatGenerator): their end of turn ends them

    def __init__(self, lm: PreTrainedModel, tok, cfg: GenerateConfig):
        self.lm, self.tok, self.cfg = lm, tok, cfg
        self.settings = cfg.settings()
        self.context = model_stage.context_length(lm) or model_stage.DEFAULT_CONTEXT
        self.eos = tok.eos_token_id
        if self.eos is None:
            raise UserError("the tokenizer has no EOS token, which marks where documents start and end")
        self.ends = end_ids(lm, tok, self.chat)
        # Models that do not say (hub models, runs saved before): after an EOS, as before.
        self.prompt_context = getattr(lm.generation_config, model_stage.PROMPT_CONTEXT, None) or "document"
        self.fast = None  # generate.cache static: hftextgen.generate.static's loop instead of generate's (see _run)
        if cfg.cache == "static":
            from .static import StaticDecoder

            self.fast = StaticDecoder.create(lm)

    def record(self, sample: Sample, model_name: str) -> dict:
        """A JSONL record: the sample and every setting that produced it."""
        return {
            **asdict(sample),
            "model": model_name,
            "preset": self.cfg.preset,
            "settings": self.settings,
            "max_new_tokens": self.cfg.max_new_tokens,
            "stop": self.cfg.stop,
        }

    def __call__(self, prompts: list[str], streamer=None, desc: str | None = None) -> list[Sample]:
        """Samples of the prompts, in order; `desc` names a progress bar over them."""
        n = self.cfg.num_return_sequences
        beams = self.settings["num_beams"] > 1
        rows = [(p, i * n + j) for i, p in enumerate(prompts) for j in range(1 if beams else n)]
        samples: list[Sample] = []
        size = self.cfg.batch_size
        # A bar only when there is more than one batch to watch.
        shown = progress.bar(len(rows), desc or "", "samples", show=bool(desc) and len(rows) > size)
        for first in range(0, len(rows), size):
            batch = rows[first : first + size]
            if beams:
                samples += self._beam(batch)
            else:
                samples += self._decode(batch, streamer)
            shown.update(len(batch))
        shown.close()
        return samples

    def _ids(self, prompt: str) -> list[int]:
        """The prompt's tokens after what it followed in training; with nothing before or in it,
        the EOS (a new document)."""
        ids = self.tok(prompt, add_special_tokens=self.prompt_context == "prompt")["input_ids"]
        return [self.eos, *ids] if self.prompt_context == "document" or not ids else ids

    @torch.inference_mode()
    def _run(self, windows: list[list[int]], new: int, processors: list, n_return: int = 1, streamer=None):
        """One generate call over left-padded windows; returns the new tokens of each row."""
        width = max(len(w) for w in windows)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        ids = torch.tensor([[pad] * (width - len(w)) + w for w in windows])
        mask = torch.tensor([[0] * (width - len(w)) + [1] * len(w) for w in windows])
        s = self.settings
        config = GenerationConfig(
            **UNSAMPLED,
            max_new_tokens=new,
            num_beams=s["num_beams"],
            num_return_sequences=n_return,
            repetition_penalty=s["repetition_penalty"],
            no_repeat_ngram_size=s["no_repeat_ngram_size"],
            stop_strings=self.cfg.stop or None,
            eos_token_id=self.ends,
            pad_token_id=pad,
            bos_token_id=self.eos,
            cache_implementation=None if self.cfg.cache == "dynamic" else self.cfg.cache,
        )
        if self.fast is not None:
            fast = self.fast(ids, mask, config, processors, self.tok if self.cfg.stop else None, streamer)
            if fast is not None:
                return fast
        device = self.lm.device
        out = self.lm.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            logits_processor=processors,
            tokenizer=self.tok if self.cfg.stop else None,
            streamer=streamer,
        )
        return out[:, width:].tolist()

    def _finish(self, prompt: str, index: int, new_ids: list[int], ended: bool) -> tuple[Sample, bool]:
        """Cut new_ids at the first end token or stop string; returns the sample and whether it is done."""
        finish = "length"
        cut = next((k for k, t in enumerate(new_ids) if t in self.ends), None)
        if cut is not None:
            new_ids, finish = new_ids[:cut], "eos"
        text = self.tok.decode(new_ids)
        cuts = [text.find(s) for s in self.cfg.stop if s in text]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
        done = finish != "length" or ended
        sample = Sample(prompt, text, self.cfg.seed + index, index, len(new_ids), finish)
        return sample, done

    def _decode(self, batch: list[tuple[str, int]], streamer) -> list[Sample]:
        """Greedy or seeded sampling, sliding the window for a short context."""
        history = {index: self._ids(prompt) for prompt, index in batch}
        prompt_len = {index: len(ids) for index, ids in history.items()}
        finished: dict[int, Sample] = {}
        prompts = {index: prompt for prompt, index in batch}
        sampling = self.settings["do_sample"]
        while len(finished) < len(batch):
            # A row's windows depend only on its own length, so batching never changes a sample;
            # rows that generate the same number of tokens next run together, left-padded.
            groups: dict[int, list[tuple[int, int]]] = {}
            for index in prompts:
                if index in finished:
                    continue
                remaining = self.cfg.max_new_tokens - (len(history[index]) - prompt_len[index])
                keep, new = self._next_window(len(history[index]), remaining)
                groups.setdefault(new, []).append((index, keep))
            for new, group in groups.items():
                indices = [i for i, _ in group]
                windows = [history[i][-keep:] for i, keep in group]
                processors = []
                if sampling:
                    done = [len(history[i]) - prompt_len[i] for i in indices]
                    seeds = [self.cfg.seed + i for i in indices]
                    start = max(len(w) for w in windows)
                    processors = [*warpers(self.settings), SeededGumbel(seeds, done, start)]
                outputs = self._run(windows, new, processors, streamer=streamer)
                for i, out in zip(indices, outputs, strict=True):
                    history[i] += out
                    generated = history[i][prompt_len[i] :]
                    last = len(generated) >= self.cfg.max_new_tokens or len(out) < new
                    sample, done_now = self._finish(prompts[i], i, generated, last)
                    if done_now:
                        finished[i] = sample
        return [finished[index] for _, index in batch]

    def _next_window(self, length: int, remaining: int) -> tuple[int, int]:
        """(tokens of history to keep, tokens to generate) for the next window."""
        if length + remaining <= self.context:
            return length, remaining
        new = min(remaining, self.context // 2)
        keep = min(length, self.context - new)
        return keep, min(remaining, self.context - keep)

    def _beam(self, batch: list[tuple[str, int]]) -> list[Sample]:
        n = self.cfg.num_return_sequences
        windows = [self._ids(prompt) for prompt, _ in batch]
        longest = max(len(w) for w in windows)
        if longest + self.cfg.max_new_tokens > self.context:
            raise UserError(
                f"generate: beam search cannot slide its window: prompt ({longest} tokens) + max_new_tokens "
                f"({self.cfg.max_new_tokens}) must fit the model's context ({self.context}): lower "
                f"generate.max_new_tokens, or use a sampling or greedy preset"
            )
        outputs = self._run(windows, self.cfg.max_new_tokens, [], n_return=n)
        samples = []
        for row, out in enumerate(outputs):
            prompt, first = batch[row // n]
            samples.append(self._finish(prompt, first + row % n, out, True)[0])
        return samples


def write_samples(samples: list[Sample], generator: Generator, model_name: str, path: Path, append: bool) -> None:
    """JSONL records, one per sample: appended after earlier ones, or a new file put in place whole."""
    lines = [json.dumps(generator.record(s, model_name), ensure_ascii=False) for s in samples]
    path.parent.mkdir(parents=True, exist_ok=True)
    if append:
        append_lines(path, lines)
    else:
        write_atomic(path, "".join(line + "\n" for line in lines))


def samples_markdown(samples: list[Sample], generator: Generator, title: str) -> str:
    s = generator.settings
    shown = ", ".join(f"{k} {v}" for k, v in s.items() if v != NEUTRAL[k])
    lines = [
        f"# {title}",
        "",
        f"Preset `{generator.cfg.preset}` ({shown or 'no filtering'}), max_new_tokens {generator.cfg.max_new_tokens}.",
        "",
    ]
    for sample in samples:
        lines += [
            f"## Sample {sample.index} (seed {sample.seed}, {sample.new_tokens} tokens, ended by {sample.finish})",
            "",
            "```text",
            sample.prompt + sample.completion,
            "```",
            "",
        ]
    return "\n".join(lines)
