"""Training-time guards: a signal stops a run with a checkpoint, a NaN stops it before any
checkpoint holds it, and a full disk ends it with one line; `fit` runs the Trainer under them.

- SIGTERM and Ctrl-C: the run finishes its step (or leaves the evaluation it is in, within a
  batch), saves a checkpoint and stops, saying how to continue (`GracefulStop`). After training,
  a signal during the final evaluation ends the command at once, the model already saved
  (`interruptible`).
- NaN or infinite losses: the run stops (or skips the step) instead of training on garbage
  (`NanGuard`).
- A full disk during training: one line naming the newest complete checkpoint and the command
  that continues, not a traceback.
- Gradients that are all zero from the start: a warning that nothing is learning
  (`ZeroGradients`), instead of a run that looks healthy and trains nothing.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shlex
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..errors import RunStopped, UserError, warn
from .rundir import checkpoint_step, newest_complete

# ---------------------------------------------------------------- graceful stop


def resume_command(argv: list[str] | None, processes: int) -> str:
    """The command line that continues a run: the one that started it, with
    --train.resume_from_checkpoint last instead of any resume or overwrite option."""
    if argv is None:
        return "the same command with --train.resume_from_checkpoint last"
    dropped = ("--train.resume_from_checkpoint", "--train.overwrite_output_dir")
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in dropped:
            skip = True
        elif not arg.startswith(tuple(f"{d}=" for d in dropped)):
            kept.append(arg)
    command = shlex.join(["hftextgen", "finetune", *kept, "--train.resume_from_checkpoint", "last"])
    if processes > 1:
        return f"{command} (started by accelerate launch with the same options)"
    return command


class _StopEvaluation(Exception):
    """Raised out of the Trainer's evaluation loop when a signal arrived during it: the loop has
    no other way out, and an evaluation of a large validation split can take many minutes."""


class GracefulStop(TrainerCallback):
    """SIGTERM (a scheduler ending the job, `kill`) or Ctrl-C: finish the current step, save a
    checkpoint, and stop; during an evaluation, leave it at the next batch. A second Ctrl-C
    stops at once, without saving.

    Used as a context manager around Trainer.train(): the handlers are the process's only while
    it trains. Under several processes every one decides at each step (and evaluation batch)
    end together (one tiny all-reduce), since a process that stopped alone would leave the
    others waiting forever in their next collective.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # A DataLoader worker, forked with this handler: Ctrl-C reaches the whole process
            # group, and a worker that stopped would fail the step the run is trying to finish.
            return
        if self.received is None:
            self.received = signum
            again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
            print(
                f"hftextgen: {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then "
                f"stopping{again}",
                file=sys.stderr,
                flush=True,
            )
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def _agreed(self, args) -> bool:
        stop = self.received is not None
        if args.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if stop else 0.0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self.received is None:
                self.received = signal.SIGTERM  # another process got it
        return stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and self._agreed(args):
            self.stopped_at = state.global_step
            # Log too, so the losses since the last logging step are in the checkpoint's history.
            control.should_save = control.should_log = control.should_training_stop = True

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.stopped_at is None and self._agreed(args):
            self.stopped_at = state.global_step
            raise _StopEvaluation


@contextlib.contextmanager
def interruptible(what: str, instead: str):
    """SIGTERM or Ctrl-C during `what` (work after training: the final evaluation, the model card)
    ends the command at once with one line saying what to run `instead`; the model is saved by
    then, so there is nothing to keep."""

    def stop(signum, frame):
        raise RunStopped(f"stopped by {signal.Signals(signum).name} during {what}: {instead}", 128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, stop) for s in GracefulStop.SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------- NaN guard


@dataclass
class Fault:
    what: str
    value: float
    first: int
    last: int

    @property
    def steps(self) -> str:
        return f"step {self.last}" if self.first == self.last else f"steps {self.first}-{self.last}"


# Steps in a row that train.on_nan=skip may skip before it gives up: a run whose every step is
# skipped trains on nothing.
MAX_SKIPPED_IN_A_ROW = 10


