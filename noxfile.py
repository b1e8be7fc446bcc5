"""Sessions: `nox` runs tests, lint and typecheck; `nox -s bench` prints benchmark figures."""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

# This environment sets PYTHONDONTWRITEBYTECODE=1; without compiled bytecode every import recompiles.
os.environ.setdefault("UV_COMPILE_BYTECODE", "1")

CONSTRAINTS = ("-c", "conf/constraints.txt")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (unit, integration, end to end) against the pinned versions."""
    session.install(*CONSTRAINTS, "-e", ".[test]")
    # The official TypeScript SDK for tests/e2e, exactly as tests/e2e/package-lock.json pins it (peer-only
    # packages, TypeScript itself, are not needed at run time).
    session.run("npm", "ci", "--prefix", "tests/e2e", "--no-audit", "--no-fund", "--omit=peer", external=True)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", "serve", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "serve", "tests", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "-e", ".", "mypy")
    session.run("mypy", "serve")


@nox.session
def bench(session: nox.Session) -> None:
    """Speed and memory figures (not part of the default run)."""
    session.install(*CONSTRAINTS, "-e", ".[test]")
    session.run("python", "tests/bench/bench.py", *session.posargs)
