"""The daemon never starts a process or a browser, even when it runs locally (SPEC §0).

A static check over `serve/`'s syntax trees: any import, attribute, `from`-import, `__import__`,
`importlib.import_module` or `getattr` that reaches a process-spawning API fails the build. Each form the
checker knows has a fixture under `fixtures_no_processes/` proving it is caught (fixtures are parsed, never
imported or collected).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import serve

SERVE_DIR = Path(serve.__file__).parent
FIXTURES = Path(__file__).parent / "fixtures_no_processes"

# Whole modules whose only purpose is starting processes or browsers.
BANNED_MODULES = ("subprocess", "_posixsubprocess", "pty", "webbrowser", "multiprocessing", "asyncio.subprocess")
# Single names inside otherwise allowed modules.
BANNED_NAMES = frozenset(
    {
        "os.system",
        "os.popen",
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.posix_spawnp",
        "os.startfile",
        "trio.run_process",
        "trio.lowlevel.open_process",
        "concurrent.futures.ProcessPoolExecutor",
    }
)
BANNED_PREFIXES = ("os.exec", "os.spawn", "asyncio.create_subprocess_")
# Modules that hold a banned name: a star import or a computed getattr on them is refused.
HOLDERS = frozenset({"os", "trio", "trio.lowlevel", "asyncio", "concurrent.futures"})
# `posix` and `nt` are what `os` re-exports.
CANONICAL = {"posix": "os", "nt": "os"}
IMPORTERS = frozenset({"__import__", "importlib.import_module", "importlib.__import__"})


def canonical(name: str) -> str:
    head, _, rest = name.partition(".")
    head = CANONICAL.get(head, head)
    return f"{head}.{rest}" if rest else head


def is_banned(name: str) -> bool:
    name = canonical(name)
    return (
        any(name == module or name.startswith(module + ".") for module in BANNED_MODULES)
        or name in BANNED_NAMES
        or name.startswith(BANNED_PREFIXES)
    )


def _bindings(tree: ast.AST) -> dict[str, str]:
    """Local name → the dotted name it stands for, from every import in the file (scopes ignored: stricter)."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    head = alias.name.split(".")[0]
                    bound[head] = head
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if alias.name != "*":
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _dotted(node: ast.expr, bound: dict[str, str]) -> str | None:
    """`a.b.c` with `a` resolved through the imports; None for anything but a plain dotted name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(bound.get(node.id, node.id))
    return canonical(".".join(reversed(parts)))


def process_spawns(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """Every (line, what) in `source` that can start a process or a browser."""
    tree = ast.parse(source, filename)
    bound = _bindings(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if is_banned(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            module = canonical(node.module)
            for alias in node.names:
                if alias.name == "*":
                    if module in HOLDERS or is_banned(module):
                        found.append((node.lineno, f"{module}.*"))
                elif is_banned(f"{module}.{alias.name}"):
                    found.append((node.lineno, canonical(f"{module}.{alias.name}")))
        elif isinstance(node, ast.Attribute):
            name = _dotted(node, bound)
            if name is not None and is_banned(name):
                found.append((node.lineno, name))
        elif isinstance(node, ast.Call) and node.args:
            callee = _dotted(node.func, bound)
            first = node.args[0]
            if callee in IMPORTERS:
                if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                    found.append((node.lineno, "dynamic import"))
                elif is_banned(first.value):
                    found.append((node.lineno, first.value))
            elif callee == "getattr" and len(node.args) >= 2:
                target = _dotted(first, bound)
                attribute = node.args[1]
                if target is None:
                    continue
                if isinstance(attribute, ast.Constant) and isinstance(attribute.value, str):
                    if is_banned(f"{target}.{attribute.value}"):
                        found.append((node.lineno, canonical(f"{target}.{attribute.value}")))
                elif target in HOLDERS:
                    found.append((node.lineno, f"dynamic attribute of {target}"))
    return sorted(set(found))


def test_the_daemon_cannot_start_processes_or_browsers() -> None:
    sources = sorted(SERVE_DIR.rglob("*.py"))
    assert len(sources) > 10  # the scan really covers the package
    offences = [
        f"{path.relative_to(SERVE_DIR.parent)}:{line}: {what}"
        for path in sources
        for line, what in process_spawns(path.read_text(encoding="utf-8"), str(path))
    ]
    assert offences == []


def _expected(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <finding>'"
    return first.removeprefix("# expect: ")


FIXTURE_FILES = sorted(FIXTURES.glob("*.py"))


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[p.stem for p in FIXTURE_FILES])
def test_the_checker_catches_each_form(path: Path) -> None:
    findings = [what for _, what in process_spawns(path.read_text(encoding="utf-8"), str(path))]
    assert _expected(path) in findings


def test_every_form_has_a_fixture() -> None:
    expected = {_expected(path) for path in FIXTURE_FILES}
    assert len(FIXTURE_FILES) >= 25
    assert {"subprocess", "os.system", "os.popen", "pty", "webbrowser", "dynamic import"} <= expected
    assert {"trio.run_process", "trio.lowlevel.open_process", "asyncio.create_subprocess_exec"} <= expected


@pytest.mark.parametrize(
    "source",
    [
        "import os\nos.replace('a', 'b')\nos.fsync(3)\nflags = getattr(os, 'O_NOFOLLOW', 0)\n",
        "import trio\nawait_ = trio.to_thread.run_sync\ntrio.lowlevel.checkpoint\n",
        "from os import path, environ\nimport importlib.metadata\nimportlib.metadata.version('trio')\n",
        "import asyncio.events\nsubprocess = 'just a name'\nexecute = subprocess\n",
    ],
)
def test_ordinary_code_is_not_flagged(source: str) -> None:
    assert process_spawns(source) == []
