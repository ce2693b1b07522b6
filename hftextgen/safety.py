"""What keeps a run's progress safe when things go wrong.

- Checkpoints: the Trainer writes a checkpoint-N folder in place, file by file, with
  trainer_state.json last and nothing renamed into place. A run killed while saving leaves a
  folder without trainer_state.json or with a file cut short. `checkpoint_problem` finds both,
  and resuming takes the newest checkpoint that has neither.
- The final model: written into a hidden folder of the run directory and renamed into place
  file by file, the weights last (`save_final_model`).
- SIGTERM and Ctrl-C: the run finishes its step, saves a checkpoint and stops, saying how to
  continue (`GracefulStop`).
- NaN or infinite losses: the run stops (or skips the step) instead of training on garbage
  (`NanGuard`).
- Disk space: a warning before training when the checkpoints will not fit (`disk_warning`), and
  one line, not a traceback, when the disk fills up during training (`train`).
- Resuming: a checkpoint of another model is refused (`check_same_model`), and settings the
  checkpoint overrides or that change the data order are warned about (`changed_on_resume`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from .errors import RunStopped, UserError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files hftextgen or the Trainer write into every run directory before or while training; a
# folder holding one of them is a run, which train.overwrite_output_dir may delete.
RUN_MARKERS = ("recipe.yaml", "run_info.json", "trainer_state.json")
STAGING = ".final-model"


def warn(message: str) -> None:
    print(f"hftextgen: warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders of a run directory, newest (highest N) first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def _file_problem(path: Path) -> str | None:
    """Why one file of a checkpoint is unreadable, judged by its format's own structure: a
    safetensors header states the size of the data after it, and torch.save writes a zip
    archive whose directory is its last bytes. Both catch a file cut short (or left empty by a
    machine that crashed before the file reached the disk) without reading the tensors."""
    if path.is_dir():  # a distributed (FSDP) checkpoint: torch writes .metadata when done
        return None if (path / ".metadata").is_file() else f"{path.name}/ has no .metadata"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt"):
                return None
        except Exception:  # safetensors raises its own error type for every kind of damage
            return f"{path.name} is cut short"
    if path.suffix in (".pt", ".pth", ".bin"):
        return None if zipfile.is_zipfile(path) else f"{path.name} is cut short"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return f"{path.name} is cut short"
    return None


def checkpoint_problem(folder: Path, needs_optimizer: bool = True) -> str | None:
    """Why a checkpoint folder cannot be resumed from, in a few words; None when it is complete.

    needs_optimizer: the optimizer, schedule and random states must be there too (every
    checkpoint but those of train.save_only_model). Without them the Trainer would resume
    silently with a fresh AdamW and another random state.
    """
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json: the run stopped while saving it"
    names = {p.name for p in folder.iterdir()}
    required = {"model weights": ("model.safetensors", "model-", "pytorch_model")}
    if needs_optimizer:
        required |= {"optimizer state": ("optimizer",), "schedule": ("scheduler.pt",), "random state": ("rng_state",)}
    for what, prefixes in required.items():
        if not any(name.startswith(prefixes) for name in names):
            return f"no {what}"
    for path in sorted(folder.iterdir()):
        problem = _file_problem(path)
        if problem:
            return problem
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        missing = set(json.loads(index.read_text())["weight_map"].values()) - names
        if missing:
            return f"{sorted(missing)[0]} is missing"
    return None


def newest_complete(output_dir: Path, needs_optimizer: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint of a run directory, and the newer ones skipped with why."""
    skipped = []
    for folder in checkpoints(output_dir):
        problem = checkpoint_problem(folder, needs_optimizer)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def check_same_model(checkpoint: Path, lm) -> None:
    """A checkpoint of another architecture would fail deep inside the Trainer with a size mismatch
    for every tensor; say which setting differs instead."""
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # an FSDP checkpoint keeps no config.json; the Trainer reports what it finds
    built = lm.config.to_dict()
    keys = ("model_type", "vocab_size", "n_layer", "n_head", "n_embd", "n_positions", "n_inner")
    keys += ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")
    for key in keys:
        if key in saved and key in built and saved[key] != built[key]:
            run = Path(checkpoint).parent
            raise UserError(
                f"train.resume_from_checkpoint: {checkpoint} holds a model with {key}={saved[key]}, but this "
                f"recipe builds {key}={built[key]}: resume with the run's own recipe: hftextgen finetune --config "
                f"{run / 'recipe.yaml'} --train.resume_from_checkpoint last"
            )


