"""The package has no import cycles (issue 11): every ``import`` of a package module, at
module level or inside a function (a lazy import is still an edge), except those under
``if TYPE_CHECKING:``, read from the source with ``ast`` (no import runs, so the
check does not depend on which module a test process happened to import first)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "statefun_mesh"


def _modules() -> dict[str, tuple[Path, bool]]:
    mods: dict[str, tuple[Path, bool]] = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def _edges(name: str, mods: dict[str, tuple[Path, bool]]) -> set[str]:
    path, is_pkg = mods[name]
    pkg = name if is_pkg else name.rsplit(".", 1)[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    if f"{target}.{alias.name}" in mods:  # `from . import x`: the submodule x
                        out.add(f"{target}.{alias.name}")
                    elif target in mods:
                        out.add(target)
            elif isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name in mods)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    out.discard(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles() -> None:
    mods = _modules()
    assert "statefun_mesh.peer" in mods and "statefun_mesh.snapshot.participant" in mods
    graph = {m: _edges(m, mods) for m in mods}
    assert "statefun_mesh.dispatch" in graph["statefun_mesh.peer"]  # the walk sees imports
    assert _cycles(graph) == [], "import cycles between these modules"


def _protocol_members(cls_name: str) -> set[str]:
    """The members a protocol of snapshot/host.py declares, with those of its bases (peer_view.py)."""
    classes = {
        n.name: n
        for path in (PKG / "snapshot" / "host.py", PKG / "peer_view.py")
        for n in ast.parse(path.read_text(encoding="utf-8")).body
        if isinstance(n, ast.ClassDef)
    }
    cls = classes[cls_name]
    members = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            members |= _protocol_members(base.id)
    return members


def _host_uses(path: Path, names: set[str]) -> tuple[set[str], list[str]]:
    """Attributes read of the peer handle (``self.<name>`` or a local bound to it) and
    every assignment to one of its attributes."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    locals_: set[str] = set()
    for node in ast.walk(tree):  # `peer = self.host` and the like
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr in names
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            locals_.update(t.id for t in node.targets if isinstance(t, ast.Name))

    def is_handle(node: ast.expr) -> bool:
        if isinstance(node, ast.Name):
            return node.id in locals_
        return (
            isinstance(node, ast.Attribute)
            and node.attr in names
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        )

    used: set[str] = set()
    writes: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_handle(node.value):
            used.add(node.attr)
            if isinstance(node.ctx, ast.Store):
                writes.append(f"{path.name}:{node.lineno} {node.attr}")
    return used, writes


def test_the_snapshot_code_reaches_the_peer_only_through_its_protocols() -> None:
    snap = PKG / "snapshot"
    used, writes = _host_uses(snap / "participant.py", {"host", "peer"})
    assert used and used <= _protocol_members("CheckpointHost"), used - _protocol_members("CheckpointHost")
    assert not writes, writes
    used, writes = _host_uses(snap / "coordinator.py", {"peer"})
    assert used and used <= _protocol_members("RecoveryHost"), used - _protocol_members("RecoveryHost")
    assert not writes, writes
