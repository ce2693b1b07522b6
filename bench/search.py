"""Default recipe search: the architecture, tokenizer and hyper-parameters that give the lowest
held-out bits/byte for `make finetune` (recipes/shakespeare/tiny.yaml) within its budget.

    python -m bench.search [--only NAME ...] [--stage S ...] [--threads N] [--list] [--quick] [--jobs N] [--out FILE]
    python -m bench.search --throughput [--only NAME ...] [--stage S ...] [--steps N] [--warmup N]
    python -m bench.search --table      (every full run recorded, as bench/RESULTS.md shows them)

The budget: 300 s wall on a 2-core CPU from the command's start to its exit, preparing the data
and the final evaluation included; the held-out plays, the evaluator and its stride are the
recipe's (stride: half the context, unless a candidate sets it). CANDIDATES below is the search:
each one is bench/tiny-gpt2.yaml (the default before the search) plus command-line overrides,
named by what it changes, or a recipe file of its own (the default the search chose).

Full runs (the default): each candidate is `hftextgen finetune --config <recipe> <overrides>` in
a process of its own, one at a time, with HFTEXTGEN_CACHE in a fresh temporary directory: the
cache is cold, so training a tokenizer and tokenizing the plays count, as they do for a user's
first run. Recorded per candidate: wall seconds, the child's CPU seconds (user + system: less
moved by other processes than wall time on a shared machine), training tokens/s, the load
average before and after, eval.json's bits/byte and perplexity, and the samples. Results
accumulate in bench/results/search.json by candidate name (a re-run's row replaces it, the
earlier one kept in its `earlier` list). --threads 1 gives each run one thread: on a shared
machine two threads wait for each other at every step, one keeps a core's speed.

--throughput: the training rate of each candidate over steady steps (bench/training.py, no
evaluation or saving, one thread), each measured between two runs of bench/tiny-gpt2.yaml in
the same window. A candidate's rate over the reference's (the mean of its neighbours) times the
reference's rate on a quiet machine (bench/RESULTS.md, CPU training) predicts its quiet rate,
hence the steps that fill the budget: bits/byte depends only on the recipe (a seeded CPU run
gives the same numbers under any load), wall time depends on the load, so steps are chosen from
rates measured as ratios and final wall times are taken on a quiet machine. The prediction is
conservative for small shapes, which gain more from a second thread than the reference does.

--jobs N runs N candidates at once (each with cores / N threads): for pruning runs on a bigger
machine only; wall times of such runs say nothing about the budget.

--quick: a smoke test of both modes on the first two candidates, a few steps each.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench import common

# The default recipe as shipped before this search: every candidate is BASE plus its overrides,
# and --throughput's reference is BASE as is, so the search means the same whatever tiny.yaml
# holds now.
BASE = common.ROOT / "bench" / "tiny-gpt2.yaml"
# BASE's training rate on a quiet machine (bench/RESULTS.md, CPU training), the yardstick of
# --throughput; and its steps.
REFERENCE_QUIET_TOKENS_PER_S = 3_677
REFERENCE_STEPS = 600


@dataclass(frozen=True)
class Candidate:
    """One row of the search: BASE plus `flags` (or the recipe file `recipe` plus `flags`), in
    stage `stage` (a step of the search)."""

    name: str
    stage: str
    flags: tuple[str, ...] = field(default=())
    recipe: str | None = None

    @property
    def recipe_file(self) -> str:
        return str(common.ROOT / self.recipe) if self.recipe else str(BASE)

    @property
    def steps(self) -> int:
        steps = _flag(self.flags, "--train.max_steps")
        if steps is None and self.recipe:
            steps = yaml.safe_load(Path(self.recipe_file).read_text())["train"].get("max_steps")
        return int(steps or REFERENCE_STEPS)


def _flag(flags: tuple[str, ...], key: str) -> str | None:
    value = None
    for i, f in enumerate(flags[:-1]):
        if f == key:
            value = flags[i + 1]
    return value


# The overrides a candidate is built from: knob -> (flag, the recipe's value, how it shows in
# the name). Every name shows the shape, batch, learning rate and steps, so a row of the table
# reads alone; the rest show only where they differ from the recipe.
KNOBS = {
    "arch": ("--model.model_type", None, "{}"),
    "vocab": ("--tokenizer.vocab_size", None, "bpe{}"),
    "layers": ("--model.n_layer", 4, "L{}"),
    "width": ("--model.n_embd", 128, "d{}"),
    "heads": ("--model.n_head", 4, "h{}"),
    "kv_heads": ("--model.n_kv_head", None, "kv{}"),
    "mlp": ("--model.n_inner", None, "mlp{}"),
    "tied": ("--model.tie_word_embeddings", None, "tied={}"),
    "batch": ("--train.per_device_train_batch_size", 8, "{}x"),
    "block": ("--data.block_size", 128, "{}"),
    "lr": ("--train.learning_rate", 2e-3, "lr{:g}"),
    "steps": ("--train.max_steps", REFERENCE_STEPS, "s{}"),
    "warmup": ("--train.warmup_steps", None, "warmup {:g}"),
    "wd": ("--train.weight_decay", None, "wd {:g}"),
    "beta2": ("--train.adam_beta2", None, "beta2 {:g}"),
    "min_lr": ("--train.lr_scheduler_kwargs", None, "cosine to {:g} x lr"),
    "fused_loss": ("--train.fused_loss", None, "fused_loss {}"),
}
ALWAYS_SHOWN = ("vocab", "layers", "width", "heads", "batch", "block", "lr")


def describe(flags: tuple[str, ...]) -> str:
    """A candidate's name, from its flags: e.g. `bpe2048 L4 d128 h2 16x256 lr0.002 s370`."""
    parts = []
    for key, (flag, default, shown) in KNOBS.items():
        value = _flag(flags, flag)
        if key == "vocab":
            parts.append(shown.format(value) if _flag(flags, "--tokenizer.source") == "train" else "gpt2")
        elif key == "min_lr":
            if value is not None:
                parts.append(shown.format(json.loads(value)["min_lr_rate"]))
        elif value is not None or key in ALWAYS_SHOWN:
            value = default if value is None else value
            parts.append(shown.format(float(value) if key in ("lr", "warmup", "wd", "beta2") else value))
    return " ".join(parts).replace("x ", "x", 1)


