"""schedule_of against the stock Trainer: the steps, evaluations and checkpoints it counts are
the ones a real Trainer makes, for step and epoch strategies, fractions, accumulation, a resumed
run and several processes."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hftextgen.train import schedule


class Toy(torch.nn.Module):
    """The smallest model a Trainer trains: one weight, a loss from it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, labels=None):
        return {"loss": ((self.w - x.float().mean()) ** 2).sum()}


class Count(TrainerCallback):
    def __init__(self):
        self.saves, self.evaluations = [], []

    def on_save(self, args, state, control, **kwargs):
        self.saves.append(state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluations.append(state.global_step)


def run_trainer(tmp_path, blocks: int, resume_at: int = 0, **settings) -> tuple[Count, Trainer]:
    data = [{"x": torch.tensor([i])} for i in range(blocks)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=64,
        report_to=[],
        disable_tqdm=True,
        save_only_model=True,
        use_cpu=True,
        **settings,
    )
    count = Count()
    trainer = Trainer(model=Toy(), args=args, train_dataset=data, eval_dataset=data[:2], callbacks=[count])
    if resume_at:
        trainer.train()  # a first run to resume from; its own counts are not the ones compared
        count.saves.clear(), count.evaluations.clear()
        trainer.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{resume_at}"))
    else:
        trainer.train()
    return count, trainer


CASES = {
    "steps, last step not a multiple": (23, dict(max_steps=23, save_steps=5, eval_strategy="steps", eval_steps=4)),
    "steps, last step a multiple": (23, dict(max_steps=20, save_steps=5, eval_strategy="steps", eval_steps=10)),
    "200 steps every 20": (10, dict(max_steps=200, save_steps=20, eval_strategy="no")),
    "fractions of the run": (23, dict(max_steps=30, save_steps=0.25, eval_strategy="steps", eval_steps=0.5)),
    "epochs and accumulation": (
        23,
        dict(num_train_epochs=3, per_device_train_batch_size=4, gradient_accumulation_steps=2, save_strategy="epoch"),
    ),
    "eval delay": (10, dict(max_steps=14, save_strategy="no", eval_strategy="steps", eval_steps=5, eval_delay=6)),
    "eval steps unset: the logging steps": (10, dict(max_steps=9, eval_strategy="steps", logging_steps=4)),
    "drop_last": (23, dict(num_train_epochs=2, per_device_train_batch_size=5, dataloader_drop_last=True)),
}


@pytest.mark.parametrize("name", CASES)
def test_schedule_counts_what_the_trainer_does(tmp_path, name):
    blocks, settings = CASES[name]
    settings = {"per_device_train_batch_size": 2, "logging_steps": 1000, **settings}
    count, trainer = run_trainer(tmp_path, blocks, **settings)
    st = schedule.schedule_of(trainer.args, blocks)
    assert st.total == trainer.state.max_steps == trainer.state.global_step
    assert st.saves == len(count.saves), count.saves
    assert st.evaluations == len(count.evaluations), count.evaluations


def test_a_resumed_run_counts_only_what_is_left(tmp_path):
    settings = dict(per_device_train_batch_size=2, max_steps=17, save_steps=5, eval_strategy="steps", eval_steps=3)
    count, trainer = run_trainer(tmp_path, 10, resume_at=10, **settings)
    st = schedule.schedule_of(trainer.args, 10, first=10)
    assert (st.to_run, st.saves, st.evaluations) == (7, len(count.saves), len(count.evaluations)) == (7, 2, 3)


@pytest.mark.parametrize(
    "blocks, batch, processes, accumulation, drop_last, expected",
    [
        (100, 4, 1, 1, False, 25),
        (101, 4, 1, 1, False, 26),
        (101, 4, 1, 1, True, 25),
        (101, 4, 2, 1, False, 13),  # 51 blocks a process (the sampler pads), 13 batches
        (101, 4, 2, 3, False, 5),  # the last partial accumulation still steps
        (3, 8, 4, 1, True, 1),  # nothing whole: the Trainer still counts one step
    ],
)
def test_steps_per_epoch(blocks, batch, processes, accumulation, drop_last, expected):
    assert schedule.steps_per_epoch(blocks, batch, processes, accumulation, drop_last) == expected


def test_occurrences_at_the_edges():
    # DefaultFlowCallback: every `every` steps, and once more at the last step when it is off the grid.
    assert schedule.occurrences("steps", 5, 0, 14, 1) == 3
    assert schedule.occurrences("steps", 5, 0, 15, 1) == 3
    assert schedule.occurrences("steps", 5, 10, 15, 1) == 1
    assert schedule.occurrences("steps", 5, 0, 14, 1, delay=6) == 2  # eval_delay: steps 10 and 14
    assert schedule.occurrences("no", 5, 0, 14, 1) == 0
    assert schedule.occurrences("epoch", None, 0, 14, 3) == 3
