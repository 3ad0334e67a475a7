"""The package's shape: layers import downward only, modules stay small, every sub-package says its job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "npu_parallel"
LAYERS = ("parallel", "moe", "convert", "checkpoint", "training", "tools")  # lowest first
MAX_LINES = 450


def _modules(package: Path = PACKAGE) -> list[Path]:
    return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


def _dotted(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    """Index of the sub-package ``npu_parallel.<layer>...`` belongs to; None for the top-level facade."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def _imports(path: Path, package_dir: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth (function-level imports too)."""
    here = _dotted(path, package_dir)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from npu_parallel.moe import dispatchers` imports the sub-module too
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names] or [(node.lineno, base)]
    return [(line, name) for line, name in out if name.split(".")[0] == "npu_parallel"]


def upward_imports(package: Path) -> list[str]:
    """Every import in ``package`` from a lower layer into a higher one, as 'file:line (layer) imports x (layer)'."""
    upward = []
    for path in _modules(package):
        mine = _layer(_dotted(path, package))
        if mine is None:
            continue
        for line, target in _imports(path, package):
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                upward.append(
                    f"{path.relative_to(package.parent)}:{line} ({LAYERS[mine]}) imports {target} ({LAYERS[theirs]})"
                )
    return upward


def test_layers_import_downward_only():
    upward = upward_imports(PACKAGE)
    assert not upward, "a lower layer imports a higher one (order: " + " < ".join(LAYERS) + "):\n" + "\n".join(upward)


def test_the_import_check_sees_upward_imports(tmp_path):
    """The checker itself, on a made-up tree: relative, absolute and function-level imports, both directions."""
    root = tmp_path / "npu_parallel"
    for layer in ("parallel", "moe", "training"):
        (root / layer).mkdir(parents=True)
        (root / layer / "__init__.py").write_text("")
    (root / "parallel" / "bad.py").write_text("def f():\n    from ..training import loop\n")
    (root / "moe" / "bad.py").write_text("import npu_parallel.training.loop\n")
    (root / "training" / "good.py").write_text("from npu_parallel.parallel import state\nfrom .. import moe\n")
    assert upward_imports(root) == [
        "npu_parallel/moe/bad.py:1 (moe) imports npu_parallel.training.loop (training)",
        "npu_parallel/parallel/bad.py:2 (parallel) imports npu_parallel.training.loop (training)",
    ]


def import_cycles(package: Path) -> list[list[str]]:
    """Every import cycle between modules of one sub-package (function-level imports count: they hide a circle,
    they do not remove it), each as the modules around it."""
    modules = {_dotted(p, package): p for p in _modules(package)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {t if t in modules else t.rpartition(".")[0] for _, t in _imports(path, package)}
        graph[name] = {t for t in targets if t in modules and t != name and _layer(t) == _layer(name) is not None}
    cycles, done = [], set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            cycle = trail[trail.index(node) :]
            if frozenset(cycle) not in done:
                done.add(frozenset(cycle))
                cycles.append(cycle + [node])
            return
        for nxt in sorted(graph[node]):
            visit(nxt, trail + [node])

    for start in sorted(graph):
        visit(start, [])
    return cycles


def test_no_import_cycle_inside_a_sub_package():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_hidden_cycles(tmp_path):
    root = tmp_path / "npu_parallel"
    (root / "convert" / "plans").mkdir(parents=True)
    (root / "convert" / "__init__.py").write_text("")
    (root / "convert" / "plan.py").write_text("def f():\n    from npu_parallel.convert.plans import PLANS\n")
    (root / "convert" / "plans" / "__init__.py").write_text("from npu_parallel.convert.plan import Plan\n")
    (root / "convert" / "other.py").write_text("from npu_parallel.convert import plan\n")
    plan, plans = "npu_parallel.convert.plan", "npu_parallel.convert.plans"
    assert import_cycles(root) == [[plan, plans, plan]]


def test_no_module_over_the_size_limit():
    big = {
        str(p.relative_to(PACKAGE.parent)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"


@pytest.mark.parametrize("layer", LAYERS)
def test_each_sub_package_says_its_job(layer):
    doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 25, f"npu_parallel/{layer}/__init__.py needs a paragraph saying its job"