# What a checkpoint brings back whatever the recipe says now: the optimizer's and scheduler's
# saved states hold the learning rate, its schedule and AdamW's settings.
RESTORED = (
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "optim",
    "optim_args",
)
# What decides which blocks each step sees: a resumed run skips the batches already trained by
# counting them, so with any of these changed it goes on with other data than the run had.
DATA_ORDER = ("seed", "data_seed", "per_device_train_batch_size", "gradient_accumulation_steps")


def changed_on_resume(saved_recipe: str, recipe: str) -> list[str]:
    """Warnings for settings that differ from the run's saved recipe and that a resumed run
    cannot honour (they are restored from the checkpoint) or that change its data order."""
    import yaml

    try:
        before, now = yaml.safe_load(saved_recipe) or {}, yaml.safe_load(recipe) or {}
    except yaml.YAMLError:
        return []

    def values(section: str, key: str) -> tuple:
        return (before.get(section) or {}).get(key), (now.get(section) or {}).get(key)

    def differs(section: str, key: str) -> bool:
        old, new = values(section, key)
        return key in (before.get(section) or {}) and old != new

    notes = []
    for key in RESTORED:
        if differs("train", key):
            old, new = values("train", key)
            notes.append(
                f"train.{key} is {new!r} here but {old!r} in the run: a resumed run keeps its checkpoint's "
                f"optimizer and schedule, so the new value is not used (start over to use it)"
            )
    order = [f"train.{k}" for k in DATA_ORDER if differs("train", k)]
    order += [
        f"data.{k}" for k in before.get("data") or {} if k not in ("cache_dir", "num_proc") and differs("data", k)
    ]
    if order:
        notes.append(
            f"{', '.join(order)} {'differs' if len(order) == 1 else 'differ'} from the run's: the resumed run skips "
            f"the steps already trained by count, so from here on it sees other data than the run would have"
        )
    return notes


# ---------------------------------------------------------------- the run directory


def looks_like_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in RUN_MARKERS) or bool(checkpoints(output_dir))


def clear_run(output_dir: Path) -> None:
    """Delete what an earlier run left in output_dir (train.overwrite_output_dir), keeping the
    folder itself (it may be a mount point, or carry permissions someone set)."""
    for path in output_dir.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def save_final_model(trainer, output_dir: Path) -> None:
    """Trainer.save_model writes the model in place, file by file, so a crash would leave half a
    model.safetensors in the run directory. Write it into a hidden folder of the run directory
    (same filesystem) instead, then rename each file into place, the weights last: a reader (or
    a crash) sees each file whole, and the weights appear only once everything else is there."""
    staging = output_dir / STAGING
    main = trainer.args.should_save
    if main and staging.exists():
        shutil.rmtree(staging)  # left by a run killed while saving; its files are in checkpoints
    trainer.save_model(str(staging), _internal_call=True)  # every process: FSDP gathers here
    if main:

        def weights_last(path: Path) -> tuple[bool, bool, str]:
            weights = path.suffix == ".safetensors" or path.name.startswith("pytorch_model")
            return weights, path.name.endswith(".index.json"), path.name

        for path in sorted(staging.iterdir(), key=weights_last):
            os.replace(path, output_dir / path.name)
        staging.rmdir()
    if trainer.args.push_to_hub:  # what Trainer.save_model() does when not called internally
        trainer.push_to_hub(commit_message="Model save", revision=trainer.args.hub_revision)


