"""The package's layout rules, read from the source with ``ast`` (nothing is imported).

* no import cycles among the package's modules;
* dependencies point one way (see the code map in the README): models import no formats,
  pipeline, training, toy or cli; formats no pipeline or training; the pipeline no training;
  nothing but scripts imports the command-line modules;
* no function-local import of the package's own modules (they would hide a cycle);
* nothing in the package assigns attributes of library classes or modules (no process-wide patches).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ldm", "autoencoder")
LIBRARIES = {"torch", "transformers", "diffusers", "open_clip", "accelerate", "peft", "safetensors", "datasets",
             "numpy", "PIL", "yaml", "huggingface_hub", "tqdm"}

# room -> rooms it must never import ("pipeline" is ldm/pipeline.py, "top" the other top-level modules)
FORBIDDEN = {
    "models": {"formats", "sampling", "training", "toy", "cli", "pipeline"},
    "sampling": {"models", "formats", "training", "toy", "cli", "pipeline"},
    "formats": {"training", "toy", "cli", "pipeline"},
    "pipeline": {"training", "toy", "cli"},
    "training": {"cli"},
    "toy": {"cli", "training"},
    "autoencoder": {"models", "sampling", "formats", "training", "toy", "cli", "pipeline"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """``ldm.models.unet`` -> ``models``; ``ldm.pipeline`` -> ``pipeline``; ``autoencoder.*`` -> ``autoencoder``."""
    parts = module.split(".")
    if parts[0] == "autoencoder":
        return "autoencoder"
    if len(parts) == 1:
        return "top"
    if parts[1] == "pipeline":
        return "pipeline"
    return parts[1] if (ROOT / "ldm" / parts[1]).is_dir() else "top"


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported package module, line, at module level)`` for every import of the package's modules,
    skipping ``if TYPE_CHECKING:`` blocks (annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            nested = top_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [f"{child.module}.{alias.name}" for alias in child.names] + [child.module]
            else:
                visit(child, nested)
                continue
            for name in names:
                # "from ldm.formats import checkpoints" imports the module ldm.formats.checkpoints
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name and name.split(".")[0] in PACKAGES:
                    found.append((name, child.lineno, top_level))
                    break

    visit(tree, True)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = package_modules()
    return {name: imports_of(path, set(modules)) for name, path in modules.items()}


def test_there_are_no_import_cycles(graph):
    edges = {m: {target for target, _, _ in found if target != m and not m.startswith(target + ".")}
             for m, found in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module)


def test_dependencies_point_one_way(graph):
    wrong = [f"{m}:{line} imports {target}" for m, found in graph.items() for target, line, _ in found
             if room(target) in FORBIDDEN.get(room(m), set())]
    assert not wrong, "\n".join(wrong)


def test_no_function_local_imports_of_the_package(graph):
    # Two deliberate exceptions, for start-up time, not cycles: ldm/__init__.py loads the pipeline on
    # first attribute access (`import ldm` stays cheap), and the commands in ldm/cli import the
    # networks only after their arguments parsed (--help and usage errors answer at once).
    local = [f"{m}:{line} imports {target} inside a function" for m, found in graph.items()
             for target, line, top in found if not top and m != "ldm" and room(m) != "cli"]
    assert not local, "\n".join(local)


def test_nothing_patches_library_classes_or_modules():
    patches = []
    for module, path in package_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        library_names = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
                         if isinstance(node, (ast.Import, ast.ImportFrom))
                         for alias in node.names
                         if (getattr(node, "module", None) or alias.name).split(".")[0] in LIBRARIES}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("setattr", "delattr") and node.args:
                targets = [ast.Attribute(value=node.args[0], attr="?")]
            for target in targets:
                root = target
                while isinstance(root, ast.Attribute):
                    root = root.value
                if target is not root and isinstance(root, ast.Name) and root.id in library_names:
                    patches.append(f"{module}:{node.lineno}: {ast.unparse(target)}")
    assert not patches, "\n".join(patches)


def test_the_rules_see_the_imports():
    """Guard against a checker that finds nothing: the pipeline's known imports are seen."""
    modules = package_modules()
    found = {target for target, _, _ in imports_of(modules["ldm.pipeline"], set(modules))}
    assert {"ldm.formats.checkpoints", "ldm.models.builder", "ldm.sampling.samplers", "ldm.config"} <= found
