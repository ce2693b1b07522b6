"""What a run will do, counted before it starts: steps, epochs, evaluations and checkpoints.

Pure arithmetic on the training arguments and the number of training blocks, written to agree
with the stock Trainer (`set_initial_training_values`, `TrainerState.compute_steps`,
`DefaultFlowCallback`); tests/test_schedule.py checks it against a real Trainer. finetune uses it for
the disk estimate, validate for its time and disk estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total: int
    """The run's last step (the Trainer's max_steps)."""
    epochs: int
    """Epochs the Trainer loops over (the last one may be cut short by max_steps)."""
    first: int
    """The step the run starts after: 0, or a resumed checkpoint's step."""
    evaluations: int
    """Trainer evaluations in steps first+1..total, the extra one at the final step included."""
    saves: int
    """Checkpoints written in steps first+1..total, the one at the final step included."""

    @property
    def to_run(self) -> int:
        return max(0, self.total - self.first)


def _name(strategy) -> str:
    """An IntervalStrategy/SaveStrategy member or its value -> 'steps', 'epoch', 'no', 'best'."""
    return str(getattr(strategy, "value", strategy)).lower()


def interval(value: float | None, total: int) -> int | None:
    """eval/save/logging steps as the Trainer reads them: below 1 is a share of the run."""
    if value is None:
        return None
    return math.ceil(total * value) if value < 1 else int(value)


def occurrences(strategy, every: int | None, first: int, last: int, epochs: int, delay: float = 0) -> int:
    """How often a step/epoch strategy fires in steps first+1..last (`epochs` of them left),
    counting the extra one DefaultFlowCallback adds at the final step when it is not a multiple
    of `every`."""
    strategy = _name(strategy)
    if strategy == "steps" and every:
        after = max(first, math.ceil(delay) - 1)  # multiples of `every` in (after, last]
        fired = max(0, last // every - after // every)
        return fired + (1 if last % every and last > after else 0)
    if strategy == "epoch":
        return epochs
    return 0


def steps_per_epoch(train_blocks: int, batch_size: int, processes: int, accumulation: int, drop_last: bool) -> int:
    """Optimizer steps in one pass over the blocks: each process's dataloader holds its share
    (the distributed sampler pads the shares to equal size), and the last partial accumulation
    still makes a step."""
    per_process = math.ceil(train_blocks / processes)
    batches = per_process // batch_size if drop_last else math.ceil(per_process / batch_size)
    return max(1, math.ceil(batches / accumulation))


def schedule_of(args, train_blocks: int, first: int = 0) -> Schedule:
    """The run's schedule for TrainingArguments `args` over `train_blocks` blocks, from step `first`."""
    per_epoch = steps_per_epoch(
        train_blocks,
        args.per_device_train_batch_size,
        args.world_size,
        args.gradient_accumulation_steps,
        args.dataloader_drop_last,
    )
    if args.max_steps > 0:
        total = args.max_steps
        epochs = math.ceil(total / per_epoch)
    else:
        total = math.ceil(args.num_train_epochs * per_epoch)
        epochs = math.ceil(args.num_train_epochs)
    epochs_left = epochs - first // per_epoch
    eval_every = interval(args.eval_steps if args.eval_steps is not None else args.logging_steps, total)
    evaluations = occurrences(args.eval_strategy, eval_every, first, total, epochs_left, args.eval_delay or 0)
    saves = occurrences(args.save_strategy, interval(args.save_steps, total), first, total, epochs_left)
    if _name(args.save_strategy) == "best":
        saves = evaluations  # at most one per evaluation, when the metric improves
    return Schedule(per_epoch, total, epochs, first, evaluations, saves)
