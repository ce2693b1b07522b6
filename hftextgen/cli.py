"""`hftextgen <command>`: the only module that knows about the command line.

Each command's options come from the recipe's dataclasses (config.Recipe's sections, each beside
its stage) through jsonargparse, so a YAML
section, a `--section.key` override and `--help` always agree. Mistakes end in one line on
stderr naming the key and the fix, exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import re
import sys
from pathlib import Path
from typing import Literal

from . import __version__
from .errors import RunStopped, UserError

COMMANDS = {
    "prepare": "read, split, tokenize and pack a recipe's data into the cache (finetune then finds it at once)",
    "finetune": "train a model from scratch or fine-tune a pretrained one (fully or with LoRA), from a recipe",
    "generate": "continue prompts with a model: from the command line, a file, or interactively",
    "evaluate": "perplexity, bits-per-byte and samples of a model on held-out documents",
    "validate": "check a finetune recipe, estimate its steps, tokens, time, memory and disk; writes nothing",
}

USAGE = f"""usage: hftextgen <command> [--config RECIPE] [--section.key VALUE ...] [--progress MODE] [--debug]

commands:
{chr(10).join(f"  {name:<10} {text}" for name, text in COMMANDS.items())}

`hftextgen <command> --help` lists every recipe key; `--print_config` prints the resolved recipe.
"""


def _parser(command: str, description: str, sections: tuple[str, ...]):
    """A fresh parser for a command: a copy of one built once per process (building reads every
    TrainingArguments field and docstring, ~0.3 s; parsing with a run's defaults changes it)."""
    return copy.deepcopy(_build_parser(command, description, sections))


@functools.cache
def _build_parser(command: str, description: str, sections: tuple[str, ...]):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=f"hftextgen {command}", description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="Recipe file, YAML or JSON.")
    parser.add_argument(
        "--progress",
        type=Literal["auto", "bars", "plain", "quiet"],
        default="auto",
        help="How progress shows: bars (on a terminal), plain lines without carriage returns (for logs: CI, "
        "Slurm), or quiet (no progress, only what the command found). auto: bars when stderr is a terminal, "
        "else plain. Not part of the recipe.",
    )
    classes = _section_classes()
    sections = sections or tuple(classes)
    for name in sections:
        parser.add_class_arguments(classes[name], name)
    if "train" in sections:
        # TrainingArguments keeps its docs in field metadata; jsonargparse reads docstrings.
        helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(classes["train"]) if f.init}
        for action in parser._actions:
            name = action.dest.removeprefix("train.")
            if action.dest.startswith("train.") and helps.get(name) and not action.help:
                action.help = helps[name].replace("%", "%%")
    return parser


RECIPE_SECTIONS = ()  # all of them: the fields of config.Recipe (_section_classes)


def _section_classes() -> dict:
    """The recipe's sections, in order, and each one's class: config.Recipe's fields."""
    import typing

    from . import config

    hints = typing.get_type_hints(config.Recipe)
    return {f.name: hints[f.name] for f in dataclasses.fields(config.Recipe)}


def finetune_parser():
    return _parser(
        "finetune",
        "Train a model from scratch (any causal-LM architecture) or fine-tune a pretrained one, fully or with "
        "LoRA, as a recipe describes.",
        RECIPE_SECTIONS,
    )


def prepare_parser():
    return _parser(
        "prepare",
        "Prepare a recipe's data as finetune would: read the sources in pieces, hold out validation documents, "
        "tokenize in data.num_proc processes and write token shards to the cache; print the data report and where "
        "the data lives. finetune, validate and evaluate then find it at once. Stopped (SIGTERM, Ctrl-C, a crash), "
        "the same command continues where it was.",
        RECIPE_SECTIONS,
    )


def validate_parser():
    parser = _parser(
        "validate",
        "Check a finetune recipe as finetune would (same errors), prepare its data (cached for finetune), time a "
        "few training steps on this hardware, and print the steps, tokens, time, memory and disk the run will "
        "take. Writes nothing to train.output_dir.",
        RECIPE_SECTIONS,
    )
    parser.add_argument("--json", action="store_true", help="Print the estimate as JSON.")
    return parser


def _add_model(parser) -> None:
    parser.add_argument(
        "--model",
        type=str,
        required=True,
        help="A run directory, any save_pretrained folder, a LoRA adapter folder (a run's adapter/ or a "
        "checkpoint of a LoRA run: loaded on its base model), or a hub name. A run directory's recipe.yaml "
        "supplies the defaults of the sections below.",
    )
    parser.add_argument(
        "--device", type=str | None, default=None, help="cpu, cuda, cuda:1, ... Unset: a GPU if there is one."
    )


