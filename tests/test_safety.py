"""Never lose a run: a run killed mid-training or mid-save resumes to the same weights, SIGTERM and
Ctrl-C stop with a checkpoint, a NaN stops the run (or skips the step), the final model is never
half-written, the same seed gives the same run, and a full disk is warned about.

The reference for every comparison is the session's `small_run`: 40 steps with dropout on, so
that a resume that lost the random state would show.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hftextgen import model as model_stage
from hftextgen import safety

ROOT = Path(__file__).resolve().parents[1]

# `hftextgen finetune` in a subprocess, with two test-only levers that change no number:
# STEP_DELAY sleeps in the collator (a tiny model trains 40 steps faster than a test can
# poll), and DIE_IN_SAVE=N kills the process with SIGKILL in the middle of saving checkpoint-N,
# after the model files and before the optimizer state and trainer_state.json.
DRIVER = """
import os, signal, sys, time
from transformers import Trainer
from hftextgen import cli, train

collate, delay = train.collate_blocks, float(os.environ.get("STEP_DELAY", "0"))
train.collate_blocks = lambda examples: (time.sleep(delay), collate(examples))[1]
die_at, save = int(os.environ.get("DIE_IN_SAVE", "0")), Trainer._save_optimizer_and_scheduler

def dying(self, output_dir):
    if self.state.global_step == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, output_dir)

Trainer._save_optimizer_and_scheduler = dying
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def _small_run_cache(small_run, monkeypatch):
    """The small run's trained tokenizer and packed data: no test here retrains or re-packs them."""
    monkeypatch.setenv("HFTEXTGEN_CACHE", str(small_run.cache))


