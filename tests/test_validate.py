"""`hftextgen validate`: the same checks as finetune, an estimate the run then matches, and
nothing written to the run directory."""

from __future__ import annotations

import json

import pytest
from conftest import files_args

from hftextgen.train.validate import describe_estimate, memory_formula


def validate_args(argv: list[str]) -> list[str]:
    assert argv[0] == "finetune"
    return ["validate", *argv[1:]]


@pytest.mark.slow
def test_estimate_matches_the_run(corpus, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    # Epochs, not max_steps: the step count then comes from the dataloader (173 blocks of 4: 44
    # steps an epoch, 0.3 epochs -> 14 steps), with evaluations and checkpoints off the step grid.
    argv = files_args(
        corpus,
        run_dir,
        "--train.num_train_epochs",
        "0.3",
        "--train.eval_steps",
        "5",
        "--train.save_steps",
        "6",
        "--train.save_total_limit",
        "2",
    )
    code, out, err = run_cli(*validate_args(argv), "--json")
    assert code == 0, err
    assert not run_dir.exists()
    estimate = json.loads(out[out.index("{") :])

    text = describe_estimate(estimate)  # what validate prints without --json
    assert "steps: 14 = 0.318 epochs of 44 steps" in text and "tokens: 1,792 trained" in text
    assert "time: ~" in text and "memory: ~" in text and "disk: ~" in text

    code, _, err = run_cli(*argv)
    assert code == 0, err
    state = json.loads((run_dir / "trainer_state.json").read_text())
    results = json.loads((run_dir / "train_results.json").read_text())
    assert estimate["steps"]["total"] == state["global_step"] == state["max_steps"] == 14
    assert estimate["steps"]["per_epoch"] == 44
    assert estimate["tokens"]["total"] == results["train_tokens"] == 14 * 4 * 32
    evaluations = [e for e in state["log_history"] if "eval_loss" in e]
    assert estimate["steps"]["evaluations"] == len(evaluations) == 3  # steps 5, 10 and the last
    assert estimate["steps"]["checkpoints"] == 3  # steps 6, 12 and the last
    kept = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert estimate["disk"]["checkpoints_kept"] == len(kept) == 2
    checkpoint_bytes = sum(f.stat().st_size for f in (run_dir / kept[-1]).rglob("*") if f.is_file())
    assert abs(estimate["disk"]["checkpoint_bytes"] - checkpoint_bytes) < 0.05 * checkpoint_bytes
    report = json.loads((run_dir / "data_report.json").read_text())
    assert estimate["data"]["report"] == report
    info = json.loads((run_dir / "run_info.json").read_text())
    assert estimate["model"]["parameters"] == info["parameters"]
    assert estimate["time"]["step_seconds"] > 0 and estimate["time"]["total_seconds"] > 0
    assert estimate["memory"]["formula"]["weights"] > 0 and estimate["memory"]["measured_peak"] > 0


def training_state_after_a_step(lm) -> dict:
    """The bytes of weights, gradients and AdamW state a real fp32 training step leaves behind."""
    import torch

    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad])
    x = torch.randint(0, lm.config.vocab_size, (2, 32))
    lm(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    params = list(lm.parameters())
    return {
        "weights": sum(p.nbytes for p in params),
        "gradients": sum(p.grad.nbytes for p in params if p.grad is not None),
        "optimizer": sum(v.nbytes for state in optimizer.state.values() for v in state.values() if v.dim()),
    }


def formula_of(lm) -> dict:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=2, optim="adamw_torch", use_cpu=True)
    return memory_formula(lm, args, 32, "fp32")


def test_memory_formula_counts_the_training_state_torch_holds():
    """Weights, gradients and AdamW's state as the formula counts them == the bytes of the tensors
    a real fp32 training step leaves behind."""
    from transformers import AutoModelForCausalLM, GPT2Config

    lm = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=300))
    held = training_state_after_a_step(lm)
    assert {k: v for k, v in formula_of(lm).items() if k in held} == held


def test_memory_formula_counts_a_lora_models_training_state_as_torch_holds_it():
    """With LoRA, gradients and AdamW state exist for the adapters only; the weights are all of
    them, and the formula says what full fine-tuning would add."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hftextgen.model import PeftConfig, lora

    shape = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 16, "intermediate_size": 32}
    base = AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=2, vocab_size=300, **shape))
    lm = lora.wrap_lora(base, PeftConfig(method="lora"), "base")
    held = training_state_after_a_step(lm)
    formula = formula_of(lm)
    assert {k: v for k, v in formula.items() if k in held} == held
    trainable, total = lora.lora_parameters(lm)
    assert 0 < trainable < total and formula["lora_saves"] == 12 * (total - trainable)


@pytest.mark.slow
def test_validate_refuses_what_finetune_refuses(corpus, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("an earlier run\n")
    argv = files_args(corpus, run_dir, "--train.max_steps", "2")
    refused = [run_cli(*args) for args in (argv, validate_args(argv))]
    assert refused[0] == refused[1]
    code, out, err = refused[0]
    assert code == 2 and "is not empty" in err and len(err.splitlines()) == 1
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"]

    code, _, err = run_cli(*validate_args(files_args(corpus, tmp_path / "x", "--train.resume_from_checkpoint", "last")))
    assert code == 2 and "holds no checkpoint-N folder" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_validate_after_an_interruption_counts_the_steps_left(corpus, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    argv = files_args(corpus, run_dir, "--train.save_steps", "4", "--train.eval_steps", "100")
    code, _, err = run_cli(*argv, "--train.max_steps", "4")
    assert code == 0, err
    before = sorted(p.name for p in run_dir.rglob("*"))
    code, out, err = run_cli(
        *validate_args(argv), "--train.max_steps", "10", "--train.resume_from_checkpoint", "last", "--json"
    )
    assert code == 0, err
    estimate = json.loads(out[out.index("{") :])
    assert estimate["steps"]["first"] == 4 and estimate["steps"]["to_run"] == 6
    assert estimate["tokens"]["to_run"] == 6 * 128
    assert sorted(p.name for p in run_dir.rglob("*")) == before
