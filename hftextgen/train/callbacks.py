"""Trainer callbacks that make a run visible while it trains: metrics, progress, TensorBoard, samples.

RunMetrics   adds tokens seen, tokens/s, eval perplexity and eval bits-per-byte to every log,
             ahead of every reporter (TensorBoard, wandb, ...) and of the progress display
TrainingBar  a tqdm bar with the loss and tokens/s (progress `bars`)
PlainLines   one line per logging step: step/total, loss, lr, tokens/s, elapsed, ETA (`plain`)
TensorBoard  the stock TensorBoard reporter, writing to <run>/tensorboard and purging the steps a
             resumed run repeats; also takes samples as text and the final evaluation
Samples      every evaluate.sample_every steps, samples of the generate prompts in the log,
             training_samples.jsonl and TensorBoard

`install` puts them on a stock Trainer in place of its PrinterCallback/ProgressCallback. The
callbacks that guard a run (signals, NaN) are in guards.py.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .. import data, generate, progress
from ..files import append_lines
from ..generate import GenerateConfig
from ..runtime import eval_mode


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


class RealTokens:
    """Counts the real tokens of the training batches (padding never), in the order the Trainer
    takes them. `dataset` is the training set, noting each item's tokens as the data loader
    reads it; `collate` is the collator, closing each batch of them. The Trainer's evaluations
    use the same collator on another dataset, so they add nothing. The loader reads a batch
    ahead (accelerate's), so the counts wait in a queue until `take` hands out a step's.
    Counted where the loader reads: with train.dataloader_num_workers > 0 that is the workers,
    and nothing arrives here (`take` then returns None)."""

    def __init__(self, dataset, collate):
        self.inner_collate = collate
        self.pending = 0  # tokens of the items read since the last batch
        self.batches: deque[int] = deque()
        self.dataset = _Counted(dataset, self)

    def collate(self, items):
        if self.pending:
            self.batches.append(self.pending)
            self.pending = 0
        return self.inner_collate(items)

    def take(self, micro_batches: int) -> int | None:
        """The real tokens of the next step's micro-batches (fewer at an epoch's end), or None
        when none were counted."""
        if not self.batches:
            return None
        return sum(self.batches.popleft() for _ in range(min(micro_batches, len(self.batches))))


class _Counted(torch.utils.data.Dataset):
    def __init__(self, dataset, counter: RealTokens):
        self.inner, self.counter = dataset, counter

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        item = self.inner[i]
        self.counter.pending += data.real_tokens(item)
        return item


class RunMetrics(TrainerCallback):
    """Adds to each training log `tokens` (real tokens trained so far) and `tokens_per_second`
    (over the steps since the last log, counting only the time inside steps, so evaluations,
    checkpoints and samples do not drag it down), and to each evaluation log `eval_perplexity`
    and `eval_bits_per_byte`.

    Real tokens leave out padding: blocks (concat) are never padded, but isolated rows and
    padded examples are (task data: 2,015.6 real tokens in a step of 8 rows of 256). They come
    from `real` (RealTokens), else (data loader workers) each step counts tokens_per_step, the
    most a step holds. Under several processes this process's count is taken as each one's.
    The running total is TrainerState.num_input_tokens_seen, saved with every checkpoint (left
    to the Trainer when train.include_num_input_tokens_seen asks it to count).

    eval_bits_per_byte converts the loss over packed blocks with the validation split's tokens
    per UTF-8 byte; the end-of-training evaluator's bits-per-byte is the exact figure.
    """

    def __init__(
        self,
        tokens_per_step: int,
        tokens_per_byte: float | None = None,
        real: RealTokens | None = None,
        perplexity: bool = True,
    ):
        self.tokens_per_step = tokens_per_step
        self.tokens_per_byte = tokens_per_byte
        self.real = real
        self.perplexity = perplexity  # off for a loss that is not a language model's (preference pairs)
        self.busy = 0.0
        self.tokens = 0  # real tokens of the steps since the last log, all processes
        self.session_tokens = 0  # ... and of every step of this session (train_tokens_per_second)
        self.began: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step and not state.num_input_tokens_seen and args.include_num_input_tokens_seen == "no":
            state.num_input_tokens_seen = state.global_step * self.tokens_per_step  # a checkpoint that kept none

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.began is not None:
            self.busy += time.perf_counter() - self.began
            self.began = None
        counted = self.real.take(args.gradient_accumulation_steps) if self.real is not None else None
        tokens = self.tokens_per_step if counted is None else counted * args.world_size
        self.tokens += tokens
        self.session_tokens += tokens
        if args.include_num_input_tokens_seen == "no":
            state.num_input_tokens_seen += tokens

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "loss" in logs:
            logs["tokens"] = state.num_input_tokens_seen
            if self.busy > 0:
                logs["tokens_per_second"] = round(self.tokens / self.busy, 1)
            self.busy, self.tokens = 0.0, 0
        if "eval_loss" in logs and self.perplexity:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
            if self.tokens_per_byte:
                logs["eval_bits_per_byte"] = logs["eval_loss"] / math.log(2) * self.tokens_per_byte


def eval_line(state, logs: dict) -> str:
    line = f"eval at step {state.global_step:,}/{state.max_steps:,}: loss {logs['eval_loss']:.4f}"
    if "eval_rewards/accuracies" in logs:  # preference pairs
        return (
            line + f", reward accuracy {logs['eval_rewards/accuracies']:.1%}, margin {logs['eval_rewards/margins']:.3f}"
        )
    line += f", perplexity {logs.get('eval_perplexity', perplexity(logs['eval_loss'])):.2f}"
    if "eval_bits_per_byte" in logs:
        line += f", ~{logs['eval_bits_per_byte']:.3f} bits per byte"
    return line


class TrainingBar(ProgressCallback):
    """The stock bar (and its evaluation bar), with the loss and tokens/s beside it and one line
    per evaluation above it, instead of every log printed as a dict.

    transformers' own bars stay off from here on: each checkpoint would leave a "Writing model
    shards 1/1" line under the training bar.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.training_bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="Training", unit=" steps", dynamic_ncols=True
            )
        self.current_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or logs is None:
            return
        if "loss" in logs:
            shown = f"loss {logs['loss']:.4f}"
            if "tokens_per_second" in logs:
                shown += f", {logs['tokens_per_second']:,.0f} tokens/s"
            self.training_bar.set_postfix_str(shown, refresh=False)
        if "eval_loss" in logs:
            self.training_bar.write(eval_line(state, logs))


