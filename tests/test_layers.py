"""The package's layers, read from its imports with ``ast``: each folder imports only from the layers below it.

Ground (``sharding``, ``config``) <- ``models`` <- ``adapters`` <- ``merge`` <- ``io``, ``data``, ``tiny``
(the embedded default) <- ``training``, ``evaluation``. A module may import its own folder.
"""

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_merge_jax"
GROUND = {"sharding", "config"}
MATH = {"models", "adapters", "merge"}
ALLOWED = {  # layer -> the layers it may import besides itself
    "ground": set(),
    "models": {"ground"},
    "adapters": {"ground", "models"},
    "merge": {"ground", "models", "adapters"},
    "io": {"ground", "models", "adapters", "merge"},
    "data": {"ground"},
    "tiny": {"ground", "models", "adapters", "io"},
    "training": {"ground", "models", "adapters", "merge", "io", "data", "tiny"},
    "evaluation": {"ground", "models", "adapters", "merge", "io", "data", "tiny"},
    "default_job": {"ground", "models", "adapters", "merge", "io", "data", "tiny", "training", "evaluation"},
    "package": {"ground", "models", "adapters", "merge", "io"},  # __init__.py: the public API
}


def layer_of(module: str) -> str:
    """``lora_merge_jax.models.decoder`` -> ``models``; ``lora_merge_jax.sharding`` -> ``ground``."""
    parts = module.split(".")
    assert parts[0] == "lora_merge_jax", module
    if len(parts) == 1:
        return "package"
    return "ground" if parts[1] in GROUND else parts[1]


def imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Every module of ``package`` -> the package modules it imports, anywhere in the file."""
    out = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_merge_jax"):
                for alias in node.names:  # `from pkg import module` imports the module, else the package
                    candidate = f"{node.module}.{alias.name}"
                    is_module = (package.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                    found.add(candidate if is_module else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("lora_merge_jax"))
        out[name] = found
    return out


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        mine = layer_of(module)
        bad += [f"{module} ({mine}) imports {t} ({layer_of(t)})" for t in sorted(targets)
                if layer_of(t) != mine and layer_of(t) not in ALLOWED[mine]]
    return bad


def test_every_module_imports_only_layers_below_it():
    bad = violations(imports())
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_the_math_never_imports_formats_or_orchestration():
    for module, targets in imports().items():
        if layer_of(module) in MATH:
            assert {layer_of(t) for t in targets} <= {"ground"} | MATH, module


def test_no_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for module, targets in imports().items():
        graph.setdefault(layer_of(module), set()).update(layer_of(t) for t in targets)
    for a, b in itertools.combinations(graph, 2):
        assert not (b in graph[a] and a in graph[b]), f"{a} and {b} import each other"


def test_the_checker_reports_a_violation(tmp_path):
    fake = tmp_path / "lora_merge_jax"
    (fake / "models").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "models" / "bad.py").write_text("def f():\n    from lora_merge_jax.training import loop\n")
    (fake / "training" / "loop.py").write_text("")
    assert violations(imports(fake)) == [
        "lora_merge_jax.models.bad (models) imports lora_merge_jax.training.loop (training)"]