def generate_parser():
    parser = _parser(
        "generate",
        "Continue prompts with a model. Each sample is printed and appended, with every decoding "
        "setting and its seed, to a JSONL file.",
        ("generate",),
    )
    _add_model(parser)
    parser.add_argument(
        "--prompt", action="append", type=str, help="A prompt; repeat for more. Given, generate.prompts is not used."
    )
    parser.add_argument(
        "--interactive", action="store_true", help="Read prompts from the terminal and stream the text as it is made."
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="A conversation through the model's chat template, answers streamed; /reset starts over, /exit or "
        "Ctrl-D ends.",
    )
    parser.add_argument("--system", type=str | None, default=None, help="With --chat: a system turn to start with.")
    parser.add_argument(
        "--messages",
        type=str | None,
        default=None,
        help='A JSONL file of conversations ({"messages": [...]} a line, each ending with a user turn) to answer, '
        "a record each in --output (unset: FILE.answers.jsonl beside it).",
    )
    parser.add_argument(
        "--output",
        type=str | None,
        default=None,
        help="JSONL file the samples are appended to. Unset: generations.jsonl in the model's directory "
        "(or here, for a hub model).",
    )
    return parser


def evaluate_parser():
    parser = _parser(
        "evaluate",
        "Perplexity, bits-per-byte and word perplexity of a model on documents (default: the run's "
        "held-out documents), and samples; writes eval.json, eval.md, samples.jsonl and samples.md. Preference "
        "pairs: preference accuracy, rewards and each answer's bits-per-byte, before and after training.",
        ("data", "evaluate", "generate", "preference"),
    )
    _add_model(parser)
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
            hint = f": did you mean {close[0]}?" if close else f": `{parser.prog} --help` lists the valid keys"
            return f"unknown recipe key {key}{hint}"
    missing = re.search(r"argument (--[\w.\-]+): expected one argument", text)
    if missing:
        option = missing.group(1)
        return f"{option} needs a value (one that starts with '-' goes after '=': {option}=-1e-3)"
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


def parse_args(parser, argv: list[str]):
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(argv)
    except ArgumentError as exc:
        raise UserError(explain(exc, parser)) from exc


def parse(parser, argv: list[str], defaults: dict | None = None):
    """Parse and build the sections; any mistake becomes one UserError line."""
    if defaults:
        known = set(recipe_keys(parser))
        parser.set_defaults({k: v for k, v in defaults.items() if k in known})
    cfg = parse_args(parser, argv)
    try:
        return cfg, parser.instantiate(cfg)
    except ValueError as exc:  # ConfigError, and TrainingArguments' own checks
        raise UserError(" ".join(str(exc).split())) from exc


def _recipe(s):
    from .config import Recipe

    try:
        return Recipe(**{name: getattr(s, name) for name in _section_classes()})
    except ValueError as exc:
        raise UserError(" ".join(str(exc).split())) from exc


def run_finetune(argv: list[str]) -> int:
    from . import progress

    parser = finetune_parser()
    cfg, s = parse(parser, argv)
    recipe = _recipe(s)
    progress.configure(cfg.pop("progress"), no_bars=bool(s.train.disable_tqdm))
    cfg.pop("config", None)
    # How this command treats the directory, not part of the run: the saved recipe re-runs or
    # continues it with either option given anew.
    cfg.train.resume_from_checkpoint, cfg.train.overwrite_output_dir = None, False
    from .train import finetune_recipe

    finetune_recipe(recipe, parser.dump(cfg, skip_unset=False), argv)
    return 0


def run_prepare(argv: list[str]) -> int:
    from . import progress

    cfg, s = parse(prepare_parser(), argv)
    recipe = _recipe(s)
    progress.configure(cfg.progress, no_bars=bool(s.train.disable_tqdm))
    from . import data, model

    corpus = data.open_corpus(recipe.data)
    tok = model.build_tokenizer(recipe.tokenizer, recipe.model, corpus)
    prepared = data.prepare(corpus, tok, model.fingerprint(tok))
    print(f"data: {'cached' if prepared.cache_hit else 'prepared'} at {prepared.cache_path}")
    print(data.describe_report(prepared.report))
    return 0


def run_validate(argv: list[str]) -> int:
    from . import progress

    cfg, s = parse(validate_parser(), argv)
    recipe = _recipe(s)
    progress.configure(cfg.progress, no_bars=bool(s.train.disable_tqdm))
    from .train import describe_estimate, validate_recipe

    estimate = validate_recipe(recipe)
    print(json.dumps(estimate, indent=2) if cfg.json else describe_estimate(estimate))
    return 0


def run_defaults(build, argv: list[str]) -> tuple:
    """Parse (twice: first to find --model, then with the defaults its run directory's
    recipe.yaml gives) and set the progress mode."""
    from . import progress

    cfg, s = _with_run_defaults(build, argv)
    progress.configure(cfg.progress)
    return cfg, s


