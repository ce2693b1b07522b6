"""Any causal-LM architecture from scratch: the recipe's common shape names reach each config
class's own settings (and the model's tensors), model.config is checked against the class, the
memory formula follows the shape, and one tiny model per tested model_type trains, saves, reloads
with stock transformers, generates past its context and evaluates; a Llama-style pretrained
checkpoint fine-tunes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import files_args, flags, save_tiny_pretrained
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainingArguments, pipeline

from hftextgen.errors import ConfigError
from hftextgen.generate import GenerateConfig
from hftextgen.generate.generator import Generator
from hftextgen.model import ModelConfig, architecture
from hftextgen.model.build import load
from hftextgen.train.validate import memory_formula

TYPES = ["gpt2", "llama", "qwen2", "qwen3", "gpt_neox", "mistral"]
# Trained end to end: GPT-2 and Llama in CI, the others in the extended suite (`make test-all`).
TRAINED = [t if t in ("gpt2", "llama") else pytest.param(t, marks=pytest.mark.extended) for t in TYPES]
WITH_KV_HEADS = {"llama", "qwen2", "qwen3", "mistral"}


def shape_of(model_type: str) -> dict:
    """A tiny shape with every common name set: 3 blocks, 4 heads (2 key/value heads where the
    architecture has them) of width 8, MLP 48, 40 positions, 300 tokens, tied embeddings."""
    shape = {"n_layer": 3, "n_head": 4, "n_embd": 32, "n_inner": 48, "n_positions": 40, "vocab_size": 300}
    shape |= {"tie_word_embeddings": True, "attn_pdrop": 0.0, "initializer_range": 0.01}
    return shape | ({"n_kv_head": 2} if model_type in WITH_KV_HEADS else {})


@pytest.mark.parametrize("model_type", TYPES)
def test_common_names_reach_each_architectures_own_settings_and_tensors(model_type):
    cfg = ModelConfig(model_type=model_type, **shape_of(model_type))
    config = architecture.build_config(model_type, cfg.scratch_settings())
    assert type(config).model_type == model_type
    assert architecture.shape(config) == {
        "model_type": model_type,
        "n_layer": 3,
        "n_head": 4,
        "n_kv_head": 2 if model_type in WITH_KV_HEADS else None,
        "n_embd": 32,
        "n_inner": 48,
        "n_positions": 40,
        "vocab_size": 300,
        "tie_word_embeddings": True,
    }
    assert config.initializer_range == 0.01

    lm = AutoModelForCausalLM.from_config(config)
    blocks = [m for m in lm.modules() if type(m).__name__ in lm._no_split_modules]
    assert len(blocks) == 3
    assert lm.get_input_embeddings().weight.shape == (300, 32)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert any(48 in p.shape and 32 in p.shape and p.dim() == 2 for p in lm.parameters())  # the MLP
    if model_type in WITH_KV_HEADS:  # keys are 2 heads x 8 wide, queries 4 x 8
        widths = {name.rsplit(".", 1)[-1]: m.out_features for name, m in lm.named_modules() if name.endswith("_proj")}
        assert (widths["q_proj"], widths["k_proj"], widths["v_proj"]) == (32, 16, 16)


def test_model_config_reaches_the_class_in_its_own_names():
    cfg = ModelConfig(model_type="llama", n_layer=1, n_head=2, n_embd=8, config={"attention_bias": True})
    config = architecture.build_config("llama", cfg.scratch_settings())
    assert config.attention_bias is True
    # An older name the class converts is accepted: rope_theta lives in rope_parameters now.
    cfg = ModelConfig(model_type="llama", n_layer=1, n_head=2, n_embd=8, config={"rope_theta": 5e5})
    assert architecture.build_config("llama", cfg.scratch_settings()).rope_parameters["rope_theta"] == 5e5
    # GPT-2 speaks the common names natively; the same recipe keys build it as before.
    assert ModelConfig(n_layer=2, n_head=2, n_embd=16).scratch_settings() == {"n_layer": 2, "n_head": 2, "n_embd": 16}


def test_qwen3s_fixed_head_width_follows_the_recipe():
    """Qwen3's config fixes head_dim at 128 whatever the width; a model built from a recipe gets
    n_embd / n_head, unless model.config sets head_dim."""
    cfg = ModelConfig(model_type="qwen3", n_layer=1, n_head=2, n_embd=16)
    assert architecture.build_config("qwen3", cfg.scratch_settings()).head_dim == 8
    cfg = ModelConfig(model_type="qwen3", n_layer=1, n_head=2, n_embd=16, config={"head_dim": 32})
    assert architecture.build_config("qwen3", cfg.scratch_settings()).head_dim == 32


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"model_type": "mistral", "n_head": 6, "n_embd": 48, "n_kv_head": 4}, "model.n_kv_head (4)"),
        ({"model_type": "llama", "embd_pdrop": 0.1}, "llama has no dropout on embeddings"),
        ({"model_type": "llama", "config": {"eos_token_id": 3}}, "model.config.eos_token_id comes from the tokenizer"),
        ({"model_type": "gpt2", "config": {"hidden_size": 8}}, "model.config.hidden_size is a shape every"),
        ({"model_type": "gpt_neox", "config": {"rotary_pctt": 0.5}}, "has no setting 'rotary_pctt'"),
    ],
)
def test_architecture_mistakes_are_one_line_errors(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**settings)


def test_unset_key_value_heads_follow_the_heads_not_the_full_size_default():
    """Mistral's class says 8 key/value heads, Qwen3's 32: a recipe with 4 heads gets 4."""
    for model_type in ("mistral", "qwen3", "llama"):
        config = architecture.build_config(model_type, ModelConfig(model_type=model_type, n_head=4).scratch_settings())
        assert config.num_key_value_heads == 4


def test_a_dropout_set_to_zero_is_fine_where_there_is_none():
    """The default recipe's resid_pdrop: 0.0 carries over to architectures without that dropout."""
    assert "resid_pdrop" not in ModelConfig(model_type="llama", resid_pdrop=0.0, n_embd=64).scratch_settings()


