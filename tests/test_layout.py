"""The layout rule of the README's design section, read from the code with `ast`.

Rooms, bottom to top: input_pipeline, the loose utilities of mmssl_jax, models, objectives,
parallel, training, evaluation, export, then the entry points (mmssl_jax/__init__, main).
A module imports only from its own room or rooms below it, and no modules import each other
in a circle. Imports inside functions count: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("input_pipeline", "mmssl_jax")

# Room order, bottom first. A module's room is the longest prefix listed here.
ROOMS = (
    ("input_pipeline",),
    (
        "mmssl_jax.config_utils",
        "mmssl_jax.checksums",
        "mmssl_jax.pytree",
    ),  # loose, serve every room
    ("mmssl_jax.models",),
    ("mmssl_jax.objectives",),
    ("mmssl_jax.parallel",),
    ("mmssl_jax.training",),
    ("mmssl_jax.evaluation",),
    ("mmssl_jax.export",),
    ("mmssl_jax", "mmssl_jax.main"),  # the public API and the entry point
)
# Loose modules allowed directly in mmssl_jax/ (everything else lives in a room).
LOOSE = {"__init__", "main", "config_utils", "checksums", "pytree"}


@dataclass(frozen=True)
class Arrow:
    source: str
    target: str
    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.source} -> {self.target}"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the two packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def arrows(known: dict[str, Path]) -> list[Arrow]:
    """Every import between the packages' modules (module-level and inside functions)."""
    out = []
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:  # `from P import m` imports module P.m when it is one
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in known else base)
            for target in targets:
                resolved = _resolve(target, known)
                if resolved and resolved != name:
                    out.append(Arrow(name, resolved, path, node.lineno))
    return out


def room_of(name: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(ROOMS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"module {name} is in no room; add it to ROOMS"
    return rank


def upward(all_arrows: list[Arrow]) -> list[Arrow]:
    return [a for a in all_arrows if room_of(a.target) > room_of(a.source)]


def cycles(all_arrows: list[Arrow]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a in all_arrows:
        graph.setdefault(a.source, set()).add(a.target)
        graph.setdefault(a.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def summary() -> str:
    known = modules()
    all_arrows = arrows(known)
    loose = sorted(p.stem for p in (ROOT / "mmssl_jax").glob("*.py"))
    return (
        f"{len(known)} modules, {len(all_arrows)} imports between them, "
        f"{len(cycles(all_arrows))} cycles, {len(upward(all_arrows))} upward imports, "
        f"loose in mmssl_jax/: {', '.join(loose)}"
    )


def test_no_upward_import():
    bad = upward(arrows(modules()))
    assert not bad, "imports against the room order:\n" + "\n".join(map(str, bad))


def test_no_import_cycle():
    all_arrows = arrows(modules())
    found = cycles(all_arrows)
    lines = []
    for component in found:
        members = set(component)
        lines.append("cycle: " + " <-> ".join(component))
        lines += [f"  {a}" for a in all_arrows if a.source in members and a.target in members]
    assert not found, "\n".join(lines)


def test_few_loose_modules():
    loose = {p.stem for p in (ROOT / "mmssl_jax").glob("*.py")}
    assert loose <= LOOSE, f"modules loose in mmssl_jax/ that belong in a room: {loose - LOOSE}"


def test_input_pipeline_imports_no_mmssl_jax():
    bad = [
        a
        for a in arrows(modules())
        if a.source.startswith("input_pipeline") and a.target.startswith("mmssl_jax")
    ]
    assert not bad, "\n".join(map(str, bad))


def test_the_checker_sees_what_it_must(tmp_path):
    """The rule catches a lazy upward import and a two-module circle (not a test that
    cannot fail)."""
    made = [
        Arrow("mmssl_jax.models.vit", "mmssl_jax.training.trainer", tmp_path, 3),
        Arrow("mmssl_jax.training.a", "mmssl_jax.training.b", tmp_path, 1),
        Arrow("mmssl_jax.training.b", "mmssl_jax.training.a", tmp_path, 2),
    ]
    assert upward(made) == made[:1]
    assert cycles(made) == [["mmssl_jax.training.a", "mmssl_jax.training.b"]]


if __name__ == "__main__":
    print(summary())
