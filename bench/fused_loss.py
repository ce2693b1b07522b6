"""The loss alone: the stock output layer + cross-entropy vs hftextgen's fused loss (and Liger's).

    python -m bench.fused_loss [--quick] [--rows N] [--width C] [--vocab V] [--chunk-mib M ...] [--out FILE]
    python -m bench.fused_loss --check        each tiny architecture's loss and gradients, fused vs stock

Forward and backward of the last step of a causal LM's training step - hidden states [rows,
width] through a [vocab, width] output layer into the mean cross-entropy - in bf16 autocast,
on a CUDA GPU where there is one, else on the CPU. Defaults: bench/wide.yaml's step (4,096
rows, 256 wide, GPT-2's 50,257 tokens). Configurations, each in a child process of its own so
that its peak memory is its own (CPU: peak RSS less the process's RSS before; GPU: peak
allocated memory): the stock path (`F.linear` under autocast, then transformers'
ForCausalLMLoss), hftextgen.train.fused_loss at each --chunk-mib budget (CPU; on a GPU its default
chunks), and liger-kernel's fused linear cross-entropy where it can run. Every configuration's
loss and gradients are compared with the stock path's: the largest difference relative to the
largest element is printed. `--check` runs tiny GPT-2, Llama, Qwen2 and GPT-NeoX models through
hftextgen's fused loss and Liger's (where it can run) on this device, as tests/test_fused_loss.py
does on the CPU.
"""

from __future__ import annotations

import copy
import resource
import statistics
import sys
import time

from bench import common

CPU_BUDGETS_MIB = (64, 256, 1024, 4096)


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def run(config: dict) -> dict:
    """Child side: time one configuration."""
    import torch

    from hftextgen.train import fused_loss

    cuda = torch.cuda.is_available()
    if not cuda:
        from hftextgen.runtime import reuse_freed_memory

        reuse_freed_memory()  # as hftextgen finetune runs, and the stock path's best case
    device = torch.device("cuda" if cuda else "cpu")
    rows, width, vocab = config["rows"], config["width"], config["vocab"]
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(rows, width, generator=generator)).to(device).requires_grad_()
    weight = (0.02 * torch.randn(vocab, width, generator=generator)).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (1, rows), generator=generator).to(device)
    kind = config["kind"]
    if kind == "fused" and not cuda:
        fused_loss.CPU_CHUNK_BYTES = config["chunk_mib"] * 2**20
    workspace = fused_loss.Workspace()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if kind == "stock":
                from transformers.loss.loss_utils import ForCausalLMLoss

                logits = torch.nn.functional.linear(hidden, weight)
                loss = ForCausalLMLoss(logits.unsqueeze(0), labels, vocab)
            elif kind == "fused":
                loss = fused_loss.linear_cross_entropy(hidden.unsqueeze(0), weight, labels, workspace=workspace)
            else:
                loss = fused_loss.liger_linear_cross_entropy(hidden.unsqueeze(0), weight, labels)
        loss.backward()
        return loss

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else rss()  # the inputs, before any step
    step()
    times, cpu_times = [], []
    for _ in range(config["repeats"]):
        hidden.grad = weight.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "device": str(device),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "median_cpu_s": statistics.median(cpu_times),
        "peak_bytes": peak - before,
        "loss": loss.item(),
        # A sample of each gradient to compare with the stock path's (all of them would be MBs of JSON).
        "grad_hidden": hidden.grad[:64].float().cpu().tolist(),
        "grad_weight_rows": weight.grad[:64].float().cpu().tolist(),
    }


def difference(a: list, b: list) -> float:
    import torch

    a, b = torch.tensor(a), torch.tensor(b)
    return ((a - b).abs().max() / a.abs().max()).item()