# Training rate of each shape over the recipe's, one thread each (--throughput --stage 1; the
# table in bench/RESULTS.md). A candidate given `seconds` gets the steps that train that long at
# its rate on a quiet machine.
RATES = {
    "bpe1024 L4 d128 h2 16x256 lr0.002": 5.27,
    "bpe1024 L4 d192 h3 16x256 lr0.002": 3.27,
    "bpe1024 L4 d256 h4 16x256 lr0.002": 2.31,
    "bpe1024 L6 d256 h4 16x256 lr0.002": 1.64,
    "bpe2048 L4 d128 h2 16x256 lr0.002": 5.08,
    "bpe2048 L4 d192 h3 16x256 lr0.002": 3.41,
    "bpe2048 L4 d256 h4 16x256 lr0.002": 2.34,
    "bpe2048 L6 d256 h4 16x256 lr0.002": 1.57,
    "bpe4096 L4 d128 h2 16x256 lr0.002": 4.78,
    "bpe4096 L4 d192 h3 16x256 lr0.002": 2.81,
    "bpe4096 L4 d256 h4 16x256 lr0.002": 2.06,
    "bpe4096 L6 d256 h4 16x256 lr0.002": 1.44,
    "bpe8192 L4 d128 h2 16x256 lr0.002": 3.41,
    "bpe8192 L4 d256 h4 16x256 lr0.002": 1.71,
    "bpe2048 L6 d384 h6 16x256 lr0.002": 0.89,
    "gpt2 L4 d128 h4 16x256 lr0.002": 0.45,
    "bpe2048 L4 d256 h4 8x256 lr0.002": 2.17,
    "bpe2048 L4 d256 h4 32x256 lr0.002": 2.20,
    "bpe2048 L4 d256 h4 16x128 lr0.002": 2.17,
    "bpe2048 L4 d256 h4 32x128 lr0.002": 2.18,
    "bpe2048 L4 d256 h4 64x64 lr0.002": 2.40,
    # stage 1b
    "bpe4096 L2 d128 h2 16x256 lr0.002": 6.27,
    "bpe4096 L3 d128 h2 16x256 lr0.002": 4.58,
    "bpe4096 L6 d128 h2 16x256 lr0.002": 3.19,
    "bpe4096 L8 d128 h2 16x256 lr0.002": 2.33,
    "bpe4096 L4 d96 h2 16x256 lr0.002": 5.37,
    "bpe4096 L6 d96 h2 16x256 lr0.002": 3.91,
    "bpe4096 L4 d128 h4 16x256 lr0.002": 4.12,
    "bpe4096 L4 d128 h2 8x256 lr0.002": 4.40,
    "bpe4096 L4 d128 h2 32x128 lr0.002": 4.76,
    "bpe4096 L4 d128 h2 8x512 lr0.002": 3.78,
    "bpe4096 L4 d128 h2 4x512 lr0.002": 3.41,
    # stage 1c (8 x 256 measured again there: 3.88)
    "bpe4096 L4 d128 h2 4x256 lr0.002": 3.70,
    "bpe4096 L4 d128 h2 8x128 lr0.002": 3.72,
    "bpe6144 L4 d128 h2 8x256 lr0.002": 3.75,
    "bpe8192 L4 d128 h2 8x256 lr0.002": 3.27,
    # stage 1d (measured again: bpe8192 8 x 128 3.13, bpe4096 8 x 128 3.93)
    "bpe8192 L4 d128 h2 8x128 lr0.002": 3.28,
    "llama bpe8192 L4 d128 h2 kv1 mlp344 tied=true 8x128 lr0.002": 3.25,
    "llama bpe8192 L4 d128 h2 mlp344 tied=true 8x128 lr0.002": 2.97,
    "bpe4096 L4 d128 h2 4x128 lr0.002": 3.60,
}


