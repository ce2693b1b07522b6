"""`hftextgen validate`: a dry run of `finetune` that says what the run will do and cost.

It makes the same checks as finetune and builds the same tokenizer, data and model (setup.py:
the same errors, before any work; the data is then cached for finetune), then:

  measure    trains a throwaway copy of the model for a few steps with the stock Trainer, in the
             recipe's precision and on its batches, in a temporary folder; times a checkpoint, the
             final save, Trainer evaluation, samples and the end-of-training evaluator; reads the
             peak memory (`measure`)
  schedule   steps, evaluations and checkpoints of the run: pure arithmetic that agrees with the
             stock Trainer (schedule.py)
  estimate   time = measured seconds x how often the schedule does each thing; memory = weights +
             gradients + AdamW state + activations (a formula) beside the measured peak; disk = a
             real checkpoint's size x the checkpoints kept, plus the final model (`estimate`)

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
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, get_last_checkpoint

from .. import data, evaluate, generate, model, progress, runtime
from ..config import Recipe
from ..progress import size
from . import fused_loss, rundir, setup
from .schedule import Schedule, schedule_of

# Timed steps: at least MIN_STEPS and MIN_SECONDS of them after the warm-up step, at most
# MAX_STEPS: enough to average out noise on a fast model, few on a slow one.
MIN_STEPS, MIN_SECONDS, MAX_STEPS = 5, 5.0, 30
SAMPLE_TOKENS = 16  # generation is timed for this many new tokens and scaled to max_new_tokens


def validate_recipe(recipe: Recipe) -> dict:
    """Check and measure a recipe; returns the estimate (see the module docstring)."""
    output_dir = Path(recipe.train.output_dir)
    existed = output_dir.exists()
    resume = setup.preflight(recipe)
    runtime.reuse_freed_memory()
    set_seed(recipe.train.seed)

    started = time.perf_counter()
    built = setup.build(recipe)
    prepared = {
        "cache": str(built.prepared.cache_path),
        "cached": built.prepared.cache_hit,
        "seconds": round(time.perf_counter() - started, 2),
        "report": built.prepared.report,
    }
    info = setup.run_info(recipe, built)
    # Before the probe: a LoRA probe's final save folds the adapter into the model.
    described = describe_model(built.lm, info)
    formula = memory_formula(built.lm, recipe.train, recipe.data.block_size, info["precision"])
    measured = measure(recipe, built)
    schedule = schedule_of(recipe.train, len(built.prepared.train), _resumed_step(resume))
    return {
        "output_dir": str(output_dir),
        "output_dir_exists": existed,
        "resume_from": resume,
        "data": prepared,
        "model": described,
        **estimate(recipe, built, info, schedule, measured, resume, formula),
    }


@dataclass
class Measured:
    """What the probe measured on this hardware."""

    step_seconds: float
    timed_steps: int
    checkpoint_seconds: float
    checkpoint_bytes: int
    final_save_seconds: float
    final_model_bytes: int
    eval_call_seconds: float
    eval_item_seconds: float
    sample_seconds: float
    scoring_seconds: float
    memory_peak: int
    memory_what: str


def measure(recipe: Recipe, built: setup.Built) -> Measured:
    """Train a copy of the model for a few steps with the recipe's batch, precision, optimizer
    and data order in a temporary folder, and time everything else the run will do."""
    args = recipe.train
    device = torch.device(str(args.device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="hftextgen-validate-") as tmp:
        probe = copy.copy(args)
        probe.output_dir = tmp
        probe.max_steps = 10**9  # StepTimer stops it
        probe.eval_strategy, probe.save_strategy = IntervalStrategy.NO, SaveStrategy.NO
        probe.report_to, probe.push_to_hub, probe.load_best_model_at_end = [], False, False
        probe.save_total_limit = None
        trainer = setup.make_trainer(built, probe)
        for stock in (PrinterCallback, ProgressCallback):
            trainer.pop_callback(stock)
        timer = StepTimer()
        trainer.add_callback(timer)
        with progress.transformers_bars_off():  # the probe's bars are not the run's
            trainer.train()
            memory_what, memory_peak = _peak_memory(device)
            checkpoint = get_last_checkpoint(tmp)
            eval_call, eval_item = _time_evaluation(trainer, built.prepared.eval_items, args.per_device_eval_batch_size)
            sample_seconds = _time_samples(built.lm, built.tok, recipe.generate)
            scoring_seconds = _time_final_scoring(built, recipe.evaluate, recipe.data.block_size)
            # Last: a LoRA run's final save merges the adapter into the model, in place.
            final_dir = Path(tmp) / "final"
            saving = time.perf_counter()
            rundir.write_final(trainer, final_dir)
            final_save_seconds = time.perf_counter() - saving
            return Measured(
                step_seconds=statistics.median(timer.times),  # robust to a step slowed by other work
                timed_steps=len(timer.times),
                checkpoint_seconds=timer.save_seconds or 0.0,
                checkpoint_bytes=_folder_bytes(Path(checkpoint)) if checkpoint else 0,
                final_save_seconds=final_save_seconds,
                final_model_bytes=_folder_bytes(final_dir),
                eval_call_seconds=eval_call,
                eval_item_seconds=eval_item,
                sample_seconds=sample_seconds,
                scoring_seconds=scoring_seconds,
                memory_peak=memory_peak,
                memory_what=memory_what,
            )


def describe_model(lm, info: dict) -> dict:
    """The model's shape in the recipe's names, its parameters, and its LoRA adapters if any."""
    shape = model.shape(lm.config)
    return {
        "parameters": info["parameters"],
        "trainable_parameters": info["trainable_parameters"],
        "architecture": shape["model_type"],
        "layers": shape["n_layer"],
        "heads": shape["n_head"],
        "kv_heads": shape["n_kv_head"],
        "width": shape["n_embd"],
        "mlp_width": shape["n_inner"],
        "context": shape["n_positions"],
        "vocab_size": shape["vocab_size"],
        "tied_embeddings": shape["tie_word_embeddings"],
        "shape": model.describe_shape(shape),
        **({"lora": _lora(lm)} if model.is_peft(lm) else {}),
    }


def estimate(
    recipe: Recipe, built: setup.Built, info: dict, st: Schedule, m: Measured, resume: str | None, formula: dict
) -> dict:
    """The estimate record: the schedule, and what it costs at the measured speeds."""
    args = recipe.train
    return {
        "device": info["device"],
        "precision": info["precision"],
        "batch": {
            key: info[key]
            for key in (
                "effective_batch_size",
                "per_device_batch_size",
                "processes",
                "gradient_accumulation_steps",
                "tokens_per_step",
                "batch_unit",
            )
            if key in info
        },
        "steps": {
            "per_epoch": st.steps_per_epoch,
            "epochs": round(st.total / st.steps_per_epoch, 3),
            "total": st.total,
            "first": st.first,
            "to_run": st.to_run,
            "evaluations": st.evaluations + _final_trainer_evaluation(args, st),
            "checkpoints": st.saves,
            "sample_rounds": _sample_rounds(recipe, st),
        },
        "tokens": {
            "total": st.total * info["tokens_per_step"],
            "to_run": st.to_run * info["tokens_per_step"],
            "train_split": built.prepared.report["train"]["tokens"],
        },
        "time": _time(recipe, built, st, m),
        "memory": {
            "formula": formula,
            "measured_peak": m.memory_peak,
            "measured": m.memory_what,
        },
        "disk": _disk(args, st, m, resume),
    }


def _lora(lm) -> dict:
    config = lm.peft_config["default"]
    trainable, total = model.lora_parameters(lm)
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
        "trainable_share": round(trainable / total, 6),
    }


def _final_trainer_evaluation(args, st: Schedule) -> int:
    """finetune evaluates once more after training unless an evaluation ran at the final step."""
    return 0 if st.evaluations and not args.load_best_model_at_end else 1


def _sample_rounds(recipe: Recipe, st: Schedule) -> int:
    every = recipe.evaluate.sample_every
    return st.to_run // every if every else 0


def _time(recipe: Recipe, built: setup.Built, st: Schedule, m: Measured) -> dict:
    evaluations = st.evaluations + _final_trainer_evaluation(recipe.train, st)
    eval_seconds = m.eval_call_seconds + m.eval_item_seconds * len(built.prepared.eval_items)
    final_eval_seconds = 0.0
    if recipe.evaluate.at_end_of_training:
        final_eval_seconds = m.scoring_seconds + (m.sample_seconds if recipe.evaluate.samples else 0.0)
    total = (
        st.to_run * m.step_seconds
        + evaluations * eval_seconds
        + st.saves * m.checkpoint_seconds
        + _sample_rounds(recipe, st) * m.sample_seconds
        + m.final_save_seconds
        + final_eval_seconds
    )
    return {
        "step_seconds": round(m.step_seconds, 4),
        "timed_steps": m.timed_steps,
        "tokens_per_second": round(setup.tokens_per_step(recipe, built) / m.step_seconds, 1),
        "evaluation_seconds": round(eval_seconds, 2),
        "checkpoint_seconds": round(m.checkpoint_seconds, 2),
        "samples_seconds": round(m.sample_seconds, 2),
        "final_evaluation_seconds": round(final_eval_seconds, 2),
        "total_seconds": round(total, 1),
    }


def _disk(args, st: Schedule, m: Measured, resume: str | None) -> dict:
    kept = st.saves if args.save_total_limit is None else min(st.saves, args.save_total_limit)
    if args.load_best_model_at_end and args.save_total_limit:
        kept = min(st.saves, max(args.save_total_limit, 2))  # the best checkpoint is kept besides the newest
    output_dir = Path(args.output_dir)
    if resume and output_dir.is_dir():
        kept = max(0, kept - len(list(output_dir.glob("checkpoint-*"))))  # some are on disk already
    return {
        "checkpoint_bytes": m.checkpoint_bytes,
        "checkpoints_kept": kept,
        "final_model_bytes": m.final_model_bytes,
        "total_bytes": m.checkpoint_bytes * kept + m.final_model_bytes,
    }


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


def memory_formula(lm, args, block_size: int, precision: str) -> dict:
    """Bytes of the fp32 weights (4 per parameter), and of gradients (4) and AdamW state (8) per
    *trained* parameter: all of them, or a LoRA run's adapters (`lora_saves`: what full
    fine-tuning would add). Tied embeddings count once.

    Activations, roughly: per layer, in 16-bit, Korthikanti et al. 2022 ("Reducing activation
    recomputation in large transformer models", eq. 1: s*b*h*(34 + 5*a*s/h)) with its terms
    written for any shape: attention 7sbh + 4sb*h_kv + 5as^2b (h_kv: the key/value width, below h
    with grouped-query attention), MLP 3sbh + 4sbf (f: the MLP width; 8sbf for a gated, SwiGLU
    MLP: gate, up, activation and product), norms 4sbh; GPT-2's f = 4h, h_kv = h gives eq. 1.
    The 5as^2b of the attention scores only with eager attention: SDPA and flash attention keep
    no scores (counting them overstated the gpt2-small recipe's measured peak on an H200:
    bench/RESULTS.md, GPU, "validate vs the measured run"). Doubled for fp32, plus the logits and their
    gradient in fp32 (b*s*vocabulary*4 bytes, 3 copies), or with train.fused_loss in effect the
    one chunk of them it holds at a time.
    """
    trainable, params = model.lora_parameters(lm)
    shape = model.shape(lm.config)
    b, s = args.per_device_train_batch_size, block_size
    h, a, layers = shape["n_embd"] or 768, shape["n_head"] or 12, shape["n_layer"] or 12
    h_kv = (shape["n_kv_head"] or a) * h / a
    f = shape["n_inner"] or 4 * h
    gated = any(name.endswith(("gate_proj", "gate_up_proj")) for name, _ in lm.named_modules())
    scores = 5 * a * s if getattr(lm.config, "_attn_implementation", "eager") == "eager" else 0
    per_layer = s * b * (7 * h + 4 * h_kv + scores + 3 * h + (8 if gated else 4) * f + 4 * h)
    width = 1 if precision in ("bf16", "fp16") else 2
    logits = 3 * b * s * shape["vocab_size"] * 4
    if fused_loss.installed(lm):
        logits = fused_loss.logits_bytes(b * s, shape["vocab_size"], lm.device)
    activations = layers * per_layer * width + logits
    optim = str(getattr(args.optim, "value", args.optim))
    per_state = 8 if "adam" in optim.lower() else 4  # two fp32 moments; else one, roughly
    out = {
        "weights": 4 * params,
        "gradients": 4 * trainable,
        "optimizer": per_state * trainable,
        "activations": int(activations),
    }
    out["total"] = sum(out.values())
    if trainable < params:
        out["lora_saves"] = (4 + per_state) * (params - trainable)
    return out


def _resumed_step(resume: str | None) -> int:
    if resume is None:
        return 0
    return json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]


def _time_evaluation(trainer: Trainer, items, batch_size: int) -> tuple[float, float]:
    """(seconds per call, seconds per item) of Trainer.evaluate, its items blocks, rows or
    examples: after a warm-up batch, one batch and then four are timed, and the difference gives
    the cost of an item without the fixed cost of a call (a dataloader, moving the model to eval
    mode), which a few batches would otherwise spread over too few items."""
    n = len(items)
    small, large = min(n, batch_size), min(n, 4 * batch_size)
    trainer.evaluate(items.select(range(small)))
    seconds = []
    for count in (small, large):
        started = time.perf_counter()
        trainer.evaluate(items.select(range(count)))
        seconds.append(time.perf_counter() - started)
    if large == small:
        return 0.0, seconds[1] / large
    per_item = max(seconds[1] - seconds[0], 0.0) / (large - small) or seconds[1] / large
    return max(seconds[0] - per_item * small, 0.0), per_item


def _time_answer_scoring(built: setup.Built, cfg) -> float:
    """Task data: seconds the evaluator will take to score the held-out answers, from two batches
    of them timed (the answers it then generates are not counted)."""
    items, names, answer_bytes = built.prepared.eval_examples("validation")
    few = min(len(items), 2 * cfg.batch_size)
    sample = evaluate.answer_examples(items.select(range(few)), names[:few], answer_bytes[:few], few, items.n_tokens)
    with runtime.eval_mode(built.lm), progress.silenced():
        evaluate.score_answers(built.lm, sample, cfg.batch_size)  # warm-up
        started = time.perf_counter()
        evaluate.score_answers(built.lm, sample, cfg.batch_size)
        seconds = time.perf_counter() - started
    return seconds / max(sample.tokens, 1) * items.n_tokens


def _time_pair_scoring(built: setup.Built, cfg) -> float:
    """Preference pairs: seconds the evaluator will take to score the held-out pairs, from two
    batches of them timed."""
    pairs = built.prepared.eval_items
    sample = pairs.select(range(min(len(pairs), 2 * cfg.batch_size)))
    collator = data.PairCollator(built.tok.pad_token_id, built.prepared.cfg.block_size)
    with runtime.eval_mode(built.lm), progress.silenced():
        evaluate.score_pairs(built.lm, sample.select(range(1)), collator, cfg.batch_size)  # warm-up
        started = time.perf_counter()
        evaluate.score_pairs(built.lm, sample, collator, cfg.batch_size)
        seconds = time.perf_counter() - started
    return seconds / max(len(sample), 1) * len(pairs)


def _time_final_scoring(built: setup.Built, cfg, block_size: int) -> float:
    """Seconds the end-of-training evaluator will take to score the validation documents: its
    own scoring (windows, stride, batch, precision) timed on two batches of windows cut from the
    validation blocks, scaled to the windows of the whole split."""
    lm, tok, prepared = built.lm, built.tok, built.prepared
    if built.preference is not None:
        return _time_pair_scoring(built, cfg)
    if prepared.task:
        return _time_answer_scoring(built, cfg)
    s = evaluate.scoring_settings(lm, cfg)
    context, stride, bf16 = s.context, s.stride, s.bf16
    wanted = context + 1 + stride * (2 * cfg.batch_size - 1)  # two batches of windows
    blocks = math.ceil(wanted / block_size)
    ids = prepared.validation[: min(blocks, len(prepared.validation))]["input_ids"]
    doc = [tok.eos_token_id, *ids.reshape(-1)[:wanted].tolist()]
    with runtime.eval_mode(lm), progress.silenced():
        evaluate.score(lm, [doc[: context + 1]], context, stride, cfg.batch_size, bf16=bf16)  # warm-up
        started = time.perf_counter()
        evaluate.score(lm, [doc], context, stride, cfg.batch_size, bf16=bf16)
        seconds = time.perf_counter() - started
    per_window = seconds / len(evaluate.windows(len(doc), context, stride))
    docs = prepared.eval_documents("validation")  # what the evaluator will score
    return per_window * (docs.tokens / stride + len(docs))


def _time_samples(lm, tok, cfg) -> float:
    """Seconds for one round of the recipe's samples, from SAMPLE_TOKENS new tokens each."""
    new = min(SAMPLE_TOKENS, cfg.max_new_tokens)
    short = dataclasses.replace(cfg, max_new_tokens=new)
    with runtime.eval_mode(lm):
        prompts = generate.read_prompts(cfg)
        generate.Generator(lm, tok, dataclasses.replace(cfg, max_new_tokens=1))(prompts)  # warm-up
        started = time.perf_counter()
        generate.Generator(lm, tok, short)(prompts)
        return (time.perf_counter() - started) * cfg.max_new_tokens / new


def _lora_lines(m: dict, formula: dict) -> list[str]:
    if "lora" not in m:
        return []
    lo = m["lora"]
    return [
        f"LoRA: {m['trainable_parameters']:,} of {m['parameters']:,} parameters trained ({lo['trainable_share']:.2%}; "
        f"rank {lo['r']}, alpha {lo['alpha']:g}, on {', '.join(lo['target_modules'])}); gradients and AdamW state "
        f"for those only: ~{size(formula['lora_saves'])} less memory than full fine-tuning"
    ]


def describe_estimate(est: dict) -> str:
    """The estimate as lines a person reads before starting a run."""
    d, m, b, st, tk, t, mem, disk = (
        est[k] for k in ("data", "model", "batch", "steps", "tokens", "time", "memory", "disk")
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
        data.describe_report(d["report"]),
        f"model: {m['parameters']:,} parameters ({m['architecture']}, {m['shape']}); "
        f"precision {est['precision']} on {est['device']}",
        *_lora_lines(m, f),
        setup.describe_batch(b),
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
        f"memory: ~{size(f['total'])} by formula (weights {size(f['weights'])}, gradients {size(f['gradients'])}, "
        f"optimizer {size(f['optimizer'])}, activations ~{size(f['activations'])}); measured: "
        f"{size(mem['measured_peak'])} ({mem['measured']})",
        f"disk: ~{size(disk['total_bytes'])} = {disk['checkpoints_kept']} checkpoints kept x "
        f"{size(disk['checkpoint_bytes'])} + final model {size(disk['final_model_bytes'])}",
    ]
    return "\n".join(lines)