def lm_of(model_type: str, attention: str = "sdpa", **shape):
    config = architecture.build_config(model_type, ModelConfig(model_type=model_type, **shape).scratch_settings())
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention)


ARGS = TrainingArguments(output_dir="unused", per_device_train_batch_size=2, use_cpu=True)


def activations(lm, s=32) -> float:
    logits = 3 * ARGS.per_device_train_batch_size * s * lm.config.vocab_size * 4
    return memory_formula(lm, ARGS, s, "bf16")["activations"] - logits


def test_memory_formula_is_the_papers_for_gpt2_and_follows_other_shapes():
    b, s = ARGS.per_device_train_batch_size, 32
    gpt2 = lm_of("gpt2", "eager", n_layer=2, n_head=4, n_embd=32, vocab_size=100)
    h, a = 32, 4  # Korthikanti et al. eq. 1, in 16-bit: s*b*h*(34 + 5*a*s/h) per layer
    assert activations(gpt2) == pytest.approx(2 * s * b * h * (34 + 5 * a * s / h), abs=1)
    # SDPA and flash attention keep no attention scores: the 5as^2b term goes.
    sdpa = lm_of("gpt2", "sdpa", n_layer=2, n_head=4, n_embd=32, vocab_size=100)
    assert activations(sdpa) == pytest.approx(2 * s * b * h * 34, abs=1)
    # Llama's MLP is gated (SwiGLU): with the same width f it keeps 4sbf more per layer.
    shape = {"n_layer": 2, "n_head": 4, "n_embd": 32, "n_inner": 128, "vocab_size": 100}
    llama, plain = lm_of("llama", **shape), lm_of("gpt_neox", **shape)
    assert activations(llama) - activations(plain) == pytest.approx(2 * 4 * s * b * 128, abs=1)
    # Grouped-query attention: half the key/value heads, half the K and V activations (4sb*h_kv).
    grouped = lm_of("llama", **shape, n_kv_head=2)
    assert activations(llama) - activations(grouped) == pytest.approx(2 * 4 * s * b * (h - h / 2), abs=1)


# ---------------------------------------------------------------- end to end


def tiny_args(corpus, run_dir, model_type: str, *extra: str) -> list[str]:
    shape = {"model.model_type": model_type, "model.n_layer": 2, "model.n_head": 4, "model.n_embd": 16}
    shape |= {"model.n_inner": 32} | ({"model.n_kv_head": 2} if model_type in WITH_KV_HEADS else {})
    settings = {
        "tokenizer.source": "train",
        "tokenizer.vocab_size": 300,
        "train.max_steps": 8,
        "train.eval_steps": 8,
        "train.save_steps": 8,
        "evaluate.stride": 8,
        "generate.prompts": '["HAMLET:", ""]',
    }
    return files_args(corpus, run_dir, *flags(settings), *extra, model=flags(shape))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TRAINED)