def start(
    argv: list[str], cache: Path, cwd: Path, python_argv: bool = False, new_session: bool = False, **env: str
) -> subprocess.Popen:
    """The driver running `hftextgen argv`, or with python_argv, `python argv` (the driver is
    then one of them)."""
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HFTEXTGEN_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # as in this process (conftest): the same numbers, and fast on a busy CPU
        **env,
    }
    command = [sys.executable, *argv] if python_argv else [sys.executable, "-c", DRIVER, *argv]
    return subprocess.Popen(
        command, env=environment, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=new_session
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended before {path} appeared:\n{out.decode()[-2000:]}\n{err.decode()[-2000:]}")
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


def said(err: str) -> str:
    """hftextgen's own lines on stderr (not the progress bars of datasets)."""
    return "\n".join(line for line in err.splitlines() if line.startswith("hftextgen:"))


def logged(run_dir: Path, key: str) -> dict[int, float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {e["step"]: e[key] for e in state["log_history"] if key in e}


def losses(run_dir: Path) -> dict[int, float]:
    return logged(run_dir, "loss")


def learning_rates(run_dir: Path) -> dict[int, float]:
    return logged(run_dir, "learning_rate")


def weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same steps, same losses at every step, same final weights, to 1e-6 (float32 on one CPU
    thread repeats itself exactly: measured 0). A resume with another step's random state,
    and nothing else wrong, misses by 2e-2 on the losses and 3e-3 on the weights (measured)."""
    got, expected = losses(run_dir), losses(reference)
    assert list(got) == list(expected) == list(range(1, 41))
    assert max(abs(got[s] - expected[s]) for s in got) <= 1e-6, (got, expected)
    assert weight_difference(run_dir, reference) <= 1e-6


# ---------------------------------------------------------------- kill, crash while saving


def test_a_run_killed_mid_training_resumes_to_the_same_weights(small_run, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    process = start(small_run.argv(run_dir), small_run.cache, tmp_path, STEP_DELAY="0.05")
    wait_for(run_dir / "checkpoint-10" / "trainer_state.json", process)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "model.safetensors").exists()

    code, _, err = run_cli(*small_run.argv(run_dir, "--train.resume_from_checkpoint", "last"))
    assert code == 0, err
    assert_same_run(run_dir, small_run.run_dir)


def test_a_save_cut_short_is_skipped_and_the_run_resumes_from_the_one_before(small_run, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    process = start(small_run.argv(run_dir), small_run.cache, tmp_path, DIE_IN_SAVE="20")
    process.communicate(timeout=180)
    assert process.returncode == -signal.SIGKILL
    partial = run_dir / "checkpoint-20"
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert safety.checkpoint_problem(partial) == "no trainer_state.json: the run stopped while saving it"

    code, _, err = run_cli(*small_run.argv(run_dir, "--train.resume_from_checkpoint", "last"))
    assert code == 0, err
    assert (
        f"hftextgen: warning: {partial} is incomplete or damaged (no trainer_state.json: the run stopped while "
        f"saving it): skipped\n" in err
    )
    assert_same_run(run_dir, small_run.run_dir)
    assert safety.checkpoint_problem(partial) is None  # saved again, whole, at step 20


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json: the run stopped while saving it"),
        (lambda c: os.truncate(c / "trainer_state.json", 100), "trainer_state.json is cut short"),
        (lambda c: os.truncate(c / "model.safetensors", 1000), "model.safetensors is cut short"),
        (lambda c: os.truncate(c / "optimizer.pt", 1000), "optimizer.pt is cut short"),
        (lambda c: os.truncate(c / "scheduler.pt", 0), "scheduler.pt is cut short"),
        (lambda c: os.truncate(c / "rng_state.pth", 10), "rng_state.pth is cut short"),
        (lambda c: (c / "optimizer.pt").unlink(), "no optimizer state"),
        (lambda c: (c / "rng_state.pth").unlink(), "no random state"),
        (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
    ],
    ids=["no-state", "state", "weights", "optimizer", "empty-scheduler", "rng", "no-optimizer", "no-rng", "no-model"],
)
def test_every_kind_of_damaged_checkpoint_is_found_and_skipped(small_run, tmp_path, damage, problem):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run.run_dir, run_dir)
    assert safety.newest_complete(run_dir) == (run_dir / "checkpoint-40", [])
    damage(run_dir / "checkpoint-40")
    assert safety.newest_complete(run_dir) == (run_dir / "checkpoint-30", [(run_dir / "checkpoint-40", problem)])


def test_resume_says_which_new_settings_it_cannot_use(small_run, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run.run_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoint-40")
    argv = small_run.argv(run_dir, "--train.resume_from_checkpoint", "last", "--train.learning_rate", "1e-3")
    code, _, err = run_cli(*argv, "--train.per_device_train_batch_size", "2")
    assert code == 0, err
    assert said(err).splitlines() == [
        "hftextgen: warning: train.learning_rate is 0.001 here but 0.01 in the run: a resumed run keeps its "
        "checkpoint's optimizer and schedule, so the new value is not used (start over to use it)",
        "hftextgen: warning: train.per_device_train_batch_size differs from the run's: the resumed run skips the "
        "steps already trained by count, so from here on it sees other data than the run would have",
    ]
    # What the warning says: steps 31-40 ran on the run's schedule, not on the new learning rate.
    assert learning_rates(run_dir) == learning_rates(small_run.run_dir)


# ---------------------------------------------------------------- SIGTERM, Ctrl-C


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
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
    assert safety.checkpoint_problem(checkpoint) is None
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
    assert checkpoint == run_dir / f"checkpoint-{stopped[0][0]}" and safety.checkpoint_problem(checkpoint) is None
    assert sorted(p.name for p in checkpoint.glob("rng_state_*")) == ["rng_state_0.pth", "rng_state_1.pth"]


def test_resume_command_drops_resume_and_overwrite_options():
    argv = ["--config", "my recipe.yaml", "--train.overwrite_output_dir", "true"]
    argv += ["--train.resume_from_checkpoint=runs/x/checkpoint-5", "--train.seed", "3"]
    assert safety.resume_command(argv, 1) == (
        "hftextgen finetune --config 'my recipe.yaml' --train.seed 3 --train.resume_from_checkpoint last"
    )
    assert safety.resume_command([], 2).endswith("(started by accelerate launch with the same options)")


# ---------------------------------------------------------------- NaN guard


def poison(monkeypatch, steps) -> None:
    """NaN hidden states (so NaN logits) in the training forward passes of these steps (1-based;
    one forward a step). On the base model's output: the fused loss never calls lm_head."""
    build = model_stage.build_model

    def build_model(*args, **kwargs):
        lm = build(*args, **kwargs)
        forwards = itertools.count(1)

        def hook(module, inputs, output):
            if module.training and next(forwards) in steps:
                output.last_hidden_state = output.last_hidden_state * float("nan")
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
    assert sorted(p.name for p in safety.checkpoints(run_dir)) == ["checkpoint-10", "checkpoint-5"]
    assert all(torch.isfinite(t).all() for t in load_file(run_dir / "checkpoint-10" / "model.safetensors").values())
    assert not (run_dir / "model.safetensors").exists()


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


def test_on_nan_skip_gives_up_after_ten_steps_in_a_row(small_run, tmp_path, run_cli, monkeypatch):
    poison(monkeypatch, set(range(5, 100)))
    run_dir = tmp_path / "run"
    code, _, err = run_cli(*small_run.argv(run_dir, "--train.max_steps", "30", "--train.on_nan", "skip"))
    assert code == 2
    assert "hftextgen: error: the gradient norm was nan in 10 steps in a row (steps 5-14): the learning rate" in err
    # Skipped steps leave the weights as they were: the checkpoint saved during them is good.
    assert f"{run_dir / 'checkpoint-10'} is the last good checkpoint" in err
    assert not (run_dir / "model.safetensors").exists()


# ---------------------------------------------------------------- final model, determinism, disk


def test_a_crash_while_saving_the_final_model_leaves_no_half_model(small_run, tmp_path, run_cli, monkeypatch):
    from transformers import Trainer

    save = Trainer._save

    def crash_in_final_save(self, output_dir=None, state_dict=None):
        save(self, output_dir, state_dict)
        if Path(output_dir).name == safety.STAGING:
            weights = Path(output_dir) / "model.safetensors"
            os.truncate(weights, weights.stat().st_size // 2)
            raise OSError("disk full")

    run_dir = tmp_path / "run"
    monkeypatch.setattr(Trainer, "_save", crash_in_final_save)
    with pytest.raises(OSError, match="disk full"):
        run_cli(*small_run.argv(run_dir))
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "config.json").exists()
    assert safety.checkpoint_problem(run_dir / "checkpoint-40") is None

    monkeypatch.setattr(Trainer, "_save", save)
    code, _, err = run_cli(*small_run.argv(run_dir, "--train.resume_from_checkpoint", "last"))
    assert code == 0, err
    assert not (run_dir / safety.STAGING).exists()
    assert weight_difference(run_dir, small_run.run_dir) == 0


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


def test_the_same_recipe_and_seed_give_the_same_run(small_run, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(*small_run.argv(run_dir))
    assert code == 0, err
    assert losses(run_dir) == losses(small_run.run_dir)
    assert weight_difference(run_dir, small_run.run_dir) == 0


def test_a_disk_too_small_for_the_checkpoints_is_warned_about(small_run, tmp_path, run_cli, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    run_dir = tmp_path / "run"
    code, _, err = run_cli(*small_run.argv(run_dir, "--train.max_steps", "2"))
    assert code == 0, err
    # 11,904 parameters: 142,848 bytes a checkpoint; 2 steps save once at the end.
    assert (
        f"hftextgen: warning: train.output_dir {run_dir}: 0.1 MB free, but this run may write about 0.2 MB more "
        "(1 checkpoints of 0.1 MB (weights + AdamW state) at once with train.save_total_limit=3, and the final "
        "model): free some space, lower train.save_total_limit, or choose another train.output_dir\n"
    ) in err


def test_disk_estimate():
    class Args:
        per_device_train_batch_size, world_size, gradient_accumulation_steps = 4, 2, 1
        max_steps, num_train_epochs, save_strategy, save_steps = 1000, 3.0, "steps", 100

    assert safety.planned_saves(Args, train_blocks=10_000) == 11
    Args.max_steps = -1
    assert safety.planned_saves(Args, train_blocks=800) == 3 * 100 // 100 + 1
    Args.save_strategy = "epoch"
    assert safety.planned_saves(Args, train_blocks=800) == 3
