"""GPU benchmark (issue 14): training, generation, validate and FSDP's save in one call, most important first.

    python -m bench.gpu [--budget-s 330] [--only NAME,...] [--skip NAME,...] [--out FILE]
    python -m bench.gpu --cpu-smoke      every configuration on a CPU, tiny shapes: check the script

bench/gpu.sh runs it on a lent H100/H200 (after installing the carried wheels); bench/RESULTS.md
has the exact device call and the time plan. Each configuration runs in a child process of its
own with a timeout; one is skipped when what is left of --budget-s cannot fit its estimate
(seconds on an H200, in plan()), so one call always brings back the first rows. In order (what
the issue asks first: our speed against the baseline, the loss check, generation, the fused
losses, then FSDP's save and validate's estimate):

  ours             `hftextgen finetune --config recipes/shakespeare/gpt2-small.yaml`, as shipped
  baseline         a plain Trainer, TrainingArguments defaults (fp32), GPT-2 124M, block 1024,
                   micro-batch 16 (perf-notes' baseline)
  slow, fast       the loss check: the recipe with every speed setting off (fp32, eager, stock
                   loss, adamw_torch) and as shipped, both without dropout (so that both compute
                   the same thing), 12 steps; per-step losses must agree within --loss-tolerance.
                   `fast` is also a throughput row: the recipe without dropout
  generate         bench/generate.py on GPT-2 124M (random weights), 256 new tokens: HF generate vs
                   ours with the dynamic and the static cache (hftextgen/generate/static.py), batch 1 and 64
  fused_loss       ours + train.fused_loss
  fsdp             launch/fsdp.yaml on one process: 4 steps, a sharded checkpoint, the final model
                   saved whole and loaded back with stock transformers
  validate         `hftextgen validate` on the recipe: its step time and memory vs `ours`
  liger            ours + `train.fused_loss liger` (liger-kernel's fused linear + cross-entropy)
  batch64          ours + the faster of the two fused losses, micro-batch 64
  cudagraphs       ours + train.torch_compile_mode reduce-overhead (CUDA graphs through the Trainer)
  decode_compiled  generation with the static step compiled (only when `generate`'s batch-1 row
                   missed 1,500 tokens/s)
  hf_static        HF generate with its own static cache (transformers compiles it), batch 1
  profile          ours, 2 steps under torch.profiler after the warm-up: the top kernels by device
                   time and the device's busy fraction (where a step's time goes)
  llama            ours with a Llama-style model of GPT-2 small's depth and width from scratch
                   (RoPE, RMSNorm, SwiGLU of 2,048, 4 key/value heads), the recipe's bf16 and compile
  lora             recipes/custom/lora.yaml on a GPT-2 124M checkpoint the child saves (random
                   weights: the hub is offline), the plays, bf16, gradient checkpointing
  packing          bench/packing.py: task data packed isolated vs padded, a Llama of GPT-2 small's
                   shape, SDPA (flash-attn is not on the machine), real tokens/s and answer bits/byte
  autotune         ours + train.torch_compile_mode max-autotune-no-cudagraphs (inductor benchmarks
                   its GEMM and Triton choices while compiling: minutes)

MFU = tokens/s x (6N + 12*L*H*Q*T) / 989e12, N without position embeddings (855 MFLOP/token for
GPT-2 124M at T=1024). Everything lands in one JSON (--out) and the log gpu.sh tees.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import common

RECIPE = str(common.ROOT / "recipes/shakespeare/gpt2-small.yaml")
LORA = str(common.ROOT / "recipes/custom/lora.yaml")
AUTOTUNE = "max-autotune-no-cudagraphs"  # CUDA graphs are the cudagraphs row's lever
NO_DROPOUT = ["--model.resid_pdrop", "0", "--model.embd_pdrop", "0", "--model.attn_pdrop", "0"]
SLOW = ["--train.bf16", "false", "--train.torch_compile", "false", "--train.optim", "adamw_torch"]
SLOW += ["--train.fused_loss", "false", *NO_DROPOUT]
NO_COMPILE = ["--train.torch_compile", "false"]
# --cpu-smoke: the recipe's settings on a model small enough for a CPU.
SMOKE = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.n_positions", "64"]
SMOKE += ["--data.block_size", "64", "--train.per_device_train_batch_size", "2"]
OTHER_MODELS = ("llama", "lora")
GOALS = {"mfu": 0.45, "generate_batch1": 1500.0, "generate_batch64_ratio": 3.0}


@dataclass
class Job:
    """One configuration: what runs, and the seconds it is expected to take on an H200."""

    name: str
    kind: str  # train (bench.training), generate, packing (their scripts), validate, fsdp (bench.gpu_checks)
    config: dict = field(default_factory=dict)
    needs_s: float = 60
    datasets: bool = True  # needs the datasets package (the data stage): skipped without it


def plan(args) -> list[Job]:
    smoke = SMOKE if args.cpu_smoke else []
    # On a CPU, torch.compile takes a minute or more per process: only the rows whose point is
    # compilation keep it in the smoke run.
    light = [*smoke, *NO_COMPILE] if args.cpu_smoke else []
    timing = {"kind": "ours", "recipe": RECIPE, "warmup": args.warmup, "steps": args.steps}
    check = {**timing, "warmup": 1, "steps": args.check_steps - 1}  # losses of steps 1..check_steps
    baseline = {
        "kind": "plain",
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32}
        if args.cpu_smoke
        else {"n_layer": 12, "n_head": 12, "n_embd": 768},
        "block_size": 64 if args.cpu_smoke else 1024,
        "batch_size": 2 if args.cpu_smoke else 16,
        "warmup": 1 if args.cpu_smoke else 3,
        "steps": args.steps if args.cpu_smoke else 15,
    }
    generate = (
        ["--model", "tiny", "--new-tokens", "8", "--quick"]
        if args.cpu_smoke
        else ["--new-tokens", "256", "--repeats", "2"]
    )
    llama = ["--model.model_type", "llama", "--model.n_kv_head", "1" if args.cpu_smoke else "4"]
    llama += ["--model.n_inner", "64" if args.cpu_smoke else "2048"]
    checkpoint = (
        {"n_layer": 2, "n_head": 2, "n_embd": 32} if args.cpu_smoke else {"n_layer": 12, "n_head": 12, "n_embd": 768}
    )
    lora = ["--data.source", "shakespeare", "--data.paths", "[]", "--train.gradient_checkpointing", "true"]
    lora += ["--data.block_size", "64" if args.cpu_smoke else "1024"]
    lora += ["--train.per_device_train_batch_size", "2" if args.cpu_smoke else "16"]
    packing = ["--quick"] if args.cpu_smoke else ["--examples", "4000", "--shape", "small", "--rows", "32"]
    return [
        Job("ours", "train", {**timing, "flags": smoke}, 90),
        Job("baseline", "train", baseline, 30),
        Job("slow", "train", {**check, "flags": [*smoke, *SLOW]}, 30),
        Job("fast", "train", {**check, "warmup": args.warmup, "steps": args.steps, "flags": [*smoke, *NO_DROPOUT]}, 80),
        Job("generate", "generate", {"args": generate}, 50, datasets=False),
        Job("fused_loss", "train", {**timing, "flags": [*light, "--train.fused_loss", "true"]}, 85),
        Job("fsdp", "fsdp", {"recipe": RECIPE, "steps": 4, "flags": [*smoke, *NO_COMPILE]}, 50),
        Job("validate", "validate", {"recipe": RECIPE, "flags": light}, 100),
        Job("liger", "train", {**timing, "flags": [*light, "--train.fused_loss", "liger"]}, 90),
        Job("batch64", "train", {**timing, "flags": light}, 95),  # + the faster fused loss, see _batch64
        Job("cudagraphs", "train", {**timing, "flags": [*smoke, "--train.torch_compile_mode", "reduce-overhead"]}, 100),
        Job("decode_compiled", "generate", {"args": [*generate, "--compiled", "--no-main"]}, 150, datasets=False),
        Job("hf_static", "generate", {"args": [*generate, "--hf-static", "--no-main"]}, 80, datasets=False),
        Job("profile", "train", {**timing, "steps": 2, "profile": True, "flags": smoke}, 70),
        Job("llama", "train", {**timing, "flags": [*smoke, *llama]}, 90),
        Job("lora", "train", {**timing, "recipe": LORA, "pretrained": checkpoint, "flags": lora}, 60),
        Job("packing", "packing", {"args": packing}, 120),
        Job("autotune", "train", {**timing, "flags": [*smoke, "--train.torch_compile_mode", AUTOTUNE]}, 240),
    ]


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, few steps: check the script works on a CPU")
    p.add_argument("--budget-s", type=float, default=330, help="start no configuration that would end after this")
    p.add_argument("--only", default="", help="comma-separated configuration names to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated configuration names not to run")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps of a timed row (default 8; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30; smoke 2)")
    p.add_argument("--check-steps", type=int, default=None, help="steps of the loss check (default 12; smoke 3)")
    p.add_argument("--loss-tolerance", type=float, default=0.02, help="relative, per step (default 0.02)")
    p.add_argument("--previous", type=Path, help="gpu.json of an earlier call: its rows count where this one has none")
    args = p.parse_args(argv)
    args.quick = args.quick or args.cpu_smoke
    args.warmup = args.warmup if args.warmup is not None else 1 if args.quick else 8
    args.steps = args.steps or (2 if args.quick else 30)
    args.check_steps = args.check_steps or (3 if args.quick else 12)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a running child's group is ended too
    before = common.load()
    started = time.perf_counter()
    jobs = [j for j in plan(args) if _chosen(j.name, args)]
    no_datasets = os.environ.get("BENCH_NO_DATASETS")  # set by gpu.sh when the datasets stage cannot import

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as cache:
        for job in jobs:
            left = args.budget_s - (time.perf_counter() - started)
            why = _skip(job, results, left, args, no_datasets)
            if why:
                results[job.name] = {"skipped": why}
                print(f"[gpu] {job.name}: skipped: {why}", flush=True)
                continue
            print(
                f"[gpu] {job.name}: starting ({time.perf_counter() - started:.0f} s in, {left:.0f} s left)", flush=True
            )
            # Bounded by what is left, and by a multiple of the estimate, so that one stuck
            # configuration cannot take the rows after it down with it.
            timeout = None if args.cpu_smoke else max(30.0, min(left, 2.5 * job.needs_s))
            results[job.name] = _run(job, results, cache, timeout, args)
            print(
                f"[gpu] {job.name}: {_shown(results[job.name])} ({time.perf_counter() - started:.0f} s in)", flush=True
            )
            _write_partial(args, results)  # what has run survives the call being stopped
    summary = _summary(_with_previous(results, args.previous), args)
    common.report(
        "gpu",
        "GPU benchmark, issue 14 (baseline: Trainer defaults for training rows, HF generate for generation); "
        "higher is better",
        summary.pop("rows"),
        args,
        before,
        results=results,
        **summary,
        wall_s=time.perf_counter() - started,
    )
    failed = [name for name, r in results.items() if "error" in r]
    if args.cpu_smoke and failed:
        raise SystemExit(f"smoke run: these configurations failed: {', '.join(failed)}")


def _with_previous(results: dict, previous: Path | None) -> dict:
    """This call's rows, and an earlier call's where this one skipped or did not run them (a
    second call that runs the rest of the list still compares against the first one's rows)."""
    if previous is None:
        return results
    earlier = json.loads(previous.read_text()).get("results", {})
    merged = {name: {**r, "from_previous_call": True} for name, r in earlier.items() if "skipped" not in r}
    merged.update({name: r for name, r in results.items() if "skipped" not in r or name not in merged})
    return merged


def _write_partial(args, results: dict) -> None:
    out = args.out or common.RESULTS / "gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "gpu", "partial": True, "results": results}, indent=2))


def _chosen(name: str, args) -> bool:
    only = [n for n in args.only.split(",") if n]
    return (not only or name in only) and name not in args.skip.split(",")


def _skip(job: Job, results: dict, left: float, args, no_datasets: str | None) -> str | None:
    if job.datasets and no_datasets:
        return f"the data stage cannot import here ({no_datasets})"
    if job.name == "decode_compiled" and not args.cpu_smoke:
        rate = results.get("generate", {}).get("tokens_per_s", {}).get("ours, static cache, batch 1")
        if rate and rate >= GOALS["generate_batch1"]:
            return f"not needed: the captured eager step already makes {rate:,.0f} tokens/s at batch 1"
    if left < job.needs_s and not args.cpu_smoke:
        return f"{left:.0f} s of the budget left, it needs about {job.needs_s:.0f}"
    return None


def _run(job: Job, results: dict, cache: str, timeout: float | None, args) -> dict:
    if job.kind == "train":
        config = _batch64(job.config, results, args) if job.name == "batch64" else job.config
        result = common.run_child("bench.training", {**config, "cache_dir": cache}, timeout=timeout)
        return {**result, "flags": config.get("flags", [])}
    if job.kind in ("validate", "fsdp"):
        return common.run_child("bench.gpu_checks", {**job.config, "kind": job.kind, "cache_dir": cache}, timeout)
    with tempfile.TemporaryDirectory() as tmp:  # generate, packing: their script writes its JSON
        out = Path(tmp) / f"{job.kind}.json"
        started = time.perf_counter()
        code = common.run_command(
            [sys.executable, "-m", f"bench.{job.kind}", *job.config["args"], "--out", str(out)], timeout
        )
        wall = time.perf_counter() - started
        if code is None:
            return {"error": f"timed out after {timeout:.0f} s", "wall_s": wall}
        if code != 0 or not out.exists():
            return {"error": f"exit code {code}", "wall_s": wall}
        return {**json.loads(out.read_text()), "wall_s": wall}


def _batch64(config: dict, results: dict, args) -> dict:
    """Micro-batch 64 with whichever fused loss measured faster (train.fused_loss if neither ran)."""
    rates = {name: results.get(name, {}).get("tokens_per_s", 0) for name in ("fused_loss", "liger")}
    rates = {name: rate if learned(results.get(name, {})) else 0 for name, rate in rates.items()}
    best = max(rates, key=rates.get) if any(rates.values()) else "fused_loss"
    flags = [*config["flags"], "--train.per_device_train_batch_size", "4" if args.cpu_smoke else "64"]
    return {**config, "flags": [*flags, "--train.fused_loss", "liger" if best == "liger" else "true"]}


def _shown(r: dict) -> str:
    if "error" in r:
        return f"FAILED: {r['error']}"
    if "profile" in r:
        top = ", ".join(f"{e['name'][:40]} {e['s_per_step'] * 1e3:.1f} ms" for e in r["profile"]["top"][:5])
        return f"device busy {r['profile']['busy_fraction']:.0%} of each step; top: {top}"
    if "isolated" in r and "padded" in r:
        speed = {k: r[k]["real_tokens_per_s"] for k in ("isolated", "padded")}
        learned_ = {k: r[k]["bits_per_byte"] for k in ("isolated", "padded")}
        return f"real tokens/s {speed}, answer bits/byte {learned_}"
    if "tokens_per_s" in r and isinstance(r["tokens_per_s"], float):
        memory = r.get("peak_memory_bytes", 0) / 2**30
        first = r["first_step_s"]
        return f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}, first step {first:.0f} s, peak {memory:.1f} GiB"
    if "estimate" in r:
        t = r["estimate"]["time"]
        return f"estimate {t['step_seconds']:.3f} s/step, {t['tokens_per_second']:,.0f} tokens/s"
    if "loads" in r:
        return f"saved model loads: {r['loads']}, logits finite: {r['logits_finite']}, checkpoints {r['checkpoints']}"
    if "tokens_per_s" in r:
        return ", ".join(f"{k} {v:,.0f}" for k, v in r["tokens_per_s"].items())
    return "done"


