"""Oracles: the plain reference paths the tests (and bench/) compare hftextgen's fast ones against.

Each does the simple, slow thing the package's code must agree with: the documents of a corpus
read whole into memory and split by the split rule, run_clm's tokenize-and-pack, texts tokenized
by the tokenizer itself and scored. None of it is in the package: nothing there needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from hftextgen import data
from hftextgen.data import DataConfig, shards, sources
from hftextgen.evaluate import EvaluateConfig

# ---------------------------------------------------------------- documents in memory


@dataclass
class SplitTexts:
    """Raw documents of each split, in memory: datasets with columns `id` and `text`."""

    train: object  # datasets.Dataset
    validation: object


def split_texts(cfg: DataConfig) -> SplitTexts:
    """Every document of the corpus `cfg` names, whole, in the split preparing puts it in."""
    corpus = data.Corpus(cfg)
    return SplitTexts(*(as_dataset(list(corpus.texts(split))) for split in shards.SPLITS))


def as_dataset(docs: list[tuple[str, str | None]]):
    import datasets

    docs = [(i, t) for i, t in docs if sources.is_document(t)]
    return datasets.Dataset.from_dict({"id": [i for i, _ in docs], "text": [t for _, t in docs]})


def read_file(path: Path, cfg: DataConfig) -> list[tuple[str, str | None]]:
    """(id, text) records of one local file, empty ones included, whole documents."""
    out = []
    for _, record in sources.read_all(sources.file_segments(path, cfg, every=1 << 62, cuttable=False), cfg):
        if record.begins:
            out.append((record.id, record.text))
        else:
            out[-1] = (out[-1][0], out[-1][1] + record.text)
    return out


# ---------------------------------------------------------------- run_clm's tokenize and pack


def run_clm_blocks(docs, tokenizer, block_size: int, add_eos: bool = True):
    """run_clm.py's tokenize_function and group_texts, with EOS after each document (what
    hftextgen's recipes do; run_clm leaves it out). group_texts sees the whole split as one
    batch: run_clm's default of 1000 documents per batch drops a partial block per batch."""
    eos = tokenizer.eos_token_id if add_eos else None

    def tokenize_function(examples):
        output = tokenizer(examples["text"])
        if eos is not None:
            for ids, mask in zip(output["input_ids"], output["attention_mask"], strict=True):
                ids.append(eos)
                mask.append(1)
        return output

    tokenized = docs.map(tokenize_function, batched=True, remove_columns=docs.column_names)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    return tokenized.map(group_texts, batched=True, batch_size=max(1, len(tokenized)))


def blocks_array(ds) -> np.ndarray:
    """All blocks of a datasets.Dataset (the reference) or of prepared data, as one array."""
    blocks = ds.with_format("numpy")[:] if hasattr(ds, "with_format") else ds[:]
    return np.asarray(blocks["input_ids"], dtype=np.int64)


# ---------------------------------------------------------------- evaluating texts


def document_ids(texts: list[str], tok, add_eos: bool) -> list[list[int]]:
    """The ids a text is scored as, by the tokenizer itself: [EOS] + its ids (+ [EOS] with add_eos)."""
    eos = tok.eos_token_id
    ids = tok(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return [[eos, *doc, *([eos] if add_eos else [])] for doc in ids]


def evaluate_texts(lm, tok, texts: list[str], cfg: EvaluateConfig, add_eos: bool) -> dict:
    """Perplexity, bits-per-byte and word perplexity of `texts`, with the counts behind them."""
    from hftextgen.evaluate.run import evaluate_ids

    return evaluate_ids(
        lm,
        document_ids(texts, tok, add_eos),
        [len(t.encode("utf-8")) for t in texts],
        [len(t.split()) for t in texts],
        cfg,
    )


# ---------------------------------------------------------------- scoring answers


def score_conversations(run_dir: Path, conversations: list[list[dict]]) -> dict:
    """Each assistant turn of each conversation scored by the run's model and stock
    apply_chat_template alone: the tokens that turn adds to the rendering of the turns before it
    (with the generation prompt), through the first end of turn the model stops at; bits per byte
    over the UTF-8 bytes of the answers' own text. For prefix-preserving templates (hftextgen's
    default is one)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir)
    lm = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    ends = lm.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [ends])
    nll, tokens, n_bytes = 0.0, 0, 0
    for messages in conversations:
        full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(lm(torch.tensor([full])).logits[0].double(), -1)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            start = len(tok(prompt, add_special_tokens=False)["input_ids"])
            stop = next(t for t in range(start, len(full)) if full[t] in ends) + 1
            nll -= sum(logp[t - 1, full[t]].item() for t in range(start, stop))
            tokens += stop - start
            n_bytes += len(message["content"].encode("utf-8"))
    return {"nll": nll, "answer_tokens": tokens, "answer_bytes": n_bytes, "bits_per_byte": nll / math.log(2) / n_bytes}
