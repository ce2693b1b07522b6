"""The command line: every recipe parses, JSON works too, and mistakes are one-line errors (the
cases the issue lists are in test_bad_inputs.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hftextgen.cli import finetune_parser
from hftextgen.config import Recipe
from hftextgen.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def test_recipes_exist():
    names = {str(p.relative_to(ROOT / "recipes")) for p in RECIPES}
    assert {
        "shakespeare/tiny.yaml",
        "shakespeare/gpt2-small.yaml",
        "gpt2/wikitext2.yaml",
        "gpt2/fineweb-edu-10b.yaml",
        "custom/text-files.yaml",
        "custom/lora.yaml",
        "shakespeare/tiny-llama.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_recipe_parses_and_passes_its_checks(path):
    parser = finetune_parser()
    sections = parser.instantiate(parser.parse_args(["--config", str(path)]))
    Recipe(sections.model, sections.tokenizer, sections.data, sections.train, peft=sections.peft)
    if path.suffix != ".json":
        head = path.read_text().splitlines()[0]
        assert head.startswith("# ") and ("hftextgen " in head or "make " in head), "recipes open with their command"


def test_json_recipes_work(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes/shakespeare/tiny.yaml").read_text())
    (tmp_path / "tiny.json").write_text(json.dumps(recipe))
    parser = finetune_parser()
    from_json = parser.parse_args(["--config", str(tmp_path / "tiny.json")])
    from_yaml = parser.parse_args(["--config", str(ROOT / "recipes/shakespeare/tiny.yaml")])
    from_json.pop("config"), from_yaml.pop("config")
    assert from_json == from_yaml


def test_command_line_overrides_the_recipe():
    parser = finetune_parser()
    cfg = parser.parse_args(
        [
            "--config",
            str(ROOT / "recipes/shakespeare/tiny.yaml"),
            "--train.learning_rate",
            "3e-4",
            "--model.n_layer",
            "2",
        ]
    )
    assert cfg.train.learning_rate == 3e-4 and cfg.model.n_layer == 2 and cfg.model.n_embd == 128


@pytest.mark.parametrize(
    "argv, drop_last",
    [
        ([], False),
        (["--train.torch_compile", "true"], True),
        (["--train.torch_compile", "true", "--train.dataloader_drop_last", "false"], False),
        (["--train.dataloader_drop_last", "true"], True),
    ],
)
def test_compiled_runs_drop_the_incomplete_batch_unless_told(argv, drop_last):
    """Under torch.compile a batch of another size recompiles the model (21 s for a 2-layer
    model on a 2-core CPU; the likely stall of the H200's micro-batch-64 row, bench/RESULTS.md)."""
    parser = finetune_parser()
    sections = parser.instantiate(parser.parse_args(["--config", str(ROOT / "recipes/shakespeare/tiny.yaml"), *argv]))
    assert sections.train.dataloader_drop_last is drop_last


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model.n_layr", "2"], "unknown recipe key model.n_layr: did you mean model.n_layer?"),
        (["--model.attn_implementation", "flash"], "model.attn_implementation: expected one of sdpa, eager"),
        (["--train.per_device_train_batch_size", "0"], "train.per_device_train_batch_size must be >= 1"),
        (["--model.n_embd", "30", "--model.n_head", "4"], "model.n_embd (30) must be divisible by model.n_head (4)"),
        (
            ["--model.name_or_path", "gpt2", "--model.n_layer", "2"],
            "model.n_layer describes a model built from scratch",
        ),
        (["--data.validation_fraction", "1.5"], "data.validation_fraction must be in (0, 1)"),
        (["--data.encoding", "nope"], "data.encoding: unknown encoding 'nope'"),
        (["--data.source", "files"], "data.source=files needs data.paths"),
        (["--data.source", "hub"], "data.source=hub needs data.dataset"),
        (["--tokenizer.source", "train", "--model.name_or_path", "gpt2"], "tokenizer.source=train makes new token ids"),
        (["--model.resid_pdrop", "1.0"], "model.resid_pdrop must be in [0, 1)"),
        (["--config", "missing.yaml"], "missing.yaml"),
    ],
)
def test_bad_recipe_values_are_one_line_errors(run_cli, tmp_path, argv, expected):
    code, out, err = run_cli("finetune", "--train.output_dir", tmp_path / "run", *argv)
    assert code == 2
    assert err.startswith("hftextgen: error: ") and expected in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_a_recipe_file(run_cli, tmp_path):
    (tmp_path / "r.yaml").write_text("modle:\n  n_layer: 2\n")
    assert (
        "unknown recipe key modle.n_layer: did you mean model.n_layer?"
        in run_cli("finetune", "--config", tmp_path / "r.yaml")[2]
    )
    (tmp_path / "r.yaml").write_text("model:\n  n_layr: 2\n")
    assert (
        "unknown recipe key model.n_layr: did you mean model.n_layer?"
        in run_cli("finetune", "--config", tmp_path / "r.yaml")[2]
    )


