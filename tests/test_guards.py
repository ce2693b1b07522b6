"""The guards of a run in training: SIGTERM and Ctrl-C stop it with a checkpoint (also during an
evaluation, and under two processes), a NaN stops it before any checkpoint holds it (or skips
the step), and a full disk ends it with one line naming the checkpoint to continue from.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shlex
import signal
from pathlib import Path

import pytest
import torch
from runs import DRIVER, ROOT, assert_same_run, losses, said, start, wait_for, weight_difference
from safetensors.torch import load_file

from hftextgen import model as model_stage
from hftextgen.train import guards, rundir

pytestmark = pytest.mark.slow  # every test here trains end to end
# SIGINT (Ctrl-C) takes the same path as SIGTERM: the extended suite (`make test-all`) runs it.
SIGNALS = [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.extended)]


@pytest.fixture(autouse=True)
def _small_run_cache(small_run, monkeypatch):
    """The small run's trained tokenizer and packed data: no test here retrains or re-packs them."""
    monkeypatch.setenv("HFTEXTGEN_CACHE", str(small_run.cache))


# ---------------------------------------------------------------- SIGTERM, Ctrl-C


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_says_how_to_continue(small_run, tmp_path, run_cli, signum):
    run_dir = tmp_path / "run"
    # SIGTERM as `kill` sends it, to the process; SIGINT as a terminal's Ctrl-C does, to the
    # whole process group, DataLoader workers included.
    workers = ("--train.dataloader_num_workers", "2") if signum == signal.SIGINT else ()
    argv = small_run.argv(run_dir, *workers)
    process = start(argv, small_run.cache, tmp_path, new_session=True, STEP_DELAY="0.05")
    wait_for(run_dir / "checkpoint-10" / "trainer_state.json", process)
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    err = err.decode()
    assert process.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert f"hftextgen: {name}: saving a checkpoint at the end of this step, then stopping" in err
    stopped = re.search(
        rf"^hftextgen: stopped by {name} at step (\d+) of 40; checkpoint saved: (\S+)\n"
        rf"hftextgen: continue with: (hftextgen finetune .*)\n\Z",
        err,
        re.M,
    )
    assert stopped, err
    step, checkpoint, command = int(stopped[1]), Path(stopped[2]), stopped[3]
    assert 10 < step < 40 and checkpoint == run_dir / f"checkpoint-{step}"
    assert rundir.checkpoint_problem(checkpoint) is None
    # The losses since the last logging step are in its history, and nothing of a finished run
    # was written.
    assert max(e["step"] for e in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]) == step
    for file in ("model.safetensors", "eval_results.json", "train_results.json", "trainer_state.json"):
        assert not (run_dir / file).exists(), file
    assert command == shlex.join(["hftextgen", *argv, "--train.resume_from_checkpoint", "last"])

    if signum == signal.SIGTERM:  # the printed command, as printed, finishes the same run
        code, _, err = run_cli(*shlex.split(command)[1:])
        assert code == 0, err
        assert_same_run(run_dir, small_run.run_dir)


