"""Shared test helpers: a tiny corpus the tests write, a tiny model, and the CLI in-process."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from hftextgen import cli, hub

# Tiny models gain nothing from a second thread, and OpenMP's waiting threads cost up to 10x
# when the CPU is shared (a 15-step run: 1 s with one thread, 18 s with two while other jobs
# ran on the 2-core machine). Subprocesses started by the tests get OMP_NUM_THREADS=1.
torch.set_num_threads(1)

WORDS = (
    "thou art my lord and i shall love thee well the king doth speak of war and peace "
    "good night sweet prince o what a noble mind is here"
).split()
SPEAKERS = ["HAMLET", "KING", "QUEEN", "HORATIO"]


def pytest_collection_modifyitems(items):
    """A test that reads the session's trained model (a few seconds to make) is slow: the fast
    subset (`pytest -m "not slow"`) never trains it."""
    for item in items:
        if "trained_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def flags(settings: dict) -> list[str]:
    """{"train.max_steps": 40} -> ["--train.max_steps", "40"]"""
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


# 2 layers, width 16: seconds per run, and still a real GPT-2.
TINY_MODEL = flags({"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 16})
TINY_TRAIN = flags(
    {
        "data.block_size": 32,
        "train.per_device_train_batch_size": 4,
        "train.per_device_eval_batch_size": 8,
        "train.learning_rate": 1e-2,
        "train.warmup_steps": 0,
        "train.logging_steps": 1,
        "train.bf16": "false",
        "train.disable_tqdm": "true",
        "generate.max_new_tokens": 12,
    }
)


def make_text(seed: int, lines: int = 60) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        out.append(f"{rng.choice(SPEAKERS)}:")
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 10))).capitalize() + ".")
        out.append("")
    return "\n".join(out)


def write_corpus(folder: Path, n_docs: int = 8, lines: int = 60, suffix: str = ".txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i}{suffix}").write_text(make_text(i, lines), encoding="utf-8")
    return folder


def save_tiny_pretrained(folder: Path, model_type: str = "gpt2", **shape):
    """A tiny pretrained model of `model_type` with GPT-2's tokenizer, saved as a hub model would
    be (2 layers, width 16, 64 positions; for llama, grouped-query attention and tied embeddings)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hftextgen.model.tokenizer import bundled_gpt2

    tokenizer = bundled_gpt2()
    settings = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 16, "max_position_embeddings": 64}
    if model_type == "llama":
        settings |= {"num_key_value_heads": 2, "intermediate_size": 32, "tie_word_embeddings": True}
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **settings, **ids, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


# The default template of the fine-tuning stage: assistant turns marked for the loss, ended by EOS.
TEMPLATE = (
    "{%- for message in messages %}{%- if message['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{%- else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- endif %}"
)


def save_chat_model(folder: Path) -> Path:
    """A tiny GPT-2 (64 positions) whose tokenizer carries TEMPLATE, saved with save_pretrained."""
    save_tiny_pretrained(folder)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


# Answers with spaces, punctuation, digits and a non-ASCII letter: BPE merges across a careless
# boundary would show.
ANSWERS = ["Paris.", " 42", "Hello there, friend!", "Café au lait", "No.", "It is 3:15 now.", "Yes, 7 of them."]


def pc_records(n: int = 40) -> list[dict]:
    return [{"prompt": f"Question {i}: what is it?\n", "completion": ANSWERS[i % len(ANSWERS)]} for i in range(n)]


def chat_records(n: int = 40) -> list[dict]:
    out = []
    for i in range(n):
        first, second = ANSWERS[i % len(ANSWERS)], ANSWERS[(i + 3) % len(ANSWERS)]
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Tell me thing {i}."},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And another?"},
            {"role": "assistant", "content": second},
        ]
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt2():
    """GPT-2's bundled tokenizer, ready for a language model (a pad id), once per test module."""
    from hftextgen.model import bundled_gpt2, ready_for_lm

    return ready_for_lm(bundled_gpt2(), "gpt2")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test gets its own cache, and nothing reaches the network."""
    monkeypatch.setenv("HFTEXTGEN_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub.hub_reachable.cache_clear()


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def run_cli(capsys):
    """Run `hftextgen ...` in this process; returns (exit code, stdout, stderr)."""

    def run(*argv: str):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def files_args(corpus: Path, output_dir: Path, *extra: str, model=TINY_MODEL) -> list[str]:
    """`finetune` of a tiny model on the files in `corpus`, two of eight documents held out."""
    data = flags({"data.source": "files", "data.paths": f"[{corpus}/*.txt]", "data.validation_fraction": 0.25})
    return ["finetune", *data, *model, *TINY_TRAIN, "--train.output_dir", str(output_dir), *extra]


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder `make(folder)` fills once for the whole session: under pytest-xdist the first
    worker to ask makes it while the others wait, and all read the same one."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    from filelock import FileLock

    folder = tmp_path_factory.getbasetemp().parent / name  # the session's folder, shared by the workers
    with FileLock(f"{folder}.lock"):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died half-way
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny model trained once for the session (60 steps), with its run directory; the
    generation and evaluation tests read it and never write into it."""

    def make(root: Path) -> None:
        corpus = write_corpus(root / "corpus")
        argv = files_args(corpus, root / "run", "--train.max_steps", "60", "--train.eval_steps", "60")
        finetune_offline(argv + flags({"generate.prompts": '["HAMLET:", ""]', "evaluate.stride": 8}), root / "cache")

    return made_once(tmp_path_factory, "trained", make) / "run"


def finetune_offline(argv: list[str], cache: Path) -> None:
    """Run `hftextgen finetune` for a fixture shared by several tests: offline, with its own cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HFTEXTGEN_CACHE", str(cache))
        import huggingface_hub.constants

        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        hub.hub_reachable.cache_clear()
        assert cli.main(argv) == 0


# A run without GPT-2's 50k vocabulary (whose logits are most of a tiny model's work: a step
# takes ~50x longer) and without the evaluation at the end: a 300-token BPE trained on the corpus.
FAST = flags(
    {
        "tokenizer.source": "train",
        "tokenizer.vocab_size": 300,
        "evaluate.at_end_of_training": "false",
        "train.eval_steps": 1000,
    }
)


class SmallRun:
    """A finished run of 40 steps with a checkpoint every 10 (dropout on, GPT-2's default), its
    corpus and its data cache. `argv` gives the command that made it, for another directory."""

    STEPS = ("--train.max_steps", "40", "--train.save_steps", "10")

    def __init__(self, root: Path):
        self.root, self.corpus, self.run_dir, self.cache = root, root / "corpus", root / "run", root / "cache"

    def argv(self, run_dir: Path, *extra: str) -> list[str]:
        return files_args(self.corpus, run_dir, *FAST, *self.STEPS, *extra)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> SmallRun:
    """Trained once for the session; tests copy its run directory and never write into it."""

    def make(root: Path) -> None:
        run = SmallRun(root)
        write_corpus(run.corpus)
        finetune_offline(run.argv(run.run_dir), run.cache)

    return SmallRun(made_once(tmp_path_factory, "small", make))
