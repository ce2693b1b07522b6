"""Every command README.md and docs/*.md show parses as written: a renamed or removed recipe key
fails here instead of in a reader's terminal.

The commands are the lines of the ```sh blocks that run hftextgen: `hftextgen ...` itself,
`accelerate launch ... -m hftextgen ...`, `sbatch launch/slurm.sbatch RECIPE ...` (the script
runs `hftextgen finetune --config RECIPE ...`) and `make TARGET VAR=... ARGS="..."` (mapped to
the target's hftextgen line in the Makefile, its variables filled in as make would), plus the
`make`/`hftextgen` code spans of table rows. Each is parsed by the command's own parser from
hftextgen.cli with `--print_config` appended, in-process: jsonargparse checks every key, type and
choice, reads the `--config` file, prints the resolved recipe and exits; nothing runs. (Parsing
is all `hftextgen generate/evaluate` do before `--print_config` exits, so a run directory named by
`--model` need not exist; files named by `--data.paths` and such are read only when a run
starts.) The one file a command reads that a fresh clone lacks, a run's saved recipe.yaml, is
written in a temporary folder the commands run in, the way finetune writes it.

The ```yaml blocks are parsed as recipes the same way, and one that opens with `# recipes/X.yaml`
must hold that file's values.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from hftextgen import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Files the documented commands read that a fresh clone does not have, and how each is made.
RUN_RECIPE = "runs/x/recipe.yaml"  # a run's saved recipe: `hftextgen finetune --config runs/x/recipe.yaml`


def fenced(path: Path, language: str) -> list[tuple[int, str]]:
    """(line number, text) of each ```language block in a Markdown file."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if current is None and line.strip() == f"```{language}":
            current, start = [], number + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def shell_lines(path: Path):
    """(line number, line) of every command in the file's ```sh blocks, continuations joined,
    and of the `make ...`/`hftextgen ...` code spans in its table rows."""
    for start, text in fenced(path, "sh"):
        joined, first = "", None
        for offset, line in enumerate(text.splitlines()):
            first = start + offset if first is None else first
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            yield first, joined + line
            joined, first = "", None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("|"):
            for span in re.findall(r"`((?:make|hftextgen) [^`]+)`", line):
                yield number, span.replace("\\|", "|")


class Makefile:
    """A make target's hftextgen command, as `make TARGET VAR=value ...` would run it."""

    def __init__(self, path: Path):
        self.variables, self.rules, self.default = {}, {}, None
        target = None
        for line in path.read_text(encoding="utf-8").splitlines():
            assignment = re.match(r"^([A-Z_]+)\s*[?:]?=\s*(.*)$", line)
            if assignment:
                self.variables[assignment.group(1)] = assignment.group(2).strip()
            elif line.startswith(".DEFAULT_GOAL"):
                self.default = line.split("=", 1)[1].strip()
            elif re.match(r"^[\w-]+:", line):
                target = line.split(":", 1)[0]
                self.rules.setdefault(target, [])
            elif line.startswith("\t") and target:
                self.rules[target].append(line.strip())

    def command(self, target: str | None, overrides: dict[str, str]) -> list[str] | None:
        lines = [line for line in self.rules.get(target or self.default, []) if "hftextgen" in line]
        if not lines:
            return None  # a target that runs no hftextgen command (test, setup, bench, ...)
        values = {**self.variables, **overrides}
        line = lines[0]
        for _ in range(10):
            line = re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), ""), line)
        return hftextgen_argv(shlex.split(line))


