"""Import layering: the plumbing (`cai.core`) and the backends never reach up into the stages,
and no modules of `cai` import each other in a loop.

Every import counts, wherever it stands: at the top, inside a function (a lazy import is
still a dependency) or under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAI = ROOT / "cai"


def module_name(path: Path) -> str:
    parts = path.resolve().relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def cai_imports(path: Path) -> set[str]:
    """Every `cai` module a file imports, anywhere in it (`from cai.x import y` gives
    `cai.x.y` when that is a module, else `cai.x`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "cai"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module.split(".")[0] == "cai"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                as_path = CAI.parent / sub.replace(".", "/")
                found.add(sub if as_path.with_suffix(".py").exists() or as_path.is_dir()
                          else node.module)
    return found


def graph(folders: list[str]) -> dict[str, set[str]]:
    files = [f for d in folders for f in sorted((CAI / d).rglob("*.py"))]
    return {module_name(f): cai_imports(f) for f in files}


def test_core_imports_only_core() -> None:
    bad = {(m, i) for m, imps in graph(["core"]).items() for i in imps
           if i != "cai" and not i.startswith("cai.core")}
    assert not bad, f"cai.core reaches up: {sorted(bad)}"


def test_backends_import_only_backends_and_core() -> None:
    bad = {(m, i) for m, imps in graph(["backends"]).items() for i in imps
           if not i.startswith(("cai.core", "cai.backends"))}
    assert not bad, f"cai.backends reaches up: {sorted(bad)}"


def test_seeds_come_from_core() -> None:
    """Whatever samples takes its seeds from `cai.core.seeds`, not from the constitution."""
    users = [p for p in CAI.rglob("*.py") if "derive_seed(" in p.read_text(encoding="utf-8")
             and p != CAI / "core" / "seeds.py"]
    assert len(users) >= 4  # the backends, SL, the judge, PPO, ...
    via_constitution = [str(p.relative_to(ROOT)) for p in users if any(
        isinstance(n, ast.ImportFrom) and n.module == "cai.constitution"
        and "derive_seed" in {a.name for a in n.names}
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))))]
    assert not via_constitution


def test_no_import_cycle_in_cai() -> None:
    g = graph(["."])
    assert "cai.core.models" in g and "cai.backends" in g and len(g) > 40
    done: set[str] = set()

    def visit(m: str, stack: list[str]) -> None:
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done or m not in g:
            return
        for i in sorted(g[m]):
            visit(i, stack + [m])
        done.add(m)

    for m in sorted(g):
        visit(m, [])