class PlainLines(TrainerCallback):
    """One line per logging step, for logs that keep every character (CI, Slurm):
    `step 120/600 (20%) | loss 5.1234 | lr 1.9e-03 | 2,871 tokens/s | 0:41 elapsed, ETA 2:46`.
    The ETA extrapolates the wall time per step so far, evaluations and checkpoints included."""

    def __init__(self):
        self.started: float | None = None
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()
        self.first_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None or self.started is None:
            return
        if "loss" in logs:
            print(self.line(state, logs), flush=True)
        if "eval_loss" in logs:
            print(eval_line(state, logs), flush=True)

    def line(self, state, logs: dict) -> str:
        step, total = state.global_step, state.max_steps
        parts = [f"step {step:,}/{total:,} ({100 * step / max(total, 1):.0f}%)", f"loss {logs['loss']:.4f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "grad_norm" in logs:
            parts.append(f"grad norm {logs['grad_norm']:.3g}")
        if "tokens_per_second" in logs:
            parts.append(f"{logs['tokens_per_second']:,.0f} tokens/s")
        elapsed = time.monotonic() - self.started
        done = step - self.first_step
        timing = f"{progress.duration(elapsed)} elapsed"
        if done > 0 and total > step:
            timing += f", ETA {progress.duration(elapsed / done * (total - step))}"
        parts.append(timing)
        return " | ".join(parts)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.started is not None:
            elapsed = time.monotonic() - self.started
            print(
                f"training: {state.global_step - self.first_step:,} steps in {progress.duration(elapsed)}", flush=True
            )


class TensorBoard(TensorBoardCallback):
    """The stock reporter, logging to `log_dir` (unless TENSORBOARD_LOGGING_DIR says otherwise).

    A resumed run starts again after its checkpoint's step: the events the interrupted run
    logged after that step are purged (SummaryWriter's purge_step), so its curves do not double
    back. Samples and the final evaluation go through `add_text` and `log_final`.
    """

    def __init__(self, log_dir: Path):
        super().__init__()
        self.logging_dir = self.logging_dir or str(log_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.tb_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_writer = SummaryWriter(
                log_dir=self.logging_dir, purge_step=state.global_step + 1 if state.global_step else None
            )
        super().on_train_begin(args, state, control, **kwargs)

    def add_text(self, tag: str, text: str, step: int) -> None:
        if self.tb_writer is not None:
            self.tb_writer.add_text(tag, text, step)
            self.tb_writer.flush()

    def log_final(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        """After training (the stock writer is closed by then): a writer of its own, same folder."""
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=self.logging_dir) as writer:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)
            for tag, text in texts.items():
                writer.add_text(tag, text, step)


class Samples(TrainerCallback):
    """Every `every` steps, print samples of the generate prompts and append them to `path`
    (training_samples.jsonl) and to TensorBoard's text tab, so a long run shows its text
    improving."""

    def __init__(self, every: int, cfg: GenerateConfig, tok, path: Path, tensorboard: TensorBoard | None = None):
        self.every, self.cfg, self.tok, self.path = every, cfg, tok, path
        self.tensorboard = tensorboard
        self.prompts = generate.read_prompts(cfg)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every or not state.is_world_process_zero:
            return
        with eval_mode(model):
            generator = generate.Generator(model, self.tok, self.cfg)
            samples = generator(self.prompts)
        run = str(self.path.parent)
        append_lines(self.path, [json.dumps({"step": state.global_step, **generator.record(s, run)}) for s in samples])
        shown = [f"  {(sample.prompt + sample.completion)[:300]!r}" for sample in samples[:3]]
        progress.write("\n".join([f"samples at step {state.global_step}:", *shown]))
        if self.tensorboard is not None:
            self.tensorboard.add_text(
                "samples", tensorboard_text(s.prompt + s.completion for s in samples), state.global_step
            )


def tensorboard_text(texts) -> str:
    """Samples as TensorBoard markdown: each an indented block, so its line breaks survive."""
    return "\n\n---\n\n".join("\n".join("    " + line for line in text.splitlines() or [""]) for text in texts)


def samples_text(output_dir: Path) -> str:
    """The final samples of a run directory (samples.jsonl) as TensorBoard text."""
    path = output_dir / "samples.jsonl"
    if not path.is_file():
        return ""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return tensorboard_text(r["prompt"] + r.get("completion", r.get("answer", "")) for r in records)


def install(
    trainer, *, tokens_per_step: int, tokens_per_byte: float | None, log_dir: Path, perplexity: bool = True
) -> TensorBoard | None:
    """Put the progress display of the current mode, RunMetrics and our TensorBoard reporter on
    a stock Trainer. Returns the TensorBoard reporter when train.report_to includes it."""
    handler = trainer.callback_handler
    counted = trainer.train_dataset  # setup.make_trainer's, counting real tokens
    real = counted.counter if isinstance(counted, _Counted) else None
    # First in line: the logs it extends are the same dict every later callback receives, and
    # the reporters (stock ones included, e.g. wandb) are added before any callback we could add.
    handler.callbacks.insert(0, RunMetrics(tokens_per_step, tokens_per_byte, real, perplexity))
    for stock in (PrinterCallback, ProgressCallback):
        trainer.pop_callback(stock)
    shown = progress.mode()
    if shown == "bars":
        trainer.add_callback(TrainingBar())
    elif shown == "plain":
        trainer.add_callback(PlainLines())
    reporter = next((cb for cb in handler.callbacks if type(cb) is TensorBoardCallback), None)
    if reporter is None:
        return None
    trainer.remove_callback(reporter)
    tensorboard = TensorBoard(log_dir)
    trainer.add_callback(tensorboard)
    return tensorboard


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
