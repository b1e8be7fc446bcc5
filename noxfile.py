"""Sessions: `nox` runs tests, lint and typecheck; `nox -s bench` prints benchmark figures.

Every package is installed at the version `conf/constraints.txt` pins (regenerate it with the command at its
top); `pyproject.toml` carries only lower bounds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

# This environment sets PYTHONDONTWRITEBYTECODE=1; without compiled bytecode every import recompiles.
os.environ.setdefault("UV_COMPILE_BYTECODE", "1")

CONSTRAINTS = ("-c", "conf/constraints.txt")
E2E = Path("tests/e2e")
# Written after `npm ci`: the lock file's digest, so an unchanged lock skips the reinstall.
NPM_STAMP = E2E / "node_modules" / ".qwen-serve-lock.sha256"


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (unit, integration, end to end) against the pinned versions, with coverage.

    Arguments after `--` go to pytest (then the coverage floor is not enforced: a subset covers less).
    """
    session.install(*CONSTRAINTS, "-e", ".[test]")
    _install_e2e_packages(session)
    # One absolute data file, so the daemons that tests start as subprocesses (any cwd) report there too.
    env = {"COVERAGE_FILE": str(Path(".coverage").absolute())}
    session.run("coverage", "erase", env=env)
    # One worker per core (pytest-xdist): the tests are independent (port 0, their own tmp dirs).
    session.run("coverage", "run", "-m", "pytest", "-n", "auto", *session.posargs, env=env)
    session.run("coverage", "combine", "--quiet", env=env)
    if not session.posargs:
        session.run("coverage", "report", env=env)


def _install_e2e_packages(session: nox.Session) -> None:
    """The npm packages of tests/e2e (the official TypeScript SDK, oidc-provider), exactly as
    tests/e2e/package-lock.json pins them (peer-only packages, TypeScript itself, are not needed at run
    time); skipped when node_modules matches the lock."""
    digest = hashlib.sha256((E2E / "package-lock.json").read_bytes()).hexdigest()
    if NPM_STAMP.is_file() and NPM_STAMP.read_text().strip() == digest:
        session.log("tests/e2e/node_modules matches package-lock.json: npm ci skipped")
        return
    session.run("npm", "ci", "--prefix", str(E2E), "--no-audit", "--no-fund", "--omit=peer", external=True)
    NPM_STAMP.write_text(digest + "\n")


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", "serve", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "serve", "tests", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the daemon and its tests (tests/ is on MYPYPATH, as on pytest's pythonpath)."""
    session.install(*CONSTRAINTS, "-e", ".[test]", "mypy", "types-jsonschema")
    session.run("mypy", "serve", "tests", env={"MYPYPATH": "tests"})


@nox.session
def bench(session: nox.Session) -> None:
    """Speed and memory figures (not part of the default run)."""
    session.install(*CONSTRAINTS, "-e", ".[test]")
    session.run("python", "tests/bench/bench.py", *session.posargs)
