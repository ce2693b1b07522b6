"""A directory saved as a run saves its model (save_pretrained, the chat template beside the
tokenizer) serves through stock `transformers serve` and answers the openai client's chat
completion, offline, with the model named by its path in the request. Needs the `serve` extra."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import save_chat_model

import hftextgen.generate.chat as chat
from hftextgen.generate import GenerateConfig
from hftextgen.model import load, set_generation

openai = pytest.importorskip("openai", reason="the serve extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra: pip install -e '.[serve]'")

READY_S = 90  # the server up (imports torch and transformers); the first request loads the model
MAX_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    """The `transformers` console script of this environment (next to its python)."""
    script = Path(sys.executable).with_name("transformers")
    return [str(script) if script.exists() else shutil.which("transformers") or "transformers", "serve"]


def wait_until_healthy(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"transformers serve exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet
            time.sleep(0.5)
    pytest.fail(f"transformers serve not up after {READY_S} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM lets serve stop its model's process; SIGKILL to its whole group if it does not."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


@contextlib.contextmanager
def served(tmp_path: Path):
    """`transformers serve` on a free port, offline, and an openai client of it; stopped after."""
    port, log = free_port(), tmp_path / "serve.log"
    # Offline: a local directory needs nothing from the Hub. One thread: the machine is shared.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [*serve_command(), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(process, port, log)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=120, max_retries=0)
    finally:
        stop(process)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.mark.slow
@pytest.mark.extended  # starts a server: the extended suite (`make test-all`)
def test_transformers_serve_answers_the_openai_client_from_a_run_directory(tmp_path):
    folder = save_chat_model(tmp_path / "run")
    with served(tmp_path) as client:
        reply = client.chat.completions.create(model=str(folder), messages=MESSAGES, max_tokens=MAX_TOKENS)
    answer = reply.choices[0]
    assert answer.message.role == "assistant" and isinstance(answer.message.content, str)
    assert 1 <= reply.usage.completion_tokens <= MAX_TOKENS
    assert answer.finish_reason in ("stop", "length")
    # Serve prompted with the directory's template, as hftextgen's chat does: same prompt, and
    # (both greedy: serve's default for a generation_config without do_sample) the same answer.
    lm, tok = load(str(folder), device="cpu")
    assert reply.usage.prompt_tokens == len(tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"])
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES}) + "\n")
    cfg = GenerateConfig(preset="greedy", max_new_tokens=MAX_TOKENS)
    chat.answer_file(lm, tok, cfg, path, tmp_path / "answers.jsonl")
    ours = json.loads((tmp_path / "answers.jsonl").read_text())["messages"][-1]["content"]
    assert answer.message.content == ours


@pytest.mark.slow
@pytest.mark.extended  # starts a server
def test_serve_samples_as_the_recipe_says_and_takes_the_clients_temperature(tmp_path):
    """A run's generation_config.json holds its recipe's preset (balanced: sampling), so serve
    samples at the temperature a client asks for; without do_sample there it answered greedily,
    the same answer each time."""
    folder = save_chat_model(tmp_path / "run")
    lm, tok = load(str(folder), device="cpu")
    set_generation(lm, tok, [], "conversation", GenerateConfig(preset="balanced").settings())
    lm.save_pretrained(folder)
    assert json.loads((folder / "generation_config.json").read_text())["do_sample"] is True
    with served(tmp_path) as client:
        ask = dict(model=str(folder), messages=MESSAGES, max_tokens=MAX_TOKENS)
        hot = [client.chat.completions.create(**ask, temperature=1.2).choices[0].message.content for _ in range(3)]
        cold = [client.chat.completions.create(**ask, temperature=0).choices[0].message.content for _ in range(2)]
    assert len(set(hot)) > 1, hot  # a random model's 50k-token softmax at 1.2: three draws never all agree
    assert len(set(cold)) == 1  # temperature 0: greedy, as the protocol says