def test_each_architecture_trains_reloads_generates_and_evaluates(model_type, corpus, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(*tiny_args(corpus, run_dir, model_type))
    assert code == 0, err
    state = json.loads((run_dir / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses

    # Stock transformers reloads it: the architecture, its shape, the context it trained on.
    config = AutoConfig.from_pretrained(run_dir)
    assert config.model_type == model_type
    shape = architecture.shape(config)
    assert (shape["n_layer"], shape["n_head"], shape["n_embd"], shape["n_inner"], shape["n_positions"]) == (
        2,
        4,
        16,
        32,
        32,
    )
    assert AutoTokenizer.from_pretrained(run_dir).model_max_length == 32
    text = pipeline("text-generation", model=str(run_dir))("HAMLET:", max_new_tokens=8, do_sample=False)
    assert text[0]["generated_text"].startswith("HAMLET:")

    # The model card names the architecture, in its tags and its text.
    card = (run_dir / "README.md").read_text()
    assert f"- {model_type}\n" in card and "- gpt2\n" not in card.replace(f"- {model_type}\n", "")
    assert f"A {'GPT-2' if model_type == 'gpt2' else model_type} (" in card

    # hftextgen evaluate on the run directory gives the end-of-training evaluation's numbers.
    code, _, err = run_cli("evaluate", "--model", run_dir, "--evaluate.output_dir", tmp_path / "again")
    assert code == 0, err
    first = json.loads((run_dir / "eval.json").read_text())
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert again["perplexity"] == pytest.approx(first["perplexity"], rel=1e-6) and first["context"] == 32

    # Generation past the 32-token context slides the window, and batching (left padding, which
    # moves a RoPE model's positions) changes no sample.
    lm, tok = load(str(run_dir), device="cpu")
    prompts = ["HAMLET:", "", "KING: good night sweet prince o what a noble mind"]
    batched = Generator(lm, tok, GenerateConfig(preset="greedy", max_new_tokens=40, batch_size=3))(prompts)
    alone = [Generator(lm, tok, GenerateConfig(preset="greedy", max_new_tokens=40))([p])[0] for p in prompts]
    assert [s.completion for s in batched] == [s.completion for s in alone]
    assert any(s.new_tokens == 40 for s in batched)


@pytest.mark.slow
@pytest.mark.extended  # test_train fine-tunes a pretrained folder; this one is Llama's
def test_fine_tune_a_llama_style_checkpoint(corpus, tmp_path, run_cli):
    pretrained = tmp_path / "pretrained"
    before = save_tiny_pretrained(pretrained, "llama")
    run_dir = tmp_path / "run"
    args = files_args(corpus, run_dir, "--train.max_steps", "6", model=["--model.name_or_path", str(pretrained)])
    code, out, err = run_cli(*args, "--model.attn_pdrop", "0.1", "--evaluate.at_end_of_training", "false")
    assert code == 0, err
    after = AutoModelForCausalLM.from_pretrained(run_dir)
    assert type(after).__name__ == "LlamaForCausalLM" and after.config.attention_dropout == 0.1
    assert after.config.num_key_value_heads == 2 and after.config.max_position_embeddings == 64
    assert not torch.equal(after.model.layers[0].mlp.gate_proj.weight, before.model.layers[0].mlp.gate_proj.weight)
    assert AutoTokenizer.from_pretrained(run_dir)("Hello world")["input_ids"] == [15496, 995]
    card = (run_dir / "README.md").read_text()
    assert f"fine-tuned from `{pretrained}`" in card and "- llama\n" in card

    # A dropout Llama does not have is refused before any work.
    code, _, err = run_cli(*args, "--model.resid_pdrop", "0.1", "--train.output_dir", tmp_path / "other")
    assert code == 2 and err.strip() == (
        "hftextgen: error: model.resid_pdrop: llama has no dropout on residual branches: remove it (its dropouts: "
        "model.attn_pdrop)"
    )
    assert not (tmp_path / "other").exists()


def test_a_shape_in_words_leaves_out_what_the_architecture_lacks():
    gpt2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_kv_head": 4, "n_embd": 16, "n_inner": 64}
    gpt2 |= {"n_positions": 64, "vocab_size": 50257, "tie_word_embeddings": True}
    words = "2 layers, 4 heads, width 16, MLP 64, context 64 tokens, vocabulary 50,257, tied embeddings"
    assert architecture.describe_shape(gpt2) == words
    grouped = gpt2 | {"n_kv_head": 2, "n_inner": None, "tie_word_embeddings": False}
    words = "2 layers, 4 heads, 2 key/value heads, width 16, context 64 tokens, vocabulary 50,257"
    assert architecture.describe_shape(grouped) == words
