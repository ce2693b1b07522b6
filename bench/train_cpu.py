"""CPU training at two shapes: `hftextgen finetune` vs a plain Trainer, tokens/s and peak memory.

    python -m bench.train_cpu [--quick] [--explore] [--repeats N] [--recipe FILE ...] [--out FILE]

Shapes: bench/tiny-gpt2.yaml (the default recipe before the default recipe search: GPT-2 4 x 128
wide with GPT-2's 50,257 tokens, 8 blocks of 128 tokens a step) and bench/wide.yaml
(recipes/custom/text-files.yaml's model and batch: 6 x 256 wide, 16 blocks of 256 tokens), both
on the bundled plays; --recipe (repeatable) times others instead.

Baseline: transformers.Trainer(TrainingArguments(output_dir, per_device_train_batch_size=<the
recipe's>, report_to="none")) - fp32, AdamW (adamw_torch) - on the recipe's GPT-2 and its packed
Shakespeare blocks. Ours: `hftextgen finetune --config <recipe>`, everything as the recipe and
hftextgen's defaults set it (bf16 autocast where the CPU has native bf16, glibc allocator
settings, the fused loss where a micro-batch's fp32 logits exceed 64 MiB, ...). Each run is a
child process of its own, one after the other, never two at once; --repeats alternates
baseline and ours, shape by shape, and reports medians.
Four figures per run: tokens/s over the whole timed interval; tokens per step over the median
step time; tokens per CPU-second of the process; its peak resident memory (RSS). The median step
and the CPU-second figures are the ones least moved by other processes when the machine is
shared.

--explore adds variants of ours, each against the same baseline, to show what each setting
is worth: fp32, the other loss (stock or fused), torch.compile, GPT-2's dropout (where the
recipe has none). See bench/training.py for how steps are timed. The baseline is the recipe's
model, dropout included: the same computation.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import yaml

from bench import common

# Each shape with its untimed and timed steps: about 50k and 80k tokens timed.
SHAPES = {
    common.ROOT / "bench/tiny-gpt2.yaml": (10, 50),
    common.ROOT / "bench/wide.yaml": (5, 20),
}
QUICK = (2, 3)

EXPLORE = {
    "ours, fp32 (train.bf16 false)": ["--train.bf16", "false"],
    "ours, stock loss (train.fused_loss false)": ["--train.fused_loss", "false"],
    "ours, fused loss (train.fused_loss true)": ["--train.fused_loss", "true"],
    "ours + train.torch_compile": ["--train.torch_compile", "true"],
    "ours, dropout 0.1 (GPT-2's)": [
        "--model.resid_pdrop",
        "0.1",
        "--model.embd_pdrop",
        "0.1",
        "--model.attn_pdrop",
        "0.1",
    ],
}
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
FIGURES = (
    ("tokens_per_s", "tokens/s over the timed steps", "tokens/s", True),
    ("tokens_per_s_median_step", "tokens/s of the median step", "tokens/s", True),
    ("tokens_per_cpu_s", "tokens per CPU-second", "tokens/CPU-s", True),
    ("peak_rss_gb", "peak RSS", "GB", False),
)


def baseline_config(recipe: Path) -> dict:
    """The plain Trainer's model and batch, read from the recipe so the two always agree."""
    spec = yaml.safe_load(recipe.read_text())
    keys = ("n_layer", "n_head", "n_embd", "vocab_size", *DROPOUT_KEYS)
    model = {k: spec["model"][k] for k in keys if k in spec["model"]}
    return {
        "kind": "plain",
        "model": model,
        "block_size": spec["data"]["block_size"],
        "batch_size": spec["train"]["per_device_train_batch_size"],
    }


def recipe_fuses(spec: dict) -> bool:
    """Whether the recipe trains with the fused loss on a CPU (`auto`: when a micro-batch's fp32
    logits exceed CPU_FUSE_BYTES; the vocabulary is GPT-2's unless the recipe trains or sets one)."""
    from hftextgen.train.fused_loss import CPU_FUSE_BYTES

    setting = spec["train"].get("fused_loss", "auto")
    if setting != "auto":
        return setting is not False
    tok = spec.get("tokenizer", {})
    vocab = spec["model"].get("vocab_size") or (tok.get("vocab_size") if tok.get("source") == "train" else 50257)
    rows = spec["train"]["per_device_train_batch_size"] * spec["data"]["block_size"]
    return rows * vocab * 4 > CPU_FUSE_BYTES


