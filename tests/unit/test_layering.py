"""The layering of ``src/ferry``, read from the imports themselves (parsed with ``ast``).

DESIGN.md: nothing imports from a layer above it; no import cycles between
packages, ``TYPE_CHECKING`` ones included. Every import statement counts,
wherever it is: at the top, under ``if TYPE_CHECKING:``, or inside a function
(the CLI imports lazily to start fast, which changes when, not what, it uses).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "ferry"

# From bottom to top: a package may import from its own layer and those below.
# The order follows DESIGN.md, corrected where today's imports show a real
# dependency that its table does not order.
LAYERS: tuple[str, ...] = (
    "ferry",  # the package root (__init__: __version__ only)
    "errors",
    "util",
    "domain",
    "hypervisor",
    "config",
    "network",
    "storage",
    "pki",
    "cluster",  # in DESIGN.md, not written yet
    "host",  # the domain table, launcher and watcher (below migration, which drives them)
    "migration",
    # stream and guest sit below the daemon although DESIGN.md's table lists
    # them after cli: guest.image puts stream's media server into the image,
    # and ferryd (daemon.main) boots domains from the guest image cache.
    "stream",
    "guest",
    "daemon",
    "client",  # the control-API client and progress view: what cli and lab share
    "dashboard",  # the web page of the cluster (ferry dashboard; ferry demo --dashboard)
    "lab",
    "cli",  # the top: `ferry lab` and `ferry demo` are commands of the CLI
)

# Imports that break the layering today and that another change is removing,
# as (importing package, imported package). Remove an entry with the import;
# the test fails on an entry that no longer occurs. Never an entry about cli
# or lab: those two are settled.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, "ferry.lab.demo"
    line: int
    target: str  # what it names, "ferry.client.daemon_client.DaemonClient"

    @property
    def where(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def unit_of(dotted: str) -> str | None:
    """The layer unit of a ferry module: its top package under ferry, or the root."""
    parts = dotted.split(".")
    if parts[0] != "ferry":
        return None
    return parts[1] if len(parts) > 1 else "ferry"


def module_name(path: Path) -> tuple[str, bool]:
    """The dotted name of a source file under SRC, and whether it is a package."""
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def imports_in(source: str, module: str, is_package: bool = False) -> Iterator[Import]:
    """Every import statement of ``source``, anywhere in it, with relative ones resolved."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                if not is_package:
                    package.pop()
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            for alias in node.names:
                # `from ferry import lab` names a package; `from ferry.x import Y`
                # is in ferry.x either way, so base.name is always in the right unit.
                yield Import(
                    module, node.lineno, base if alias.name == "*" else f"{base}.{alias.name}"
                )


def all_imports() -> list[Import]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        module, is_package = module_name(path)
        found += imports_in(path.read_text(), module, is_package)
    return found


def package_edges(imports: list[Import]) -> dict[tuple[str, str], list[Import]]:
    """(importing unit, imported unit) -> the imports that make that edge."""
    edges: dict[tuple[str, str], list[Import]] = {}
    for imp in imports:
        source, target = unit_of(imp.module), unit_of(imp.target)
        if source is not None and target is not None and source != target:
            edges.setdefault((source, target), []).append(imp)
    return edges


def find_cycle(edges: set[tuple[str, str]]) -> list[str] | None:
    """One cycle of the graph (as a path that returns to its start), or None."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for nxt in graph.get(node, []):
            cycle = visit(nxt)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


@pytest.fixture(scope="module")
def edges() -> dict[tuple[str, str], list[Import]]:
    return package_edges(all_imports())


def test_every_package_has_a_layer() -> None:
    units = {unit_of(module_name(p)[0]) for p in SRC.rglob("*.py")}
    missing = sorted(u for u in units if u not in LAYERS)
    assert not missing, f"add these to LAYERS, at their place: {missing}"


def test_no_package_imports_from_a_layer_above(
    edges: dict[tuple[str, str], list[Import]],
) -> None:
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [
        f"{imp.where}: {a} may not import {b}, a layer above it"
        for (a, b), imps in sorted(edges.items())
        if a in rank and b in rank and rank[b] > rank[a] and (a, b) not in KNOWN_VIOLATIONS
        for imp in imps
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles_between_packages(edges: dict[tuple[str, str], list[Import]]) -> None:
    cycle = find_cycle(set(edges) - KNOWN_VIOLATIONS)
    assert cycle is None, " -> ".join(cycle or [])


def test_lab_does_not_import_cli(edges: dict[tuple[str, str], list[Import]]) -> None:
    assert ("lab", "cli") not in edges, [imp.where for imp in edges[("lab", "cli")]]


def test_known_violations_are_not_about_cli_or_lab() -> None:
    settled = {"cli", "lab"}
    assert not [edge for edge in KNOWN_VIOLATIONS if settled & set(edge)]


def test_known_violations_still_occur(edges: dict[tuple[str, str], list[Import]]) -> None:
    gone = sorted(KNOWN_VIOLATIONS - set(edges))
    assert not gone, f"fixed, remove from KNOWN_VIOLATIONS: {gone}"


# -- the reader itself ---------------------------------------------------------------

SAMPLE = """\
from __future__ import annotations
import os
from typing import TYPE_CHECKING
from ferry import errors
from ferry.lab.lab import Lab
from . import sibling
from ..util import wait

if TYPE_CHECKING:
    from ferry.cli.main import build_parser

def later():
    import ferry.stream.player
"""


def test_the_reader_sees_every_kind_of_import() -> None:
    units = {
        (imp.line, unit_of(imp.target))
        for imp in imports_in(SAMPLE, "ferry.daemon.api")
        if unit_of(imp.target)
    }
    assert units == {
        (4, "errors"),
        (5, "lab"),
        (6, "daemon"),
        (7, "util"),
        (10, "cli"),
        (13, "stream"),
    }


def test_relative_imports_of_a_package_resolve_from_the_package_itself() -> None:
    targets = [imp.target for imp in imports_in("from . import x\n", "ferry.lab", True)]
    assert targets == ["ferry.lab.x"]


def test_a_cycle_is_found_and_shown() -> None:
    assert find_cycle({("a", "b"), ("b", "c"), ("c", "a")}) == ["a", "b", "c", "a"]
    assert find_cycle({("a", "b"), ("b", "c")}) is None
