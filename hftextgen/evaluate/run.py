"""Evaluate stage: exact perplexity, bits-per-byte and word perplexity of documents, and samples.

Scoring. Each document is scored as the model saw documents in training: it starts after an EOS
token, and (with data.add_eos) ends with one. Every token is scored exactly once. A document
longer than the context is scored with windows that advance by `stride`: the first window
scores all its tokens, each later one scores only the `stride` tokens after it, each with at
least context - stride + 1 tokens before it (stride = context: disjoint windows). The totals
are sums over tokens, never means of per-batch or per-window means, so the result does not
depend on batching.

Metrics. perplexity = exp(NLL / tokens); bits_per_byte = NLL / ln 2 / UTF-8 bytes of the text;
word_perplexity = exp(NLL / whitespace-separated words). Only bits-per-byte and word perplexity
compare models with different tokenizers.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__, progress, runtime
from .. import model as model_stage
from ..data import DataConfig, EvalDocuments
from ..errors import UserError
from ..files import write_atomic, write_json
from ..generate import GenerateConfig, Generator, samples_markdown, write_samples
from .config import EvaluateConfig

METRICS = Path(__file__).parent / "metrics"


@dataclass
class Window:
    doc: int
    begin: int
    first: int
    stop: int
    """Targets [first, stop) of the document, predicted from its tokens [begin, stop - 1)."""


@dataclass(frozen=True)
class ScoringSettings:
    """How documents are scored: tokens of context per window, the stride between windows, bf16 autocast."""

    context: int
    stride: int
    bf16: bool


def scoring_settings(lm, cfg: EvaluateConfig) -> ScoringSettings:
    """evaluate.context (else the model's), evaluate.stride (else half the context) and
    evaluate.bf16 (else where the device has it), checked against the model: the settings the
    evaluator scores with, and validate times."""
    model_context = model_stage.context_length(lm) or model_stage.DEFAULT_CONTEXT
    context = cfg.context or model_context
    if context > model_context:
        raise UserError(
            f"evaluate.context ({context}) is longer than the model's context ({model_context}): "
            f"lower it or leave it unset"
        )
    stride = cfg.stride or max(1, context // 2)
    if stride > context:
        raise UserError(f"evaluate.stride ({stride}) must be <= the context ({context}): lower evaluate.stride")
    bf16 = bool(cfg.bf16) if cfg.bf16 is not None else runtime.bf16_scoring(lm.device)
    return ScoringSettings(context, stride, bf16)


def windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first, stop) windows over a document of `length` tokens whose first token (the
    EOS before it) is context only. Together they score tokens 1..length-1 once each; the first
    target of a later window has context - stride + 1 tokens before it, the last ones more."""
    if length < 2:
        return []
    stop = min(context + 1, length)
    out = [(0, 1, stop)]
    while stop < length:
        first, stop = stop, min(stop + stride, length)
        out.append((max(0, stop - 1 - context), first, stop))
    return out


@torch.inference_mode()
def score(
    lm, docs: list[list[int]], context: int, stride: int, batch_size: int, bf16: bool = False
) -> list[tuple[float, int]]:
    """(summed NLL in nats, scored tokens) per document."""
    work = [Window(d, *w) for d, ids in enumerate(docs) for w in windows(len(ids), context, stride)]
    work.sort(key=lambda w: w.stop - w.begin, reverse=True)  # similar lengths share a batch: little padding
    nll = torch.zeros(len(docs), dtype=torch.float64)
    counts = [0] * len(docs)
    device = lm.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    shown = progress.bar(len(work), "Scoring", "windows")
    for start in range(0, len(work), batch_size):
        batch = work[start : start + batch_size]
        width = batch[0].stop - 1 - batch[0].begin
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        keep = torch.zeros(len(batch), width, dtype=torch.bool)  # positions whose next token is scored
        targets, owner = [], []
        for row, w in enumerate(batch):
            n = w.stop - 1 - w.begin
            ids[row, :n] = torch.tensor(docs[w.doc][w.begin : w.stop - 1])
            mask[row, :n] = 1
            keep[row, w.first - 1 - w.begin : n] = True
            targets += docs[w.doc][w.first : w.stop]
            owner += [w.doc] * (w.stop - w.first)
            counts[w.doc] += w.stop - w.first
        with autocast:
            logits = lm(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device)).logits
        losses = nll_rows(logits, torch.tensor(targets, device=device))
        del logits  # before the next batch's forward makes its own: one batch of logits at a time
        nll.index_add_(0, torch.tensor(owner), losses.double().cpu())
        shown.update(len(batch))
    shown.close()
    return list(zip(nll.tolist(), counts, strict=True))


