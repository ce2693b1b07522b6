"""The house's layout rules, read from the source (ast), so a change that breaks one fails here:
every module opens with a docstring that says its job, no function is over 60 lines, code outside
a stage reaches it only through the stage package's exported names, no import cycle (at module
level or inside functions), each recipe section's dataclass beside its stage in a config module
that imports no other stage, and no test module importing from another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hftextgen"
STAGES = ("data", "model", "train", "generate", "evaluate")
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in MODULES.items()}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def exports(stage: str) -> dict[str, str]:
    """A stage package's `_EXPORTS`: public name -> "module" or "module:attribute"."""
    for node in TREES[f"hftextgen.{stage}"].body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"hftextgen/{stage}/__init__.py has no _EXPORTS")


EXPORTS = {f"hftextgen.{stage}": exports(stage) for stage in STAGES}


def import_source(name: str, node: ast.ImportFrom) -> str:
    """The absolute name of the module a `from ... import` in module `name` imports from."""
    if not node.level:
        return node.module or ""
    base = name if is_package(name) else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def imports(name: str, tree: ast.Module, module_level: bool, exported: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every hftextgen module that `name` imports: at module level only, or
    anywhere. `from package import x` is the module x when x is one, else the package itself, or
    with `exported` the module behind a stage's exported name x (what running it imports)."""
    nodes = tree.body if module_level else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("hftextgen")]
        elif isinstance(node, ast.ImportFrom):
            source = import_source(name, node)
            if not source.startswith("hftextgen"):
                continue
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if target in MODULES:
                    out.append((node.lineno, target))
                elif exported and alias.name in EXPORTS.get(source, {}):
                    out.append((node.lineno, f"{source}.{EXPORTS[source][alias.name]}"))
                else:
                    out.append((node.lineno, source))
    return [(line, target) for line, target in out if target in MODULES]


def exported_uses(name: str, tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every stage module that `name` reaches as an attribute of the stage's
    package (`from .. import data` ... `data.prepare(...)`): the lazy exports import that module
    when the attribute is first read, as an import would."""
    packages = {}  # local name -> stage package
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = import_source(name, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in EXPORTS:
                    packages[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            packages.update({a.asname: a.name for a in node.names if a.asname and a.name in EXPORTS})
    return [
        (node.lineno, f"{packages[node.value.id]}.{EXPORTS[packages[node.value.id]][node.attr]}")
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in packages
        and node.attr in EXPORTS[packages[node.value.id]]
    ]


def import_graph(module_level: bool) -> dict[str, set[str]]:
    """Module -> the hftextgen modules running it imports: at module level only, or anywhere
    (inside functions too, and through a stage package's exported names)."""
    graph = {}
    for name, tree in TREES.items():
        found = imports(name, tree, module_level, exported=True)
        if not module_level:
            found += exported_uses(name, tree)
        graph[name] = {t for _, t in found}
    # A module's parent packages run first (their __init__.py): hftextgen.data.corpus needs hftextgen.data.
    for name in graph:
        parent = name.rpartition(".")[0]
        if parent in graph:
            graph[name].add(parent)
    return graph


def test_every_module_opens_with_a_docstring():
    missing = [str(p.relative_to(PACKAGE.parent)) for p in MODULES.values() if not p.read_text().startswith('"""')]
    assert not missing, f"modules whose first line is not a docstring: {missing}"
    empty = [name for name, tree in TREES.items() if not (ast.get_docstring(tree) or "").strip()]
    assert not empty


def test_no_function_is_over_60_lines():
    long = [
        f"{MODULES[name].relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for name, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def stage_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_outside_a_stage_only_its_package_is_imported():
    """`from hftextgen.data import Corpus`, never `from hftextgen.data.corpus import ...` (tests may)."""
    wrong = []
    for name, tree in TREES.items():
        for line, target in imports(name, tree, module_level=False):
            stage = stage_of(target)
            if stage and stage != stage_of(name) and target != f"hftextgen.{stage}":
                wrong.append(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "a stage's own modules imported from outside it:\n" + "\n".join(wrong)


def test_every_exported_name_exists():
    for package, names in EXPORTS.items():
        for public, module in names.items():
            tree = TREES[f"{package}.{module}"]
            defined = {
                t.id
                for node in ast.walk(tree)
                if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name)
            }
            defined |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defined |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
            assert public in defined, f"{package}: {public} -> {module} is not defined there under that name"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one that imports itself (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycles_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycle():
    assert not cycles(import_graph(module_level=True))


def test_no_import_cycle_anywhere():
    """Function-level imports and exported names read from a stage package included: a lazy
    import must not hide a two-way dependency."""
    assert not cycles(import_graph(module_level=False))


def test_import_graph_sees_function_level_and_exported_uses():
    graph = import_graph(module_level=False)
    assert "hftextgen.model.tokenizer" in graph["hftextgen.data.prepared"]  # model_stage.encoder_spec, in a function
    assert "hftextgen.data.report" in graph["hftextgen.train.card"]  # `from .. import data` inside a function
    assert "hftextgen.data.report" not in import_graph(module_level=True)["hftextgen.train.card"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_sections_config_module_imports_no_other_stage(stage):
    """Each recipe section's dataclass lives beside its stage, in <stage>/config.py, which imports
    nothing of another stage (so a stage can import any section, and the sections import no
    stage back)."""
    name = f"hftextgen.{stage}.config"
    assert name in MODULES, f"hftextgen/{stage}/config.py is missing"
    reached = {t for _, t in imports(name, TREES[name], False, exported=True) + exported_uses(name, TREES[name])}
    other = sorted(t for t in reached if stage_of(t) not in (None, stage))
    assert not other, f"{name} imports {other}"


def test_every_recipe_section_is_a_config_modules_dataclass():
    """config.Recipe's sections are each declared in a stage's config module: a new section is a
    dataclass there and a field of Recipe."""
    import dataclasses
    import typing

    from hftextgen.config import Recipe

    hints = typing.get_type_hints(Recipe)
    homes = {f.name: hints[f.name].__module__ for f in dataclasses.fields(Recipe)}
    assert all(home in {f"hftextgen.{s}.config" for s in STAGES} for home in homes.values()), homes


def test_no_test_module_imports_another():
    """What tests share lives in conftest.py (fixtures, helpers) or a helper module (oracle.py,
    runs.py), never in another test module: a test file imports no test_*.py."""
    tests = Path(__file__).parent
    wrong = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_"):
                wrong.append(f"{path.name}:{node.lineno} imports {node.module}")
            elif isinstance(node, ast.Import):
                wrong += [
                    f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if a.name.startswith("test_")
                ]
    assert not wrong, wrong


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_package_imports_none_of_its_modules_until_asked(stage):
    """The lazy exports (hftextgen.stage_exports): importing a stage loads only its __init__.py."""
    assert {t for _, t in imports(f"hftextgen.{stage}", TREES[f"hftextgen.{stage}"], module_level=True)} <= {
        "hftextgen"
    }