def loss_check(slow: dict, fast: dict, tolerance: float) -> dict:
    a, b = slow.get("step_losses", []), fast.get("step_losses", [])
    steps = min(len(a), len(b))
    if not steps:
        return {"ok": False, "why": "no losses to compare (one of the two runs failed or was skipped)"}
    worst = max(abs(a[i] - b[i]) / abs(a[i]) for i in range(steps))
    return {
        "ok": worst <= tolerance,
        "steps": steps,
        "worst_relative_difference": worst,
        "tolerance": tolerance,
        "slow": a[:steps],
        "fast": b[:steps],
    }


def _summary(results: dict, args) -> dict:
    """The table rows, and what the issue asks to be read off them."""
    rows, training = _training_rows(results)
    generation = {}
    for name in ("generate", "decode_compiled", "hf_static"):
        generation.update(results.get(name, {}).get("tokens_per_s", {}))
    rows += _generation_rows(generation)
    rows += _packing_rows(results.get("packing", {}))
    if "profile" in results.get("profile", {}):
        print(f"[gpu] profile of {RECIPE} after the warm-up:\n{results['profile']['profile']['table']}")
    # The MFU goal is GPT-2's: the Llama and LoRA rows are other models (LoRA computes no weight
    # gradients of the frozen layers, so 6N overstates its work).
    learning = [name for name in training if learned(training[name]) and name not in OTHER_MODELS]
    best = max(learning, key=lambda n: training[n]["tokens_per_s"]) if learning else None
    check = loss_check(results.get("slow", {}), results.get("fast", {}), args.loss_tolerance)
    validation = _validate_vs_measured(results.get("validate", {}), results.get("ours", {}))
    goals = _goals(training.get(best), generation)
    print(f"[gpu] loss check, slow vs fast path: {json.dumps(check)}")
    print(f"[gpu] validate vs the measured run: {json.dumps(validation)}")
    if best:
        r = training[best]
        print(f"[gpu] best training configuration: {best}: flags {r['flags']}")
    print(f"[gpu] goals: {json.dumps(goals)}")
    summary = {"loss_check": check, "validate_vs_measured": validation, "best_training": best, "goals": goals}
    return {"rows": rows, **summary}


