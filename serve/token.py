"""The daemon's bearer token (SPEC §1): where it comes from, and the file it is kept in.

First that is set wins: `--token`, env `QWEN_SERVER_TOKEN` (empty counts as unset), `--token-file` /
`server.token_file`; with none, `$QWEN_HOME/serve/token` is reused when it has mode 0600, else a fresh token
is written there (directory 0700, file 0600). `--no-token` runs token-less, on loopback binds only.

The user's token file is refused as OpenSSH's StrictModes refuses a key: readable by others, or in a
directory others may write. The daemon's own file is read and written by `serve.private_files`, so a
symlinked `$QWEN_HOME/serve` is refused rather than followed (`$QWEN_HOME` itself may be a symlink), and
the temp files a killed write left there are removed.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from serve.errors import ConfigError
from serve.netloc import is_loopback_host
from serve.private_files import (
    SymlinkedDirectory,
    home_problem,
    read_private,
    sweep_temp_files,
    unsafe_path_problem,
    write_private,
)

log = logging.getLogger("serve.token")
TOKEN_ENV = "QWEN_SERVER_TOKEN"
_TOKEN_FILE = "serve/token"  # below $QWEN_HOME
_KEY = "server.token_file"
TokenSource = Literal["flag", "env", "file", "reused", "generated", "none"]


@dataclass(frozen=True, slots=True)
class ResolvedToken:
    """The token as bytes (None: token-less), where it came from, and its file when there is one."""

    token: bytes | None
    source: TokenSource
    path: Path | None = None

    def __repr__(self) -> str:
        return f"ResolvedToken(source={self.source!r}, path={self.path!r})"


def qwen_home(env: Mapping[str, str]) -> Path:
    """`$QWEN_HOME`, default `~/.qwen` (the directory qwen-code itself uses)."""
    value = env.get("QWEN_HOME")
    return Path(value).expanduser() if value else Path.home() / ".qwen"


def default_token_path(home: Path) -> Path:
    return home.joinpath(*_TOKEN_FILE.split("/"))


def resolve_token(
    *,
    flag_token: str | None,
    token_file: str | None,
    no_token: bool,
    host: str,
    env: Mapping[str, str],
    home: Path,
) -> ResolvedToken:
    """Pick the token by SPEC §1's precedence; may create `$QWEN_HOME/serve/token`.

    Raises `ConfigError` (exit 2) for `--no-token` on a non-loopback host, an empty `--token`, a token
    file that is missing, empty, readable or writable by group or others, or in a directory others may
    write (`read_token_file`), and a default token file that cannot be read or written or sits in a
    symlinked directory.
    """
    if no_token:
        if not is_loopback_host(host):
            raise ConfigError("server.host", f"--no-token is refused on a non-loopback bind ({host})")
        return ResolvedToken(None, "none")
    if flag_token is not None:
        if not flag_token.strip():
            raise ConfigError("--token", "must not be empty")
        return ResolvedToken(flag_token.strip().encode(), "flag")
    from_env = env.get(TOKEN_ENV, "").strip()
    if from_env:
        return ResolvedToken(from_env.encode(), "env")
    if token_file is not None:
        path = Path(token_file).expanduser().absolute()
        return ResolvedToken(read_token_file(path), "file", path)
    return _reuse_or_generate(home)


def read_token_file(path: Path) -> bytes:
    """The token in a file the user named; refused, as ssh refuses a key, if others may read or change it.

    Others may change it when they own it or a directory above it, or may write to such a directory (a
    root-owned sticky one like `/tmp` excepted): see `serve.private_files.unsafe_path_problem`.
    """
    key = _KEY
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path} ({exc.strerror})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(key, f"{path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ConfigError(key, f"{path} is accessible by group or others (mode {mode:04o}); chmod 600 it")
    try:
        problem = unsafe_path_problem(path)
    except OSError as exc:
        raise ConfigError(key, f"cannot check the directories above {path} ({exc.strerror})") from exc
    if problem is not None:
        raise ConfigError(key, f"{problem}; others could replace the token")
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path} ({exc.strerror})") from exc
    if not token:
        raise ConfigError(key, f"{path} is empty")
    return token


def _reuse_or_generate(home: Path) -> ResolvedToken:
    """Reuse the daemon's own token file if only its owner can use it; else write a new one in its place."""
    path = default_token_path(home)
    problem = home_problem(home)
    if problem is not None:
        log.warning("QWEN_HOME %s; other users could replace the bearer token", problem)
    removed = sweep_temp_files(home, [_TOKEN_FILE])
    if removed:
        log.info("removed %d stale token temp file(s) in %s", removed, path.parent)
    try:
        found = read_private(home, _TOKEN_FILE)
    except SymlinkedDirectory as exc:
        raise ConfigError(_KEY, f"refusing {path}: {exc.filename} is a symlinked directory") from exc
    except OSError as exc:
        raise ConfigError(_KEY, f"cannot read {path} ({exc.strerror})") from exc
    if found is not None:
        info, data = found
        owned = info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o600
        token = data.strip() if owned else b""
        if token:
            return ResolvedToken(token, "reused", path)
    token = secrets.token_urlsafe(32).encode()
    try:
        write_private(home, _TOKEN_FILE, token + b"\n")
    except SymlinkedDirectory as exc:
        raise ConfigError(_KEY, f"refusing {path}: {exc.filename} is a symlinked directory") from exc
    except OSError as exc:
        raise ConfigError(_KEY, f"cannot write a token to {path} ({exc.strerror})") from exc
    return ResolvedToken(token, "generated", path)
