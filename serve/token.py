"""The daemon's bearer token (SPEC §1): where it comes from, and the file it is kept in.

First that is set wins: `--token`, env `QWEN_SERVER_TOKEN` (empty counts as unset), `--token-file` /
`server.token_file`; with none, `$QWEN_HOME/serve/token` is reused when it has mode 0600, else a fresh token
is written there (directory 0700, file 0600). `--no-token` runs token-less, on loopback binds only.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from serve.config import is_loopback_host
from serve.errors import ConfigError

TOKEN_ENV = "QWEN_SERVER_TOKEN"
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
    return home / "serve" / "token"


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

    Raises `ConfigError` (exit 2) for `--no-token` on a non-loopback host, an empty `--token`, and a token
    file that is missing, empty, or readable or writable by group or others.
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
    return _reuse_or_generate(default_token_path(home))


def read_token_file(path: Path) -> bytes:
    """The token in a file the user named; refused, as ssh refuses a key, if others may read or change it."""
    key = "server.token_file"
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
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path} ({exc.strerror})") from exc
    if not token:
        raise ConfigError(key, f"{path} is empty")
    return token


def _reuse_or_generate(path: Path) -> ResolvedToken:
    """Reuse the daemon's own token file if only its owner can use it; else write a new one in its place."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600:
        token = path.read_bytes().strip() if info.st_uid == os.getuid() else b""
        if token:
            return ResolvedToken(token, "reused", path)
    token = secrets.token_urlsafe(32).encode()
    try:
        _write_private(path, token)
    except OSError as exc:
        raise ConfigError("server.token_file", f"cannot write a token to {path} ({exc.strerror})") from exc
    return ResolvedToken(token, "generated", path)


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` atomically with mode 0600, in a directory made (or tightened to) 0700."""
    # Every directory we create is 0700, $QWEN_HOME included (`parents=True` would make those 0755).
    missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
    path.parent.chmod(0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    written = False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        written = True
    finally:
        if not written:
            tmp.unlink(missing_ok=True)
