"""Static-cache decoding (hftextgen/generate/static.py) gives exactly the tokens of transformers' generate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from hftextgen.generate import GenerateConfig
from hftextgen.generate import static as decode
from hftextgen.generate.generator import Generator
from hftextgen.model import tokenizer

PROMPTS = ["HAMLET:", "", "KING: good night sweet prince o what a noble mind", "QUEEN"]
CONTEXT = 48  # 60 new tokens after a 13-token prompt slide the window


@pytest.fixture(scope="module")
def tok():
    return tokenizer.ready_for_lm(tokenizer.bundled_gpt2(), "the bundled GPT-2 tokenizer")


def gpt2(tok, attention="sdpa", eos_boost=0.3, vocab=None, seed=0):
    """A random 2-layer GPT-2 whose EOS logit is raised by `eos_boost` (through ln_f's bias and the
    tied EOS row), so that some samples end by EOS and others run to the length."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab or len(tok),
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=CONTEXT,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    lm = AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()
    with torch.no_grad():
        direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
        lm.transformer.ln_f.bias.copy_(direction * eos_boost)
        lm.lm_head.weight[tok.eos_token_id] = direction
    return lm


def samples(lm, tok, prompts=PROMPTS, streamer=None, **settings):
    generator = Generator(lm, tok, GenerateConfig(**{"max_new_tokens": 60, "batch_size": 4, **settings}))
    return [(s.completion, s.new_tokens, s.finish) for s in generator(prompts, streamer=streamer)], generator


class Recorder:
    """A streamer that keeps every call, to compare what generate and the decoder stream."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.tolist())

    def end(self):
        self.calls.append("end")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "settings",
    [
        {"preset": "greedy"},
        {"preset": "balanced"},  # temperature, top-k, top-p, seeded sampling
        {"preset": "precise", "max_new_tokens": 24},  # repetition penalty: it reads the ids so far
        {"preset": "creative", "typical_p": 0.9, "max_new_tokens": 12},
    ],
    ids=["greedy", "balanced", "precise", "creative+typical"],
)
def test_same_tokens_as_generate(tok, attention, settings):
    lm = gpt2(tok, attention)
    dynamic, _ = samples(lm, tok, **settings)
    static, generator = samples(lm, tok, cache="static", **settings)
    assert generator.fast is not None and generator.fast.fallback is None
    assert static == dynamic
    assert any(n for _, n, _ in static)


def test_rows_end_by_length_and_by_eos_in_one_batch(tok):
    lm = gpt2(tok)
    dynamic, _ = samples(lm, tok, preset="balanced", top_k=200)
    static, _ = samples(lm, tok, preset="balanced", top_k=200, cache="static")
    assert static == dynamic
    assert {finish for _, _, finish in static} == {"eos", "length"}
    assert max(n for _, n, _ in static) == 60  # past the 48-token context: the window slid


def test_stop_strings_and_streaming(tok):
    lm = gpt2(tok)
    for prompts in (PROMPTS[:1], PROMPTS[2:]):
        streamed = {}
        for cache in ("dynamic", "static"):
            recorder = Recorder()
            out, _ = samples(lm, tok, prompts, streamer=recorder, preset="balanced", stop=["e", "th"], cache=cache)
            streamed[cache] = (out, recorder.calls)
        assert streamed["static"] == streamed["dynamic"]
        assert "stop" in {finish for _, _, finish in streamed["static"][0]}


def test_padded_vocabulary_rows_are_never_picked(tok):
    # The model's generation_config suppresses the rows past the tokenizer (model.build_model
    # sets it for a padded vocabulary); one of them is made the likeliest token here.
    padded = len(tok) + 47
    lm = gpt2(tok, vocab=padded, eos_boost=0.0)
    with torch.no_grad():
        direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
        lm.transformer.ln_f.bias.copy_(direction * 3)
        lm.lm_head.weight[len(tok) + 3] = direction
    unsuppressed, _ = samples(lm, tok, preset="balanced", max_new_tokens=20)
    lm.generation_config.suppress_tokens = list(range(len(tok), padded))
    dynamic, _ = samples(lm, tok, preset="balanced", max_new_tokens=20)
    static, generator = samples(lm, tok, preset="balanced", max_new_tokens=20, cache="static")
    assert static == dynamic and generator.fast.fallback is None
    assert static != unsuppressed


def test_reused_buffers_take_each_calls_padding_and_seeds(tok):
    # Same shapes, so the second batch runs on the first one's buffers (and, on a GPU, its
    # captured step): its padding, seeds and penalty window must replace the first one's.
    lm = gpt2(tok)
    generator = Generator(lm, tok, GenerateConfig(max_new_tokens=12, batch_size=2, preset="precise", cache="static"))
    reference = Generator(lm, tok, GenerateConfig(max_new_tokens=12, batch_size=2, preset="precise"))
    first, second = ["HAMLET: my lord", "O"], ["KING:", "QUEEN: good night sweet"]
    for prompts in (first, second, first):
        assert [s.completion for s in generator(prompts)] == [s.completion for s in reference(prompts)]
    assert len(generator.fast.states) == 1


def test_settings_it_cannot_run_go_back_to_generate(tok, capsys):
    lm = gpt2(tok)
    settings = {"preset": "balanced", "no_repeat_ngram_size": 2, "max_new_tokens": 12}  # the fallback, not the length
    dynamic, _ = samples(lm, tok, **settings)
    static, generator = samples(lm, tok, cache="static", **settings)
    assert static == dynamic
    assert "NoRepeatNGramLogitsProcessor" in generator.fast.fallback
    assert capsys.readouterr().err.count("runs through transformers' generate") == 1  # one note, not one per call


def test_other_architectures_keep_transformers_static_cache(tok, capsys):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    lm = AutoModelForCausalLM.from_config(config).eval()
    static, generator = samples(lm, tok, PROMPTS[:2], preset="greedy", cache="static")
    assert generator.fast is None
    assert "LlamaForCausalLM is not a GPT-2" in capsys.readouterr().err
    assert static == samples(lm, tok, PROMPTS[:2], preset="greedy")[0]


def test_unsupported_names_what_it_cannot_run(tok):
    assert decode.unsupported(gpt2(tok)) is None
    lm = gpt2(tok)
    lm.config._attn_implementation = "flex_attention"
    assert "flex_attention" in decode.unsupported(lm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_step_gives_the_eager_steps_tokens(tok):
    lm = gpt2(tok).cuda()
    eager = Generator(lm, tok, GenerateConfig(max_new_tokens=60, batch_size=4, preset="balanced", cache="static"))
    eager.fast.graphs = False
    captured = Generator(lm, tok, GenerateConfig(max_new_tokens=60, batch_size=4, preset="balanced", cache="static"))
    assert captured.fast.graphs
    assert [s.completion for s in captured(PROMPTS)] == [s.completion for s in eager(PROMPTS)]
    assert all(state.graph is not None for state in captured.fast.states.values())