def learned(result: dict) -> bool:
    """Whether a training row's loss fell over its steps (the last three steps' mean at least 2%
    below the first step's): a row that trains nothing is not a speed (an H200 run of the fused
    loss under torch.compile took full-speed steps with zero gradients)."""
    losses = result.get("step_losses") or []
    if len(losses) < 4:
        return True  # too few steps to tell (the CPU smoke run)
    return sum(losses[-3:]) / 3 < 0.98 * losses[0]


def _training_rows(results: dict) -> tuple[list, dict]:
    base, rows, training = results.get("baseline", {}), [], {}
    for name in ("ours", "fast", "fused_loss", "liger", "batch64", "cudagraphs", "autotune", "llama", "lora"):
        r = results.get(name, {})
        if "tokens_per_s" not in r:
            continue
        training[name] = r
        peak = r["peak_memory_bytes"] / 2**30
        note = f"micro-batch {r['per_device_batch_size']}, first step {r['first_step_s']:.0f} s, peak {peak:.1f} GiB"
        if not learned(r):
            note += "; TRAINED NOTHING: its loss did not fall, so its speed does not count"
        rows.append(common.Row(f"{name}: tokens/s", base.get("tokens_per_s"), r["tokens_per_s"], "tokens/s", note=note))
        rows.append(common.Row(f"{name}: MFU (%)", 100 * base["mfu"] if "mfu" in base else None, 100 * r["mfu"], "%"))
    return rows, training