def test_unknown_command_and_help(run_cli):
    code, _, err = run_cli("fintune")
    assert code == 2 and "did you mean finetune?" in err
    code, out, _ = run_cli("--help")
    assert code == 0 and "finetune" in out


def test_debug_shows_the_traceback():
    from hftextgen.cli import main

    with pytest.raises(UserError):
        main(["finetune", "--data.source", "files", "--data.paths", "[/nonexistent/*.txt]", "--debug"])


def test_print_config_prints_the_resolved_recipe(capsys, tmp_path):
    """The printed recipe holds the file's values, the overrides and every default, and runs as
    a recipe of its own: parsed again, it gives the same recipe."""
    import yaml

    from hftextgen.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--config", str(ROOT / "recipes/shakespeare/tiny.yaml"), "--train.max_steps", "7",
              "--print_config"])  # fmt: skip
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    recipe = yaml.safe_load(printed)
    assert recipe["model"]["n_embd"] == 128 and recipe["data"]["block_size"] == 128  # from the file
    assert recipe["train"]["max_steps"] == 7  # the override
    assert recipe["train"]["lr_scheduler_type"] == "cosine" and recipe["evaluate"]["stride"] is None  # defaults
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    parser = finetune_parser()
    printed_recipe = parser.instantiate(parser.parse_args(["--config", str(again)]))
    original = parser.instantiate(
        parser.parse_args(["--config", str(ROOT / "recipes/shakespeare/tiny.yaml"), "--train.max_steps", "7"])
    )
    for section in ("model", "tokenizer", "data", "train", "generate", "evaluate"):
        assert printed_recipe[section] == original[section], section


@pytest.mark.slow
def test_console_entry_point_exit_code():
    result = subprocess.run(
        [sys.executable, "-m", "hftextgen", "finetune", "--train.learnin_rate", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "hftextgen: error: unknown recipe key train.learnin_rate: did you mean train.learning_rate?"
    )


def test_train_arguments_built_in_python_have_the_defaults_of_finetune():
    """hftextgen's train defaults are TrainArguments' field defaults: built in Python, with no
    argument, it equals the train section `hftextgen finetune` parses with no option, field by
    field; and those defaults are hftextgen's, not TrainingArguments'."""
    import dataclasses

    from transformers import TrainingArguments

    from hftextgen import cli
    from hftextgen.train import TrainArguments

    _, sections = cli.parse(finetune_parser(), [])
    in_python = TrainArguments()
    names = [f.name for f in dataclasses.fields(TrainArguments) if f.init]
    differ = {n: (getattr(in_python, n), getattr(sections.train, n)) for n in names}
    assert not {n: pair for n, pair in differ.items() if pair[0] != pair[1]}
    stock = TrainingArguments()
    ours = {
        "output_dir": "runs/default",
        "learning_rate": 6e-4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "weight_decay": 0.1,
        "adam_beta2": 0.95,
        "eval_strategy": "steps",
        "eval_steps": 500,
        "save_total_limit": 3,
        "logging_steps": 10,
        "logging_first_step": True,
        "prediction_loss_only": True,
        "report_to": ["tensorboard"],
        "ddp_find_unused_parameters": False,
        "log_level_replica": "error",
        "log_on_each_node": False,
    }
    for name, value in ours.items():
        assert getattr(in_python, name) == value != getattr(stock, name), name
