"""The import graph of lora_cli: no cycles, and imports point downward through the layers (README, Development).

Imports inside functions (kept there to load torch late) count: a lazy import is still a dependency, and a cycle
through one works only until someone hoists it. Imports under TYPE_CHECKING count for the direction (a type names
what a module depends on) but not for cycles: they never run, and a Run naming the type of a field whose methods
take the Run is a cycle of types only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_cli"

# Bottom up; a module may import its own layer and the ones below it. A package's name covers its modules.
LAYERS = [
    ("foundation", {"errors", "fsutil", "safetensors_io", "layout", "quantization", "generate_io"}),
    ("config", {"config", "chat_templates"}),
    ("loading and data", {"data", "lora", "inject", "adapter_config", "adapter", "precision", "model_files",
                          "models"}),
    ("model operations", {"losses", "packing", "memory_model", "generate", "merge", "export"}),
    ("training", {"training", "estimate"}),
    ("lora-train", {"train"}),
    ("commands", {"api", "cli", "__main__", ""}),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _nodes(tree: ast.AST, typing: bool):
    """Every node of `tree`; without what is under `if TYPE_CHECKING:` unless `typing`."""
    for node in ast.iter_child_nodes(tree):
        if not typing and isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            yield from (n for child in node.orelse for n in [child, *_nodes(child, typing)])
            continue
        yield node
        yield from _nodes(node, typing)


def imports(module: str, typing: bool = True) -> set[str]:
    """The lora_cli modules `module` imports (a from-import of a module's name counts as that module); those under
    TYPE_CHECKING only if `typing`."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8")), typing):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports(module) for module in MODULES}
RUNTIME_GRAPH = {module: imports(module, typing=False) for module in MODULES}


def layer(module: str) -> int:
    top = module.removeprefix("lora_cli").removeprefix(".").split(".")[0]
    return next(i for i, (_, names) in enumerate(LAYERS) if top in names)


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if not any(m.removeprefix("lora_cli").removeprefix(".").split(".")[0] in names
                                             for _, names in LAYERS)]
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def test_imports_point_downward():
    upward = [f"{m} ({LAYERS[layer(m)][0]}) imports {d} ({LAYERS[layer(d)][0]})"
              for m, deps in sorted(GRAPH.items()) for d in sorted(deps) if layer(d) > layer(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    """Depth-first search for a back edge among the imports that run; the cycle found is shown whole."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(RUNTIME_GRAPH[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(RUNTIME_GRAPH):
        if module not in state and (cycle := visit(module, [module])):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_readme_layout_names_every_module_and_no_other():
    """README's Layout section (Development) lists each module by file name; a new module, or a renamed or removed
    one, shows here instead of leaving the map stale."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("Layout (data flows"):]
    section = "\n\n".join(section.split("\n\n")[:2])  # the opening sentence and the list
    named = set(re.findall(r"`([\w/]+\.py)`", section))
    files = {p.name for p in PACKAGE.rglob("*.py")}
    missing = sorted(f"{p.relative_to(PACKAGE.parent)}" for p in PACKAGE.rglob("*.py") if f"`{p.name}`" not in section
                     and p.name != "__init__.py")
    tests = {p.name for p in (PACKAGE.parent / "tests").glob("*.py")}
    stale = sorted(name for name in named if name.rpartition("/")[2] not in files | tests)
    assert not missing, f"README's Layout section does not name: {missing}"
    assert not stale, f"README's Layout section names files that do not exist: {stale}"
