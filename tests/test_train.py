"""End to end: `hftextgen finetune` on a tiny corpus, what the run directory holds, resume, and
fine-tuning from a pretrained folder."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import files_args, save_tiny_pretrained
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hftextgen.cli import finetune_parser

pytestmark = pytest.mark.slow  # every test here trains end to end


def logged_losses(run_dir):
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e], state


def test_finetune_end_to_end(corpus, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(
        *files_args(corpus, run_dir, "--train.max_steps", "40", "--train.eval_steps", "20", "--train.save_steps", "20")
    )
    assert code == 0, err
    assert "held-out loss" in out

    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "recipe.yaml",
        "data_report.json",
        "validation_documents.json",
        "run_info.json",
        "train_results.json",
        "eval_results.json",
        "trainer_state.json",
        "checkpoint-40",
    ):
        assert (run_dir / name).exists(), name

    losses, state = logged_losses(run_dir)
    assert state["global_step"] == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 2.0, losses

    metrics = json.loads((run_dir / "eval_results.json").read_text())
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    report = json.loads((run_dir / "data_report.json").read_text())
    for split in ("train", "validation"):
        r = report[split]
        assert r["tokens"] == r["blocks"] * 32 + r["tokens_dropped"] and 0 <= r["tokens_dropped"] < 32
    assert report["validation"]["documents"] == 2 and report["train"]["documents"] == 6
    held_out = json.loads((run_dir / "validation_documents.json").read_text())
    assert len(held_out) == 2 and all(h.startswith(str(corpus)) for h in held_out)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["effective_batch_size"] == 4 and info["tokens_per_step"] == 128 and info["precision"] == "fp32"

    # Stock transformers loads the run directory, and the pipeline generates from it.
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    assert model.config.n_layer == 2 and tokenizer.eos_token == "<|endoftext|>"
    generator = pipeline("text-generation", model=str(run_dir))
    text = generator("HAMLET:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("HAMLET:") and len(text) > len("HAMLET:")

    # The saved recipe is a complete recipe: it parses back to the same settings.
    parser = finetune_parser()
    again = parser.parse_args(["--config", str(run_dir / "recipe.yaml")])
    assert again.model.n_embd == 16 and again.data.block_size == 32 and again.train.max_steps == 40
    assert again.data.paths == [f"{corpus}/*.txt"]


def test_output_dir_with_a_run_is_refused_then_resumed(corpus, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    args = files_args(corpus, run_dir, "--train.eval_steps", "100", "--train.save_steps", "5")
    code, _, err = run_cli(*args, "--train.max_steps", "10")
    assert code == 0, err
    first_losses, _ = logged_losses(run_dir)

    code, _, err = run_cli(*args, "--train.max_steps", "20")
    assert code == 2
    assert "is not empty" in err and "--train.resume_from_checkpoint last" in err and len(err.splitlines()) == 1

    code, _, err = run_cli(*args, "--train.max_steps", "20", "--train.resume_from_checkpoint", "last")
    assert code == 0, err
    losses, state = logged_losses(run_dir)
    assert state["global_step"] == 20
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps[:10] == list(range(1, 11)) and steps[-1] == 20
    assert losses[:10] == first_losses[:10]


def test_resume_errors_are_one_line(corpus, tmp_path, run_cli):
    run_dir = tmp_path / "fresh"
    code, _, err = run_cli(
        *files_args(corpus, run_dir, "--train.max_steps", "2", "--train.resume_from_checkpoint", "last")
    )
    assert code == 2 and "holds no checkpoint-N folder" in err
    code, _, err = run_cli(*files_args(corpus, run_dir, "--train.resume_from_checkpoint", str(tmp_path)))
    assert code == 2 and "is not a Trainer checkpoint" in err
    assert not run_dir.exists()


def test_finetune_from_a_pretrained_folder(corpus, tmp_path, run_cli):
    pretrained = tmp_path / "pretrained"
    before = save_tiny_pretrained(pretrained)
    run_dir = tmp_path / "run"
    args = files_args(corpus, run_dir, "--train.max_steps", "6", model=["--model.name_or_path", str(pretrained)])
    code, out, err = run_cli(*args, "--model.resid_pdrop", "0.0")
    assert code == 0, err
    after = AutoModelForCausalLM.from_pretrained(run_dir)
    assert after.config.n_positions == 64 and after.config.resid_pdrop == 0.0
    assert not torch.equal(after.transformer.h[0].mlp.c_fc.weight, before.transformer.h[0].mlp.c_fc.weight)
    assert AutoTokenizer.from_pretrained(run_dir)("Hello world")["input_ids"] == [15496, 995]


def test_pretrained_errors(corpus, tmp_path, run_cli):
    pretrained = tmp_path / "pretrained"
    save_tiny_pretrained(pretrained)
    run_dir = tmp_path / "run"
    base = files_args(corpus, run_dir, "--train.max_steps", "2")

    code, _, err = run_cli(*base, "--model.name_or_path", str(pretrained))
    assert code == 2 and "model.n_layer describes a model built from scratch" in err

    def pretrained_args(path):
        return files_args(corpus, run_dir, "--train.max_steps", "2", model=["--model.name_or_path", str(path)])

    code, _, err = run_cli(*pretrained_args(tmp_path / "corpus"))
    assert code == 2 and "is not a model (no config.json)" in err

    code, _, err = run_cli(*pretrained_args(pretrained), "--data.block_size", "128")
    assert code == 2 and "longer than the model's context (64 positions)" in err

    code, _, err = run_cli(*pretrained_args(pretrained), "--tokenizer.source", "train")
    assert code == 2 and "tokenizer.source=train" in err
    assert not run_dir.exists()


def test_hub_names_fail_clearly_offline(corpus, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        *files_args(corpus, run_dir, "--train.max_steps", "2", model=["--model.name_or_path", "gpt2"])
    )
    assert code == 2 and "Hugging Face Hub cannot be reached" in err and len(err.splitlines()) == 1

    code, _, err = run_cli("finetune", "--config", "recipes/gpt2/wikitext2.yaml", "--train.output_dir", str(run_dir))
    assert code == 2 and "cannot be reached" in err and len(err.splitlines()) == 1

    code, _, err = run_cli(
        "finetune",
        "--data.source",
        "hub",
        "--data.dataset",
        "Salesforce/wikitext",
        "--data.dataset_config",
        "wikitext-2-raw-v1",
        "--train.output_dir",
        str(run_dir),
    )
    assert code == 2 and "data.dataset" in err and "data.source=files" in err
    assert not run_dir.exists()


def test_trained_tokenizer_is_saved_with_the_model(corpus, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        *files_args(
            corpus, run_dir, "--train.max_steps", "4", "--tokenizer.source", "train", "--tokenizer.vocab_size", "300"
        )
    )
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    assert len(tok) <= 300 and model.config.vocab_size == len(tok)
    assert tok.model_max_length == model.config.n_positions == 32


def test_final_metrics_describe_the_saved_model(corpus, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    args = files_args(
        corpus,
        run_dir,
        "--train.max_steps",
        "12",
        "--train.eval_steps",
        "4",
        "--train.save_steps",
        "4",
        # "Best" = highest loss, so that the best checkpoint is the first, not the last one.
        "--train.load_best_model_at_end",
        "true",
        "--train.metric_for_best_model",
        "eval_loss",
        "--train.greater_is_better",
        "true",
    )
    code, _, err = run_cli(*args)
    assert code == 0, err
    _, state = logged_losses(run_dir)
    evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    final = json.loads((run_dir / "eval_results.json").read_text())["eval_loss"]
    assert evals[0] > evals[-1] + 0.1, evals
    assert final == pytest.approx(evals[0], abs=1e-4)


def test_gradient_checkpointing_gives_the_same_losses(corpus, tmp_path, run_cli, monkeypatch):
    """train.gradient_checkpointing recomputes each block's activations in the backward pass
    instead of keeping them: the same losses (dropout on: the recompute replays its random state),
    and it really runs (every block's forward goes through torch's checkpoint)."""
    import transformers.modeling_utils

    calls = []
    checkpoint = transformers.modeling_utils.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)
    runs = {}
    for setting in ("false", "true"):
        run_dir = tmp_path / setting
        args = files_args(corpus, run_dir, "--train.max_steps", "6", "--evaluate.at_end_of_training", "false")
        code, _, err = run_cli(*args, "--train.gradient_checkpointing", setting)
        assert code == 0, err
        assert "deprecated" not in err
        runs[setting], _ = logged_losses(run_dir)
        assert bool(calls) == (setting == "true")
    assert len(calls) == 6 * 2  # 6 steps x 2 blocks
    assert runs["true"] == pytest.approx(runs["false"], abs=1e-6)


def test_early_stopping_stops_and_keeps_the_best_checkpoint(corpus, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    args = files_args(
        corpus,
        run_dir,
        *["--train.max_steps", "40", "--train.eval_steps", "2", "--train.save_steps", "2"],
        *["--train.early_stopping_patience", "2", "--evaluate.at_end_of_training", "false"],
        # "Better" = a higher loss: every evaluation after the first (at step 2) is worse.
        *["--train.metric_for_best_model", "eval_loss", "--train.greater_is_better", "true"],
    )
    code, _, err = run_cli(*args)
    assert code == 0, err
    _, state = logged_losses(run_dir)
    evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    assert state["global_step"] == 6 and len(evals) == 3  # steps 2 (the best), 4 and 6: patience 2 used up
    assert state["best_model_checkpoint"].endswith("checkpoint-2")
    final = json.loads((run_dir / "eval_results.json").read_text())["eval_loss"]
    assert final == pytest.approx(evals[0], abs=1e-4)  # the final model is the best checkpoint's
