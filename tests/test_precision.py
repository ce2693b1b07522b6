"""The precision probe: bf16 or fp32 on a CPU by timing the run's step, kept per machine and shape."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hftextgen.train import fused_loss, precision


def tiny_llama():
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def args(**kw):
    values = {"bf16": True, "bf16_from_hardware": True, "world_size": 1, "torch_compile": False}
    return types.SimpleNamespace(**(values | kw))


BATCH = {"input_ids": torch.arange(32).reshape(2, 16) % 64, "labels": torch.arange(32).reshape(2, 16) % 64}


@pytest.mark.parametrize("fused", [False, True])
def test_the_probe_leaves_weights_gradients_and_random_numbers_as_they_were(fused):
    model = tiny_llama()
    if fused:  # the training forward the probe times is then the fused loss's
        assert fused_loss.install(model) is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    times = precision.time_both(model, BATCH)
    assert times["fp32_s"] > 0 and times["bf16_s"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("fp32_s, bf16_s, chosen", [(1.0, 0.5, True), (0.5, 1.0, False), (1.0, 1.04, True)])
def test_the_faster_precision_wins_and_is_kept_for_the_next_run(tmp_path, monkeypatch, fp32_s, bf16_s, chosen):
    model = tiny_llama()
    monkeypatch.setattr(precision, "time_both", lambda *a: {"fp32_s": fp32_s, "bf16_s": bf16_s})
    first = args()
    note = precision.choose(first, model, BATCH, None, str(tmp_path))
    assert first.bf16 is chosen and note.startswith(f"precision: {'bf16' if chosen else 'fp32'} (")
    assert first.precision_probe["fp32_s"] == fp32_s

    def measured_again(*a):
        raise AssertionError("the kept choice is not measured again")

    monkeypatch.setattr(precision, "time_both", measured_again)
    again = args()
    precision.choose(again, model, BATCH, None, str(tmp_path))
    assert again.bf16 is chosen
    other_batch = {k: v[:1] for k, v in BATCH.items()}  # another shape is measured anew
    with pytest.raises(AssertionError, match="not measured again"):
        precision.choose(args(), model, other_batch, None, str(tmp_path))


@pytest.mark.parametrize(
    "settings", [{"bf16_from_hardware": False}, {"bf16": False}, {"world_size": 2}, {"torch_compile": True}]
)
def test_a_set_precision_and_other_setups_are_left_alone(tmp_path, settings):
    given = args(**settings)
    assert precision.choose(given, tiny_llama(), BATCH, None, str(tmp_path)) is None
    assert given.bf16 == settings.get("bf16", True)
    assert not (tmp_path / "precision").exists()
