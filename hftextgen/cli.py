"""`hftextgen <command>`: the only module that knows about the command line.

Each command's options come from the recipe dataclasses in config.py (jsonargparse), so a YAML
section, a `--section.key` override and `--help` always agree. Mistakes end in one line on
stderr naming the key and the fix, exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import difflib
import re
import sys

from . import __version__
from .errors import UserError

COMMANDS = {
    "finetune": "train a GPT-2 from scratch or fine-tune a pretrained model, from a recipe",
}

USAGE = f"""usage: hftextgen <command> [--config RECIPE] [--section.key VALUE ...] [--debug]

commands:
{chr(10).join(f"  {name:<10} {text}" for name, text in COMMANDS.items())}

`hftextgen <command> --help` lists every recipe key; `--print_config` prints the resolved recipe.
"""


def finetune_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    from .config import TRAIN_DEFAULTS, DataConfig, ModelConfig, TokenizerConfig, TrainArguments, training_field_help

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="hftextgen finetune",
        description="Train a GPT-2 from scratch or fine-tune a pretrained model, as a recipe describes.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="Recipe file, YAML or JSON.")
    parser.add_class_arguments(ModelConfig, "model")
    parser.add_class_arguments(TokenizerConfig, "tokenizer")
    parser.add_class_arguments(DataConfig, "data")
    parser.add_class_arguments(TrainArguments, "train")
    parser.set_defaults({f"train.{key}": value for key, value in TRAIN_DEFAULTS.items()})
    helps = training_field_help()
    for action in parser._actions:
        name = action.dest.removeprefix("train.")
        if action.dest.startswith("train.") and helps.get(name) and not action.help:
            action.help = helps[name].replace("%", "%%")
    return parser


def recipe_keys(parser) -> list[str]:
    return [a.dest for a in parser._actions if "." in a.dest]


UNKNOWN_KEY = (
    re.compile(r"unrecognized arguments: --?(?P<key>[\w.\-]+)"),
    re.compile(r"Group '(?P<group>[\w.\-]+)' does not accept option '(?P<key>[\w.\-]+)'"),
    re.compile(r"does not accept (?:option|key) '(?P<key>[\w.\-]+)'"),
    re.compile(r"Option '(?P<key>[\w.\-]+)' is not accepted"),
)


def explain(exc: Exception, parser) -> str:
    """jsonargparse's multi-line errors -> one line naming the key, with the closest valid key
    for a typo."""
    text = str(exc).strip()
    for pattern in UNKNOWN_KEY:
        unknown = pattern.search(text)
        if unknown:
            parts = unknown.groupdict()
            key = f"{parts['group']}.{parts['key']}" if parts.get("group") else parts["key"]
            close = difflib.get_close_matches(key, recipe_keys(parser), n=1, cutoff=0.6)
            hint = f": did you mean {close[0]}?" if close else ": `hftextgen finetune --help` lists the valid keys"
            return f"unknown recipe key {key}{hint}"
    bad = re.match(r"Parser key \"([\w.\-]+)\":\s*(.*)", text, re.S)
    if bad:
        key, detail = bad.groups()
        given = re.search(r"(?:Given|Got) value: (.*)", detail)
        value = f", got {given.group(1).strip()!r}" if given else ""
        choices = re.search(r"Literal\[(.*?)\]", detail)
        if choices:
            return f"{key}: expected one of {choices.group(1).replace(chr(39), '')}{value}"
        expected = re.search(r"Expected a <class '(\w+)'>", detail)
        if expected:
            return f"{key}: expected {expected.group(1)}{value}"
        return f"{key}: {' '.join(detail.split())}"
    return " ".join(text.split())


def run_finetune(argv: list[str]) -> int:
    from jsonargparse import ArgumentError

    from .config import Recipe

    parser = finetune_parser()
    try:
        cfg = parser.parse_args(argv)
    except ArgumentError as exc:
        raise UserError(explain(exc, parser)) from exc
    try:
        sections = parser.instantiate(cfg)
        recipe = Recipe(sections.model, sections.tokenizer, sections.data, sections.train)
    except ValueError as exc:  # ConfigError, and TrainingArguments' own checks
        raise UserError(" ".join(str(exc).split())) from exc
    cfg.pop("config", None)
    from .train import finetune

    finetune(recipe, parser.dump(cfg, skip_unset=False))
    return 0


RUNNERS = {"finetune": run_finetune}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"hftextgen {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in RUNNERS:
        close = difflib.get_close_matches(command, RUNNERS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"commands: {', '.join(RUNNERS)}"
        print(f"hftextgen: error: unknown command {command!r}: {hint}", file=sys.stderr)
        return 2
    try:
        return RUNNERS[command](rest)
    except UserError as exc:
        if debug:
            raise
        print(f"hftextgen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hftextgen: interrupted", file=sys.stderr)
        return 130
