"""GPU training: the gpt2-small recipe's `hftextgen finetune` vs a plain Trainer; tokens/s and MFU.

    python -m bench.gpu [--budget-s 420] [--out FILE]     on one H100/H200 (bench/gpu.sh sets it up)
    python -m bench.gpu --cpu-smoke                       the same script on a CPU, tiny model, to check it runs

Configurations, each in its own child process, in this order (a later one is skipped when the
time budget could not fit it, so one call always brings back the most important rows):
  baseline          plain Trainer, TrainingArguments defaults (fp32, adamw_torch), GPT-2 124M,
                    block 1024, micro-batch --baseline-batch (16: the perf-notes baseline)
  ours              hftextgen finetune --config recipes/shakespeare/gpt2-small.yaml, as shipped
  slow / fast       the loss check: the recipe with every speed setting off (fp32, eager, stock
                    loss, adamw_torch) and as shipped, dropout off in both so that they see the
                    same computation; their per-step losses must agree (--loss-tolerance)
  ours + fused loss the recipe with train.fused_loss on
  ours + fused loss, micro-batch 64   what the memory it saves buys

MFU = tokens/s x (6N + 12*L*H*Q*T) / 989e12, N without position embeddings (855 MFLOP/token for
GPT-2 124M at T=1024).
"""

from __future__ import annotations

import tempfile
import time

from bench import common

RECIPE = common.ROOT / "recipes/shakespeare/gpt2-small.yaml"
NO_DROPOUT = ["--model.resid_pdrop", "0", "--model.embd_pdrop", "0", "--model.attn_pdrop", "0"]
SLOW = ["--train.bf16", "false", "--train.torch_compile", "false", "--train.optim", "adamw_torch"]
SLOW += ["--train.fused_loss", "false"]
# --cpu-smoke: the recipe's settings on a model small enough for a CPU.
SMOKE = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.n_positions", "64"]
SMOKE += ["--data.block_size", "64", "--train.per_device_train_batch_size", "2"]


def plan(args) -> list[tuple[str, dict, float]]:
    """(name, child config, seconds it is expected to need) in priority order."""
    smoke = SMOKE if args.cpu_smoke else []
    ours = {"kind": "ours", "recipe": str(RECIPE), "warmup": args.warmup, "steps": args.steps}
    # Stops before step check_steps + 1 is logged: losses of steps 1..check_steps.
    check = {**ours, "warmup": 1, "steps": args.check_steps}
    logging = ["--train.logging_steps", "1"]
    model = (
        {"n_layer": 2, "n_head": 2, "n_embd": 32} if args.cpu_smoke else {"n_layer": 12, "n_head": 12, "n_embd": 768}
    )
    baseline = {
        "kind": "plain",
        "model": model,
        "block_size": 64 if args.cpu_smoke else 1024,
        "batch_size": 2 if args.cpu_smoke else args.baseline_batch,
        "warmup": args.warmup,
        "steps": args.steps,
    }
    mb64 = ["--train.per_device_train_batch_size", "64"] if not args.cpu_smoke else []
    return [
        # Expected seconds on an H100: ~20 s of start-up each, ~60 s of torch.compile, then the steps.
        ("baseline: plain Trainer, defaults", baseline, 45),
        ("ours: hftextgen finetune gpt2-small.yaml", {**ours, "flags": smoke}, 100),
        ("slow path (loss check)", {**check, "flags": [*smoke, *SLOW, *NO_DROPOUT, *logging]}, 45),
        ("fast path (loss check)", {**check, "flags": [*smoke, *NO_DROPOUT, *logging]}, 100),
        ("ours + train.fused_loss", {**ours, "flags": [*smoke, "--train.fused_loss", "true"]}, 100),
        ("ours + fused_loss, micro-batch 64", {**ours, "flags": [*smoke, "--train.fused_loss", "true", *mb64]}, 100),
    ]


def loss_check(slow: dict, fast: dict, tolerance: float) -> dict:
    a, b = dict(map(tuple, slow.get("losses", []))), dict(map(tuple, fast.get("losses", [])))
    steps = sorted(set(a) & set(b))
    if not steps:
        return {"ok": False, "why": "no losses to compare"}
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)
    return {
        "ok": worst <= tolerance,
        "steps": len(steps),
        "worst_relative_difference": worst,
        "tolerance": tolerance,
        "slow": [a[s] for s in steps],
        "fast": [b[s] for s in steps],
    }


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, few steps: check the script works on a CPU")
    p.add_argument("--budget-s", type=float, default=420, help="stop starting configurations after this (default 420)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30; smoke 2)")
    p.add_argument("--check-steps", type=int, default=None, help="steps of the loss check (default 20; smoke 3)")
    p.add_argument("--loss-tolerance", type=float, default=0.02, help="relative, per step (default 0.02)")
    p.add_argument("--baseline-batch", type=int, default=16)
    args = p.parse_args(argv)
    args.quick = args.quick or args.cpu_smoke
    args.warmup = args.warmup if args.warmup is not None else 1 if args.quick else 10
    args.steps = args.steps or (2 if args.quick else 30)
    args.check_steps = args.check_steps or (3 if args.quick else 20)
    before = common.load()
    started = time.perf_counter()

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as cache:
        for name, config, needs in plan(args):
            left = args.budget_s - (time.perf_counter() - started)
            if left < needs and not args.cpu_smoke:
                results[name] = {"error": f"skipped: {left:.0f} s of the budget left, it needs about {needs:.0f}"}
                print(f"[gpu] {name}: {results[name]['error']}", flush=True)
                continue
            # Bounded twice: by what is left, and by three times the estimate so that one stuck
            # configuration cannot take the rows after it down with it.
            timeout = None if args.cpu_smoke else min(left, 3 * needs)
            results[name] = common.run_child("bench.training", {**config, "cache_dir": cache}, timeout=timeout)
            r = results[name]
            shown = (
                f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}, first step {r['first_step_s']:.0f} s"
                if "tokens_per_s" in r
                else r["error"]
            )
            print(f"[gpu] {name}: {shown} ({time.perf_counter() - started:.0f} s in)", flush=True)

    names = list(results)
    base = results[names[0]]
    rows = []
    for name in names[1:]:
        r = results[name]
        if "loss check" in name:
            continue
        note = f"micro-batch {r.get('per_device_batch_size')}" if "tokens_per_s" in r else r.get("error", "")
        rows.append(
            common.Row(f"{name}, tokens/s", base.get("tokens_per_s"), r.get("tokens_per_s"), "tokens/s", True, note)
        )
        rows.append(
            common.Row(
                f"{name}, MFU (%)",
                100 * base["mfu"] if "mfu" in base else None,
                100 * r["mfu"] if "mfu" in r else None,
                "%",
                True,
            )
        )
    check = loss_check(
        results.get("slow path (loss check)", {}), results.get("fast path (loss check)", {}), args.loss_tolerance
    )
    print(f"[gpu] loss check, slow vs fast path: {check}")
    common.report(
        "gpu",
        "GPU training, gpt2-small recipe vs a plain Trainer (fp32, micro-batch "
        f"{baseline_batch(results)}); higher is better",
        rows,
        args,
        before,
        results=results,
        loss_check=check,
        wall_s=time.perf_counter() - started,
    )


def baseline_batch(results: dict) -> str:
    first = next(iter(results.values()), {})
    return str(first.get("per_device_batch_size", "?"))


if __name__ == "__main__":
    main()
