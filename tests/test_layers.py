"""The import graph of lora_cli: no cycles, and imports point downward through the layers (README, Development).

Every import counts, the ones inside functions (kept there to load torch late) and under TYPE_CHECKING too: a lazy
import is still a dependency, and a cycle through one works only until someone hoists it.
"""

from __future__ import annotations

import ast
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


def imports(module: str) -> set[str]:
    """The lora_cli modules `module` imports (a from-import of a module's name counts as that module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports(module) for module in MODULES}


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
    """Depth-first search for a back edge; the cycle found is shown whole."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (cycle := visit(module, [module])):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