# ---------------------------------------------------------------- disk space


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def disk_warning(output_dir: Path, parameters: int, saves: int, save_total_limit: int | None) -> str | None:
    """A warning when the disk under output_dir cannot hold what this run will write, else None.

    A checkpoint holds the fp32 weights (4 bytes a parameter) and AdamW's two fp32 moments (8
    bytes); the Trainer deletes the oldest one only after writing a new one, so save_total_limit
    + 1 of them exist at once. The final model is the weights again. What the run directory
    already holds (a resumed run's checkpoints) counts as spent.
    """
    checkpoint = parameters * 12
    at_once = min(saves, save_total_limit + 1) if save_total_limit and save_total_limit > 0 else saves
    needed = at_once * checkpoint + parameters * 4
    needed -= sum(_size(p) for p in checkpoints(output_dir)) + _size(output_dir / "model.safetensors")
    where = output_dir
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed <= free:
        return None
    limit = f"train.save_total_limit={save_total_limit}" if save_total_limit else "no train.save_total_limit"
    return (
        f"train.output_dir {output_dir}: {_gb(free)} free, but this run may write about {_gb(needed)} more "
        f"({at_once} checkpoints of {_gb(checkpoint)} (weights + AdamW state) at once with {limit}, and the "
        f"final model): free some space, lower train.save_total_limit, or choose another train.output_dir"
    )


def planned_saves(args, train_blocks: int) -> int:
    """How many checkpoints the Trainer will write: every save_steps steps and at the end."""
    per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(train_blocks / per_step))
    steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    strategy = str(args.save_strategy).rsplit(".", 1)[-1].lower()
    if strategy == "no":
        return 1  # a graceful stop still saves one
    if strategy == "epoch":
        return max(1, math.ceil(steps / steps_per_epoch))
    every = args.save_steps if args.save_steps >= 1 else max(1, math.ceil(args.save_steps * steps))
    return steps // every + 1


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


class GracefulStop(TrainerCallback):
    """SIGTERM (a scheduler ending the job, `kill`) or Ctrl-C: finish the current step, save a
    checkpoint, and stop. A second Ctrl-C stops at once, without saving.

    Used as a context manager around Trainer.train(): the handlers are the process's only while
    it trains. Under several processes every one decides at each step end together (one tiny
    all-reduce), since a process that stopped alone would leave the others waiting forever in
    their next collective.
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


# ---------------------------------------------------------------- training


def train(trainer, resume: str | None, output_dir: Path, command: list[str] | None):
    """trainer.train() under GracefulStop and NanGuard. Returns its TrainOutput when the run
    reached its end; raises RunStopped (a signal) or UserError (a NaN) when it did not, so that
    the final model, metrics and evaluation, which are for a finished run, are not written."""
    args = trainer.args
    main = args.process_index == 0
    stop, guard = GracefulStop(), NanGuard(args.on_nan, args.fp16)
    trainer.add_callback(stop)
    trainer.add_callback(guard)  # after GracefulStop, so that it sees the save that one asks for
    continue_with = resume_command(command, args.world_size)
    try:
        with stop:
            result = trainer.train(resume_from_checkpoint=resume)
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
        raise RunStopped(message + continue_with if main else "", 128 + signal.SIGINT) from None
    finally:
        trainer.remove_callback(stop)
        trainer.remove_callback(guard)
    if guard.fault is not None:
        raise UserError(guard.message(args, output_dir))
    if stop.received is not None:
        newest, _ = newest_complete(output_dir)
        message = (
            f"stopped by {signal.Signals(stop.received).name} at step {trainer.state.global_step} of "
            f"{trainer.state.max_steps}; checkpoint saved: {newest}\nhftextgen: continue with: {continue_with}"
        )
        raise RunStopped(message if main else "", 128 + stop.received)
    if guard.skipped and main:
        print(f"train.on_nan=skip: {guard.skipped} steps skipped for a non-finite gradient", flush=True)
    return result
