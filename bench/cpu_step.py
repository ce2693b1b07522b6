"""Where a CPU training step's time goes: matmul throughput fp32 vs bf16, and one training step
of the default recipe's model in fp32 and under bf16 autocast, with 1 and 2 threads, profiled.

    python -m bench.cpu_step [--quick] [--profile] [--out FILE]

The model is recipes/shakespeare/tiny.yaml's (Llama 4 x 128, 2 heads, 1 key/value head, MLP
344, tied embeddings, 4,096 tokens), a step 8 blocks of 128 tokens with the stock loss and
fused AdamW, as the Trainer runs it without hftextgen's other settings: what bf16 autocast is
worth on this CPU, at this width, by itself. --profile adds torch.profiler's top operators of
5 steps each way (2 threads). Baseline: fp32; ratios above 1 mean bf16 is faster.
"""

from __future__ import annotations

import time

from bench import common


def matmul_gflops(n: int, dtype, seconds: float = 1.0) -> float:
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    started, k = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        a @ b
        k += 1
    return 2 * n**3 * k / (time.perf_counter() - started) / 1e9


def training_step():
    """A step function of the default recipe's model (bf16 autocast or not)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", num_hidden_layers=4, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=344, vocab_size=4096, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, 4096, (8, 128))

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def seconds_per_step(step, bf16: bool, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step(bf16)
    started = time.perf_counter()
    for _ in range(steps):
        step(bf16)
    return (time.perf_counter() - started) / steps


def profile(step) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for bf16 in (False, True):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step(bf16)
        print(f"--- 5 steps, {'bf16 autocast' if bf16 else 'fp32'}, 2 threads")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=40))


def main() -> None:
    import torch

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--profile", action="store_true", help="print the top operators of each way")
    args = p.parse_args()
    load_before = common.load()
    warmup, steps = (1, 2) if args.quick else (3, 20)
    rows = []
    for n in (512, 1024):
        fp32, bf16 = matmul_gflops(n, torch.float32), matmul_gflops(n, torch.bfloat16)
        rows.append(common.Row(f"matmul {n} x {n} (fp32 = baseline, bf16)", fp32, bf16, "GFLOPS"))
    step = training_step()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        fp32, bf16 = (seconds_per_step(step, b, warmup, steps) for b in (False, True))
        what = f"training step, {threads} thread{'s' if threads > 1 else ''} (fp32 = baseline, bf16 autocast)"
        rows.append(common.Row(what, 1024 / fp32, 1024 / bf16, "tokens/s"))
    common.report("cpu_step", "The default recipe's model on this CPU: fp32 vs bf16", rows, args, load_before)
    if args.profile:
        torch.set_num_threads(2)
        profile(step)


if __name__ == "__main__":
    main()
