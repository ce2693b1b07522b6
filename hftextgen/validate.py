"""`hftextgen validate`: a dry run of `finetune` that says what the run will do and cost.

It makes the same checks as finetune (the same errors, before any work), prepares the data
(or finds it cached: finetune then loads it at once), builds the model, and trains a copy of it
for a few steps with the stock Trainer in the recipe's precision, on the recipe's batches, in a
temporary folder. From those it reports:

  steps and tokens     the Trainer's own arithmetic (set_initial_training_values) on the real
                       dataloader, so they are the numbers the run will log
  time                 measured seconds per step (after a warm-up step) x steps, plus measured
                       evaluation, checkpoint and sampling times x how often the recipe does them
  memory               weights + gradients + AdamW state + activations (a formula), and the
                       peak measured while stepping
  disk                 a real checkpoint's size x the checkpoints kept, plus the final model

Nothing is written to train.output_dir.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, get_last_checkpoint

from . import data, evaluation, generate, model, progress, tokenizer, train
from .config import Recipe

# Timed steps: at least MIN_STEPS and MIN_SECONDS of them after the warm-up step, at most
# MAX_STEPS: enough to average out noise on a fast model, few on a slow one.
MIN_STEPS, MIN_SECONDS, MAX_STEPS = 5, 5.0, 30
SAMPLE_TOKENS = 16  # generation is timed for this many new tokens and scaled to max_new_tokens


class StepTimer(TrainerCallback):
    """Times whole steps (end to end, data and logging included, as the run will pay them),
    stops training once it has enough, and asks for one checkpoint at that step."""

    def __init__(self):
        self.times: list[float] = []
        self.last: float | None = None
        self.save_seconds: float | None = None

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # steps are asynchronous on a GPU: time finished work
        return time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now
        if len(self.times) >= MAX_STEPS or (len(self.times) >= MIN_STEPS and sum(self.times) >= MIN_SECONDS):
            control.should_training_stop = True
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.save_seconds = self._now() - self.last


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _peak_memory(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        return "GPU memory allocated, torch.cuda.max_memory_allocated", torch.cuda.max_memory_allocated(device)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return "resident memory of this process, peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _interval(value: float | None, max_steps: int) -> int | None:
    """eval/save/logging steps as the Trainer reads them: below 1 is a share of max_steps."""
    if value is None:
        return None
    return math.ceil(max_steps * value) if value < 1 else int(value)


def _occurrences(strategy, every: int | None, first: int, last: int, epochs: int, delay: float = 0) -> int:
    """How often a step/epoch strategy fires between step first (exclusive) and last (inclusive),
    counting the extra one DefaultFlowCallback adds at the final step."""
    strategy = getattr(strategy, "value", strategy)
    if strategy == "steps" and every:
        after = max(first, math.ceil(delay) - 1)  # multiples of `every` in (after, last]
        fired = max(0, last // every - after // every)
        return fired + (1 if last % every and last > after else 0)
    if strategy == "epoch":
        return epochs
    return 0


def memory_formula(lm, recipe: Recipe, precision: str) -> dict:
    """Bytes of weights, gradients and AdamW state (fp32: 4 + 4 + 8 per parameter) and a rough
    activation figure: per layer s*b*h*(34 + 5*a*s/h) bytes in 16-bit (Korthikanti et al. 2022,
    "Reducing activation recomputation in large transformer models", eq. 1), doubled for fp32,
    plus the logits and their gradient in fp32 (b*s*vocabulary*4 bytes, 3 copies)."""
    params = lm.num_parameters()
    config = lm.config
    b, s = recipe.train.per_device_train_batch_size, recipe.data.block_size
    h = getattr(config, "n_embd", None) or getattr(config, "hidden_size", 768)
    a = getattr(config, "n_head", None) or getattr(config, "num_attention_heads", 12)
    layers = getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers", 12)
    width = 1 if precision in ("bf16", "fp16") else 2
    activations = layers * s * b * h * (34 + 5 * a * s / h) * width + 3 * b * s * config.vocab_size * 4
    optim = str(getattr(recipe.train.optim, "value", recipe.train.optim))
    optimizer = 8 * params if "adam" in optim.lower() else 4 * params  # two fp32 moments; else one, roughly
    out = {"weights": 4 * params, "gradients": 4 * params, "optimizer": optimizer, "activations": int(activations)}
    out["total"] = sum(out.values())
    return out


def validate(recipe: Recipe) -> dict:
    """Check and measure a recipe; returns the estimate (see the module docstring)."""
    args = recipe.train
    output_dir = Path(args.output_dir)
    existed = output_dir.exists()
    resume = train.preflight(recipe)
    train.reuse_freed_memory()
    set_seed(args.seed)

    started = time.perf_counter()
    corpus = data.Corpus(recipe.data)
    tok = tokenizer.build_tokenizer(recipe, corpus)
    packed = data.prepare(corpus, tok, tokenizer.fingerprint(tok))
    prep_seconds = time.perf_counter() - started

    lm = model.build_model(recipe.model, tok, recipe.data.block_size)
    info = train.run_info(recipe, lm, packed)
    device = torch.device(str(args.device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with tempfile.TemporaryDirectory(prefix="hftextgen-validate-") as tmp:
        probe = copy.copy(args)  # the recipe's batch, precision, optimizer and data order
        probe.output_dir = tmp
        probe.max_steps = 10**9  # StepTimer stops it
        probe.eval_strategy, probe.save_strategy = IntervalStrategy.NO, SaveStrategy.NO
        probe.report_to, probe.push_to_hub, probe.load_best_model_at_end = [], False, False
        probe.save_total_limit, probe.disable_tqdm = None, True
        trainer = Trainer(
            model=lm,
            args=probe,
            data_collator=train.collate_blocks,
            train_dataset=packed.train,
            eval_dataset=packed.eval_blocks,
            processing_class=tok,
        )
        for stock in (PrinterCallback, ProgressCallback):
            trainer.pop_callback(stock)
        # The run's own step count: the Trainer's arithmetic on the recipe's arguments.
        epochs, steps_per_epoch, _, _, _, _, max_steps = trainer.set_initial_training_values(
            args, trainer.get_train_dataloader()
        )
        timer = StepTimer()
        trainer.add_callback(timer)
        with progress.transformers_bars_off():  # the probe's bars are not the run's
            trainer.train()
            memory_what, memory_peak = _peak_memory(device)
            checkpoint = get_last_checkpoint(tmp)
            checkpoint_bytes = _folder_bytes(Path(checkpoint)) if checkpoint else 0
            final_dir = Path(tmp) / "final"
            saving = time.perf_counter()
            trainer.save_model(str(final_dir))
            final_save_seconds = time.perf_counter() - saving
            final_bytes = _folder_bytes(final_dir)
            eval_call_seconds, eval_block_seconds = _time_evaluation(
                trainer, packed.eval_blocks, args.per_device_eval_batch_size
            )
            sample_seconds = _time_samples(lm, tok, recipe)
            scoring_seconds = _time_final_scoring(lm, tok, recipe, packed)
    step_seconds = statistics.median(timer.times)  # robust to a step slowed by other work on the machine

    first_step = _resumed_step(resume)
    steps_left = max(0, max_steps - first_step)
    eval_steps = _interval(args.eval_steps if args.eval_steps is not None else args.logging_steps, max_steps)
    save_steps = _interval(args.save_steps, max_steps)
    evaluations = _occurrences(args.eval_strategy, eval_steps, first_step, max_steps, epochs, args.eval_delay or 0)
    saves = _occurrences(args.save_strategy, save_steps, first_step, max_steps, epochs)
    final_trainer_eval = 0 if evaluations and not args.load_best_model_at_end else 1
    evaluations_total = evaluations + final_trainer_eval
    sample_rounds = steps_left // recipe.evaluate.sample_every if recipe.evaluate.sample_every else 0
    val_blocks = len(packed.eval_blocks)
    eval_seconds = eval_call_seconds + eval_block_seconds * val_blocks
    final_eval_seconds = 0.0
    if recipe.evaluate.at_end_of_training:
        final_eval_seconds = scoring_seconds + (sample_seconds if recipe.evaluate.samples else 0.0)
    total_seconds = (
        steps_left * step_seconds
        + evaluations_total * eval_seconds
        + saves * (timer.save_seconds or 0.0)
        + sample_rounds * sample_seconds
        + final_save_seconds
        + final_eval_seconds
    )
    kept = saves if args.save_total_limit is None else min(saves, args.save_total_limit)
    if args.load_best_model_at_end and args.save_total_limit:
        kept = min(saves, max(args.save_total_limit, 2))  # the best checkpoint is kept besides the newest
    if resume and output_dir.is_dir():
        kept = max(0, kept - len(list(output_dir.glob("checkpoint-*"))))  # some are on disk already
    tokens_per_step = info["tokens_per_step"]
    return {
        "output_dir": str(output_dir),
        "output_dir_exists": existed,
        "resume_from": resume,
        "data": {
            "cache": str(packed.cache_path),
            "cached": packed.cache_hit,
            "seconds": round(prep_seconds, 2),
            "report": packed.report,
        },
        "model": {
            "parameters": info["parameters"],
            "layers": getattr(lm.config, "n_layer", None),
            "heads": getattr(lm.config, "n_head", None),
            "width": getattr(lm.config, "n_embd", None),
            "context": model.context_length(lm),
            "vocab_size": lm.config.vocab_size,
        },
        "device": info["device"],
        "precision": info["precision"],
        "batch": {
            "effective_batch_size": info["effective_batch_size"],
            "per_device_batch_size": info["per_device_batch_size"],
            "processes": info["processes"],
            "gradient_accumulation_steps": info["gradient_accumulation_steps"],
            "tokens_per_step": tokens_per_step,
        },
        "steps": {
            "per_epoch": steps_per_epoch,
            "epochs": round(max_steps / steps_per_epoch, 3),
            "total": max_steps,
            "first": first_step,
            "to_run": steps_left,
            "evaluations": evaluations_total,
            "checkpoints": saves,
            "sample_rounds": sample_rounds,
        },
        "tokens": {
            "total": max_steps * tokens_per_step,
            "to_run": steps_left * tokens_per_step,
            "train_split": packed.report["train"]["tokens"],
        },
        "time": {
            "step_seconds": round(step_seconds, 4),
            "timed_steps": len(timer.times),
            "tokens_per_second": round(tokens_per_step / step_seconds, 1),
            "evaluation_seconds": round(eval_seconds, 2),
            "checkpoint_seconds": round(timer.save_seconds or 0.0, 2),
            "samples_seconds": round(sample_seconds, 2),
            "final_evaluation_seconds": round(final_eval_seconds, 2),
            "total_seconds": round(total_seconds, 1),
        },
        "memory": {
            "formula": memory_formula(lm, recipe, info["precision"]),
            "measured_peak": memory_peak,
            "measured": memory_what,
        },
        "disk": {
            "checkpoint_bytes": checkpoint_bytes,
            "checkpoints_kept": kept,
            "final_model_bytes": final_bytes,
            "total_bytes": checkpoint_bytes * kept + final_bytes,
        },
    }


def _resumed_step(resume: str | None) -> int:
    if resume is None:
        return 0
    return json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]


def _time_evaluation(trainer: Trainer, blocks, batch_size: int) -> tuple[float, float]:
    """(seconds per call, seconds per block) of Trainer.evaluate: after a warm-up batch, one
    batch and then four are timed, and the difference gives the cost of a block without the
    fixed cost of a call (a dataloader, moving the model to eval mode), which a few batches
    would otherwise spread over too few blocks."""
    n = len(blocks)
    small, large = min(n, batch_size), min(n, 4 * batch_size)
    trainer.evaluate(blocks.select(range(small)))
    seconds = []
    for size in (small, large):
        started = time.perf_counter()
        trainer.evaluate(blocks.select(range(size)))
        seconds.append(time.perf_counter() - started)
    if large == small:
        return 0.0, seconds[1] / large
    per_block = max(seconds[1] - seconds[0], 0.0) / (large - small) or seconds[1] / large
    return max(seconds[0] - per_block * small, 0.0), per_block


def _time_final_scoring(lm, tok, recipe: Recipe, packed: data.Packed) -> float:
    """Seconds the end-of-training evaluator will take to score the validation documents: its
    own scoring (windows, stride, batch, precision) timed on two batches of windows cut from the
    validation blocks, scaled to the windows of the whole split."""
    cfg = recipe.evaluate
    context = cfg.context or model.context_length(lm) or 1024
    stride = cfg.stride or max(1, context // 2)
    bf16 = bool(cfg.bf16) if cfg.bf16 is not None else lm.device.type == "cuda" and torch.cuda.is_bf16_supported()
    wanted = context + 1 + stride * (2 * cfg.batch_size - 1)  # two batches of windows
    blocks = math.ceil(wanted / recipe.data.block_size)
    ids = packed.validation[: min(blocks, len(packed.validation))]["input_ids"]
    doc = [tok.eos_token_id, *ids.reshape(-1)[:wanted].tolist()]
    was_training = lm.training
    lm.eval()
    try:
        with progress.silenced():
            evaluation.score(lm, [doc[: context + 1]], context, stride, cfg.batch_size, bf16=bf16)  # warm-up
            started = time.perf_counter()
            evaluation.score(lm, [doc], context, stride, cfg.batch_size, bf16=bf16)
            seconds = time.perf_counter() - started
    finally:
        lm.train(was_training)
    per_window = seconds / len(evaluation.windows(len(doc), context, stride))
    docs = packed.eval_documents("validation")  # what the evaluator will score
    return per_window * (docs.tokens / stride + len(docs))


def _time_samples(lm, tok, recipe: Recipe) -> float:
    """Seconds for one round of the recipe's samples, from SAMPLE_TOKENS new tokens each."""
    cfg = recipe.generate
    new = min(SAMPLE_TOKENS, cfg.max_new_tokens)
    short = dataclasses.replace(cfg, max_new_tokens=new)
    was_training = lm.training
    lm.eval()
    try:
        prompts = generate.read_prompts(cfg)
        generate.Generator(lm, tok, dataclasses.replace(cfg, max_new_tokens=1))(prompts)  # warm-up
        started = time.perf_counter()
        generate.Generator(lm, tok, short)(prompts)
        return (time.perf_counter() - started) * cfg.max_new_tokens / new
    finally:
        lm.train(was_training)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def describe(est: dict) -> str:
    """The estimate as lines a person reads before starting a run."""
    d, m, b, st, tk, t, mem, disk = (
        est[k] for k in ("data", "model", "batch", "steps", "tokens", "time", "memory", "disk")
    )
    shape = ", ".join(
        text
        for value, text in (
            (m["layers"], f"{m['layers']} layers"),
            (m["heads"], f"{m['heads']} heads"),
            (m["width"], f"width {m['width']}"),
        )
        if value
    )
    start = (
        f"resumes {est['resume_from']} at step {st['first']:,}"
        if est["resume_from"]
        else "a new run"
        + (" (the folder exists and is empty)" if est["output_dir_exists"] else " (the folder does not exist yet)")
    )
    f = mem["formula"]
    lines = [
        f"recipe: valid; {est['output_dir']}: {start}; nothing written",
        f"data: {'cached' if d['cached'] else 'prepared and cached'} at {d['cache']} ({d['seconds']:.1f} s)",
        data.format_report(d["report"]),
        f"model: {m['parameters']:,} parameters ({shape}; context {m['context']}, vocabulary {m['vocab_size']:,}); "
        f"precision {est['precision']} on {est['device']}",
        f"batch: {b['effective_batch_size']} blocks = {b['per_device_batch_size']} per device x {b['processes']} "
        f"processes x {b['gradient_accumulation_steps']} accumulation ({b['tokens_per_step']:,} tokens per step)",
        f"steps: {st['total']:,} = {st['epochs']:g} epochs of {st['per_epoch']:,} steps"
        + (f"; {st['to_run']:,} left to run" if st["first"] else ""),
        f"tokens: {tk['total']:,} trained ({tk['total'] / max(tk['train_split'], 1):.2f} x the "
        f"{tk['train_split']:,} training tokens)",
        f"time: ~{progress.spoken(t['total_seconds'])} on {est['device']} (start-up not included)",
        f"  {st['to_run']:,} steps x {t['step_seconds']:.3f} s (median of {t['timed_steps']} timed steps after a "
        f"warm-up; {t['tokens_per_second']:,.0f} tokens/s) = {progress.spoken(st['to_run'] * t['step_seconds'])}",
        f"  {st['evaluations']} evaluations x {t['evaluation_seconds']:.1f} s, {st['checkpoints']} checkpoints x "
        f"{t['checkpoint_seconds']:.1f} s, {st['sample_rounds']} rounds of samples x {t['samples_seconds']:.1f} s, "
        f"final evaluation ~{t['final_evaluation_seconds']:.1f} s",
        f"memory: ~{_size(f['total'])} by formula (weights {_size(f['weights'])}, gradients {_size(f['gradients'])}, "
        f"optimizer {_size(f['optimizer'])}, activations ~{_size(f['activations'])}); measured: "
        f"{_size(mem['measured_peak'])} ({mem['measured']})",
        f"disk: ~{_size(disk['total_bytes'])} = {disk['checkpoints_kept']} checkpoints kept x "
        f"{_size(disk['checkpoint_bytes'])} + final model {_size(disk['final_model_bytes'])}",
    ]
    return "\n".join(lines)
