"""The core imports one way: quantization -> surgery -> format -> runtime -> training -> cli,
with no cycle between modules and nothing above torch and numpy (issue 17). Every import counts,
also those inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LAYERS = ("quantization", "surgery", "format", "runtime", "training", "cli")
# The file format reads and writes bytes; what a model is, it never needs to know.
FORBIDDEN = {("format", "surgery")}
THIRD_PARTY_OK = {"torch", "numpy", "safetensors", "constriction", "tqdm"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph(package: str) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_lower_layers_never_import_higher_ones():
    upward = []
    for module, imported in _graph("compressor").items():
        here = _layer(module)
        if module == "compressor":
            continue  # the facade re-exports every layer
        for target in imported:
            there = _layer(target)
            if target == "compressor" or (here is not None and there is not None and there > here):
                upward.append(f"{module} -> {target}")
            elif (
                here is not None
                and there is not None
                and (LAYERS[here], LAYERS[there]) in FORBIDDEN
            ):
                upward.append(f"{module} -> {target} (forbidden)")
            elif here is not None and there is None:
                upward.append(f"{module} -> {target} (outside the layers)")
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(upward))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle_in_the_core_or_the_plugins():
    graph = {}
    for package in ("compressor", "onmt_plugin", "vision_plugin", "recipes"):
        graph.update(_graph(package))
    # A package's __init__ importing its own modules is how a facade works; a module that
    # imports its package's facade back closes a cycle.
    cycles = [c for c in _cycles(graph) if not (len(c) == 2 and c[0] == c[1])]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_core_depends_on_torch_and_numpy_only():
    outside = set()
    stdlib = set(sys.stdlib_module_names)
    for path in (ROOT / "compressor").rglob("*.py"):
        for module in _imports(path):
            top = module.split(".")[0]
            if top not in stdlib and top not in THIRD_PARTY_OK and top != "compressor":
                outside.add(f"{_module_name(path)} -> {module}")
    assert not outside, sorted(outside)


def test_each_layer_imports_alone_in_a_fresh_interpreter():
    for layer in LAYERS:
        done = subprocess.run(
            [sys.executable, "-c", f"import compressor.{layer}.__init__; import compressor"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
