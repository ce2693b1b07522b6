"""Evaluate stage for task data: held-out answers scored given their prompts, and answers generated beside the references.

Task data holds, per example, token ids and a mask of the trained tokens: the answers (a
completion and its EOS, or every assistant turn of a chat and its end-of-turn token), after the
prompt they answer. The evaluator reads held-out examples so:

Scoring. Each example is scored alone, as it was trained (packing isolates examples): one forward
pass over its ids, and the loss of the token at t + 1 predicted at t counted wherever t + 1 is
trained. Prompt tokens are context only. Totals are float64 sums over the trained tokens, never
means of per-example or per-batch means, so they depend neither on batching nor on padding.
perplexity = exp(NLL / answer tokens); bits_per_byte = NLL / ln 2 / UTF-8 bytes of the answers
(which compares models with different tokenizers).

Answers. The prompt of an example is its ids before its last trained span; the reference is that
span's text without its end token (EOS or the template's end-of-turn marker). The model answers
the first N prompts with the recipe's decoding settings; sample i is drawn from seed + i alone
(hftextgen.generate's seeded Gumbel noise), so a rerun, or another batch size, gives the same
text. Exact match and F1 are SQuAD's (hftextgen/metrics/answers).

Files: eval.json / eval.md (the scores and the match rates) and samples.jsonl / samples.md (each
prompt, reference and answer with its seed and decoding settings), each put in place whole.
"""  # noqa: E501 (the summary line is the stage's one-line description, kept whole)

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import progress
from ..errors import UserError
from ..files import write_atomic, write_json
from .run import eval_record, load_metric, nll_rows

if TYPE_CHECKING:
    from ..generate import GenerateConfig


