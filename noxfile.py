"""Sessions: `nox` runs tests, lint and typecheck; `nox -s bench` prints benchmark figures.

Every package is installed at the version `conf/constraints.txt` pins (regenerate it with the command at its
top); `pyproject.toml` carries only lower bounds.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
from pathlib import Path

import nox
from nox.command import CommandFailed

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

# This environment sets PYTHONDONTWRITEBYTECODE=1; without compiled bytecode every import recompiles.
os.environ.setdefault("UV_COMPILE_BYTECODE", "1")

CONSTRAINTS = ("-c", "conf/constraints.txt")
E2E = Path("tests/e2e")
# The original `qwen serve` (@qwen-code/qwen-code, pinned by its lock file) that `nox -s bench` measures.
BENCH_ORIGINAL = Path("tests/bench/original")
# Written into node_modules after `npm ci`: the lock file's digest, so an unchanged lock skips the reinstall.
NPM_STAMP = Path("node_modules") / ".qwen-serve-lock.sha256"


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
    time)."""
    _npm_ci(session, E2E, "--omit=peer")


def _npm_ci(session: nox.Session, folder: Path, *options: str) -> None:
    """`npm ci` in `folder`, exactly as its package-lock.json pins; skipped when node_modules matches the lock."""
    digest = hashlib.sha256((folder / "package-lock.json").read_bytes()).hexdigest()
    stamp = folder / NPM_STAMP
    if stamp.is_file() and stamp.read_text().strip() == digest:
        session.log(f"{folder}/node_modules matches package-lock.json: npm ci skipped")
        return
    try:
        session.run("npm", "ci", "--prefix", str(folder), "--no-audit", "--no-fund", *options, external=True)
    except CommandFailed:
        # `npm ci` also wants lock entries for every platform's optional packages. A registry that lacks
        # some (the one here has only the linux-x64 build of the original's clipboard helper) leaves a lock
        # that `npm ci` refuses and `npm install` still installs exactly: fall back to that, and fail if it
        # would change the lock.
        lock = folder / "package-lock.json"
        pinned = lock.read_bytes()
        session.warn(f"npm ci refused {lock}; installing the same pins with npm install")
        session.run("npm", "install", "--prefix", str(folder), "--no-audit", "--no-fund", *options, external=True)
        if lock.read_bytes() != pinned:
            lock.write_bytes(pinned)
            session.error(f"npm install changed {lock}: the pins no longer install as they are")
    stamp.write_text(digest + "\n")


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
    """Speed and memory figures beside the original `qwen serve` 0.24.4 (not part of the default run).

    Installs wrk (Debian's package; only as root: otherwise it says what is missing and fails) and the
    original (`npm ci` of tests/bench/original). Without the original the run still prints this daemon's
    figures, says why the other column is empty, and fails. Arguments after `--` go to tests/bench/bench.py
    (`--quick`, `--repetitions N`, `--json PATH`).
    """
    session.install(*CONSTRAINTS, "-e", ".[test]")
    # Byte-compile the daemon, as `pip install .` does for a user: the install here is editable, and with
    # PYTHONDONTWRITEBYTECODE set (as on this machine) every start would otherwise compile every module of
    # serve/ again, about 0.1 s of the cold start that no user pays.
    session.run("python", "-m", "compileall", "-q", "serve")
    _install_wrk(session)
    if shutil.which("npm") is None:
        session.warn("npm is not on PATH: the original cannot be installed (apt-get install nodejs npm)")
    else:
        try:
            _npm_ci(session, BENCH_ORIGINAL)
        except CommandFailed:
            session.warn(f"npm ci --prefix {BENCH_ORIGINAL} failed: the original's column will be empty")
    command = shlex.join(["nox", "-s", "bench", *(["--", *session.posargs] if session.posargs else [])])
    session.run("python", "tests/bench/bench.py", "--command", command, *session.posargs)


def _install_wrk(session: nox.Session) -> None:
    """wrk from Debian's package: installed when missing and running as root, else the session fails."""
    if shutil.which("wrk") is not None:
        return
    if os.geteuid() != 0:
        session.error("wrk is not on PATH: install it with `sudo apt-get install -y wrk`, then run nox -s bench again")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    install = ("apt-get", "install", "-y", "--no-install-recommends", "wrk")
    try:
        session.run(*install, external=True, env=env)
    except CommandFailed:  # a fresh machine's package lists may be empty or stale
        session.run("apt-get", "update", external=True, env=env)
        session.run(*install, external=True, env=env)