def _with_run_defaults(build, argv: list[str]) -> tuple:
    """The defaults of the sections this command has come from the run directory's recipe.yaml:
    what the model was trained and sampled with. A LoRA run's adapter/ folder is part of its run."""
    import yaml

    from .model import ADAPTER_DIR

    model = parse_args(build(), argv).model
    recipe = Path(model) / "recipe.yaml"
    if Path(model).name == ADAPTER_DIR and not recipe.is_file():
        recipe = Path(model).parent / "recipe.yaml"
    if not recipe.is_file():
        return parse(build(), argv)
    try:
        saved = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{recipe} is not valid YAML ({' '.join(str(exc).split())}): fix or delete it") from None
    defaults = {
        f"{section}.{key}": value
        for section, values in saved.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }
    defaults.pop("evaluate.output_dir", None)  # results go next to the model being evaluated
    named = {a.split("=")[0] for a in argv}
    if named & {"--data.source", "--data.paths", "--data.dataset"}:
        # Other data named: not the run's mixture, nor its format (auto finds the new data's).
        defaults.pop("data.mixture", None)
        defaults.pop("data.format", None)
    if named & {"--data.source", "--data.paths", "--data.dataset", "--data.format"}:
        # How the run's data trained (its loss_on) says nothing of other data: the format's own
        # default, unless given anew (the evaluator scores the answers, or every token of text).
        defaults.pop("data.loss_on", None)
    return parse(build(), argv, defaults)


def run_generate(argv: list[str]) -> int:
    cfg, s = run_defaults(generate_parser, argv)
    from . import generate, model, runtime

    modes = [
        flag
        for flag, on in (
            ("--chat", cfg.chat),
            ("--messages", cfg.messages),
            ("--interactive", cfg.interactive),
            ("--prompt", cfg.prompt),
        )
        if on
    ]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} are different ways to generate: give one")
    if cfg.system is not None and not cfg.chat:
        raise UserError("--system starts a --chat conversation: add --chat, or drop --system")
    runtime.reuse_freed_memory()
    lm, tok = model.load(cfg.model, device=cfg.device)
    output = Path(cfg.output) if cfg.output else _model_dir(cfg.model, Path(".")) / "generations.jsonl"
    if cfg.messages:
        answers = Path(cfg.output) if cfg.output else Path(cfg.messages).with_suffix(".answers.jsonl")
        n = generate.answer_file(lm, tok, s.generate, Path(cfg.messages), answers, model_name=cfg.model)
        print(f"--- {n} answers written to {answers}", file=sys.stderr)
        return 0
    if cfg.chat:
        generate.converse(lm, tok, s.generate, cfg.system, output=output, model_name=cfg.model)
        return 0
    generator = generate.Generator(lm, tok, s.generate)
    if cfg.interactive:
        return _interactive(generator, cfg.model, output)
    prompts = cfg.prompt or generate.read_prompts(s.generate)
    samples = generator(prompts, desc="Generating")
    for sample in samples:
        print(f"--- sample {sample.index} (seed {sample.seed}, ended by {sample.finish}) ---")
        print(sample.prompt + sample.completion)
    generate.write_samples(samples, generator, cfg.model, output, append=True)
    print(f"--- {len(samples)} samples appended to {output}", file=sys.stderr)
    return 0


def _interactive(generator, model_name: str, output: Path) -> int:
    from transformers import TextStreamer

    from . import generate

    streamer = TextStreamer(generator.tok, skip_prompt=True)
    print("Type a prompt and press Enter (an empty line samples from nothing); Ctrl-D ends.", file=sys.stderr)
    count = 0
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            print(file=sys.stderr)
            break
        print(prompt, end="", flush=True)
        sample = generator([prompt], streamer=streamer)[0]
        generate.write_samples([sample], generator, model_name, output, append=True)
        generator.cfg.seed += 1  # a new draw for the next prompt; the record keeps the seed used
        count += 1
    print(f"{count} samples appended to {output}", file=sys.stderr)
    return 0


def _model_dir(model: str, otherwise: Path) -> Path:
    return Path(model) if Path(model).is_dir() else otherwise


def run_evaluate(argv: list[str]) -> int:
    cfg, s = run_defaults(evaluate_parser, argv)
    from . import data, evaluate, model, runtime

    runtime.reuse_freed_memory()
    lm, tok = model.load(cfg.model, device=cfg.device)
    corpus = data.open_corpus(s.data)
    # The model's tokenizer finds the data its run prepared; split all holds nothing out. A
    # mixture: the source its run's evaluator scored (the first task source, else the first).
    prepared = data.prepare(corpus, tok, model.fingerprint(tok), s.evaluate.split != "all", for_training=False)
    out_dir = Path(s.evaluate.output_dir) if s.evaluate.output_dir else _model_dir(cfg.model, Path("eval") / cfg.model)
    if getattr(prepared, "pairs", False) and Path(cfg.model).is_dir():
        from .train import saved_reference

        saved_reference(Path(cfg.model), prepared)  # the run's reference: the "before"
    evaluate.evaluate_prepared(
        lm,
        tok,
        prepared.evaluated,
        s.evaluate.split,
        cfg=s.evaluate,
        generate_cfg=s.generate,
        out_dir=out_dir,
        model_name=cfg.model,
        preference=s.preference,
    )
    return 0


RUNNERS = {
    "prepare": run_prepare,
    "finetune": run_finetune,
    "generate": run_generate,
    "evaluate": run_evaluate,
    "validate": run_validate,
}


def main(argv: list[str] | None = None) -> int:
    from . import runtime

    runtime.wait_briefly()  # before torch loads
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
    except RunStopped as exc:
        if str(exc):
            print(f"hftextgen: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hftextgen: interrupted", file=sys.stderr)
        return 130
