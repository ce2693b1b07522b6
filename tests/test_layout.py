"""The house's layout rules, read from the source (ast), so a change that breaks one fails here:
every module opens with a docstring that says its job, no function is over 60 lines, code outside
a stage reaches it only through the stage package's exported names, and no module-level import
cycle."""

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
            if node.level:
                base = name if is_package(name) else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if not source.startswith("hftextgen"):
                continue
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if target in MODULES:
                    out.append((node.lineno, target))
                elif exported and alias.name in EXPORTS.get(source, {}):
                    out.append((node.lineno, f"{source}.{EXPORTS[source][alias.name].partition(':')[0]}"))
                else:
                    out.append((node.lineno, source))
    return [(line, target) for line, target in out if target in MODULES]


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
        for public, where in names.items():
            module, _, attribute = where.partition(":")
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
            assert (attribute or public) in defined, f"{package}: {public} -> {where} is not defined there"


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
    graph = {name: {t for _, t in imports(name, tree, True, exported=True)} for name, tree in TREES.items()}
    # A module's parent packages run first (their __init__.py): hftextgen.data.corpus needs hftextgen.data.
    for name in graph:
        parent = name.rpartition(".")[0]
        if parent in graph:
            graph[name].add(parent)
    assert not cycles(graph)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_package_imports_none_of_its_modules_until_asked(stage):
    """The lazy exports (hftextgen.stage_exports): importing a stage loads only its __init__.py."""
    assert {t for _, t in imports(f"hftextgen.{stage}", TREES[f"hftextgen.{stage}"], module_level=True)} <= {
        "hftextgen"
    }
