"""The import structure: the library below the apps, no circle, no import running up a floor.

Read from the source (every ``import`` and ``from ... import``, also inside functions), so a lazy
import counts as much as a top-level one.
"""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APPS = ("simulations", "strategies", "benchmarks", "tests")
# what each library package may import from the others (below it); anything else runs up a floor
BELOW = {
    "data": set(),
    "models": set(),
    "evaluation": {"data", "models"},
    "distributed": set(),
    "privacy": {"data", "distributed"},
    "training": {"data", "models", "privacy", "distributed"},
    "attacks": {"data", "models", "privacy", "evaluation", "training"},  # reference models train as a site does
    "reporting": {"data", "privacy", "evaluation", "attacks"},
    "privatize": {"data", "models", "privacy", "reporting"},
}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _library_modules():
    for path in sorted((ROOT / "fedclip").rglob("*.py")):
        yield ".".join(path.relative_to(ROOT).with_suffix("").parts), path


def test_the_library_never_imports_the_apps():
    wrong = {m: sorted(i for i in _imports(p) if i.split(".")[0] in APPS) for m, p in _library_modules()}
    assert not {m: i for m, i in wrong.items() if i}


def test_no_library_package_imports_one_above_it():
    up = defaultdict(list)
    for module, path in _library_modules():
        parts = module.split(".")
        if len(parts) < 3 or parts[1] not in BELOW:
            continue
        for name in _imports(path):
            target = name.split(".")
            if (
                target[0] == "fedclip"
                and len(target) > 1
                and target[1] in BELOW
                and target[1] != parts[1]
                and target[1] not in BELOW[parts[1]]
            ):
                up[module].append(name)
    assert not up, dict(up)


def test_no_import_circle_between_modules():
    modules = {m: p for m, p in _library_modules()}
    for app in ("simulations", "strategies"):
        modules |= {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in (ROOT / app).rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    seen, stack, circles = set(), [], []

    def visit(m):
        if m in stack:
            circles.append(stack[stack.index(m) :] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in graph[m]:
            visit(n)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not circles
