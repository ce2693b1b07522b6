"""Progress modes (bars, plain lines, quiet) and publishing with train.push_to_hub."""

from __future__ import annotations

import concurrent.futures
import re
from types import SimpleNamespace

import pytest
from conftest import files_args

from hftextgen import cli, hub, progress


@pytest.fixture
def run_fd(capfd):
    """Run `hftextgen ...` and capture at the file descriptors: whatever any library writes."""

    def run(*argv: str):
        code = cli.main([str(a) for a in argv])
        out, err = capfd.readouterr()
        return code, out, err

    yield run
    progress.configure("auto")


def short_run(corpus, run_dir, *extra):
    # logging every step, and an evaluation mid-run: what a progress display has to show
    return files_args(corpus, run_dir, "--train.max_steps", "6", "--train.eval_steps", "3", *extra)


@pytest.mark.slow
def test_quiet_prints_no_progress_and_no_carriage_return(corpus, tmp_path, run_fd):
    code, out, err = run_fd(*short_run(corpus, tmp_path / "run"), "--progress", "quiet")
    assert code == 0, err
    assert "\r" not in out + err
    assert "held-out loss" in out and "run directory:" in out  # what it found is still said
    assert not re.search(r"^step \d", out, re.M) and "Tokenizing" not in out + err and "Scoring" not in out + err


@pytest.mark.slow
def test_plain_prints_a_line_per_log_and_no_carriage_return(corpus, tmp_path, run_fd):
    code, out, err = run_fd(*short_run(corpus, tmp_path / "run"), "--progress", "plain")
    assert code == 0, err
    assert "\r" not in out + err
    steps = re.findall(
        r"^step (\d+)/6 \(\d+%\) \| loss [\d.]+ \| lr [\d.e+-]+ \| grad norm .* \| [\d,]+ tokens/s \| ", out, re.M
    )
    assert steps == [str(s) for s in range(1, 7)], out
    assert re.search(r"^step 3/6 .*, ETA \d+:\d\d$", out, re.M)
    assert (
        len(re.findall(r"^eval at step \d/6: loss [\d.]+, perplexity [\d.]+, ~[\d.]+ bits per byte$", out, re.M)) == 2
    )
    assert "Tokenizing 8 documents (1 unit, 1 process): 21.1 kB ..." in out and "training: 6 steps in" in out


@pytest.mark.slow
def test_bars_draw_bars(corpus, tmp_path, run_fd):
    """The same check that finds no carriage return in the modes above finds the bars' here."""
    code, out, err = run_fd(*short_run(corpus, tmp_path / "run"), "--progress", "bars", "--train.disable_tqdm", "false")
    assert code == 0, err
    assert "\r" in err and "Training:" in err and "Tokenizing 8 documents" in err
    assert re.search(r"loss [\d.]+, [\d,]+ tokens/s", err)
    assert not re.search(r"^step \d", out, re.M)


def test_auto_is_plain_off_a_terminal():
    assert progress.resolve("auto") == "plain"  # pytest's captured stderr is no terminal
    assert progress.resolve("auto", no_bars=True) == "plain"
    assert progress.resolve("bars", no_bars=True) == "bars"


def test_bad_progress_mode_is_one_line(run_cli, tmp_path):
    code, _, err = run_cli("finetune", "--progress", "loud", "--train.output_dir", tmp_path / "run")
    assert code == 2 and "progress: expected one of auto, bars, plain, quiet" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_push_to_hub_offline_fails_before_any_work(corpus, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    for command in ("finetune", "validate"):
        argv = files_args(corpus, run_dir, "--train.max_steps", "2", "--train.push_to_hub", "true")
        code, out, err = run_cli(command, *argv[1:])
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "train.push_to_hub: the Hugging Face Hub cannot be reached" in err
        assert "Tokenizing" not in out and not run_dir.exists()
        assert not (tmp_path / "cache").exists()  # failed before reading the data


@pytest.mark.slow
def test_push_to_hub_needs_a_token(corpus, tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    code, _, err = run_cli(*files_args(corpus, tmp_path / "run", "--train.push_to_hub", "true"))
    assert code == 2 and "needs a Hugging Face token" in err and "hf auth login" in err


class FakeHub:
    """Records what the Trainer and hftextgen ask of the hub, and what the folder held then."""

    def __init__(self):
        self.calls = []

    def create_repo(self, name, **kwargs):
        self.calls.append(("create_repo", name, kwargs))
        return SimpleNamespace(repo_id=f"someone/{name}")

    def upload_folder(self, *, repo_id, folder_path, run_as_future=False, **kwargs):
        from pathlib import Path

        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, {**kwargs, "files": files}))
        if run_as_future:
            done = concurrent.futures.Future()
            done.set_result(None)
            return done
        return SimpleNamespace(commit_url="https://huggingface.co/someone/x/commit/1")


@pytest.mark.slow
def test_push_to_hub_uploads_the_run_with_its_model_card(corpus, tmp_path, run_cli, monkeypatch):
    import huggingface_hub
    import transformers.trainer
    import transformers.utils.hub

    fake = FakeHub()
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, token=None: {"name": "someone"})
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: fake)
    monkeypatch.setattr(transformers.utils.hub, "hf_api", lambda: fake)
    run_dir = tmp_path / "tiny-pushed"
    code, out, err = run_cli(*files_args(corpus, run_dir, "--train.max_steps", "4", "--train.push_to_hub", "true"))
    assert code == 0, err
    assert fake.calls[0][:2] == ("create_repo", "tiny-pushed")
    last = fake.calls[-1]
    assert last[0] == "upload_folder" and last[1] == "someone/tiny-pushed"
    assert last[2]["commit_message"] == "End of training" and "checkpoint-*" in last[2]["ignore_patterns"]
    assert {"README.md", "loss.png", "model.safetensors", "eval.json"} <= set(last[2]["files"])
    assert 'model="someone/tiny-pushed"' in (run_dir / "README.md").read_text()
    assert "pushed to https://huggingface.co/someone/tiny-pushed" in out


def test_durations_read_as_clocks_and_as_words():
    assert [progress.duration(s) for s in (0, 65, 3725, -3)] == ["0:00", "1:05", "1:02:05", "0:00"]
    assert [progress.spoken(s) for s in (42.3, 230, 3725)] == ["42 s", "3 min 50 s", "1 h 2 min"]


def test_plain_line_shows_rate_and_eta(monkeypatch):
    from hftextgen.train.callbacks import PlainLines

    lines = PlainLines()
    lines.started, lines.first_step = 100.0, 20
    monkeypatch.setattr("hftextgen.train.callbacks.time.monotonic", lambda: 130.0)  # 30 s for 10 steps
    state = SimpleNamespace(global_step=30, max_steps=120)
    logs = {"loss": 5.12345, "learning_rate": 1.9e-3, "grad_norm": 0.612, "tokens_per_second": 2871.4}
    assert lines.line(state, logs) == (
        "step 30/120 (25%) | loss 5.1235 | lr 1.90e-03 | grad norm 0.612 | 2,871 tokens/s | 0:30 elapsed, ETA 4:30"
    )
