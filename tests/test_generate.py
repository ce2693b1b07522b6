"""Generation: reproducible seeded sampling, batching, stop strings, sliding windows, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch

from hftextgen.generate import GenerateConfig
from hftextgen.generate.config import NEUTRAL, PRESETS
from hftextgen.generate.generator import Generator
from hftextgen.generate.sampling import SeededGumbel
from hftextgen.model.build import load

PROMPTS = ["HAMLET:", "", "KING: good night sweet prince o what a noble mind", "QUEEN"]


@pytest.fixture(scope="module")
def model(trained_run):
    return load(str(trained_run), device="cpu")


def generate(model, prompts=PROMPTS, **settings):
    lm, tok = model
    return Generator(lm, tok, GenerateConfig(**settings))(prompts)


def texts(samples):
    return [s.completion for s in samples]


def test_the_sampler_draws_from_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)[0]
    draws = Counter()
    for seed in range(4000):
        noisy = SeededGumbel([seed], [0], start=1)(torch.zeros(1, 1, dtype=torch.long), logits.clone())
        draws[int(noisy.argmax())] += 1
    for token in range(4):
        # 4000 draws: the standard error of a share is below 0.008
        assert draws[token] / 4000 == pytest.approx(probs[token].item(), abs=0.03), draws


def test_same_seed_same_text_and_each_sample_has_its_own_seed(model):
    first = generate(model, preset="creative", max_new_tokens=20)
    again = generate(model, preset="creative", max_new_tokens=20)
    assert texts(first) == texts(again)
    assert [s.seed for s in first] == [1234, 1235, 1236, 1237]
    other = generate(model, preset="creative", max_new_tokens=20, seed=99)
    assert texts(other) != texts(first)


@pytest.mark.parametrize("preset", ["greedy", "balanced"])
def test_batched_and_one_by_one_give_the_same_text(model, preset):
    # 40 new tokens overflow the 32-token context: the window slides as well.
    batched = generate(model, preset=preset, max_new_tokens=40, batch_size=4)
    alone = [
        s for i, p in enumerate(PROMPTS) for s in generate(model, [p], preset=preset, max_new_tokens=40, seed=1234 + i)
    ]
    assert texts(batched) == texts(alone)
    assert any(s.new_tokens == 40 for s in batched)


def test_stop_strings_cut_the_output(model):
    (full,) = generate(model, ["HAMLET:"], preset="greedy", max_new_tokens=30)
    assert len(full.completion) > 12
    stop = full.completion[6:10]
    (cut,) = generate(model, ["HAMLET:"], preset="greedy", max_new_tokens=30, stop=[stop])
    assert cut.completion == full.completion[: full.completion.index(stop)] and cut.finish == "stop"


def test_beam_search_returns_several_sequences(model):
    samples = generate(model, ["HAMLET:", "KING:"], preset="beam", max_new_tokens=8, num_return_sequences=2)
    assert [s.index for s in samples] == [0, 1, 2, 3] and [s.prompt for s in samples] == ["HAMLET:"] * 2 + ["KING:"] * 2


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_preset_sets_its_fields_and_any_field_overrides_it(preset):
    """Settings = neutral values, then the preset's, then the fields set; nothing else."""
    assert GenerateConfig(preset=preset).settings() == {**NEUTRAL, **PRESETS[preset]}
    sampling = PRESETS[preset].get("do_sample", False)
    overrides = {"temperature": 0.7, "top_k": 7, "top_p": 0.7, "typical_p": 0.7, "repetition_penalty": 1.3}
    overrides |= {"no_repeat_ngram_size": 2} | ({} if sampling else {"num_beams": 3})
    for key, value in overrides.items():
        settings = GenerateConfig(preset=preset, **{key: value}).settings()
        assert settings == {**NEUTRAL, **PRESETS[preset], key: value}, key


def test_jsonl_records_reproduce_their_sample(trained_run, tmp_path, run_cli):
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--model", trained_run, "--output", out, "--prompt", "HAMLET:", "--prompt", "KING:"]
    code, stdout, err = run_cli(*args, "--generate.num_return_sequences", "2", "--generate.max_new_tokens", "16")
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and records[3]["prompt"] == "KING:" and records[3]["seed"] == 1237
    assert records[0]["completion"] in stdout
    record = records[3]
    assert record["settings"]["temperature"] == 0.8 and record["preset"] == "balanced"
    code, _, err = run_cli(
        "generate", "--model", trained_run, "--output", out, "--prompt", record["prompt"],
        "--generate.seed", record["seed"], "--generate.max_new_tokens", record["max_new_tokens"],
        *[a for k, v in record["settings"].items() for a in (f"--generate.{k}", v)],
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out.read_text().splitlines()[-1])["completion"] == record["completion"]


def test_prompts_file(trained_run, tmp_path, run_cli):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "HAMLET:"}\n\n{"prompt": "KING:"}\n')
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--model", trained_run, "--output", out, "--generate.max_new_tokens", "4"]
    code, _, err = run_cli(*args, "--generate.prompts_file", prompts)
    assert code == 0, err
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["HAMLET:", "KING:"]
    prompts.write_text('{"prompt": "HAMLET:"}\n{"prompt": \n')
    code, _, err = run_cli(*args, "--generate.prompts_file", prompts)
    assert code == 2 and "line 2" in err and str(prompts) in err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("top_p", "1.5", "generate.top_p must be in (0, 1]"),
        ("temperature", "0", "generate.temperature must be > 0"),
        ("num_return_sequences", "3", "greedy decoding gives the same text"),
    ],
)
def test_bad_decoding_settings_are_one_line(trained_run, run_cli, flag, value, message):
    extra = ["--generate.preset", "greedy"] if flag == "num_return_sequences" else []
    code, _, err = run_cli("generate", "--model", trained_run, f"--generate.{flag}", value, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.extended  # a process of its own
def test_interactive_streams_and_records(trained_run, tmp_path):
    out = tmp_path / "gen.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "hftextgen", "generate", "--model", str(trained_run), "--interactive"]
        + ["--output", str(out), "--generate.max_new_tokens", "6", "--generate.preset", "greedy"],
        input="HAMLET:\nKING:\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["HAMLET:", "KING:"]
    assert "HAMLET:" + records[0]["completion"] in result.stdout


def test_static_cache_gives_the_same_text(model):
    dynamic = generate(model, preset="greedy", max_new_tokens=20)
    static = generate(model, preset="greedy", max_new_tokens=20, cache="static")
    assert texts(static) == texts(dynamic)


@pytest.mark.parametrize(
    "length, remaining, expected",
    [
        (10, 20, (10, 20)),  # fits the context: all at once
        (10, 200, (10, 118)),  # a short history: all of it kept, as many new tokens as fit
        (120, 50, (78, 50)),  # the history is cut to what leaves room for the new tokens
        (300, 200, (64, 64)),  # a long history: half a context kept, half generated
        (300, 3, (125, 3)),
    ],
)
def test_a_short_context_slides_its_window_keeping_at_least_half_of_it(length, remaining, expected):
    generator = Generator.__new__(Generator)
    generator.context = 128
    keep, new = generator._next_window(length, remaining)
    assert (keep, new) == expected and keep + new <= 128 and keep >= min(length, 64)