@dataclass
class Examples:
    """Held-out task examples as they were prepared: ids and trained-token masks, one each."""

    ids: list[np.ndarray]
    """Token ids (int) of each example, prompt first; at most data.block_size of them."""
    masks: list[np.ndarray]
    """True where the token is trained (an answer token or the end token after it)."""
    names: list[str]
    """Where each example came from (file and record), for the samples."""
    answer_bytes: list[int]
    """UTF-8 bytes of each example's trained text: bits per byte divides by their sum."""
    split_examples: int
    """Examples in the split these were drawn from (more when they are a sample of it)."""
    split_tokens: int
    """Tokens of that split."""

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not len(self.masks) == len(self.names) == len(self.answer_bytes) == n:
            raise ValueError("Examples: ids, masks, names and answer_bytes must have one entry per example")
        for i, (ids, mask) in enumerate(zip(self.ids, self.masks, strict=True)):
            if len(ids) != len(mask):
                raise ValueError(f"Examples: example {i} has {len(ids)} ids but a mask of {len(mask)}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.ids)


# -- scoring ---------------------------------------------------------------------------------


def trained_targets(mask: np.ndarray) -> np.ndarray:
    """Positions t >= 1 whose token is trained: each is predicted at t - 1. A trained first token
    has nothing before it to be predicted from (in training neither), so it is not counted."""
    positions = np.flatnonzero(np.asarray(mask, dtype=bool))
    return positions[positions >= 1]


def _batch(
    examples: Examples, order: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Right-padded ids, attention mask and the positions whose next token is trained, of the
    examples `order` names; with the targets and which example each belongs to."""
    width = max(len(examples.ids[i]) for i in order)
    ids = torch.zeros(len(order), width, dtype=torch.long)
    attention = torch.zeros(len(order), width, dtype=torch.long)
    keep = torch.zeros(len(order), width, dtype=torch.bool)
    targets: list[int] = []
    owner: list[int] = []
    for row, i in enumerate(order):
        example = torch.as_tensor(np.asarray(examples.ids[i], dtype=np.int64))
        ids[row, : len(example)] = example
        attention[row, : len(example)] = 1
        at = trained_targets(examples.masks[i])
        keep[row, torch.as_tensor(at - 1, dtype=torch.long)] = True
        # The model returns kept positions row by row, in order: the targets follow that order.
        targets += example[torch.as_tensor(at, dtype=torch.long)].tolist()
        owner += [i] * len(at)
    return ids, attention, keep, targets, owner


@torch.inference_mode()
def score_examples(lm, examples: Examples, batch_size: int, bf16: bool = False) -> tuple[list[float], list[int]]:
    """(summed NLL in nats, trained tokens scored) per example."""
    # Longest first: similar lengths share a batch, so little padding.
    order = sorted(range(len(examples)), key=lambda i: len(examples.ids[i]), reverse=True)
    nll = torch.zeros(len(examples), dtype=torch.float64)
    counts = [len(trained_targets(m)) for m in examples.masks]
    device = lm.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    shown = progress.bar(len(order), "Scoring answers", "examples")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, attention, keep, targets, owner = _batch(examples, chunk)
        if targets:
            with autocast:
                # logits_to_keep as a [batch, width] bool mask: logits of the kept positions
                # only, flattened row by row (transformers' slice_logits_to_keep).
                out = lm(input_ids=ids.to(device), attention_mask=attention.to(device), logits_to_keep=keep.to(device))
            losses = nll_rows(out.logits, torch.tensor(targets, device=device))
            del out  # one batch of logits at a time
            nll.index_add_(0, torch.tensor(owner), losses.double().cpu())
        shown.update(len(chunk))
    shown.close()
    return nll.tolist(), counts


def score_answers(lm, examples: Examples, batch_size: int, bf16: bool = False) -> dict:
    """Answer perplexity and bits per byte of the examples' trained tokens given their prompts.

    Returns answers (examples scored), answer_tokens, answer_bytes, nll (nats, summed), loss
    (nats per answer token), perplexity, bits_per_byte, precision, seconds, tokens_per_second."""
    context, longest = context_of(lm), max((len(ids) for ids in examples.ids), default=0)
    if context is not None and longest > context:
        raise UserError(
            f"evaluation: a held-out example holds {longest} tokens, more than the model's context ({context}): "
            f"prepare the data with a data.block_size of at most {context}"
        )
    started = time.perf_counter()
    nll, counts = score_examples(lm, examples, batch_size, bf16=bf16)
    seconds = time.perf_counter() - started
    tokens = sum(counts)
    if tokens == 0:
        raise UserError("evaluation: the held-out examples hold no answer tokens to score: check the data section")
    total = math.fsum(nll)  # in example order: the same sum whatever the batches were
    n_bytes = sum(examples.answer_bytes)
    return {
        "answers": len(examples),
        "answer_tokens": tokens,
        "answer_bytes": n_bytes,
        "nll": total,
        "loss": total / tokens,
        "perplexity": math.exp(total / tokens),
        "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else float("nan"),
        "precision": "bf16" if bf16 else "fp32",
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
    }


# -- prompts and references ------------------------------------------------------------------


@dataclass
class Question:
    """One held-out example as a question: what the model is given, and the answer it was taught."""

    index: int
    name: str
    prompt_ids: list[int]
    """The ids before the example's last trained span."""
    reference_ids: list[int]
    """That span's ids, its end token included."""
    reference: str
    """That span's text without its end token, special tokens dropped, stripped."""


def last_span(mask: np.ndarray) -> tuple[int, int] | None:
    """[start, stop) of the last run of trained tokens; None when nothing is trained."""
    positions = np.flatnonzero(np.asarray(mask, dtype=bool))
    if len(positions) == 0:
        return None
    stop = int(positions[-1]) + 1
    start = stop - 1
    while start > 0 and mask[start - 1]:
        start -= 1
    return start, stop


def end_ids(tok, extra: Iterable[int] = ()) -> set[int]:
    """The tokens that end an answer: the tokenizer's EOS and `extra` (a chat template's
    end-of-turn marker, e.g. <|im_end|>, where it is not the EOS)."""
    ends = {int(i) for i in extra}
    if tok.eos_token_id is not None:
        ends.add(int(tok.eos_token_id))
    if not ends:
        raise UserError("the tokenizer has no EOS token and no end-of-turn token was given: answers would never end")
    return ends


def reference_text(tok, span: list[int], ends: set[int]) -> str:
    """The answer a span teaches: its end token is what stops generation, not part of the answer."""
    if span and span[-1] in ends:
        span = span[:-1]
    return tok.decode(span, skip_special_tokens=True).strip()


def questions(examples: Examples, tok, ends: set[int], limit: int | None = None) -> list[Question]:
    """The first `limit` examples (all: None) as prompts and references; an example with no
    trained token has no answer to ask for and is left out."""
    out: list[Question] = []
    for i in range(len(examples) if limit is None else min(limit, len(examples))):
        span = last_span(examples.masks[i])
        if span is None:
            continue
        ids = [int(t) for t in examples.ids[i]]
        taught = ids[span[0] : span[1]]
        out.append(Question(i, examples.names[i], ids[: span[0]], taught, reference_text(tok, taught, ends)))
    return out


# -- generated answers -----------------------------------------------------------------------


@dataclass
class Answer:
    """A generated answer beside its reference, and everything needed to generate it again."""

    index: int
    """The example's position among the held-out examples."""
    name: str
    prompt: str
    """The prompt's text, special tokens (template markers) shown as the model saw them."""
    reference: str
    answer: str
    seed: int
    """generate.seed + index: the answer depends on this seed alone, not on its batch."""
    new_tokens: int
    finish: str
    """eos (an end token), stop (a stop string), or length (max_new_tokens, or the context)."""


def context_of(lm) -> int | None:
    """Positions the model knows: GPT-2's n_positions, max_position_embeddings elsewhere."""
    config = lm.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _budget(lm, prompt: list[int], max_new_tokens: int) -> int:
    """New tokens a prompt leaves room for: an answer never slides past the model's context
    (the example it came from fitted data.block_size, so the prompt leaves at least one)."""
    context = context_of(lm)
    return max_new_tokens if context is None else max(1, min(max_new_tokens, context - len(prompt)))


def _finish(tok, new: list[int], ends: set[int], stop: list[str]) -> tuple[str, int, str]:
    """(answer text, new tokens, finish) of one row's new tokens: cut at the first end token,
    then before the first stop string."""
    finish = "length"
    cut = next((k for k, t in enumerate(new) if t in ends), None)
    if cut is not None:
        new, finish = new[:cut], "eos"
    text = tok.decode(new, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s in text]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    return text.strip(), len(new), finish


@torch.inference_mode()
def _generate(lm, tok, prompts: list[list[int]], seeds: list[int], new: int, cfg: GenerateConfig, ends: set[int]):
    """One lm.generate call over left-padded prompts; the new tokens of each row."""
    from transformers import GenerationConfig

    from ..generate import UNSAMPLED, SeededGumbel, warpers

    settings = cfg.settings()
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(ends)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    processors = []
    if settings["do_sample"]:
        # Sampling as argmax(logits + noise hashed from the row's seed): a draw that does not
        # depend on the other rows, so batches never change an answer.
        processors = [*warpers(settings), SeededGumbel(seeds, [0] * len(prompts), width)]
    config = GenerationConfig(
        **UNSAMPLED,
        max_new_tokens=new,
        num_beams=settings["num_beams"],
        repetition_penalty=settings["repetition_penalty"],
        no_repeat_ngram_size=settings["no_repeat_ngram_size"],
        eos_token_id=sorted(ends),
        pad_token_id=pad,
    )
    out = lm.generate(
        input_ids=ids.to(lm.device),
        attention_mask=attention.to(lm.device),
        generation_config=config,
        logits_processor=processors,
    )
    return out[:, width:].tolist()


def generate_answers(lm, tok, asked: list[Question], cfg: GenerateConfig, ends: set[int]) -> list[Answer]:
    """An answer to each question with the decoding settings of `cfg` (hftextgen's
    GenerateConfig: preset and overrides, max_new_tokens, seed, batch_size, stop), in order."""
    # Nothing before the answer: start a new document, as training data starts after an EOS.
    first_token = tok.eos_token_id if tok.eos_token_id is not None else min(ends)
    start = [q.prompt_ids or [first_token] for q in asked]
    budget = [_budget(lm, p, cfg.max_new_tokens) for p in start]
    # Rows that may generate as many tokens run together (a shared max_new_tokens would let a
    # row's neighbours decide where it stops); left-padded, cfg.batch_size at a time.
    groups: dict[int, list[int]] = {}
    for k, b in enumerate(budget):
        groups.setdefault(b, []).append(k)
    texts: dict[int, tuple[str, int, str]] = {}
    shown = progress.bar(len(asked), "Answering", "answers", show=len(asked) > cfg.batch_size)
    for new, rows in groups.items():
        for first in range(0, len(rows), cfg.batch_size):
            batch = rows[first : first + cfg.batch_size]
            seeds = [cfg.seed + asked[k].index for k in batch]
            outputs = _generate(lm, tok, [start[k] for k in batch], seeds, new, cfg, ends)
            for k, out in zip(batch, outputs, strict=True):
                texts[k] = _finish(tok, out, ends, list(cfg.stop))
            shown.update(len(batch))
    shown.close()
    answers = []
    for k, q in enumerate(asked):
        text, new_tokens, finish = texts[k]
        prompt = tok.decode(q.prompt_ids)
        answers.append(Answer(q.index, q.name, prompt, q.reference, text, cfg.seed + q.index, new_tokens, finish))
    return answers


# -- metrics and files -----------------------------------------------------------------------


def match_answers(answers: list[Answer]) -> dict:
    """SQuAD's exact match and F1 (percent) over the answers, and each answer's (fraction)."""
    if not answers:
        return {"exact_match": None, "f1": None, "answers": 0, "exact_match_each": [], "f1_each": []}
    metric = load_metric("answers")
    return metric.compute(predictions=[a.answer for a in answers], references=[a.reference for a in answers])


def settings_of(cfg: GenerateConfig) -> dict:
    """Every decoding setting an answer was generated with: a record reproduces it alone."""
    return {
        "preset": cfg.preset,
        "settings": cfg.settings(),
        "max_new_tokens": cfg.max_new_tokens,
        "stop": list(cfg.stop),
    }


def sample_records(answers: list[Answer], match: dict, cfg: GenerateConfig, model_name: str) -> list[dict]:
    decoding = settings_of(cfg)
    return [
        {
            **asdict(a),
            "exact_match": match["exact_match_each"][k],
            "f1": round(match["f1_each"][k], 4),
            "model": model_name,
            **decoding,
        }
        for k, a in enumerate(answers)
    ]


def samples_markdown(records: list[dict], title: str) -> str:
    lines = [f"# {title}", ""]
    if records:
        first = records[0]
        shown = ", ".join(f"{k} {v}" for k, v in first["settings"].items())
        lines += [f"Preset `{first['preset']}` ({shown}), max_new_tokens {first['max_new_tokens']}.", ""]
    for r in records:
        lines += [
            f"## Example {r['index']}: {r['name']} (seed {r['seed']}, {r['new_tokens']} tokens, ended by "
            f"{r['finish']}; exact match {r['exact_match']:.0f}, F1 {r['f1']:.2f})",
            "",
            "Prompt:",
            "",
            "```text",
            r["prompt"],
            "```",
            "",
            "Reference:",
            "",
            "```text",
            r["reference"],
            "```",
            "",
            "Generated:",
            "",
            "```text",
            r["answer"],
            "```",
            "",
        ]
    return "\n".join(lines)


def describe(examples: Examples) -> str:
    """Which examples were scored, in words, for eval.json's "data"."""
    n, whole = len(examples), len(examples) == examples.split_examples
    which = f"all {n:,} held-out examples" if whole else f"{n:,} of the {examples.split_examples:,} held-out examples"
    shown = ", ".join(examples.names[:4]) + (f" and {n - 4:,} more" if n > 4 else "")
    return f"{which} ({examples.split_tokens:,} tokens in the split; {shown})"


def markdown(result: dict, records: list[dict]) -> str:
    lines = [
        f"# Evaluation of {result['model']} on held-out answers",
        "",
        f"Data: {result['data']}.",
        "",
        "| metric | value | over |",
        "|---|---|---|",
        f"| answer perplexity | {result['perplexity']:.3f} | {result['answer_tokens']:,} answer tokens |",
        f"| bits per byte | {result['bits_per_byte']:.4f} | {result['answer_bytes']:,} UTF-8 bytes |",
        f"| loss (nats/token) | {result['loss']:.4f} | {result['answers']:,} answers |",
    ]
    samples = result.get("samples")
    if samples:
        lines += [
            f"| exact match (%) | {samples['exact_match']:.1f} | {samples['count']:,} generated answers |",
            f"| F1 (%) | {samples['f1']:.1f} | {samples['count']:,} generated answers |",
        ]
    lines += [
        "",
        f"Answers scored given their prompts, {result['precision']}; {result['tokens_per_second']:,.0f} tokens/s.",
    ]
    if samples:
        lines += [
            "",
            f"Generated with preset `{samples['preset']}`, seed {samples['seed']} + index. All answers: samples.md.",
            "",
        ]
        for r in records[:3]:
            lines += [f"- reference: {r['reference']!r}", f"  generated: {r['answer']!r}"]
    return "\n".join(lines) + "\n"


def run_answers(
    lm,
    tok,
    examples: Examples,
    *,
    out_dir: Path,
    model_name: str,
    generate_cfg: GenerateConfig,
    n_samples: int,
    batch_size: int = 8,
    bf16: bool | None = None,
    end_tokens: Iterable[int] = (),
    data_description: str | None = None,
    say=print,
) -> dict:
    """Score the examples' answers, answer the first `n_samples` prompts, and write eval.json,
    eval.md, samples.jsonl and samples.md into out_dir (the samples files only with n_samples).
    `end_tokens`: end-of-turn tokens besides the EOS and the model's own (generation_config's
    eos_token_id, the chat template's end of turn). Returns eval.json's content."""
    if len(examples) == 0:
        raise UserError("evaluation: no held-out examples to score: hold some out in the data section")
    if bf16 is None:  # as the text evaluator: bf16 where the GPU has it
        bf16 = lm.device.type == "cuda" and torch.cuda.is_bf16_supported()
    from ..generate import end_ids as model_ends

    # What ends an answer in training ends it here: the EOS, the end of turn the run saved in
    # generation_config.json, and the chat template's (a run saved before the config held it).
    ends = end_ids(tok, [*end_tokens, *model_ends(lm, tok, chat=True)])
    say(f"evaluating {model_name} on {len(examples):,} held-out answers ({examples.tokens:,} tokens) ...")
    metrics = score_answers(lm, examples, batch_size, bf16=bf16)
    metrics.update(split_examples=examples.split_examples, split_tokens=examples.split_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_info, records = None, []
    asked = questions(examples, tok, ends, limit=n_samples) if n_samples > 0 else []
    if asked:
        answers = generate_answers(lm, tok, asked, generate_cfg, ends)
        match = match_answers(answers)
        records = sample_records(answers, match, generate_cfg, model_name)
        write_atomic(out_dir / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        write_atomic(out_dir / "samples.md", samples_markdown(records, f"Answers of {model_name}"))
        samples_info = {
            "count": len(answers),
            "exact_match": match["exact_match"],
            "f1": match["f1"],
            "seed": generate_cfg.seed,
            **settings_of(generate_cfg),
        }
    result = eval_record(model_name, data_description or describe(examples), metrics, samples_info)
    write_json(out_dir / "eval.json", result)
    write_atomic(out_dir / "eval.md", markdown(result, records))
    matched = ""
    if samples_info:
        em, f1 = samples_info["exact_match"], samples_info["f1"]
        matched = f", exact match {em:.1f}%, F1 {f1:.1f}% ({len(records):,} generated)"
    say(
        f"answer perplexity {result['perplexity']:.3f}, bits-per-byte {result['bits_per_byte']:.4f} "
        f"({result['answers']:,} answers, {result['answer_tokens']:,} tokens)"
        f"{matched}; results in {out_dir / 'eval.json'}"
    )
    return result


def evaluate_answers(lm, tok, packed, split: str, *, cfg, generate_cfg, out_dir: Path, model_name: str, say=print):
    """The evaluator on task data: the held-out answers of `split` scored given their prompts
    (data.max_eval_tokens of them), and the first evaluate.max_answers prompts answered."""
    which = "train" if split == "all" else split
    items, names, answer_bytes = packed.eval_examples(which)
    if not len(items):
        raise UserError(f"evaluate.split={split} holds no examples: pick another split")
    report = packed.report[which]
    examples = answer_examples(items, names, answer_bytes, report["examples"]["examples"], report["tokens"])
    described = f"{len(examples):,} held-out {packed.task['format']} examples ({examples.tokens:,} tokens)"
    return run_answers(
        lm,
        tok,
        examples,
        out_dir=out_dir,
        model_name=model_name,
        generate_cfg=generate_cfg,
        n_samples=cfg.max_answers if cfg.samples else 0,
        batch_size=cfg.batch_size,
        bf16=cfg.bf16,
        data_description=described,
        say=say,
    )


def answer_examples(items, names: list[str], answer_bytes, split_examples: int, split_tokens: int) -> Examples:
    """The evaluator's Examples from prepared ones (data.Prepared.eval_examples), each read from
    the memory maps once."""
    read = [items[i] for i in range(len(items))]
    return Examples(
        ids=[example.ids for example in read],
        masks=[example.trained for example in read],
        names=list(names),
        answer_bytes=[int(b) for b in answer_bytes],
        split_examples=split_examples,
        split_tokens=split_tokens,
    )