def candidate(stage: str, evals: int = 2, note: str = "", **knobs) -> Candidate:
    """The recipe with `knobs` changed (see KNOBS). `vocab` trains a BPE of that size on the
    plays (tokenizer.source=train); unset keeps GPT-2's 50,257 tokens. Evaluations, checkpoints
    and samples during training happen `evals` times (the last at the end), whatever the steps,
    so their cost stays the same share of the budget."""
    seconds = knobs.pop("seconds", None)
    if seconds is not None:
        # The steps that train `seconds` at the shape's measured rate (RATES).
        shape_knobs = ("arch", "vocab", "layers", "width", "heads", "kv_heads", "mlp", "tied", "batch", "block")
        shape = describe(tuple(candidate(stage, **{k: v for k, v in knobs.items() if k in shape_knobs}).flags))
        batch, block = (knobs.get(k, KNOBS[k][1]) for k in ("batch", "block"))
        rate = RATES[shape] * REFERENCE_QUIET_TOKENS_PER_S
        knobs["steps"] = int(round(rate * seconds / (batch * block), -1))
    flags: list[str] = []
    if "vocab" in knobs:
        flags += ["--tokenizer.source", "train"]
    for key, value in knobs.items():
        if value is None:  # the recipe's (or the architecture's) own
            continue
        flag = KNOBS[key][0]
        if key == "min_lr":
            flags += ["--train.lr_scheduler_type", "cosine_with_min_lr", flag, json.dumps({"min_lr_rate": value})]
        else:
            flags += [flag, str(value)]
    if "steps" in knobs:
        every = str(max(1, knobs["steps"] // evals))
        flags += ["--train.eval_steps", every, "--train.save_steps", every, "--evaluate.sample_every", every]
    return Candidate(describe(tuple(flags)) + (f" ({note})" if note else ""), stage, tuple(flags))


def llama(stage: str, width: int = 128, **knobs) -> Candidate:
    """A candidate with the Llama-style block of stages 6-9 (rotary positions, RMSNorm, a gated
    MLP at 8/3 x the width rounded up to a multiple of 8, tied embeddings; 2 heads sharing one
    key/value head), the 4,096-token BPE and 8 x 128 tokens a step, unless `knobs` say otherwise."""
    mlp = (-(-8 * width // 3) + 7) // 8 * 8
    shape = dict(arch="llama", vocab=4096, layers=4, width=width, heads=2, kv_heads=1, mlp=mlp, tied="true")
    return candidate(stage, **{**shape, "batch": 8, "block": 128, **knobs})


# The search, in the order it was run; each stage's comment says what it asks. Steps come from
# --throughput: the most that fit in the budget at the candidate's quiet rate.
CANDIDATES: list[Candidate] = [
    # 0. The recipe as shipped before this search (evaluations every 200 steps).
    candidate("0", evals=3, steps=600, note="the default before this search"),
    # 1. Rates of the shapes: vocabulary x width x depth at 4,096 tokens a step, and the batch.
    *[
        candidate("1", vocab=v, layers=layers, width=width, heads=width // 64 or 2, batch=16, block=256)
        for v in (1024, 2048, 4096)
        for layers, width in ((4, 128), (4, 192), (4, 256), (6, 256))
    ],
    candidate("1", vocab=8192, layers=4, width=128, heads=2, batch=16, block=256),
    candidate("1", vocab=8192, layers=4, width=256, heads=4, batch=16, block=256),
    candidate("1", vocab=2048, layers=6, width=384, heads=6, batch=16, block=256),
    candidate("1", layers=4, width=128, heads=4, batch=16, block=256),
    *[
        candidate("1", vocab=2048, layers=4, width=256, heads=4, batch=b, block=t)
        for b, t in ((8, 256), (32, 256), (16, 128), (32, 128), (64, 64))
    ],
    # 2. Vocabulary x shape, each trained for a third of the budget (85 s at its rate), at the
    # recipe's learning rate: which shapes learn most per second.
    candidate("2", evals=1, steps=200, warmup=0.05),
    *[
        candidate(
            "2",
            evals=1,
            vocab=v,
            layers=layers,
            width=width,
            heads=width // 64,
            batch=16,
            block=256,
            seconds=85,
            warmup=0.05,
        )
        for v, layers, width in (
            (1024, 4, 128),
            (2048, 4, 128),
            (4096, 4, 128),
            (8192, 4, 128),
            (2048, 4, 192),
            (4096, 4, 192),
            (2048, 4, 256),
            (4096, 4, 256),
            (2048, 6, 256),
        )
    ],
    # 1b. Rates of the shapes around the best of stage 2 (vocabulary 4,096 at width 128): depth,
    # width, heads, the batch and the context.
    *[
        candidate("1b", vocab=4096, layers=layers, width=width, heads=heads, batch=batch, block=block)
        for layers, width, heads, batch, block in (
            (2, 128, 2, 16, 256),
            (3, 128, 2, 16, 256),
            (6, 128, 2, 16, 256),
            (8, 128, 2, 16, 256),
            (4, 96, 2, 16, 256),
            (6, 96, 2, 16, 256),
            (4, 128, 4, 16, 256),
            (4, 128, 2, 8, 256),
            (4, 128, 2, 32, 128),
            (4, 128, 2, 8, 512),
            (4, 128, 2, 4, 512),
        )
    ],
    # 3. Around the best of stage 2 (bpe4096 L4 d128 h2 16x256), a third of the budget each: the
    # learning rate, then depth, width, heads, the batch and the context at their own rates.
    *[
        candidate(
            "3", evals=1, vocab=4096, layers=4, width=128, heads=2, batch=16, block=256, seconds=85, warmup=0.05, lr=lr
        )
        for lr in (4e-3, 8e-3)
    ],
    *[
        candidate(
            "3",
            evals=1,
            vocab=4096,
            layers=layers,
            width=width,
            heads=heads,
            batch=batch,
            block=block,
            seconds=85,
            warmup=0.05,
        )
        for layers, width, heads, batch, block in (
            (4, 128, 4, 16, 256),
            (4, 128, 2, 8, 256),
            (4, 128, 2, 8, 512),
            (6, 128, 2, 16, 256),
            (3, 128, 2, 16, 256),
            (4, 96, 2, 16, 256),
            (6, 96, 2, 16, 256),
        )
    ],
    # 1c. Rates of smaller batches (stage 3: 8 x 256 beat 16 x 256) and of larger vocabularies there.
    *[
        candidate("1c", vocab=v, layers=4, width=128, heads=2, batch=batch, block=block)
        for v, batch, block in ((4096, 4, 256), (4096, 8, 128), (4096, 8, 256), (6144, 8, 256), (8192, 8, 256))
    ],
    # 4. Smaller batches (more updates in the same time), the learning rate at 8 x 256, and larger
    # vocabularies there; a third of the budget each.
    *[
        candidate(
            "4", evals=1, vocab=v, layers=4, width=128, heads=2, batch=batch, block=block, seconds=85, warmup=0.05
        )
        for v, batch, block in ((4096, 4, 256), (4096, 8, 128), (6144, 8, 256), (8192, 8, 256))
    ],
    *[
        candidate(
            "4", evals=1, vocab=4096, layers=4, width=128, heads=2, batch=8, block=256, steps=670, warmup=0.05, lr=lr
        )
        for lr in (1e-3, 3e-3)
    ],
    # 1d. Rates at 1,024 tokens a step (stage 4: 8 x 128 beat 8 x 256), a Llama-style block
    # (RoPE, RMSNorm, SwiGLU at 8/3 x width, tied embeddings) and 512 tokens a step.
    candidate("1d", vocab=8192, layers=4, width=128, heads=2, batch=8, block=128),
    candidate("1d", vocab=4096, layers=4, width=128, heads=2, batch=8, block=128),
    candidate(
        "1d",
        arch="llama",
        vocab=8192,
        layers=4,
        width=128,
        heads=2,
        kv_heads=1,
        mlp=344,
        tied="true",
        batch=8,
        block=128,
    ),
    candidate("1d", arch="llama", vocab=8192, layers=4, width=128, heads=2, mlp=344, tied="true", batch=8, block=128),
    candidate("1d", vocab=4096, layers=4, width=128, heads=2, batch=4, block=128),
    # 5. 1,024 tokens a step with the larger vocabulary, the learning rate there, Llama-style
    # blocks, and 512 tokens a step; a third of the budget each.
    *[
        candidate(
            "5", evals=1, vocab=8192, layers=4, width=128, heads=2, batch=8, block=128, seconds=85, warmup=0.05, lr=lr
        )
        for lr in (2e-3, 3e-3)
    ],
    candidate(
        "5", evals=1, vocab=4096, layers=4, width=128, heads=2, batch=8, block=128, steps=1140, warmup=0.05, lr=3e-3
    ),
    *[
        candidate(
            "5",
            evals=1,
            arch="llama",
            vocab=8192,
            layers=4,
            width=128,
            heads=2,
            kv_heads=kv,
            mlp=344,
            tied="true",
            batch=8,
            block=128,
            seconds=85,
            warmup=0.05,
        )
        for kv in (1, None)
    ],
    candidate("5", evals=1, vocab=4096, layers=4, width=128, heads=2, batch=4, block=128, seconds=85, warmup=0.05),
    # 6. The whole budget (stages 2-5 trained a third of it): the best shapes of stage 4 at the
    # steps that fill it, evaluated twice as the recipe does.
    candidate("6", vocab=4096, layers=4, width=128, heads=2, batch=8, block=128, steps=3000, warmup=0.05, lr=3e-3),
    llama("6", steps=3000, warmup=0.05, lr=3e-3),
    # 7. Around the Llama-style block (stage 6: 2.00 vs GPT-2's 2.11 at the same steps, and
    # faster): a higher learning rate, a wider model and a larger vocabulary, each at the steps
    # that take the time of 3,000 of the first (its rate over the first's, one thread).
    llama("7", steps=3000, warmup=0.05, lr=5e-3),
    llama("7", width=192, heads=3, steps=1800, warmup=0.05, lr=3e-3),
    llama("7", vocab=8192, steps=2500, warmup=0.05, lr=3e-3),
    # 8. Around the best of stage 7 (width 128, learning rate 5e-3 over 3e-3; width 192 lost): a
    # higher rate still, a narrower model, and a key/value head per query head, each at the steps
    # that take the time of 3,000 at width 128 with one key/value head.
    llama("8", steps=3000, warmup=0.05, lr=8e-3),
    llama("8", width=96, steps=3900, warmup=0.05, lr=5e-3),
    llama("8", kv_heads=None, steps=2750, warmup=0.05, lr=5e-3),
    # 1e. The rate of the best shape of stages 6-8, with the fused loss (train.fused_loss auto, as
    # every run since stage 6) and the stock one: the steps of the recipe come from it.
    llama("1e", lr=5e-3),
    llama("1e", lr=5e-3, fused_loss="false"),
    # 9. The default recipe this search chose, as it ships; first at the steps the rate of stage 1e
    # predicted for the budget (its quiet run then took 204 s of the 300: the rate of one thread
    # against the reference's underestimates two threads on this shape), then at the steps that
    # quiet run's rate fits.
    Candidate(
        "tiny.yaml s3600",
        "9",
        ("--train.max_steps", "3600", "--train.eval_steps", "1800", "--train.save_steps", "1800")
        + ("--evaluate.sample_every", "1800"),
        recipe="recipes/shakespeare/tiny.yaml",
    ),
    Candidate("tiny.yaml (the default chosen)", "9", recipe="recipes/shakespeare/tiny.yaml"),
]

BY_NAME = {c.name: c for c in CANDIDATES}


def selected(only: list[str] | None, stages: list[str] | None) -> list[Candidate]:
    if only:
        unknown = [n for n in only if n not in BY_NAME]
        if unknown:
            raise SystemExit(f"unknown candidate {unknown[0]!r}: `python -m bench.search --list` shows them")
        return [BY_NAME[n] for n in only]
    if stages:
        return [c for c in CANDIDATES if c.stage in stages]
    return list(CANDIDATES)


# ---------------------------------------------------------------- full runs


def run_full(c: Candidate, threads: int | None = None) -> dict:
    """`hftextgen finetune` of one candidate in a fresh process and a cold cache."""
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, "HFTEXTGEN_CACHE": str(Path(tmp) / "cache")}
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), RAYON_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "hftextgen", "finetune", "--config", c.recipe_file, *c.flags]
        # fp32 scoring, as on a CPU by default, also when a pruning run has a GPU.
        cmd += ["--train.output_dir", str(out), "--progress", "plain", "--evaluate.bf16", "false"]
        result = {
            "name": c.name,
            "stage": c.stage,
            "flags": list(c.flags),
            "steps": c.steps,
            "load_before": common.load(),
        }
        started = time.perf_counter()
        with open(Path(tmp) / "log.txt", "w") as log:
            try:
                proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                _, status, usage = os.wait4(proc.pid, 0)
                code = os.waitstatus_to_exitcode(status)
            except KeyboardInterrupt:
                proc.terminate()
                raise
        result.update(wall_s=round(time.perf_counter() - started, 1), load_after=common.load())
        result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
        log_text = (Path(tmp) / "log.txt").read_text(errors="replace")
        if code != 0 or not (out / "eval.json").exists():
            result["error"] = f"exit code {code}: {log_text.strip().splitlines()[-1:] or ''}"
            return result
        result.update(_run_files(out))
        result["log_tail"] = log_text.strip().splitlines()[-6:]
    return result


def _run_files(out: Path) -> dict:
    evaluation = json.loads((out / "eval.json").read_text())
    train = json.loads((out / "train_results.json").read_text())
    info = json.loads((out / "run_info.json").read_text())
    return {
        "bits_per_byte": evaluation["bits_per_byte"],
        "perplexity": evaluation["perplexity"],
        "eval_tokens": evaluation["tokens"],
        "eval_context": evaluation["context"],
        "eval_stride": evaluation["stride"],
        "parameters": info["parameters"],
        "tokens_per_step": info["tokens_per_step"],
        "train_tokens": train["train_tokens"],
        "train_runtime_s": train["train_runtime"],
        "train_tokens_per_s": train["train_tokens_per_second"],
        "device": info["device"],
        "samples_md": (out / "samples.md").read_text(),
    }


def full_runs(cands: list[Candidate], jobs: int, threads: int | None = None, save_to=None) -> list[dict]:
    """Each candidate's full run; `save_to(rows)` after each one, so a stopped search keeps the
    runs it finished."""
    if threads is None and jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_full, c, threads): c for c in cands}
        for future in concurrent.futures.as_completed(futures):
            r = future.result()
            r.update(jobs=jobs, threads=threads)
            results.append(r)
            if save_to is not None:
                save_to(results)
            shown = r.get("error") or f"{r['bits_per_byte']:.4f} bits/byte"
            print(f"[search] {r['name']}: {shown}, {r['wall_s']:.0f} s wall, load {r['load_before']}", flush=True)
    return results


