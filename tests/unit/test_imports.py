"""Import direction (DESIGN.md, "Import direction"): each package, imported in a fresh interpreter
with every one of its modules, loads only what its role may use.

    launch  -> learner, actors, buffer          (the composition root; the only one that imports Ray)
    learner -> agents
    actors  -> agents
    agents  -> (no role)
    buffer  -> (no role, no torch: numpy and msgpack only)
    every package -> choreo.vocabulary, which imports nothing of choreo's

Modules are discovered with pkgutil.walk_packages, so a new module is covered without editing this
file; a failure names the package, the forbidden module and the chain of modules that imported it.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ALLOWED: dict[str, tuple[str, ...]] = {
    # package: the choreo packages it may load (itself included); anything else under choreo. is forbidden
    "choreo.vocabulary": ("choreo", "choreo.vocabulary"),
    "choreo.agents": ("choreo", "choreo.vocabulary", "choreo.agents"),
    "choreo.actors": ("choreo", "choreo.vocabulary", "choreo.agents", "choreo.actors"),
    "choreo.learner": ("choreo", "choreo.vocabulary", "choreo.agents", "choreo.learner"),
    "choreo.buffer": ("choreo", "choreo.vocabulary", "choreo.buffer"),
}
FORBIDDEN_THIRD_PARTY: dict[str, tuple[str, ...]] = {
    # package: third-party top-level modules it must not load
    "choreo.vocabulary": ("ray",),
    "choreo.agents": ("ray",),
    "choreo.actors": ("ray",),
    "choreo.learner": ("ray",),
    "choreo.buffer": ("ray", "torch"),
}
UNCHECKED = ("choreo", "choreo.launch")
"""The root (no code) and the composition root, which may import everything."""

# Run in a fresh interpreter: import the package and every module under it, and print the sorted
# sys.modules plus, for each choreo/ray/torch module, the chain of modules that were executing when
# it was first imported (innermost first), recorded by a finder that only observes.
PROBE = r"""
import importlib, json, pkgutil, sys

WATCH = ("choreo", "ray", "torch")
importers = {}

class Observer:
    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname.split(".")[0] in WATCH and fullname not in importers:
            chain, frame = [], sys._getframe(1)
            while frame is not None:
                name = frame.f_globals.get("__name__", "?")
                if not name.startswith(("importlib", "_frozen_importlib", "pkgutil")):
                    where = f"{name}:{frame.f_lineno}"
                    if not chain or chain[-1].split(":")[0] != name:
                        chain.append(where)
                frame = frame.f_back
            importers[fullname] = chain
        return None  # let the real finders find it

sys.meta_path.insert(0, Observer)
package = sys.argv[1]
root = importlib.import_module(package)
names = [package]
if hasattr(root, "__path__"):
    def fail(name):
        raise ImportError(f"cannot import {name} while walking {package}")
    names += [m.name for m in pkgutil.walk_packages(root.__path__, package + ".", onerror=fail)]
for name in names:
    importlib.import_module(name)
print(json.dumps({"checked": names, "modules": sorted(sys.modules), "importers": importers}))
"""


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(package: str, modules: list[str]) -> list[str]:
    """The modules in `modules` (sys.modules after importing `package`) that its rules forbid."""
    bad = []
    for module in modules:
        if module.split(".")[0] == "choreo":
            if module != "choreo" and not any(_under(module, ok) for ok in ALLOWED[package] if ok != "choreo"):
                bad.append(module)
        elif module.split(".")[0] in FORBIDDEN_THIRD_PARTY[package]:
            bad.append(module)
    # Name the top of each forbidden tree (choreo.launch, not every module under it).
    return [m for m in bad if not any(_under(m, other) for other in bad if other != m)]


def probe(package: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, package], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, f"importing {package} and its modules failed:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_its_role_may(package):
    result = probe(package)
    assert result["checked"][0] == package
    bad = violations(package, result["modules"])
    if bad:
        lines = []
        for module in bad:
            chain = result["importers"].get(module) or result["importers"].get(module.split(".")[0]) or []
            lines.append(f"  {module}, imported by: " + (" <- ".join(chain) if chain else "(unknown)"))
        pytest.fail(f"{package} (with its modules {', '.join(result['checked'])}) imports what its role must "
                    f"not (see DESIGN.md, 'Import direction'):\n" + "\n".join(lines), pytrace=False)


def test_every_package_has_a_rule():
    """A new top-level package in pyproject.toml gets a rule here (or is the composition root)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p for p in config["tool"]["setuptools"]["packages"] if p.count(".") <= 1}
    packages.add("choreo.vocabulary")
    assert packages - set(UNCHECKED) == set(ALLOWED), "give each top-level package a rule in test_imports.py"


