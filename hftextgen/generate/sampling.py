"""Sampling pieces both decoders use: the seeded Gumbel draw (its noise and keys) and the warpers.

Generator (generator.py) runs them as logits processors inside `model.generate`; the static
decoder (static.py) runs the same noise and the same warpers on its preallocated buffers.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

# What both decoders give model.generate besides their own settings: they draw with their own
# warpers and SeededGumbel under do_sample false, so the sampling of the model's
# generation_config.json (the recipe's preset, for stock loaders) must not be merged in. These are
# transformers' own unset values (top_k 50 included), which it neither applies without do_sample
# nor warns about.
UNSAMPLED = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0}


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (murmur3's finaliser) on int64 tensors; products stay below 2**63."""
    mask = 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & mask
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & mask
    return x ^ (x >> 16)


def gumbel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise [rows, vocab]: a hash of each row's 32-bit key (int64 tensor) and the token id."""
    row = _mix32(keys)[:, None]
    token = torch.arange(vocab, device=keys.device, dtype=torch.int64)[None, :]
    bits = _mix32(_mix32(row ^ token) + token)
    uniform = ((bits >> 8).to(torch.float32) + 0.5) / 2**24  # in (0, 1)
    return -torch.log(-torch.log(uniform))


class SeededGumbel(LogitsProcessor):
    """Adds Gumbel noise that depends only on (row seed, tokens generated so far, token id), so
    the argmax that follows is a reproducible draw from softmax(scores) for each row alone."""

    # A row's key at a step: (seed * SEED + (done + step) * STEP) & MASK (static.py
    # computes the same keys on the device).
    SEED, STEP, MASK = 0x9E3779B1, 0x7FEB352D, 0xFFFFFFFF

    def __init__(self, seeds: list[int], done: list[int], start: int):
        self.seeds = seeds
        self.done = done  # tokens each row generated before this call (sliding windows)
        self.start = start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.start
        pairs = zip(self.seeds, self.done, strict=True)
        keys = [(seed * self.SEED + (done + step) * self.STEP) & self.MASK for seed, done in pairs]
        return scores + gumbel_noise(torch.tensor(keys, device=scores.device, dtype=torch.int64), scores.shape[1])


def warpers(settings: dict) -> list[LogitsProcessor]:
    out: list[LogitsProcessor] = []
    if settings["temperature"] != 1.0:
        out.append(TemperatureLogitsWarper(settings["temperature"]))
    if settings["top_k"]:
        out.append(TopKLogitsWarper(settings["top_k"]))
    if settings["top_p"] < 1.0:
        out.append(TopPLogitsWarper(settings["top_p"]))
    if settings["typical_p"] < 1.0:
        out.append(TypicalLogitsWarper(settings["typical_p"]))
    return out