def check() -> None:
    """Each tiny architecture, fused (and Liger's) vs stock, on this device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hftextgen.train import fused_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 64, "intermediate_size": 128}
    shapes = {
        "gpt2": {"n_layer": 2, "n_head": 2, "n_embd": 64, "resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0},
        "llama": {**layers, "num_key_value_heads": 1},
        "qwen2": {**layers, "num_key_value_heads": 1},
        "gpt_neox": layers,
    }
    kernels = ["hftextgen"] + ([] if fused_loss.liger_unavailable() else ["liger"])
    print(f"[fused_loss] check on {device}; liger: {fused_loss.liger_unavailable() or 'available'}")
    failed = False
    for model_type, shape in shapes.items():
        config = AutoConfig.for_model(model_type, vocab_size=50257, bos_token_id=0, eos_token_id=0, **shape)
        torch.manual_seed(0)
        stock = AutoModelForCausalLM.from_config(config).to(device)
        x = torch.randint(0, 50257, (4, 128), device=device)
        for kernel in kernels:
            fused = copy.deepcopy(stock)
            reason = fused_loss.install(fused, kernel)
            losses = []
            for model in (stock, fused):
                model.zero_grad()
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = model(input_ids=x, labels=x).loss
                loss.backward()
                losses.append(loss.item())
            error = max(
                ((p.grad - q.grad).abs().max() / p.grad.abs().max()).item()
                for p, q in zip(stock.parameters(), fused.parameters(), strict=True)
            )
            ok = reason is None and abs(losses[1] - losses[0]) <= 1e-3 * abs(losses[0]) and error <= 4 * 2**-7
            failed |= not ok
            verdict = "ok" if ok else f"FAILED {reason or ''}"
            print(
                f"[fused_loss] {model_type:8s} {kernel:9s} loss {losses[1]:.5f} vs stock {losses[0]:.5f}, "
                f"gradients within {error:.1e} of the largest: {verdict}"
            )
    if failed:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config = common.child_config(argv)
    if config is not None:
        common.write_child_result(config, run(config))
        return
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="tiny architectures, fused vs stock, on this device")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--chunk-mib", type=int, nargs="+", default=None, help=f"CPU budgets (default {CPU_BUDGETS_MIB})")
    p.add_argument("--repeats", type=int, default=None, help="timed forward+backward passes (default 5, quick 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (OMP_NUM_THREADS; default torch's)")
    args = p.parse_args(argv)
    if args.check:
        check()
        return
    import torch

    from hftextgen.train import fused_loss

    cuda = torch.cuda.is_available()
    shape = {"rows": args.rows, "width": args.width, "vocab": args.vocab}
    shape["repeats"] = args.repeats or (2 if args.quick else 5)
    configs = {"stock": {"kind": "stock"}}
    for mib in [None] if cuda else args.chunk_mib or CPU_BUDGETS_MIB:
        configs["fused" + (f", {mib} MiB chunks" if mib else "")] = {"kind": "fused", "chunk_mib": mib}
    if fused_loss.liger_unavailable() is None:
        configs["liger"] = {"kind": "liger"}
    before = common.load()
    results = {}
    for name, config in configs.items():
        env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
        results[name] = common.run_child("bench.fused_loss", {**shape, **config}, env=env)
        r = results[name]
        print(f"[fused_loss] {name}: {r.get('median_s', r.get('error'))} s, peak {r.get('peak_bytes', 0) / 1e9:.2f} GB")
    if fused_loss.liger_unavailable() is not None:
        print(f"[fused_loss] liger: {fused_loss.liger_unavailable()}")
    stock = results["stock"]
    rows = []
    for name, r in list(results.items())[1:]:
        note = ""
        if "loss" in r and "loss" in stock:
            note = (
                f"loss {r['loss']:.5f} vs {stock['loss']:.5f}; gradients within "
                f"{max(difference(stock[k], r[k]) for k in ('grad_hidden', 'grad_weight_rows')):.1e}"
            )
        for key, how in (("median_s", "median forward+backward"), ("median_cpu_s", "its CPU time")):
            rows.append(common.Row(f"{name}, {how}", stock.get(key), r.get(key), "s", False, note))
            note = ""
        peak = {k: v.get("peak_bytes", 0) / 1e9 or None for k, v in (("stock", stock), (name, r))}
        rows.append(common.Row(f"{name}, peak memory", peak["stock"], peak[name], "GB", False))
    device = "CUDA" if cuda else "CPU"
    for r in results.values():  # not written to the JSON: thousands of numbers each
        r.pop("grad_hidden", None), r.pop("grad_weight_rows", None)
    common.report(
        "fused_loss",
        f"{device}: output layer + cross-entropy, {args.rows} x {args.width} -> {args.vocab}, bf16; "
        f"ratios stock / fused, above 1x is fused faster or leaner",
        rows,
        args,
        before,
        results=results,
    )


if __name__ == "__main__":
    main()