def test_vocabulary_source_imports_nothing_of_ours():
    source = (ROOT / "choreo" / "vocabulary.py").read_text()
    lines = [line for line in source.splitlines() if re.match(r"\s*(import\s+choreo|from\s+(choreo|\.))", line)]
    assert not lines, f"choreo/vocabulary.py must import nothing of choreo's: {lines}"


def test_rules_catch_violations():
    """The checker itself: each rule reports the top forbidden module, and allowed ones pass."""
    assert violations("choreo.buffer", ["choreo", "choreo.buffer.shard", "choreo.vocabulary", "numpy", "msgpack"]) == []
    assert violations("choreo.buffer", ["torch", "torch.nn", "choreo.agents.config"]) == ["torch", "choreo.agents.config"]
    assert violations("choreo.agents", ["choreo.agents.nets", "torch", "choreo.learner.snapshot"]) == [
        "choreo.learner.snapshot"]
    assert violations("choreo.actors", ["choreo.agents.nets", "choreo.launch", "choreo.launch.runtime.config",
                                        "choreo.buffer.codec"]) == ["choreo.launch", "choreo.buffer.codec"]
    assert violations("choreo.learner", ["choreo.agents.nets", "ray", "ray._private"]) == ["ray"]
    assert violations("choreo.vocabulary", ["choreo", "choreo.vocabulary", "choreo.agents"]) == ["choreo.agents"]
    assert violations("choreo.agents", ["choreo.agentsx"]) == ["choreo.agentsx"]  # a prefix is not a package


# ----------------------------------------------------------------------------- inside launch/
#
# launch/ is split by role: runtime/ (command line pieces, config, plan, builder, run core, loops,
# Ray layer, run directory, snapshots, job runner), commands/ (what uses a snapshot or a
# run) and bench/ (benchmarks); launch/cli.py is the entry point that dispatches to all of them.
# Commands and benchmarks import the runtime, never the reverse, and no module imports itself back
# through others. Every import counts, also those inside functions (lazy imports still close cycles).

LAUNCH = ROOT / "launch"
LAYERS = {"runtime": 0, "commands": 1, "bench": 2}
"""A module may import its own layer and those below it (a lower number)."""


def launch_modules() -> dict[str, Path]:
    modules = {}
    for path in LAUNCH.rglob("*.py"):
        parts = list(path.relative_to(LAUNCH).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(["choreo.launch", *parts])] = path
    return modules


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the modules of `sources` it imports (`from package import module` counts as the module)."""
    graph = {}
    for name, source in sources.items():
        deps = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{a.name}" for a in node.names]
                deps.update(t if t in sources else node.module for t in targets)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in sources and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[2]) if len(parts) > 2 else None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in graph.items():
        own = layer(module)
        for dep in deps:
            theirs = layer(dep)
            if dep == "choreo.launch.cli" or (own is not None and theirs is not None and theirs > own):
                bad.append(f"{module} -> {dep}")
    return sorted(bad)


def test_launch_has_no_import_cycle_and_the_runtime_imports_no_command():
    graph = import_graph({name: path.read_text() for name, path in launch_modules().items()})
    assert {"choreo.launch.runtime.config", "choreo.launch.commands.evaluate", "choreo.launch.bench.soak"} <= set(graph)
    found = cycles(graph)
    assert not found, "import cycles inside launch/:\n" + "\n".join(" -> ".join(c) for c in found)
    bad = layering_violations(graph)
    assert not bad, ("the runtime imports no command or benchmark, commands no benchmark, nothing the entry "
                     "point:\n" + "\n".join(bad))


def test_the_launch_checks_catch_cycles_and_inverted_imports():
    sources = {
        "choreo.launch.runtime.a": "from choreo.launch.runtime import b\n",
        "choreo.launch.runtime.b": "def f():\n    from choreo.launch.runtime.a import x\n",
        "choreo.launch.commands.c": "from choreo.launch.runtime.a import x\n",
        "choreo.launch.runtime.d": "import choreo.launch.commands.c\n",
    }
    graph = import_graph(sources)
    assert cycles(graph) == [["choreo.launch.runtime.a", "choreo.launch.runtime.b", "choreo.launch.runtime.a"]]
    assert layering_violations(graph) == ["choreo.launch.runtime.d -> choreo.launch.commands.c"]