def hftextgen_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after `hftextgen` (`.venv/bin/hftextgen`, `-m hftextgen`), or None."""
    for i, token in enumerate(tokens):
        if token == "hftextgen" or token.endswith("/hftextgen"):
            if i == 0 or tokens[i - 1] == "-m" or "/" in token:
                return tokens[i + 1 :]
    return None


SLURM = (ROOT / "launch" / "slurm.sbatch").read_text(encoding="utf-8")
MAKEFILE = Makefile(ROOT / "Makefile")


def to_argv(line: str) -> list[str] | None:
    """The hftextgen arguments a documented shell line runs, or None for other commands."""
    tokens = shlex.split(line, comments=True)
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):  # LAUNCH=... sbatch ...
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "make":
        overrides = dict(t.split("=", 1) for t in tokens[1:] if "=" in t)
        targets = [t for t in tokens[1:] if "=" not in t and not t.startswith("-")]
        return MAKEFILE.command(targets[0] if targets else None, overrides)
    if tokens[0] == "sbatch":
        script = next(i for i, t in enumerate(tokens) if t.endswith("slurm.sbatch"))
        assert '-m hftextgen finetune --config "$@"' in SLURM, "slurm.sbatch no longer runs finetune --config"
        return ["finetune", "--config", *tokens[script + 1 :]]
    return hftextgen_argv(tokens)


def documented_commands() -> list[tuple[str, str, list[str]]]:
    commands = []
    for path in DOCS:
        for number, line in shell_lines(path):
            argv = to_argv(line)
            if argv is not None:
                commands.append((f"{path.relative_to(ROOT)}:{number}", line, argv))
    return commands


COMMANDS = documented_commands()


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A folder that looks like a fresh clone after one run: recipes/ and launch/ as in the
    repository, and runs/x/recipe.yaml as finetune saves it (here: the default recipe's)."""
    for folder in ("recipes", "launch"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    parser = cli.finetune_parser()
    cfg = cli.parse_args(parser, ["--config", str(ROOT / "recipes/shakespeare/tiny.yaml")])
    cfg.pop("progress")
    cfg.pop("config", None)
    saved = tmp_path / RUN_RECIPE
    saved.parent.mkdir(parents=True)
    saved.write_text(parser.dump(cfg, skip_unset=False), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def print_config(argv: list[str]) -> str:
    """Parse `hftextgen ARGV --print_config` with the command's own parser, as cli.main would
    (without --debug); a mistake fails with hftextgen's own one-line error."""
    argv = [a for a in argv if a != "--debug"]
    assert argv and argv[0] in cli.RUNNERS, f"unknown command {argv[:1]}: commands are {', '.join(cli.RUNNERS)}"
    parser = getattr(cli, f"{argv[0]}_parser")()
    parser.allow_abbrev = False  # the CLI takes `--train.max_step` for max_steps: the docs spell keys whole
    try:
        cli.parse_args(parser, [*argv[1:], "--print_config"])
    except cli.UserError as exc:
        pytest.fail(f"hftextgen: error: {exc}")
    except SystemExit as exc:
        assert exc.code in (0, None), f"exit code {exc.code}"
        return ""
    pytest.fail("--print_config did not stop the command")  # never run a documented command here


def test_the_docs_show_commands_of_every_kind():
    """The extraction itself works: a change in how the docs are written must not quietly leave
    nothing to check."""
    lines = [line for _, line, _ in COMMANDS]
    assert len(COMMANDS) >= 30, lines
    for kind in ("hftextgen ", "make ", "accelerate launch", "sbatch "):
        assert any(line.lstrip().startswith(kind) for line in lines), kind
    for command in ("finetune", "prepare", "validate", "generate", "evaluate"):
        assert any(argv[0] == command for _, _, argv in COMMANDS), command


@pytest.mark.parametrize("where, line, argv", COMMANDS, ids=[where for where, _, _ in COMMANDS])
def test_documented_command_parses(where, line, argv, checkout, capsys):
    print_config(argv)
    assert capsys.readouterr().out.strip()  # the resolved recipe


def test_paths_in_documented_commands_exist():
    """recipes/ and launch/ files a command names are in the repository."""
    missing = []
    for where, line, _ in COMMANDS:
        for token in shlex.split(line, comments=True):
            path = token.split("=", 1)[-1]
            if re.match(r"^(recipes|launch)/\S+\.(ya?ml|sbatch)$", path) and not (ROOT / path).is_file():
                missing.append(f"{where}: {path}")
    assert not missing


YAML_BLOCKS = [(f"{path.relative_to(ROOT)}:{start}", text) for path in DOCS for start, text in fenced(path, "yaml")]


@pytest.mark.parametrize("where, text", YAML_BLOCKS, ids=[where for where, _ in YAML_BLOCKS])
def test_documented_recipe_parses(where, text, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    print_config(["finetune", "--config", str(recipe)])
    named = re.match(r"#\s*(recipes/\S+\.ya?ml)\s*$", text.splitlines()[0])
    if named:  # an excerpt of a shipped recipe holds its values
        shipped = yaml.safe_load((ROOT / named.group(1)).read_text(encoding="utf-8"))
        assert yaml.safe_load(text) == shipped


def test_a_renamed_key_fails(checkout):
    """What the tests above rely on: a key the parser does not know is an error, not a no-op."""
    with pytest.raises(pytest.fail.Exception, match="unknown recipe key train.learnin_rate"):
        print_config(["finetune", "--config", "recipes/shakespeare/tiny.yaml", "--train.learnin_rate", "1e-3"])
    with pytest.raises(pytest.fail.Exception, match="unknown recipe key"):
        print_config(["generate", "--model", "runs/shakespeare-tiny", "--generate.presett", "greedy"])
    with pytest.raises(pytest.fail.Exception, match="unknown recipe key train.max_step"):  # a prefix of max_steps
        print_config(["finetune", "--config", "recipes/shakespeare/tiny.yaml", "--train.max_step", "100"])


def test_make_maps_to_the_makefile_command():
    assert to_argv("make finetune RECIPE=recipes/custom/text-files.yaml ARGS=\"--data.paths '[a/]'\"") == [
        "finetune",
        "--config",
        "recipes/custom/text-files.yaml",
        "--data.paths",
        "[a/]",
    ]
    assert to_argv("make generate") == ["generate", "--model", "runs/shakespeare-tiny", "--prompt", "ROMEO:"]
    assert to_argv("make test") is None
    assert to_argv("make") == to_argv("make finetune")