@pytest.mark.extended
def test_a_signal_during_an_evaluation_stops_it_and_saves_the_steps_since_the_last_checkpoint(
    small_run, tmp_path, run_cli
):
    """An evaluation of a large validation split can take many minutes: a signal leaves it at the
    next batch, and the steps trained since the newest checkpoint are saved, resumable exactly."""
    run_dir, mark = tmp_path / "run", tmp_path / "evaluating"
    # An evaluation at step 15 (no checkpoint there), one block a batch, each batch slowed.
    argv = small_run.argv(run_dir, "--train.eval_steps", "15", "--train.per_device_eval_batch_size", "1")
    process = start(argv, small_run.cache, tmp_path, STEP_DELAY="0.2", EVAL_MARK=str(mark))
    wait_for(mark, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    err = err.decode()
    assert process.returncode == 143, err
    assert f"hftextgen: stopped by SIGTERM at step 15 of 40; checkpoint saved: {run_dir}/checkpoint-15\n" in err
    assert rundir.checkpoint_problem(run_dir / "checkpoint-15") is None
    # Left at the next batch, not after scoring the whole split.
    state = json.loads((run_dir / "checkpoint-15" / "trainer_state.json").read_text())
    assert not any("eval_loss" in entry for entry in state["log_history"])
    code, _, err = run_cli(*argv, "--train.resume_from_checkpoint", "last")
    assert code == 0, err
    # Creating the evaluation's data loader draws from the random state, so the reference is the
    # same recipe run without a stop.
    code, _, err = run_cli(*small_run.argv(tmp_path / "reference", *argv[len(small_run.argv(run_dir)) :]))
    assert code == 0, err
    assert_same_run(run_dir, tmp_path / "reference")


@pytest.mark.extended
def test_two_processes_stop_at_the_same_step(small_run, tmp_path):
    """Under accelerate launch every process gets the signal (torchrun passes it on), maybe at
    different steps: they agree at each step end, or one would wait forever for the other."""
    run_dir = tmp_path / "run"
    (tmp_path / "driver.py").write_text(DRIVER)
    launch = ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/multi_gpu.yaml")]
    argv = [*launch, "--num_processes", "2", str(tmp_path / "driver.py")]
    argv += small_run.argv(run_dir, "--train.per_device_train_batch_size", "2")
    process = start(argv, small_run.cache, tmp_path, STEP_DELAY="0.05", python_argv=True)
    wait_for(run_dir / "checkpoint-10" / "trainer_state.json", process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    # torchrun ends with its own SignalException traceback and exit code 1, after its processes.
    stopped = re.findall(
        r"^hftextgen: stopped by SIGTERM at step (\d+) of 40; checkpoint saved: (\S+)$", err.decode(), re.M
    )
    assert len(stopped) == 1, err.decode()[-3000:]
    checkpoint = Path(stopped[0][1])
    assert checkpoint == run_dir / f"checkpoint-{stopped[0][0]}" and rundir.checkpoint_problem(checkpoint) is None
    assert sorted(p.name for p in checkpoint.glob("rng_state_*")) == ["rng_state_0.pth", "rng_state_1.pth"]


def test_resume_command_drops_resume_and_overwrite_options():
    argv = ["--config", "my recipe.yaml", "--train.overwrite_output_dir", "true"]
    argv += ["--train.resume_from_checkpoint=runs/x/checkpoint-5", "--train.seed", "3"]
    assert guards.resume_command(argv, 1) == (
        "hftextgen finetune --config 'my recipe.yaml' --train.seed 3 --train.resume_from_checkpoint last"
    )
    assert guards.resume_command([], 2).endswith("(started by accelerate launch with the same options)")


# ---------------------------------------------------------------- NaN guard


def poison(monkeypatch, steps, factor: float = float("nan")) -> None:
    """NaN hidden states (so NaN logits) in the training forward passes of these steps (1-based;
    one forward a step), or hidden states times another `factor`. On the base model's output:
    the fused loss never calls lm_head."""
    build = model_stage.build_model

    def build_model(*args, **kwargs):
        lm = build(*args, **kwargs)
        forwards = itertools.count(1)

        def hook(module, inputs, output):
            if module.training and next(forwards) in steps:
                output.last_hidden_state = output.last_hidden_state * factor
                return output

        lm.base_model.register_forward_hook(hook)
        return lm

    monkeypatch.setattr(model_stage, "build_model", build_model)


def test_a_nan_loss_stops_the_run_before_any_checkpoint_holds_it(small_run, tmp_path, run_cli, monkeypatch):
    poison(monkeypatch, {13})
    run_dir = tmp_path / "run"
    argv = small_run.argv(run_dir, "--train.max_steps", "20", "--train.save_steps", "5", "--train.logging_steps", "4")
    code, out, err = run_cli(*argv)
    assert code == 2
    # Logged at 12; the save at 15 makes the Trainer log first, and that log holds the NaN.
    assert said(err) == (
        "hftextgen: error: the training loss became nan in steps 13-15: the learning rate "
        "(train.learning_rate=0.01) is likely too high: lower it or raise train.warmup_steps, and start over "
        f"(--train.overwrite_output_dir true); {run_dir / 'checkpoint-10'} is the last good checkpoint; "
        "train.on_nan=skip drops such steps instead"
    )
    assert sorted(p.name for p in rundir.checkpoints(run_dir)) == ["checkpoint-10", "checkpoint-5"]
    assert all(torch.isfinite(t).all() for t in load_file(run_dir / "checkpoint-10" / "model.safetensors").values())
    assert not (run_dir / "model.safetensors").exists()


def test_gradients_that_are_all_zero_are_said_once(small_run, tmp_path, run_cli, monkeypatch):
    """Hidden states times 0: the logits are 0 whatever the weights (GPT-2 ties its output layer
    to the embedding), so every gradient is 0 and the loss stays at log(vocabulary)."""
    poison(monkeypatch, set(range(1, 100)), factor=0.0)
    argv = small_run.argv(tmp_path / "run", "--train.max_steps", "8", "--train.logging_steps", "2")
    code, out, err = run_cli(*argv)
    assert code == 0, err
    warning = (
        "hftextgen: warning: the gradient norm is 0 at steps 1, 2, 4: no weight is learning (every parameter "
        "frozen, or a loss that does not reach the model); stop the run and check the recipe (peft, "
        "train.fused_loss)\n"
    )
    assert err.count("gradient norm is 0") == 1 and warning in err


def test_on_nan_skip_drops_the_step_and_goes_on(small_run, tmp_path, run_cli, monkeypatch):
    poison(monkeypatch, {13})
    run_dir = tmp_path / "run"
    argv = small_run.argv(run_dir, "--train.max_steps", "14", "--train.save_steps", "1", "--train.on_nan", "skip")
    code, out, err = run_cli(*argv)
    assert code == 0, err
    assert "hftextgen: warning: step 13: the gradient norm is nan: update skipped (1 so far)\n" in err
    assert "train.on_nan=skip: 1 steps skipped for a non-finite gradient" in out
    # Step 13 changed neither the weights nor AdamW's state; step 14 trained as usual.
    before, skipped, after = (run_dir / f"checkpoint-{s}" for s in (12, 13, 14))
    assert weight_difference(before, skipped) == 0 and weight_difference(skipped, after) > 0
    state_before = torch.load(before / "optimizer.pt")["state"]
    state_skipped = torch.load(skipped / "optimizer.pt")["state"]
    assert all(torch.equal(state_before[i]["exp_avg"], state_skipped[i]["exp_avg"]) for i in state_before)
    # The skipped step's NaN is left out of the logged loss.
    assert all(map(torch.isfinite, map(torch.tensor, losses(run_dir).values())))


@pytest.mark.extended
def test_on_nan_skip_gives_up_after_ten_steps_in_a_row(small_run, tmp_path, run_cli, monkeypatch):
    poison(monkeypatch, set(range(5, 100)))
    run_dir = tmp_path / "run"
    code, _, err = run_cli(*small_run.argv(run_dir, "--train.max_steps", "30", "--train.on_nan", "skip"))
    assert code == 2
    assert "hftextgen: error: the gradient norm was nan in 10 steps in a row (steps 5-14): the learning rate" in err
    # Skipped steps leave the weights as they were: the checkpoint saved during them is good.
    assert f"{run_dir / 'checkpoint-10'} is the last good checkpoint" in err
    assert not (run_dir / "model.safetensors").exists()


@pytest.mark.extended
def test_a_full_disk_stops_the_run_with_a_line_and_the_checkpoints_before_stay_good(
    small_run, tmp_path, run_cli, monkeypatch
):
    from transformers import Trainer

    save = Trainer._save_optimizer_and_scheduler

    def full_at_20(self, output_dir):
        if self.state.global_step == 20:
            raise OSError(errno.ENOSPC, "No space left on device", f"{output_dir}/optimizer.pt")
        save(self, output_dir)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full_at_20)
    code, _, err = run_cli(*small_run.argv(run_dir))
    assert code == 2
    command = shlex.join(["hftextgen", *small_run.argv(run_dir), "--train.resume_from_checkpoint", "last"])
    assert said(err) == (
        f"hftextgen: error: the disk is full (writing {run_dir}/checkpoint-20/optimizer.pt) at step 20: "
        f"{run_dir}/checkpoint-10 is the newest complete checkpoint; free some space (or lower "
        f"train.save_total_limit) and continue with: {command}"
    )
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save)
    code, _, err = run_cli(*shlex.split(command)[1:])
    assert code == 0, err
    assert_same_run(run_dir, small_run.run_dir)
