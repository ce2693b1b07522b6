"""Runs of `hftextgen finetune` in a subprocess that tests can kill, signal or break, and the
comparisons that say two runs are the same run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

# `hftextgen finetune` in a subprocess, with test-only levers that change no number:
# STEP_DELAY sleeps in the collator (a tiny model trains 40 steps faster than a test can
# poll), DIE_IN_SAVE=N kills the process with SIGKILL in the middle of saving checkpoint-N,
# after the model files and before the optimizer state and trainer_state.json, and
# EVAL_MARK=path touches that file when the Trainer's evaluation has scored its first batch.
DRIVER = """
import os, signal, sys, time
from transformers import Trainer
from hftextgen import cli
from hftextgen.data import packing

collate, delay = packing.collate_blocks, float(os.environ.get("STEP_DELAY", "0"))
packing.collate_blocks = lambda examples: (time.sleep(delay), collate(examples))[1]
die_at, save = int(os.environ.get("DIE_IN_SAVE", "0")), Trainer._save_optimizer_and_scheduler

def dying(self, output_dir):
    if self.state.global_step == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, output_dir)

Trainer._save_optimizer_and_scheduler = dying
mark, predict = os.environ.get("EVAL_MARK"), Trainer.prediction_step

def predicting(self, *args, **kwargs):
    if mark:
        open(mark, "a").close()
    return predict(self, *args, **kwargs)

Trainer.prediction_step = predicting
sys.exit(cli.main(sys.argv[1:]))
"""


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


def kill_once_saved(argv: list[str], cache: Path, cwd: Path, checkpoint: Path, step_delay: str = "0.05") -> None:
    """Start `hftextgen argv`, and SIGKILL it once `checkpoint` is saved whole (its trainer_state.json)."""
    process = start(argv, cache, cwd, STEP_DELAY=step_delay)
    wait_for(checkpoint / "trainer_state.json", process)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL


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


def launch_two(argv: list[str], cache_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/multi_gpu.yaml --num_processes 2 -m hftextgen ...`"""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HFTEXTGEN_CACHE": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # two processes on a shared CPU; torchrun would set it and say so
    }
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/multi_gpu.yaml")]
    command += ["--num_processes", "2", "-m", "hftextgen", *argv]
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    # Each rank's own error: the launcher's tail shows only the rank it then had to kill.
    ranks = [line for line in result.stderr.splitlines() if line.startswith("[rank")]
    assert result.returncode == 0, "\n".join([result.stdout[-2000:], *ranks[-60:], result.stderr[-2000:]])
    return result
