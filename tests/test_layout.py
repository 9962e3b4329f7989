"""The package layout: imports run one way, from stage to stage, without cycles.

Every module is parsed (not imported) with :mod:`ast`; each ``import`` / ``from ... import``
becomes an edge to the package module it names — at module level, inside functions and
under ``if TYPE_CHECKING:`` alike (type-checking-only imports are kept out of the cycle
check only, since they never run).
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "fxbackmatch"
PKG = "fxbackmatch"

#: stages that run before a plan exists: they never import what applies or shows it
LOWER = ("capture", "analysis", "runtime")
UPPER = ("apply", "report", "train", "cli", "integrations")

MAX_LINES = 500
MAX_PLAN_LINES = 300


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path):
    """(target module, imported names, line, type-checking only) for every package import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for sub in node.body:
                typing_only.update(id(n) for n in ast.walk(sub))
    for node in ast.walk(tree):
        tc = id(node) in typing_only
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    yield alias.name, [], node.lineno, tc
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not (mod == PKG or mod.startswith(PKG + ".")):
                continue
            names = [a.name for a in node.names]
            # ``from pkg import submodule`` names a module
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
            yield mod, [n for n in names if f"{mod}.{n}" not in MODULES], node.lineno, tc
            for s in subs:
                yield s, [], node.lineno, tc


def _resolve(mod: str) -> str:
    """The package module an import target lives in."""
    while mod not in MODULES and "." in mod:
        mod = mod.rpartition(".")[0]
    return mod


def _stage(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


EDGES = [(name, _resolve(target), names, line, tc)
         for name, path in MODULES.items() for target, names, line, tc in _imports(name, path)]


def test_modules_found():
    assert {"fxbackmatch.plan", "fxbackmatch.api", "fxbackmatch.capture.graph", "fxbackmatch.analysis.walk",
            "fxbackmatch.runtime.chain", "fxbackmatch.apply.optim"} <= set(MODULES)


def test_lower_stages_never_import_upper_ones():
    bad = [f"{src}:{line} imports {dst}" for src, dst, _, line, _ in EDGES
           if _stage(src) in LOWER and _stage(dst) in UPPER]
    assert not bad, "\n".join(bad)


#: what each stage may import at run time (``TYPE_CHECKING`` imports of the Plan aside):
#: the table of docs/architecture.md
ALLOWED = {
    "capture": {"capture", "errors"},
    "analysis": {"capture", "analysis", "errors"},
    "runtime": {"capture", "analysis", "runtime", "errors"},
    "measure": {"capture", "analysis", "runtime", "measure", "errors"},
    "apply": {"capture", "analysis", "runtime", "measure", "apply", "errors"},
    "report": {"capture", "analysis", "runtime", "measure", "report", "errors"},
}


def test_stages_import_only_the_stages_below():
    bad = [f"{src}:{line} imports {dst}" for src, dst, _, line, tc in EDGES
           if not tc and _stage(src) in ALLOWED and _stage(dst) not in ALLOWED[_stage(src)]]
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = [f"{src}:{line} imports {n} from {dst}" for src, dst, names, line, _ in EDGES
           if dst != src for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    """Over every import that runs — module level and inside functions."""
    g = nx.DiGraph()
    g.add_nodes_from(MODULES)
    g.add_edges_from((src, dst) for src, dst, _, _, tc in EDGES if not tc and src != dst)
    cycles = list(nx.simple_cycles(g))
    assert nx.is_directed_acyclic_graph(g), f"import cycles: {cycles[:5]}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = len(MODULES[name].read_text().splitlines())
    limit = MAX_PLAN_LINES if name == "fxbackmatch.plan" else MAX_LINES
    assert lines <= limit, f"{name} has {lines} lines (limit {limit})"


def test_stage_packages_document_themselves():
    for stage in ("capture", "analysis", "runtime", "apply", "measure", "report", "train", "integrations"):
        doc = ast.get_docstring(ast.parse((ROOT / stage / "__init__.py").read_text()))
        assert doc and len(doc.split()) > 20, stage


def test_architecture_example_runs():
    """docs/architecture.md's worked rule example runs and its checks hold."""
    import re

    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/architecture.md", "exec"), {"__name__": "architecture_example"})
