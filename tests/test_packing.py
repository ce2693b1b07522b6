"""hftextgen.packing: isolated rows give each example the losses it has alone, padded rows too,
and pack / length_grouped_order place every example once, deterministically."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from hftextgen.data.packing import (
    IGNORE,
    Example,
    IsolatedCollator,
    PackedRows,
    PaddedCollator,
    Rows,
    flash_attn_kwargs,
    length_grouped_order,
    pack,
)

VOCAB, BLOCK = 96, 24
TINY = {
    "gpt2": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0},
    "llama": {
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
}


def model(kind: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, vocab_size=VOCAB, **TINY[kind])
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()  # eval: no dropout


def examples(lengths: list[int], seed: int = 0) -> list[Example]:
    """Random ids; the first third of each example is its untrained prompt."""
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(1, VOCAB, n), np.arange(n) >= n // 3) for n in lengths]


def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The loss of every next token of one sequence: logits (tokens, vocab), ids (tokens,)."""
    return F.cross_entropy(logits[:-1], ids[1:], reduction="none")


@torch.no_grad()
def alone(net: torch.nn.Module, example: Example) -> torch.Tensor:
    ids = torch.as_tensor(example.ids)
    return token_losses(net(ids[None], use_cache=False).logits[0], ids)


@torch.no_grad()
def inside_rows(net: torch.nn.Module, rows: list[list[Example]], **collator) -> list[torch.Tensor]:
    """The token losses of each example inside the collated batch of rows, row by row."""
    batch = IsolatedCollator(pad_id=0, **collator)(rows)
    logits = net(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    losses = []
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            span = slice(start, start + len(e.ids))
            losses.append(token_losses(logits[r, span], batch["input_ids"][r, span]))
            start += len(e.ids)
    return losses


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_isolated_row_gives_each_example_its_losses_alone(kind, attn):
    net = model(kind, attn)
    rows = [examples([7, 5, 9]), examples([4, 12], seed=1)]  # two rows of 21 and 16 tokens: padding too
    every = [e for row in rows for e in row]
    for e, packed in zip(every, inside_rows(net, rows), strict=True):
        torch.testing.assert_close(packed, alone(net, e), atol=1e-5, rtol=0)
    # flash-attention's boundaries ride along; sdpa and eager ignore them
    for e, packed in zip(every, inside_rows(net, rows, flash_attn_kwargs=True), strict=True):
        torch.testing.assert_close(packed, alone(net, e), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_without_restarts_or_with_a_cache_the_second_example_sees_the_first(kind):
    """The controls: plain concatenation, and the same row with a KV cache (use_cache=True skips
    transformers' packed-sequence detection), both change the second example's losses."""
    net, row = model(kind, "sdpa"), examples([7, 9])
    batch = IsolatedCollator(pad_id=0)([row])
    with torch.no_grad():
        plain = net(batch["input_ids"], use_cache=False).logits[0, 7:]
        cached = net(batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0, 7:]
    expected = alone(net, row[1])
    for logits in (plain, cached):
        assert (token_losses(logits, torch.as_tensor(row[1].ids)) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_padded_rows_give_each_example_its_losses_alone(kind):
    net, batch_examples = model(kind, "sdpa"), examples([7, 13, 4])
    batch = PaddedCollator(pad_id=0, pad_to_multiple_of=8)(batch_examples)
    assert batch["input_ids"].shape == (3, 16)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    with torch.no_grad():
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i, e in enumerate(batch_examples):
        n = len(e.ids)
        torch.testing.assert_close(
            token_losses(logits[i, :n], batch["input_ids"][i, :n]), alone(net, e), atol=1e-5, rtol=0
        )


def test_labels_stay_inside_examples_and_the_batch_loss_weighs_tokens():
    rows = [examples([6, 3, 8]), examples([10, 5], seed=1)]
    batch = IsolatedCollator(pad_id=0, pad_to_multiple_of=BLOCK)(rows)
    assert batch["input_ids"].shape == (2, BLOCK) and "attention_mask" not in batch
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            span = slice(start, start + len(e.ids))
            expected = np.where(e.trained, e.ids, IGNORE)
            expected[0] = IGNORE  # the first token is never a target predicted from the previous example
            np.testing.assert_array_equal(batch["labels"][r, span].numpy(), expected)
            np.testing.assert_array_equal(batch["position_ids"][r, span].numpy(), np.arange(len(e.ids)))
            start += len(e.ids)
        assert (batch["labels"][r, start:] == IGNORE).all()  # padding
    net = model("llama", "sdpa")
    with torch.no_grad():
        loss = net(**batch, use_cache=False).loss
    # the mean over the batch's trained tokens = the token-weighted mean over the examples
    total, count = 0.0, 0
    for e in [e for row in rows for e in row]:
        trained = torch.as_tensor(e.trained[1:])
        total += alone(net, e)[trained].sum().item()
        count += int(trained.sum())
    assert loss.item() == pytest.approx(total / count, abs=1e-5)


def best_fit_decreasing(lengths: np.ndarray, block: int) -> list[int]:
    """The textbook version, one example at a time: the free space left in each row."""
    free: list[int] = []
    for n in sorted(lengths.tolist(), reverse=True):
        fits = [i for i, f in enumerate(free) if f >= n]
        if fits:
            best = min(fits, key=lambda i: free[i])
            free[best] -= n
        else:
            free.append(block - n)
    return sorted(free)


@pytest.mark.parametrize("seed", range(4))
def test_pack_places_every_example_once_within_the_block_deterministically(seed):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(8), 0.8, 400).round(), 1, BLOCK).astype(int)
    rows = pack(lengths, BLOCK)
    np.testing.assert_array_equal(np.sort(rows.order), np.arange(len(lengths)))
    assert rows.tokens(lengths).max() <= BLOCK and (np.diff(rows.bounds) > 0).all()
    again = pack(lengths, BLOCK)
    np.testing.assert_array_equal(rows.order, again.order)
    np.testing.assert_array_equal(rows.bounds, again.bounds)
    assert sorted((BLOCK - rows.tokens(lengths)).tolist()) == best_fit_decreasing(lengths, BLOCK)
    dataset = PackedRows(examples([int(n) for n in lengths]), rows)
    assert [len(e.ids) for e in dataset[0]] == lengths[rows[0]].tolist()


def test_pack_refuses_examples_longer_than_the_block():
    with pytest.raises(ValueError, match="block_size"):
        pack(np.array([3, BLOCK + 1]), BLOCK)
    assert len(pack(np.array([], dtype=int), BLOCK)) == 0
    assert isinstance(pack(np.array([BLOCK]), BLOCK), Rows)


def test_flash_boundaries_cover_the_rows_flattened():
    positions = np.array([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])  # row 2: an example, then padding
    kwargs = flash_attn_kwargs(positions)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10, 12]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["max_length_q"] == 4


def test_length_grouped_order_groups_lengths_and_keeps_batches_whole():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, 1003)
    order = length_grouped_order(lengths, batch_size=8, seed=1, megabatch=None)
    np.testing.assert_array_equal(np.sort(order), np.arange(len(lengths)))
    np.testing.assert_array_equal(order, length_grouped_order(lengths, 8, seed=1, megabatch=None))
    assert not np.array_equal(order, length_grouped_order(lengths, 8, seed=2, megabatch=None))
    batches = lengths[order[:1000]].reshape(-1, 8)
    assert (batches.max(1) - batches.min(1)).max() <= 20  # neighbours in length
    assert batches.max() == lengths.max() == batches[0].max()  # the longest batch first
    assert set(order[1000:]) == set(np.argsort(lengths, kind="stable")[:3])  # the partial batch last
    grouped = length_grouped_order(lengths, 8, seed=1)  # megabatches of 50 batches, as the Trainer
    padded = lengths[grouped[:1000]].reshape(-1, 8).max(1).sum() * 8
    assert lengths.sum() / padded > 0.9
