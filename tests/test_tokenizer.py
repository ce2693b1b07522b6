"""Tokenizer stage: the bundled GPT-2 BPE, a trained BPE (cached), and EOS kept as a target."""

from __future__ import annotations

import torch

from hftextgen import data
from hftextgen.config import Recipe
from hftextgen.data import DataConfig
from hftextgen.data.packing import collate_blocks
from hftextgen.model import ModelConfig, TokenizerConfig, tokenizer
from hftextgen.train import TrainArguments


def test_bundled_tokenizer_is_gpt2():
    tok = tokenizer.bundled_gpt2()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257 and tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
    assert tok.decode(tok(" To be, or not to be")["input_ids"]) == " To be, or not to be"


def recipe_for(corpus, tmp_path, **tokenizer_kw) -> Recipe:
    return Recipe(
        ModelConfig(n_layer=1, n_head=1, n_embd=8),
        TokenizerConfig(source="train", **tokenizer_kw),
        DataConfig(source="files", paths=[str(corpus / "*.txt")]),
        TrainArguments(output_dir=str(tmp_path / "run"), bf16=False),
    )


def build(recipe):
    return tokenizer.build_tokenizer(recipe.tokenizer, recipe.model, data.Corpus(recipe.data))


def test_trained_tokenizer_is_cached_by_content(corpus, tmp_path, monkeypatch):
    recipe = recipe_for(corpus, tmp_path, vocab_size=300)
    tok = build(recipe)
    assert 257 < len(tok) <= 300 and tok.eos_token == "<|endoftext|>" and tok.pad_token == tok.eos_token
    text = "HAMLET:\nGood night sweet prince."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok(text)["input_ids"]) < len(text.encode())  # it learned merges

    monkeypatch.setattr(tokenizer, "train_bpe", lambda *a: (_ for _ in ()).throw(AssertionError("retrained")))
    again = build(recipe)
    assert tokenizer.fingerprint(again) == tokenizer.fingerprint(tok)

    bigger = recipe_for(corpus, tmp_path, vocab_size=400)
    monkeypatch.undo()
    assert tokenizer.fingerprint(build(bigger)) != tokenizer.fingerprint(tok)


def test_collator_keeps_eos_as_a_target():
    eos = 50256
    blocks = [{"input_ids": torch.tensor([5, 6, eos, 7])}, {"input_ids": torch.tensor([eos, 1, 2, 3])}]
    batch = collate_blocks(blocks)
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert (batch["labels"] == eos).sum() == 2 and not (batch["labels"] == -100).any()