def variants(recipe: Path, explore: bool, only: list[str] | None = None) -> dict[str, list[str]]:
    """Ours as the recipe sets it, then (--explore) each variant that changes something (only
    those whose name holds one of `only`, when given)."""
    found = {"hftextgen finetune (the recipe)": []}
    if explore:
        spec = yaml.safe_load(recipe.read_text())
        no_dropout = all(spec["model"].get(k) == 0 for k in DROPOUT_KEYS)
        fused = "true" if recipe_fuses(spec) else "false"
        for name, flags in EXPLORE.items():
            if ("dropout" in name and not no_dropout) or flags == ["--train.fused_loss", fused]:
                continue  # the recipe as it is: timed already
            if only and not any(word in name for word in only):
                continue
            found[name] = flags
    return found


def measure(args, shapes: dict[Path, tuple[int, int]], cache: str) -> dict[str, list[dict]]:
    """Every configuration, `repeats` times, alternating; results by row label."""
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for recipe, (warmup, steps) in shapes.items():
            shared = {"warmup": warmup, "steps": steps, "cache_dir": cache}
            configs = {"baseline": {**baseline_config(recipe), **shared}}
            for name, flags in variants(recipe, args.explore, args.variant).items():
                configs[name] = {"kind": "ours", "recipe": str(recipe), "flags": flags, **shared}
            for name, config in configs.items():
                result = common.run_child("bench.training", config)
                if "peak_rss_bytes" in result:
                    result["peak_rss_gb"] = result["peak_rss_bytes"] / 1e9
                results.setdefault(f"{recipe.name}: {name}", []).append(result)
                shown = f"{result['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in result else result["error"]
                rss = f", peak RSS {result['peak_rss_gb']:.2f} GB" if "peak_rss_gb" in result else ""
                print(f"[train_cpu] {recipe.name}, {name}: {shown}{rss} (load {common.load()})", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, action="append", help="time this recipe (repeatable; default: both shapes)")
    p.add_argument("--explore", action="store_true", help="also time variants of ours (several minutes each)")
    p.add_argument("--variant", action="append", help="with --explore: only variants whose name holds this (e.g. fp32)")
    p.add_argument("--repeats", type=int, default=1, help="baseline/ours pairs, alternating (default 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default per shape, quick 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default per shape, quick 3)")
    args = p.parse_args(argv)
    shapes = {recipe.resolve(): SHAPES.get(recipe.resolve(), (10, 50)) for recipe in args.recipe or SHAPES}
    shapes = {
        recipe: (
            args.warmup if args.warmup is not None else QUICK[0] if args.quick else warmup,
            args.steps or (QUICK[1] if args.quick else steps),
        )
        for recipe, (warmup, steps) in shapes.items()
    }
    before = common.load()
    with tempfile.TemporaryDirectory(prefix="bench-train-cpu-") as cache:
        results = measure(args, shapes, cache)

    def median(label: str, key: str) -> float | None:
        values = [r[key] for r in results.get(label, []) if key in r]
        return statistics.median(values) if values else None

    rows = []
    for recipe, (warmup, steps) in shapes.items():
        for name in variants(recipe, args.explore, args.variant):
            label, baseline = f"{recipe.name}: {name}", f"{recipe.name}: baseline"
            first = median(label, "first_step_s")
            span = f"steps {warmup + 1}-{warmup + steps}" + (f"; first step {first:.1f} s" if first else "")
            for key, how, unit, higher in FIGURES:
                if name != "hftextgen finetune (the recipe)" and key in (
                    "tokens_per_s_median_step",
                    "tokens_per_cpu_s",
                ):
                    continue  # variants: the interval and the memory are enough
                note = span if key != "peak_rss_gb" else "ratio: baseline / ours"
                rows.append(
                    common.Row(f"{label}, {how}", median(baseline, key), median(label, key), unit, higher, note)
                )
    names = " and ".join(recipe.name for recipe in shapes)
    common.report(
        "train_cpu",
        f"CPU training, {names} vs a plain Trainer; above 1x is ours faster or leaner",
        rows,
        args,
        before,
        results=results,
    )


if __name__ == "__main__":
    main()