class NanGuard(TrainerCallback):
    """A NaN or infinite loss (or gradient) stops the run, or with train.on_nan=skip drops that step.

    One NaN step poisons the weights for good (AdamW's moments keep it), so every later loss is
    NaN too. `stop` therefore needs no check per step, which would cost a device-to-host sync
    each: it looks at what the Trainer logs (the mean loss since the last log, NaN if any step's
    was, and the gradient norm), and makes the Trainer log before every evaluation and
    checkpoint, so that no checkpoint ever holds poisoned weights. `skip` must act before the
    optimizer step, so it checks the gradient norm of every step.

    fp16: a non-finite gradient is routine (the loss scaler skips the step and lowers the scale),
    so only the loss counts, and `skip` leaves the per-step work to the scaler.
    """

    def __init__(self, mode: str, fp16: bool):
        self.mode, self.fp16 = mode, fp16
        self.fault: Fault | None = None
        self.skipped = 0
        self.in_a_row = 0
        self.last_logged = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_logged = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.fault is not None:
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False
        elif self.mode == "stop" and (control.should_save or control.should_evaluate or control.should_training_stop):
            control.should_log = True  # the check in on_log comes before this step's save and evaluation

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.mode != "stop" or not logs or "loss" not in logs:
            return
        for key in ("loss",) if self.fp16 else ("loss", "grad_norm"):
            value = logs.get(key)
            if value is not None and not math.isfinite(value):
                self.fault = Fault(key, value, self.last_logged + 1, state.global_step)
                control.should_training_stop = True
                control.should_save = control.should_evaluate = False
                return
        self.last_logged = state.global_step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.mode != "skip" or self.fp16 or self.fault is not None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if hasattr(norm, "full_tensor"):  # FSDP: each process holds a shard of the gradients
            norm = norm.full_tensor()
        if torch.isfinite(norm):
            self.in_a_row = 0
            return
        model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
        self.skipped += 1
        self.in_a_row += 1
        step = state.global_step + 1
        if args.process_index == 0:
            warn(f"step {step}: the gradient norm is {norm.item()}: update skipped ({self.skipped} so far)")
        if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
            self.fault = Fault("grad_norm", norm.item(), step - self.in_a_row + 1, step)

    def message(self, args, output_dir: Path) -> str:
        """One line: what went wrong at which step, the likely cause, and what to do."""
        fault = self.fault
        what = "training loss" if fault.what == "loss" else "gradient norm"
        if self.mode == "skip":
            head = f"the {what} was {fault.value} in {MAX_SKIPPED_IN_A_ROW} steps in a row ({fault.steps})"
        else:
            head = f"the {what} became {fault.value} in {fault.steps}"
        lr = f"train.learning_rate={args.learning_rate:g}"
        if args.fp16:
            cause = f"fp16 overflowed, or the learning rate ({lr}) is too high: train in bf16 (--train.bf16 true)"
            cause += " where the hardware has it, or lower the learning rate"
        else:
            cause = f"the learning rate ({lr}) is likely too high: lower it or raise train.warmup_steps"
        good, _ = newest_complete(output_dir)
        kept = f"{good} is the last good checkpoint" if good else "no checkpoint was saved before it"
        instead = "; train.on_nan=skip drops such steps instead" if self.mode == "stop" else ""
        return f"{head}: {cause}, and start over (--train.overwrite_output_dir true); {kept}{instead}"


class ZeroGradients(TrainerCallback):
    """Warns once when the first LOGS gradient norms the Trainer logs are all exactly 0: no weight
    is learning (every parameter frozen, or a loss cut off from the model: on an H200 a compiled
    fused loss once trained at full speed with zero gradients and a flat loss). Reads the
    logged norm, so it costs no device sync; a single nonzero norm ends the watch."""

    LOGS = 3

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.done = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.done or not logs or logs.get("grad_norm") is None:
            return
        if logs["grad_norm"] != 0:
            self.done = True
            return
        self.steps.append(state.global_step)
        if len(self.steps) == self.LOGS:
            self.done = True
            if state.is_world_process_zero:
                warn(
                    f"the gradient norm is 0 at steps {', '.join(map(str, self.steps))}: no weight is learning "
                    f"(every parameter frozen, or a loss that does not reach the model); stop the run and check "
                    f"the recipe (peft, train.fused_loss)"
                )


# ---------------------------------------------------------------- training


def fit(trainer, resume: str | None, output_dir: Path, command: list[str] | None):
    """trainer.train() under GracefulStop, NanGuard and ZeroGradients. Returns its TrainOutput when the run
    reached its end; raises RunStopped (a signal) or UserError (a NaN, a full disk) when it did
    not, so that the final model, metrics and evaluation, which are for a finished run, are not
    written."""
    args = trainer.args
    stop, guard, zero = GracefulStop(), NanGuard(args.on_nan, args.fp16), ZeroGradients()
    trainer.add_callback(stop)
    trainer.add_callback(guard)  # after GracefulStop, so that it sees the save that one asks for
    trainer.add_callback(zero)
    continue_with = resume_command(command, args.world_size)
    try:
        with stop:
            result = trainer.train(resume_from_checkpoint=resume)
    except _StopEvaluation:
        _save_unsaved_steps(trainer, output_dir)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        newest, _ = newest_complete(output_dir)
        kept = f"{newest} is the newest complete checkpoint" if newest else "no checkpoint was saved"
        raise UserError(
            f"the disk is full (writing {exc.filename or output_dir}) at step {trainer.state.global_step}: {kept}; "
            f"free some space (or lower train.save_total_limit) and continue with: {continue_with}"
        ) from None
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without saving
        newest, _ = newest_complete(output_dir)
        saved = f"the newest checkpoint is {newest}" if newest else "no checkpoint was saved"
        message = f"interrupted at step {trainer.state.global_step} without saving ({saved}); continue with: "
        raise RunStopped(_main_only(args, message + continue_with), 128 + signal.SIGINT) from None
    finally:
        for callback in (stop, guard, zero):
            trainer.remove_callback(callback)
    if guard.fault is not None:
        raise UserError(guard.message(args, output_dir))
    if stop.received is not None:
        newest, _ = newest_complete(output_dir)
        message = (
            f"stopped by {signal.Signals(stop.received).name} at step {trainer.state.global_step} of "
            f"{trainer.state.max_steps}; checkpoint saved: {newest}\nhftextgen: continue with: {continue_with}"
        )
        raise RunStopped(_main_only(args, message), 128 + stop.received)
    if guard.skipped and args.process_index == 0:
        print(f"train.on_nan=skip: {guard.skipped} steps skipped for a non-finite gradient", flush=True)
    return result


def _save_unsaved_steps(trainer, output_dir: Path) -> None:
    """After a signal cut an evaluation short: save a checkpoint when steps were trained since
    the newest one (the weights, optimizer and random state are those of the step that ended
    before the evaluation began, as a checkpoint of that step would hold)."""
    newest, _ = newest_complete(output_dir, not trainer.args.save_only_model)
    saved = checkpoint_step(newest) if newest is not None else 0
    if trainer.state.global_step > saved:
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
        trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)


def _main_only(args, message: str) -> str:
    """Under several processes only the first one says it."""
    return message if args.process_index == 0 else ""
