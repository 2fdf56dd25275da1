"""The biomass_cache package has no import cycle, counting every import: module level, inside functions and under
TYPE_CHECKING (a cycle hidden in a function is still two modules that cannot be understood one without the other).

`from biomass_cache.a import b` is an edge to module `biomass_cache.a.b` when that is a module, else to
`biomass_cache.a`; the implicit import of a parent package's __init__ when a submodule is imported is not an edge
(Python runs the parent first, so it never sees its own child half-initialised)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from toys import ROOT

PACKAGE = ROOT / "biomass_cache"


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every module of the package."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports_of(tree: ast.AST, modules: set[str]) -> set[str]:
    """The package modules a module's code imports, anywhere in it."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(ast.parse(path.read_text()), set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of `graph`, or None (depth-first search, colouring nodes on the current path)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    assert "biomass_cache.lora.predict" in graph["biomass_cache.submit.ensemble"]  # imported inside a function
    assert "biomass_cache.heads.density" in graph["biomass_cache.heads"]  # `from package import submodule`
    assert "biomass_cache.store.layout" in graph["biomass_cache.extract.passes"]


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": set(), "c": {"d"}, "d": {"c"}}) == ["c", "d", "c"]


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_every_name_a_benchmark_imports_exists():
    """The benchmark scripts are not run by CI; a name they import that was renamed or moved fails here instead of
    in the next person's measurement."""
    import importlib
    import sys

    bench = ROOT / "benchmarks"
    siblings = {p.stem for p in bench.glob("*.py")}
    sys.path.insert(0, str(bench))
    try:
        missing = []
        for path in sorted(bench.glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                        node.module.split(".")[0] == "biomass_cache" or node.module in siblings):
                    module = importlib.import_module(node.module)
                    missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                                if not hasattr(module, a.name) and not (
                                    hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{a.name}"))]
    finally:
        sys.path.remove(str(bench))
    assert not missing


def test_the_command_list_imports_no_command():
    """`biomass --help` lists the commands from cli.COMMANDS: no command module, no torch, timm or sklearn."""
    code = ("import sys; from typer.testing import CliRunner; from biomass_cache.cli import COMMANDS, app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert all(name in r.output for name in COMMANDS); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'sklearn', 'zarr', 'peft') "
            "or m in {'biomass_cache.cli.' + module for module, _, _ in COMMANDS.values()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_listed_command_resolves_to_its_function():
    import click
    import typer

    from biomass_cache.cli import COMMANDS, app

    group = typer.main.get_command(app)
    ctx = click.Context(group)
    for name, (module, function, text) in COMMANDS.items():
        command = group.get_command(ctx, name)
        assert command.name == name and command.help == text
        assert command.callback.__module__ == f"biomass_cache.cli.{module}" and command.callback.__name__ == function


# The stages, bottom to top: a folder imports only itself and the folders before it (and the package root, for
# __version__); `python -m biomass_cache` (__main__) is the command line too.
LAYERS = ("common", "synth", "backbone", "heads", "store", "extract", "train", "lora", "submit", "report", "export", "cli")


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the package root: the version only
    return len(LAYERS) - 1 if parts[1] == "__main__" else LAYERS.index(parts[1])


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_layer_rule_on_hand_made_graphs():
    assert layer_violations({"biomass_cache.store.x": {"biomass_cache.common.y", "biomass_cache.backbone.z"}}) == []
    assert layer_violations({"biomass_cache.train.x": {"biomass_cache.submit.y"}}) == [
        "biomass_cache.train.x -> biomass_cache.submit.y"]
    assert layer_violations({"biomass_cache": {"biomass_cache.common.y"}}) == ["biomass_cache -> biomass_cache.common.y"]


def test_every_module_sits_in_a_stage_folder_and_imports_only_the_stages_below():
    graph = import_graph()
    loose = [m for m in graph if m.count(".") == 1 and m.split(".")[1] not in (*LAYERS, "__main__")]
    assert not loose, f"modules outside the stage folders: {loose}"
    assert not layer_violations(graph)


def test_only_the_command_line_imports_typer_or_click():
    found = []
    for name, path in module_files().items():
        if name.split(".")[1:2] == ["cli"]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{name}: {n}" for n in names if n.split(".")[0] in ("typer", "click")]
    assert not found
