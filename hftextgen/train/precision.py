"""Train stage: bf16 autocast or fp32 on a CPU, chosen by timing the run's own training step both
ways, once per machine and shape (the choice is kept in the cache, so a run repeats it).

A CPU with AVX512-BF16 or AMX runs large bf16 matmuls 3-5x faster than fp32, but a small
model's step is more than its matmuls: autocast casts every weight each step, and some bf16
kernels (attention, log-softmax backward) are slower than their fp32 ones. What wins depends on
the CPU and the shape: on an AMD EPYC (Zen 5) bf16 made the default recipe's step 1.5x faster,
on an Intel Xeon VM with AMX 0.84x as fast (bench/RESULTS.md, "CPU time per CPU"). So where
train.bf16 is unset and the CPU has native bf16, `choose` times the forward and backward of one
real batch in each precision (alternating, a few times each, the fastest of each kept) and
trains with the faster; bf16 unless fp32 is faster by more than MARGIN.
"""

from __future__ import annotations

import json
import time

import torch

from .. import cache
from ..files import write_json

MARGIN = 1.05  # fp32 must beat bf16 by this much: bf16 is what the hardware check chose
ROUNDS = 3  # timed steps in each precision, alternating
SLOW_STEP_S = 2.0  # a step slower than this is timed once each way


def key(model, batch: dict, fused: str | None) -> str:
    """What the choice depends on: the CPU, torch, the threads, the model's shape, the batch's."""
    from ..runtime import cpu_name

    config = model.config
    dims = [getattr(config, name, None) for name in ("num_hidden_layers", "hidden_size", "intermediate_size")]
    dims += [getattr(config, name, None) for name in ("num_attention_heads", "num_key_value_heads", "vocab_size")]
    shape = "x".join(str(n) for n in batch["input_ids"].shape)
    return (
        f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
        f"{type(model).__name__} {dims} | batch {shape} | loss {fused or 'stock'}"
    )


def _step(model, batch: dict, bf16: bool) -> float:
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss  # as the Trainer calls it
    loss.backward()
    return time.perf_counter() - started


def time_both(model, batch: dict) -> dict:
    """Seconds of a forward and backward in fp32 and in bf16 autocast, the fastest of a few.
    Leaves the weights, their gradients (none) and the random number generator as it found them."""
    rng = torch.get_rng_state()
    was_training = model.training
    model.train()
    try:
        first = [_step(model, batch, bf16) for bf16 in (False, True)]  # warm-up
        rounds = 1 if max(first) > SLOW_STEP_S else ROUNDS
        times = {False: [], True: []}
        for _ in range(rounds):
            for bf16 in (False, True):
                times[bf16].append(_step(model, batch, bf16))
    finally:
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
        torch.set_rng_state(rng)
    return {"fp32_s": min(times[False]), "bf16_s": min(times[True])}


def choose(args, model, batch: dict, fused: str | None, cache_dir: str | None) -> str | None:
    """Set args.bf16 by the step's measured speed where train.bf16 was left to the hardware on a
    CPU (one process, eager). Returns a line for the log, or None when nothing was chosen here."""
    if not getattr(args, "bf16_from_hardware", False) or args.world_size != 1 or args.torch_compile:
        return None
    if torch.accelerator.is_available() or not args.bf16:
        return None
    path = cache.root(cache_dir, "precision") / "choices.json"
    choices = json.loads(path.read_text()) if path.is_file() else {}
    name = key(model, batch, fused)
    found = choices.get(name)
    if found is None:
        found = time_both(model, batch)
        found["bf16"] = found["bf16_s"] <= found["fp32_s"] * MARGIN
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**choices, name: found})
    args.bf16 = found["bf16"]
    args.precision_probe = {**found, "cached_in": str(path)}
    ratio = found["fp32_s"] / found["bf16_s"]
    return (
        f"precision: {'bf16' if args.bf16 else 'fp32'} (bf16 autocast {ratio:.2f}x fp32 in this run's step on this "
        f"CPU; kept in {path}: delete it to measure again, or set train.bf16)"
    )


def first_batch(dataset, collate, size: int) -> dict:
    """The first `size` items of the training set, collated: the batch the probe times."""
    return collate([dataset[i] for i in range(min(size, len(dataset)))])