# ---------------------------------------------------------------- throughput


def throughput(cands: list[Candidate], warmup: int, steps: int, reference_every: int = 1, save_to=None) -> list[dict]:
    """Each candidate's steady training rate against the reference's, measured before and after
    it in the same window (one reference run between every `reference_every` candidates)."""
    with tempfile.TemporaryDirectory(prefix="bench-search-rate-") as cache:

        def rate(c: Candidate | None) -> dict:
            recipe, flags = (c.recipe_file, c.flags) if c else (str(BASE), ())
            config = {"kind": "ours", "recipe": recipe, "flags": list(_without_steps(flags))}
            config.update(warmup=warmup, steps=steps, cache_dir=cache)
            # One thread: a step's CPU time is then its work, whatever else runs on the machine
            # (two threads on a busy machine wait for each other at every parallel region).
            env = {"OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
            return {"load": common.load(), **common.run_child("bench.training", config, env=env)}

        references = [rate(None)]
        measured: dict[tuple, tuple[dict, int]] = {}  # shape -> (its run, the reference before it)

        def shape(c: Candidate) -> tuple:
            return (c.recipe, _without_steps(c.flags))  # candidates that differ in steps alone share a rate

        first: dict[tuple, Candidate] = {}  # the first candidate of each shape
        for c in cands:
            first.setdefault(shape(c), c)
        for i, c in enumerate(first.values()):
            measured[shape(c)] = (rate(c), len(references) - 1)
            if (i + 1) % reference_every == 0 or i == len(first) - 1:
                references.append(rate(None))
            results = []
            for d in cands:
                if shape(d) in measured:
                    ours, before = measured[shape(d)]
                    after = references[min(before + 1, len(references) - 1)]
                    results.append(_rate_row(d, ours, references[before], after))
            r = results[-1]
            print(f"[search] {r['name']}: {r.get('ratio', 'error')} x the reference, load {r['load']}", flush=True)
            if save_to is not None:
                save_to(results)
    return results


def _without_steps(flags: tuple[str, ...]) -> tuple[str, ...]:
    """bench/training.py sets the steps and turns evaluation and saving off itself."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f in ("--train.max_steps", "--train.eval_steps", "--train.save_steps", "--evaluate.sample_every"):
            skip = True
        else:
            out.append(f)
    return tuple(out)


def _rate_row(c: Candidate, ours: dict, ref_before: dict, ref_after: dict) -> dict:
    shape = _without_steps(c.flags)
    row = {
        "name": c.name if c.recipe else describe(shape),
        "stage": c.stage,
        "flags": list(shape),
        "load": ours["load"],
        "run": ours,
    }
    key = "tokens_per_cpu_s"
    refs = [r[key] for r in (ref_before, ref_after) if key in r]
    if key not in ours or not refs:
        row["error"] = ours.get("error") or "the reference failed"
        return row
    ratio = ours[key] / statistics.mean(refs)
    quiet = ratio * REFERENCE_QUIET_TOKENS_PER_S
    row.update(
        reference_tokens_per_s=[round(x) for x in refs],
        tokens_per_cpu_s=round(ours[key]),
        tokens_per_step=ours["tokens_per_step"],
        ratio=round(ratio, 3),
        predicted_quiet_tokens_per_s=round(quiet),
        predicted_train_s=round(c.steps * ours["tokens_per_step"] / quiet, 1),
    )
    return row


# ---------------------------------------------------------------- report


SESSION = time.strftime("%Y-%m-%dT%H:%M:%S")  # this invocation: its rows replace each other


def save(path: Path, mode: str, rows: list[dict], args) -> None:
    """Merge `rows` into the JSON at `path` by candidate name. A row from an earlier invocation
    under the same name moves to the new row's `earlier` list: a measurement is never lost."""
    payload = json.loads(path.read_text()) if path.exists() else {"benchmark": "search"}
    payload.setdefault(mode, {})
    machine = common.machine()
    for r in rows:
        old = payload[mode].get(r["name"])
        earlier = []
        if old is not None:
            earlier = old.pop("earlier", [])
            if old.get("session") != SESSION:
                earlier.append(old)
        payload[mode][r["name"]] = {**r, "session": SESSION, "machine": machine, "quick": bool(args.quick)}
        if earlier:
            payload[mode][r["name"]]["earlier"] = earlier
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"written {path}")


