"""The run directory keeps a run's progress: a run killed mid-training or mid-save resumes to the
same weights from its newest complete checkpoint, damaged checkpoints are found and skipped, the
final model is never half-written, the same recipe and seed give the same run, and the disk it
needs is estimated. The pure policies (resume warnings, writability) have unit tests of their own.

The reference for every comparison is the session's `small_run`: 40 steps with dropout on, so
that a resume that lost the random state would show.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from runs import assert_same_run, kill_once_saved, learning_rates, losses, said, start, weight_difference

from hftextgen.train import rundir


@pytest.fixture(autouse=True)
def _small_run_cache(small_run, monkeypatch):
    """The small run's trained tokenizer and packed data: no test here retrains or re-packs them."""
    monkeypatch.setenv("HFTEXTGEN_CACHE", str(small_run.cache))


# ---------------------------------------------------------------- kill, crash while saving


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_same_weights(small_run, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    kill_once_saved(small_run.argv(run_dir), small_run.cache, tmp_path, run_dir / "checkpoint-10")
    assert not (run_dir / "model.safetensors").exists()

    code, _, err = run_cli(*small_run.argv(run_dir, "--train.resume_from_checkpoint", "last"))
    assert code == 0, err
    assert_same_run(run_dir, small_run.run_dir)


@pytest.mark.slow
@pytest.mark.extended
def test_a_save_cut_short_is_skipped_and_the_run_resumes_from_the_one_before(small_run, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    process = start(small_run.argv(run_dir), small_run.cache, tmp_path, DIE_IN_SAVE="20")
    process.communicate(timeout=180)
    assert process.returncode == -signal.SIGKILL
    partial = run_dir / "checkpoint-20"
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert rundir.checkpoint_problem(partial) == "no trainer_state.json: the run stopped while saving it"

    code, _, err = run_cli(*small_run.argv(run_dir, "--train.resume_from_checkpoint", "last"))
    assert code == 0, err
    assert (
        f"hftextgen: warning: {partial} is incomplete or damaged (no trainer_state.json: the run stopped while "
        f"saving it): skipped\n" in err
    )
    assert_same_run(run_dir, small_run.run_dir)
    assert rundir.checkpoint_problem(partial) is None  # saved again, whole, at step 20


@pytest.mark.slow
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
    assert rundir.newest_complete(run_dir) == (run_dir / "checkpoint-40", [])
    damage(run_dir / "checkpoint-40")
    assert rundir.newest_complete(run_dir) == (run_dir / "checkpoint-30", [(run_dir / "checkpoint-40", problem)])


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_crash_while_saving_the_final_model_leaves_no_half_model(small_run, tmp_path, run_cli, monkeypatch):
    from transformers import Trainer

    save = Trainer._save

    def crash_in_final_save(self, output_dir=None, state_dict=None):
        save(self, output_dir, state_dict)
        if Path(output_dir).name == rundir.STAGING:
            weights = Path(output_dir) / "model.safetensors"
            os.truncate(weights, weights.stat().st_size // 2)
            raise OSError("disk full")

    run_dir = tmp_path / "run"
    monkeypatch.setattr(Trainer, "_save", crash_in_final_save)
    with pytest.raises(OSError, match="disk full"):
        run_cli(*small_run.argv(run_dir))
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "config.json").exists()
    assert rundir.checkpoint_problem(run_dir / "checkpoint-40") is None

    monkeypatch.setattr(Trainer, "_save", save)
    code, _, err = run_cli(*small_run.argv(run_dir, "--train.resume_from_checkpoint", "last"))
    assert code == 0, err
    assert not (run_dir / rundir.STAGING).exists()
    assert weight_difference(run_dir, small_run.run_dir) == 0


@pytest.mark.slow
def test_the_same_recipe_and_seed_give_the_same_run(small_run, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(*small_run.argv(run_dir))
    assert code == 0, err
    assert losses(run_dir) == losses(small_run.run_dir)
    assert weight_difference(run_dir, small_run.run_dir) == 0


@pytest.mark.slow
def test_a_disk_too_small_for_the_checkpoints_is_warned_about(small_run, tmp_path, run_cli, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    run_dir = tmp_path / "run"
    code, _, err = run_cli(*small_run.argv(run_dir, "--train.max_steps", "2"))
    assert code == 0, err
    # 11,904 parameters: 142,848 bytes a checkpoint; 2 steps save once at the end.
    assert (
        f"hftextgen: warning: train.output_dir {run_dir}: 100.0 kB free, but this run may write about 190.5 kB more "
        "(1 checkpoints of 142.8 kB (weights + AdamW state) at once with train.save_total_limit=3, and the final "
        "model): free some space, lower train.save_total_limit, or choose another train.output_dir\n"
    ) in err


def test_disk_estimate_counts_the_checkpoints_that_exist_at_once(tmp_path, monkeypatch):
    """save_total_limit + 1 checkpoints of 12 bytes a parameter exist while a new one is written,
    then the final model; a checkpoint already on disk (a resumed run) counts as spent."""
    free = {"bytes": 10**12}
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda where: type("Usage", (), {"free": free["bytes"]}))
    params = 1_000_000
    assert rundir.disk_warning(tmp_path / "run", params, saves=10, save_total_limit=3) is None
    needed = 4 * 12 * params + 4 * params
    free["bytes"] = needed
    assert rundir.disk_warning(tmp_path / "run", params, saves=10, save_total_limit=3) is None
    free["bytes"] = needed - 1
    warning = rundir.disk_warning(tmp_path / "run", params, saves=10, save_total_limit=3)
    assert "4 checkpoints of 12.0 MB" in warning and "about 52.0 MB more" in warning
    assert rundir.disk_warning(tmp_path / "run", params, saves=2, save_total_limit=3) is None  # 2 saves only
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-5" / "optimizer.pt").write_bytes(b"\0" * 1000)
    assert rundir.disk_warning(tmp_path / "run", params, saves=10, save_total_limit=3) is None


def test_changed_on_resume_names_what_the_checkpoint_overrides_and_what_moves_the_data():
    saved = "train:\n  learning_rate: 0.001\n  seed: 1\n  max_steps: 40\ndata:\n  block_size: 32\n  num_proc: 1\n"
    assert rundir.changed_on_resume(saved, saved) == []
    now = saved.replace("0.001", "0.002").replace("seed: 1", "seed: 2").replace("num_proc: 1", "num_proc: 4")
    now = now.replace("max_steps: 40", "max_steps: 80")
    restored, order = rundir.changed_on_resume(saved, now)
    assert restored.startswith("train.learning_rate is 0.002 here but 0.001 in the run: a resumed run keeps")
    # max_steps may change (a longer run), and num_proc changes no token.
    assert order.startswith("train.seed differs from the run's: the resumed run skips the steps")
    assert rundir.changed_on_resume("not: [valid", now) == []


def test_check_writable_creates_nothing_it_leaves_behind(tmp_path):
    deep = tmp_path / "a" / "b" / "run"
    rundir.check_writable(deep)
    assert not (tmp_path / "a").exists()
    (tmp_path / "existing").mkdir()
    rundir.check_writable(tmp_path / "existing")
    assert list((tmp_path / "existing").iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(rundir.UserError, match="is a file: choose a directory"):
        rundir.check_writable(tmp_path / "file")
    with pytest.raises(rundir.UserError, match=r"cannot write to /proc/hftextgen-test/run \(.+\): choose a"):
        rundir.check_writable(Path("/proc/hftextgen-test/run"))


def test_only_the_main_process_probes_the_output_dir(tmp_path):
    """Under several processes the others would race the main one (one removing the folder
    another writes into: a CI failure of the 2-process launch); they leave it to the main one."""
    unwritable = Path("/proc/hftextgen-test/run")
    rundir.check_output_dir(unwritable, resuming=False, main=False)
    with pytest.raises(rundir.UserError, match="cannot write to"):
        rundir.check_output_dir(unwritable, resuming=False, main=True)
    # A folder the probe made and someone else filled meanwhile is left alone, not an error.
    made = tmp_path / "made" / "run"
    real_mkdir = Path.mkdir

    def mkdir_then_fill(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self == made:
            (made / "other-process").write_text("x")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "mkdir", mkdir_then_fill)
        rundir.check_writable(made)
    assert (made / "other-process").exists()
