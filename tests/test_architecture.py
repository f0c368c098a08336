"""The package's shape, as docs/architecture.md draws it: imports flow one way, from the command line down to data
and config, with no cycle, not even one hidden in an import inside a function."""

import ast
import sys
from pathlib import Path

import rlhf_kit

PACKAGE = Path(rlhf_kit.__file__).parent

# Layers, top to bottom: a module may import from its own layer's package or any layer below, never above.
LAYERS = [
    {"rlhf_kit.cli", "rlhf_kit.pipeline", "rlhf_kit.plan"},
    {"rlhf_kit.inference", "rlhf_kit.training", "rlhf_kit.publish"},
    {"rlhf_kit.rewards", "rlhf_kit.tools", "rlhf_kit.vllm_engine"},
    {"rlhf_kit.model", "rlhf_kit.runs", "rlhf_kit.data"},
    {"rlhf_kit.checkpoints", "rlhf_kit.config", "rlhf_kit.resources", "rlhf_kit.stages"},
    {"rlhf_kit.errors", "rlhf_kit.hub_kernels"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every rlhf_kit module `path` imports, at the top or inside a function, relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return {name for name in found if name == "rlhf_kit" or name.startswith("rlhf_kit.")}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def layer(module: str) -> int:
    if module == "rlhf_kit":  # the package itself: it only installs the import guard of hub_kernels
        return 0
    for i, owners in enumerate(LAYERS):
        if any(module == owner or module.startswith(owner + ".") for owner in owners):
            return i
    raise AssertionError(f"{module} is in no layer of the architecture: add it to LAYERS and docs/architecture.md")


def group(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_imports_flow_down_the_layers():
    """Down only; across one layer only at the top (the CLI runs the pipeline and the plan): training, inference
    and publishing meet only in what lies below them."""
    upward = [f"{a} imports {b}" for a, targets in sorted(import_graph().items()) for b in sorted(targets)
              if group(a) != group(b) and group(b) != "rlhf_kit.tasks"
              and (layer(b) < layer(a) or (layer(b) == layer(a) and layer(a) > 0))]
    assert not upward, "imports against the layering of docs/architecture.md:\n" + "\n".join(upward)


def test_the_shipped_task_is_named_by_configs_never_imported():
    """The review task is the demo, not the library: evaluation, pipeline and CLI reach it only by its name."""
    graph = import_graph()
    importers = [a for a, targets in graph.items() if any(group(t) == "rlhf_kit.tasks" for t in targets)
                 and group(a) != "rlhf_kit.tasks"]
    assert importers == []
    assert all(group(t) == "rlhf_kit.tasks" for a in graph if group(a) == "rlhf_kit.tasks" for t in graph[a])


def test_a_cycle_is_caught(tmp_path, monkeypatch):
    """The checker itself: two modules importing each other inside functions are reported."""
    fake = tmp_path / "rlhf_kit"
    (fake / "publish").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "publish" / "__init__.py").write_text("")
    (fake / "publish" / "a.py").write_text("def f():\n    from .b import g\n")
    (fake / "publish" / "b.py").write_text("def g():\n    from rlhf_kit.publish import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    try:
        test_the_import_graph_has_no_cycle()
    except AssertionError as error:
        assert "rlhf_kit.publish.a -> rlhf_kit.publish.b -> rlhf_kit.publish.a" in str(error)
    else:
        raise AssertionError("the cycle a -> b -> a was not reported")


def test_every_recipe_imports_rlhf_kit_before_the_hugging_face_stack():
    """transformers imports bitsandbytes, which fetches a Hub kernel at import unless rlhf_kit's guard is installed
    first (rlhf_kit/hub_kernels.py): in every recipe, no transformers/trl/peft/accelerate/datasets import comes
    before the first rlhf_kit import."""
    stack = {"transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"}
    late = []
    for recipe in sorted((PACKAGE.parent / "recipes").glob("*.py")):
        for node in ast.parse(recipe.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            roots = {name.split(".")[0] for name in names}
            if "rlhf_kit" in roots:
                break
            if roots & stack:
                late.append(f"{recipe.name}: {sorted(roots & stack)} before rlhf_kit")
                break
    assert late == []