def _generation_rows(generation: dict) -> list:
    rows = []
    for name, rate in generation.items():
        *_, batch = name.rsplit(" ", 1)
        if (name.startswith("ours") or name.startswith("HF generate, static")) and batch.isdigit():
            rows.append(common.Row(f"generate: {name}", generation.get(f"HF generate, batch {batch}"), rate, "tok/s"))
    return rows


def _packing_rows(r: dict) -> list:
    if "isolated" not in r or "padded" not in r:
        return []
    speed = r["padded"]["real_tokens_per_s"], r["isolated"]["real_tokens_per_s"]
    learned_ = r["padded"]["bits_per_byte"], r["isolated"]["bits_per_byte"]
    return [
        common.Row("packing: real tokens/s (padded = baseline)", *speed, "tokens/s"),
        common.Row("packing: answer bits/byte (padded = baseline)", *learned_, "bits/byte", higher_is_better=False),
    ]


def _goals(best: dict | None, generation: dict) -> dict:
    def fastest_static(batch: str) -> float | None:
        rates = [v for k, v in generation.items() if k.startswith("ours, static") and k.endswith(f"batch {batch}")]
        return max(rates, default=None)

    b1, b64, hf64 = fastest_static("1"), fastest_static("64"), generation.get("HF generate, batch 64")
    goals = {"training MFU >= 45%": None, "generation batch 1 >= 1,500 tokens/s": None}
    goals["generation batch 64 >= 3x HF generate"] = None
    if best:
        goals["training MFU >= 45%"] = {"mfu": best["mfu"], "met": best["mfu"] >= GOALS["mfu"]}
    if b1:
        goals["generation batch 1 >= 1,500 tokens/s"] = {"tokens_per_s": b1, "met": b1 >= GOALS["generate_batch1"]}
    if b64 and hf64:
        ratio = b64 / hf64
        goals["generation batch 64 >= 3x HF generate"] = {
            "ratio": ratio,
            "met": ratio >= GOALS["generate_batch64_ratio"],
        }
    return goals


def _validate_vs_measured(validate: dict, ours: dict) -> dict:
    if "estimate" not in validate or "tokens_per_s" not in ours:
        return {"compared": False, "why": "validate or ours did not run"}
    est = validate["estimate"]
    measured_step = ours["timed_s"] / ours["timed_steps"]
    formula = est["memory"]["formula"]["total"]
    return {
        "compared": True,
        "step_seconds": {
            "validate": est["time"]["step_seconds"],
            "measured": measured_step,
            "ratio": est["time"]["step_seconds"] / measured_step,
        },
        "peak_memory_bytes": {
            "validate_formula": formula,
            "validate_measured": est["memory"]["measured_peak"],
            "measured": ours["peak_memory_bytes"],
            "formula_ratio": formula / ours["peak_memory_bytes"],
        },
        "validate_total_seconds_for_the_recipe": est["time"]["total_seconds"],
        "validate_wall_s": validate.get("validate_s"),
    }


if __name__ == "__main__":
    main()
