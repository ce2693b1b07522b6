"""CPU training: the default recipe's `hftextgen finetune` vs a plain Trainer, tokens/s.

    python -m bench.train_cpu [--quick] [--explore] [--repeats N] [--recipe FILE] [--out FILE]

Baseline: transformers.Trainer(TrainingArguments(output_dir, per_device_train_batch_size=<the
recipe's>, report_to="none")) - fp32, AdamW (adamw_torch) - on the recipe's GPT-2 and its packed
Shakespeare blocks. Ours: `hftextgen finetune --config <recipe>`, everything as the recipe and
hftextgen's defaults set it (bf16 autocast where the CPU has native bf16, glibc allocator
settings, ...). Each run is a child process of its own, one after the other, never two at
once; --repeats alternates baseline and ours and reports medians. Three figures per run:
tokens/s over the whole timed interval; tokens per step over the median step time; tokens per
CPU-second of the process. The last two are the ones least moved by other processes when the
machine is shared.

--explore adds variants of ours, each against the same baseline, to show what each setting
is worth: fp32, the fused loss, torch.compile, GPT-2's dropout. See bench/training.py for how
steps are timed. The baseline is the recipe's model, dropout included: the same computation.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import yaml

from bench import common

EXPLORE = {
    "ours, fp32 (train.bf16 false)": ["--train.bf16", "false"],
    "ours + train.fused_loss": ["--train.fused_loss", "true"],
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


def baseline_config(recipe: Path) -> dict:
    """The plain Trainer's model and batch, read from the recipe so the two always agree."""
    spec = yaml.safe_load(recipe.read_text())
    keys = ("n_layer", "n_head", "n_embd", "vocab_size", "resid_pdrop", "embd_pdrop", "attn_pdrop")
    model = {k: spec["model"][k] for k in keys if k in spec["model"]}
    return {
        "kind": "plain",
        "model": model,
        "block_size": spec["data"]["block_size"],
        "batch_size": spec["train"]["per_device_train_batch_size"],
    }


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=common.ROOT / "recipes/shakespeare/tiny.yaml")
    p.add_argument("--explore", action="store_true", help="also time variants of ours (several minutes each)")
    p.add_argument("--repeats", type=int, default=1, help="baseline/ours pairs, alternating (default 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10, quick 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50, quick 3)")
    args = p.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else 2 if args.quick else 10
    steps = args.steps or (3 if args.quick else 50)
    before = common.load()

    with tempfile.TemporaryDirectory(prefix="bench-train-cpu-") as cache:
        shared = {"warmup": warmup, "steps": steps, "cache_dir": cache}
        baseline = {**baseline_config(args.recipe), **shared}
        ours = {"kind": "ours", "recipe": str(args.recipe), "flags": [], **shared}
        variants = {"hftextgen finetune (the recipe)": ours}
        if args.explore:
            variants.update({name: {**ours, "flags": flags} for name, flags in EXPLORE.items()})

        results: dict[str, list[dict]] = {"baseline": [], **{name: [] for name in variants}}
        for _ in range(args.repeats):
            for name, config in [("baseline", baseline), *variants.items()]:
                result = common.run_child("bench.training", config)
                results[name].append(result)
                shown = f"{result['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in result else result["error"]
                print(f"[train_cpu] {name}: {shown} (load {common.load()})", flush=True)

    def median(name: str, key: str = "tokens_per_s") -> float | None:
        values = [r[key] for r in results[name] if key in r]
        return statistics.median(values) if values else None

    rows = []
    for name in variants:
        first = median(name, "first_step_s")
        span = f"steps {warmup + 1}-{warmup + steps}" + (f"; first step {first:.1f} s" if first else "")
        for key, how, unit in (
            ("tokens_per_s", "over the timed steps", "tokens/s"),
            ("tokens_per_s_median_step", "median step", "tokens/s"),
            ("tokens_per_cpu_s", "per CPU-second", "tokens/CPU-s"),
        ):
            rows.append(common.Row(f"{name}, {how}", median("baseline", key), median(name, key), unit, True, span))
    common.report(
        "train_cpu",
        f"CPU training, {args.recipe.name} vs a plain Trainer; tokens/s, higher is better",
        rows,
        args,
        before,
        results=results,
    )


if __name__ == "__main__":
    main()
