"""How each measured server is started: this daemon, the original `qwen serve`, and the two ceiling apps.

All of them bind 127.0.0.1 on a port picked beforehand (so cold start is timed by polling the port, not by
reading their output) and get a scratch HOME, QWEN_HOME and workspace; the daemons get the bearer token in
`QWEN_SERVER_TOKEN` (the original then demands it on loopback too, as this daemon always does).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.processes import Launch, ServerSpec, base_env, scratch_dirs

TOKEN = "bench-token-0123456789abcdef"
CAPABILITIES_PATH = "/capabilities"
STATUS_PATH = "/workspace/auth/status"

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parents[1]
ORIGINAL_DIR = BENCH_DIR / "original"
ORIGINAL_PACKAGE = ORIGINAL_DIR / "node_modules" / "@qwen-code" / "qwen-code"
ORIGINAL_VERSION = "0.24.4"


def ours(*, env: Mapping[str, str] | None = None, config: Mapping[str, Any] | None = None) -> ServerSpec:
    """`python -m serve run` as a user runs it (default settings, info logging to a file), plus `env` and a
    TOML `--config` built from `config` for the scenarios that need one."""

    def launch(port: int, scratch: Path) -> Launch:
        home, workspace = scratch_dirs(scratch)
        argv = ours_argv(port, workspace)
        if config:
            path = scratch / "bench.toml"
            path.write_text(_toml(config))
            argv += ["--config", str(path)]
        return Launch(argv, {**base_env(home), "QWEN_SERVER_TOKEN": TOKEN, **(env or {})}, workspace)

    return ServerSpec("qwen-serve", launch, CAPABILITIES_PATH, TOKEN)


def _toml(config: Mapping[str, Any], prefix: str = "") -> str:
    """{table: {key: value or {subtable: …}}} as TOML (strings, numbers and booleans only)."""
    out = ""
    for name, values in config.items():
        table = f"{prefix}{name}"
        scalars = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
        out += f"[{table}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in scalars.items())
        out += _toml({k: v for k, v in values.items() if isinstance(v, Mapping)}, f"{table}.")
    return out


def original_problem() -> str | None:
    """Why the original cannot be started here, or None."""
    if shutil.which("node") is None:
        return "node is not on PATH (the original is a Node.js program: apt-get install nodejs npm)"
    manifest = ORIGINAL_PACKAGE / "package.json"
    if not manifest.is_file():
        return (
            f"{ORIGINAL_PACKAGE} is missing: install it with `npm ci --prefix {ORIGINAL_DIR.relative_to(REPO)}` "
            "(nox -s bench does it; it needs the npm registry)"
        )
    version = json.loads(manifest.read_text()).get("version")
    if version != ORIGINAL_VERSION:
        return f"{ORIGINAL_PACKAGE} holds {version}, not {ORIGINAL_VERSION}: run `npm ci --prefix tests/bench/original`"
    return None


def ours_argv(port: int | str, workspace: Path | str) -> list[str]:
    return [sys.executable, "-m", "serve", "run", "--port", str(port), "--workspace", str(workspace)]


def original_argv(port: int | str, workspace: Path | str) -> list[str]:
    node = shutil.which("node") or "node"
    return [
        node,
        str(ORIGINAL_PACKAGE / "cli-entry.js"),
        "serve",
        "--port",
        str(port),
        "--hostname",
        "127.0.0.1",
        "--workspace",
        str(workspace),
    ]


def original() -> ServerSpec:
    """The npm package's `qwen` bin (`cli-entry.js serve`) with its defaults: it preheats one `qwen --acp`
    agent child (its HTTP bridge), which its idle memory and CPU figures include."""

    def launch(port: int, scratch: Path) -> Launch:
        home, workspace = scratch_dirs(scratch)
        return Launch(original_argv(port, workspace), {**base_env(home), "QWEN_SERVER_TOKEN": TOKEN}, workspace)

    return ServerSpec("original", launch, CAPABILITIES_PATH, TOKEN, expect_children=1)


def node_version() -> str:
    node = shutil.which("node")
    if node is None:
        return "not installed"
    return subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()


def ceiling(kind: str, body: bytes) -> ServerSpec:
    """A bare app (`hypercorn`: raw ASGI; `quart`: QuartTrio) answering `body` (tests/bench/ceiling.py)."""

    def launch(port: int, scratch: Path) -> Launch:
        home, workspace = scratch_dirs(scratch)
        body_file = scratch / "body.json"
        body_file.write_bytes(body)
        argv = [sys.executable, str(BENCH_DIR / "ceiling.py"), kind, "--port", str(port), "--body-file", str(body_file)]
        return Launch(argv, base_env(home), workspace)

    return ServerSpec(f"bare-{kind}", launch, STATUS_PATH, TOKEN)