# Elements of the logits turned into losses at once: cross-entropy's fp32 log-softmax of a whole
# batch of windows is as large as the logits again (8 windows x 256 positions x 50,257 tokens:
# 0.4 GB), a chunk of rows at a time is 64 MiB. Each row's loss is the same either way.
LOSS_CHUNK_ELEMENTS = 2**24


def nll_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of each row of `logits` [N, V] against `targets` [N], in fp32."""
    rows = max(1, LOSS_CHUNK_ELEMENTS // logits.shape[-1])
    return torch.cat(
        [
            torch.nn.functional.cross_entropy(logits[i : i + rows].float(), targets[i : i + rows], reduction="none")
            for i in range(0, len(targets), rows)
        ]
        or [logits.new_zeros(0, dtype=torch.float32)]
    )


def load_metric(name: str):
    """A metric module kept in hftextgen/metrics, loaded by path: the hub is not needed."""
    import evaluate

    return evaluate.load(str(METRICS / name), keep_in_memory=True)


def perplexity_metrics(scores: list[tuple[float, int]], n_bytes: list[int], words: list[int]) -> dict:
    metric = load_metric("perplexity")
    return metric.compute(nll=[s[0] for s in scores], tokens=[s[1] for s in scores], bytes=n_bytes, words=words)


def diversity_metrics(texts: list[str]) -> dict:
    return load_metric("diversity").compute(predictions=texts)


def evaluate_ids(lm, ids: list[list[int]], n_bytes: list[int], words: list[int], cfg: EvaluateConfig) -> dict:
    """Perplexity, bits-per-byte and word perplexity of documents given as the ids they are scored
    as ([EOS] + the document's ids, with its EOS when trained so) and their UTF-8 bytes and words,
    with the counts behind them."""
    s = scoring_settings(lm, cfg)
    started = time.perf_counter()
    scores = score(lm, ids, s.context, s.stride, cfg.batch_size, bf16=s.bf16)
    seconds = time.perf_counter() - started
    result = perplexity_metrics(scores, n_bytes, words)
    if result["tokens"] == 0:
        raise UserError("evaluation: the documents hold no tokens to score: check the data section")
    result.update(
        documents=len(ids),
        context=s.context,
        stride=s.stride,
        precision="bf16" if s.bf16 else "fp32",
        seconds=round(seconds, 2),
        tokens_per_second=round(result["tokens"] / seconds, 1),
    )
    return result


def eval_record(model_name: str, data_description: str, metrics: dict, samples: dict | None) -> dict:
    return {
        "model": model_name,
        "data": data_description,
        **metrics,
        **({"samples": samples} if samples else {}),
        "hftextgen": __version__,
        "torch": torch.__version__,
        "evaluated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def markdown(result: dict, sample_texts: list[str]) -> str:
    lines = [
        f"# Evaluation of {result['model']}",
        "",
        f"Data: {result['data']} ({result['documents']:,} documents).",
        "",
        "| metric | value | over |",
        "|---|---|---|",
        f"| perplexity | {result['perplexity']:.3f} | {result['tokens']:,} tokens |",
        f"| bits per byte | {result['bits_per_byte']:.4f} | {result['bytes']:,} UTF-8 bytes |",
        f"| word perplexity | {result['word_perplexity']:.3f} | {result['words']:,} words |",
        f"| loss (nats/token) | {result['loss']:.4f} | |",
        "",
        f"Context {result['context']} tokens, stride {result['stride']}, {result['precision']}; "
        f"{result['tokens_per_second']:,.0f} tokens/s.",
    ]
    samples = result.get("samples")
    if samples:
        lines += [
            "",
            f"## Samples ({samples['count']}, preset `{samples['preset']}`)",
            "",
            f"distinct-1 {samples['distinct_1']:.3f}, distinct-2 {samples['distinct_2']:.3f}, "
            f"distinct-3 {samples['distinct_3']:.3f}, repeated 4-grams {samples['repeated_4grams']:.3f}. "
            f"All samples: samples.md.",
        ]
        for text in sample_texts[:3]:
            lines += ["", "```text", text, "```"]
    return "\n".join(lines) + "\n"


def count_cut(docs: EvalDocuments, tok) -> None:
    """The bytes and words of the part of a cut document that is scored, from its text, so that
    bits-per-byte and word perplexity divide by what was scored."""
    from ..data import count_words

    text = tok.decode(docs.ids[0][1:])
    utf8 = text.encode("utf-8")
    docs.bytes, docs.words = [len(utf8)], [count_words(text, utf8)]


def describe(data: DataConfig, split: str, docs: EvalDocuments) -> str:
    source = {"shakespeare": "the bundled Shakespeare plays", "files": "files", "hub": f"hub dataset {data.dataset}"}
    names = docs.names
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4:,} more" if len(names) > 4 else "")
    whole = docs.tokens == docs.split_tokens
    n = docs.split_documents
    documents = "documents" if n > 1 else "document"
    split_ = "" if split == "all" else f"{split} "
    cap = f"data.max_eval_tokens={data.max_eval_tokens:,}"
    if whole:
        which = ("all " if n > 1 else "") + f"{n:,} {split_}{documents}"
    elif docs.cut:
        which = (
            f"the first {docs.tokens:,} tokens of one {split_}document longer than {cap} "
            f"(the split: {n:,} {documents}, {docs.split_tokens:,} tokens)"
        )
    else:
        sample = f"{docs.tokens:,} of their {docs.split_tokens:,} tokens"
        which = f"a seeded sample of the {split} documents, {sample} ({cap})"
    return f"{source[data.source]}, {which} ({shown})"


def evaluate_documents(
    lm,
    tok,
    docs: EvalDocuments,
    *,
    data: DataConfig,
    cfg: EvaluateConfig,
    generate_cfg: GenerateConfig,
    prompts: list[str],
    out_dir: Path,
    model_name: str,
    say=print,
) -> dict:
    """Score the documents, write samples, and write eval.json and eval.md into out_dir.

    Without data.add_eos the rows are pieces of one text (e.g. wikitext lines): `docs` then holds
    them as that one text, their ids joined as they were trained."""
    if len(docs) == 0:
        raise UserError(f"evaluate.split={cfg.split} holds no documents: pick another split")
    if docs.cut:
        count_cut(docs, tok)
    say(f"evaluating {model_name} on {cfg.split} documents: {len(docs.names):,} ({docs.tokens:,} tokens) ...")
    metrics = evaluate_ids(lm, docs.ids, docs.bytes, docs.words, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_info, sample_texts = None, []
    if cfg.samples:
        generator = Generator(lm, tok, generate_cfg)
        samples = generator(prompts, desc="Sampling")
        write_samples(samples, generator, model_name, out_dir / "samples.jsonl", append=False)
        write_atomic(out_dir / "samples.md", samples_markdown(samples, generator, f"Samples of {model_name}"))
        samples_info = {
            "count": len(samples),
            "preset": generate_cfg.preset,
            "settings": generator.settings,
            **diversity_metrics([s.completion for s in samples]),
        }
        sample_texts = [s.prompt + s.completion for s in samples]
    metrics.update(split_documents=docs.split_documents, split_tokens=docs.split_tokens)
    result = eval_record(model_name, describe(data, cfg.split, docs), metrics, samples_info)
    write_json(out_dir / "eval.json", result)
    write_atomic(out_dir / "eval.md", markdown(result, sample_texts))
    say(
        f"perplexity {result['perplexity']:.3f}, bits-per-byte {result['bits_per_byte']:.4f}, "
        f"word perplexity {result['word_perplexity']:.3f} ({result['tokens']:,} tokens, "
        f"{result['tokens_per_second']:,.0f} tokens/s); results in {out_dir / 'eval.json'}"
    )
    return result