def table(mode: str, rows: list[dict]) -> str:
    if mode == "throughput":
        head = "| configuration | tokens/step | tokens/CPU-s (load) | ratio to recipe | quiet tokens/s |"
        lines = [head, "|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['name']} | - | - | {r['error']} | - |")
                continue
            lines.append(
                f"| {r['name']} | {r['tokens_per_step']:,} | {r['tokens_per_cpu_s']:,} ({r['load'][0]}) | "
                f"{r['ratio']:.2f} | {r['predicted_quiet_tokens_per_s']:,} |"
            )
        return "\n".join(lines)
    head = "| stage | configuration | steps | tokens | runs at once x threads | wall s | CPU s | load before, after |"
    lines = [head + " bits/byte | perplexity |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.get("bits_per_byte", 99)):
        if "error" in r:
            continue  # a stopped run: its row stays in the JSON
        threads = r.get("threads") or "all"  # unset: torch's default, a thread per core
        lines.append(
            f"| {r['stage']} | {r['name']} | {r['steps']:,} | {r['train_tokens']:,} | {r.get('jobs', 1)} x {threads} | "
            f"{r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['load_before'][0]}, {r['load_after'][0]} | "
            f"{r['bits_per_byte']:.4f} | {r['perplexity']:.1f} |"
        )
    return "\n".join(lines)


def quick_candidates() -> list[Candidate]:
    """Two small candidates (GPT-2's BPE and a trained one), a few steps each."""
    return [
        candidate("quick", steps=4, note="quick"),
        candidate("quick", vocab=512, layers=2, width=64, steps=4, note="quick"),
    ]


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", help="candidates by name (default: every one)")
    p.add_argument("--stage", nargs="+", help="candidates of these stages")
    p.add_argument("--list", action="store_true", help="print the candidates and their overrides")
    p.add_argument("--table", action="store_true", help="print every full run recorded in --out, earlier ones too")
    p.add_argument("--throughput", action="store_true", help="training rates against the recipe, not full runs")
    p.add_argument("--jobs", type=int, default=1, help="full runs at once (pruning on a bigger machine)")
    p.add_argument("--threads", type=int, help="threads per full run (default: torch's; cores / jobs with --jobs)")
    p.add_argument("--warmup", type=int, default=3, help="--throughput: untimed steps first")
    p.add_argument("--steps", type=int, default=8, help="--throughput: timed steps")
    p.add_argument("--reference-every", type=int, default=3, help="--throughput: candidates between reference runs")
    args = p.parse_args(argv)
    cands = quick_candidates() if args.quick else selected(args.only, args.stage)
    if args.list:
        for c in cands:
            print(f"[{c.stage}] {c.name}\n    {' '.join(c.flags)}")
        return
    out = args.out or common.RESULTS / ("search-quick.json" if args.quick else "search.json")
    if args.table:
        rows = json.loads(out.read_text()).get("full", {}).values()
        print(table("full", [run for r in rows for run in (r, *r.get("earlier", []))]))
        return
    if args.throughput or args.quick:
        rows = throughput(
            cands,
            *((1, 2) if args.quick else (args.warmup, args.steps)),
            args.reference_every,
            lambda rows: save(out, "throughput", rows, args),
        )
        print(table("throughput", rows))
    if not args.throughput:
        rows = full_runs(cands, args.jobs, args.threads, lambda rows: save(out, "full", rows, args))
        print(table("full", rows))


if __name__ == "__main__":
    main()
