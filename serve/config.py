"""Configuration (SPEC §7): frozen dataclasses, and a loader that layers TOML files, environment and flags.

Order, later wins: the defaults below (which `serve/defaults.toml` repeats, commented; a test keeps the two
equal) → each `--config` / `QWEN_SERVE_CONFIG` file (tables merge key by key) → environment variables →
command-line flags. Every key is validated; a bad one raises `ConfigError` naming it (the CLI exits 2).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from serve.errors import ConfigError
from serve.netloc import split_host, url_problem

QWEN_OAUTH_ID = "qwen-oauth"
PROVIDER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 4170
    workspace: str | None = None  # None: the current directory
    token_file: str | None = None
    extra_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    max_body_bytes: int = 65536
    graceful_timeout_s: float = 0.5
    certfile: str | None = None
    keyfile: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceFlowConfig:
    default_interval_s: float = 5
    slow_down_step_s: float = 5
    min_interval_s: float = 1
    max_interval_s: float = 60
    min_expires_in_s: float = 30
    max_expires_in_s: float = 3600
    fallback_expires_in_s: float = 600
    max_active: int = 4
    terminal_grace_s: float = 300
    sweep_interval_s: float = 30
    start_timeout_s: float = 30
    poll_timeout_s: float = 30
    persist_timeout_s: float = 30
    max_transient_failures: int = 3
    max_starts_per_minute: int = 10


@dataclass(frozen=True, slots=True)
class EventsConfig:
    ring_size: int = 1024
    subscriber_queue: int = 256
    max_subscribers: int = 1024
    heartbeat_s: float = 15


@dataclass(frozen=True, slots=True)
class RefreshConfig:
    """When and how the daemon refreshes access tokens (providers with `refresh = "auto"`)."""

    skew_s: float = 300
    retry_min_s: float = 5
    retry_max_s: float = 60
    lock_wait_s: float = 10


@dataclass(frozen=True, slots=True)
class QwenOAuthConfig:
    enabled: bool = True
    base_url: str = "https://chat.qwen.ai"
    refresh: str = "off"  # qwen-code refreshes oauth_creds.json itself


ClientAuth = Literal["none", "client_secret_basic", "client_secret_post"]
Pkce = Literal["auto", "on", "off"]


@dataclass(frozen=True, slots=True)
class Rfc8628ProviderConfig:
    """A generic RFC 8628 provider from `[providers.<id>] kind = "rfc8628"`."""

    provider_id: str
    client_id: str
    issuer: str | None = None
    device_authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    client_auth: ClientAuth = "none"
    scope: str | None = None
    pkce: Pkce = "auto"
    extra_params: tuple[tuple[str, str], ...] = ()
    revocation_endpoint: str | None = None  # else the discovered one, if any (RFC 7009)
    refresh: str = "auto"
    kind: str = "rfc8628"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    device_flow: DeviceFlowConfig = field(default_factory=DeviceFlowConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    qwen_oauth: QwenOAuthConfig = field(default_factory=QwenOAuthConfig)
    providers: tuple[Rfc8628ProviderConfig, ...] = ()


# --- validators: each takes (key, value) and returns the typed value or raises ConfigError ---------

Check = Callable[[str, Any], Any]


def _int(lo: int, hi: int) -> Check:
    def check(key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ConfigError(key, f"expected an integer from {lo} to {hi}, got {v!r}")
        return v

    return check


def _num(lo: float, hi: float) -> Check:
    def check(key: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
            raise ConfigError(key, f"expected a number from {lo:g} to {hi:g}, got {v!r}")
        return v

    return check


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(key, f"expected a non-empty string, got {v!r}")
    return v


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, f"expected true or false, got {v!r}")
    return v


def _str_list(key: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(key, f"expected a list of non-empty strings, got {v!r}")
    return tuple(v)


def _choice(*options: str) -> Check:
    def check(key: str, v: Any) -> str:
        if v not in options:
            raise ConfigError(key, f"expected one of {', '.join(map(repr, options))}, got {v!r}")
        return str(v)

    return check


def _str_map(key: str, v: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ConfigError(key, f"expected a table of strings, got {v!r}")
    return tuple(v.items())


def _url(key: str, v: Any) -> str:
    """An absolute URL that `url_problem` accepts; the value is echoed unless it may hold a password."""
    url = _str(key, v)
    problem = url_problem(url)
    if problem is not None:
        raise ConfigError(key, problem if "@" in url else f"{problem}, got {v!r}")
    return url


_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def _host_name(key: str, host: str) -> str:
    """An IP literal (IPv6 with or without brackets) or a DNS name, lower-cased; IPv6 comes back bracketed."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        if bare is host and _HOSTNAME_RE.fullmatch(host):
            return host.lower()
        raise ConfigError(key, f"expected an IP address or a host name, got {host!r}") from None
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


def _bind_host(key: str, v: Any) -> str:
    """The address to bind: as given (hypercorn takes it), once it is known to be a host and not a URL."""
    host = _str(key, v)
    _host_name(key, host)
    return host


def _host_list(key: str, v: Any) -> tuple[str, ...]:
    """`extra_hosts`: each `host` or `host:port`, normalised the way the Host gate compares them."""
    out = []
    for item in _str_list(key, v):
        host, port = split_host(item)
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(key, f"expected host or host:port (no wildcards), got {item!r}")
        name = _host_name(key, host)
        out.append(name if port is None else f"{name}:{port}")
    return tuple(out)


def _origin_list(key: str, v: Any) -> tuple[str, ...]:
    """`allow_origins`: each exactly an origin, `scheme://host[:port]`, as browsers send it."""
    out = []
    for item in _str_list(key, v):
        parts = urlsplit(item)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
            or (parts.query or parts.fragment or parts.username)
        ):
            raise ConfigError(key, f"expected an origin like https://app.example.com[:port], got {item!r}")
        out.append(item.lower().rstrip("/"))
    return tuple(out)


def _readable_file(key: str, v: Any) -> str:
    path = _str(key, v)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError(key, f"not a readable file: {path!r}")
    return path


_SERVER: dict[str, Check] = {
    "host": _bind_host,
    "port": _int(0, 65535),
    "workspace": _str,
    "token_file": _str,
    "extra_hosts": _host_list,
    "allow_origins": _origin_list,
    "max_body_bytes": _int(1, 1 << 30),
    "graceful_timeout_s": _num(0, 60),
    "certfile": _readable_file,
    "keyfile": _readable_file,
}
_DEVICE_FLOW: dict[str, Check] = {
    "default_interval_s": _num(0.001, 3600),
    "slow_down_step_s": _num(0, 3600),
    "min_interval_s": _num(0.001, 3600),
    "max_interval_s": _num(0.001, 3600),
    "min_expires_in_s": _num(0.001, 86400),
    "max_expires_in_s": _num(0.001, 86400),
    "fallback_expires_in_s": _num(0.001, 86400),
    "max_active": _int(1, 10_000),
    "terminal_grace_s": _num(0, 86400),
    "sweep_interval_s": _num(0.001, 86400),
    "start_timeout_s": _num(0.001, 3600),
    "poll_timeout_s": _num(0.001, 3600),
    "persist_timeout_s": _num(0.001, 3600),
    "max_transient_failures": _int(1, 1000),
    "max_starts_per_minute": _int(1, 100_000),
}
_EVENTS: dict[str, Check] = {
    "ring_size": _int(1, 1_000_000),
    "subscriber_queue": _int(1, 1_000_000),
    "max_subscribers": _int(1, 1_000_000),
    "heartbeat_s": _num(0.001, 3600),
}
_REFRESH: dict[str, Check] = {
    "skew_s": _num(0, 86400),
    "retry_min_s": _num(0.001, 86400),
    "retry_max_s": _num(0.001, 86400),
    "lock_wait_s": _num(0.001, 3600),
}


def _qwen_refresh(key: str, v: Any) -> str:
    if v != "off":
        raise ConfigError(
            key,
            'only "off": qwen-code refreshes its oauth_creds.json itself, and two refreshers of one '
            "rotating refresh token log each other out",
        )
    return "off"


_QWEN: dict[str, Check] = {"enabled": _bool, "base_url": _url, "refresh": _qwen_refresh}
_RFC8628: dict[str, Check] = {
    "kind": _choice("rfc8628"),
    "issuer": _url,
    "device_authorization_endpoint": _url,
    "token_endpoint": _url,
    "client_id": _str,
    "client_secret_env": _str,
    "client_secret_file": _str,
    "client_auth": _choice("none", "client_secret_basic", "client_secret_post"),
    "scope": _str,
    "pkce": _choice("auto", "on", "off"),
    "extra_params": _str_map,
    "revocation_endpoint": _url,
    "refresh": _choice("auto", "off"),
}
_SECTIONS = {"server": _SERVER, "device_flow": _DEVICE_FLOW, "events": _EVENTS, "refresh": _REFRESH}


def _table(key: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigError(key, f"expected a table, got {v!r}")
    return v


def _section(name: str, raw: Mapping[str, Any], schema: Mapping[str, Check]) -> dict[str, Any]:
    out = {}
    for key, value in raw.items():
        check = schema.get(key)
        if check is None:
            raise ConfigError(f"{name}.{key}", "unknown key")
        out[key] = check(f"{name}.{key}", value)
    return out


def _rfc8628(provider_id: str, raw: Mapping[str, Any]) -> Rfc8628ProviderConfig:
    name = f"providers.{provider_id}"
    if "client_secret" in raw:
        raise ConfigError(f"{name}.client_secret", "never inline a secret: use client_secret_env or _file")
    if raw.get("kind") is None:
        raise ConfigError(f"{name}.kind", 'required for a provider other than qwen-oauth: "rfc8628"')
    values = _section(name, raw, _RFC8628)
    if "client_id" not in values:
        raise ConfigError(f"{name}.client_id", "required")
    has_endpoints = "device_authorization_endpoint" in values and "token_endpoint" in values
    if "issuer" not in values and not has_endpoints:
        raise ConfigError(name, "set issuer, or both device_authorization_endpoint and token_endpoint")
    if "device_authorization_endpoint" in values and "token_endpoint" not in values:
        raise ConfigError(f"{name}.token_endpoint", "required with device_authorization_endpoint")
    if "token_endpoint" in values and "device_authorization_endpoint" not in values:
        raise ConfigError(f"{name}.device_authorization_endpoint", "required with token_endpoint")
    if "client_secret_env" in values and "client_secret_file" in values:
        raise ConfigError(f"{name}.client_secret_file", "set client_secret_env or client_secret_file, not both")
    has_secret = "client_secret_env" in values or "client_secret_file" in values
    auth = values.setdefault("client_auth", "client_secret_basic" if has_secret else "none")
    if auth != "none" and not has_secret:
        raise ConfigError(f"{name}.client_auth", f"{auth} needs client_secret_env or client_secret_file")
    if auth == "none" and has_secret:
        raise ConfigError(f"{name}.client_auth", "a client secret is configured: use client_secret_basic or _post")
    return Rfc8628ProviderConfig(provider_id=provider_id, **values)


def build_config(raw: Mapping[str, Any]) -> Config:
    """Validate one merged TOML-shaped mapping into a `Config`."""
    parts: dict[str, Any] = {}
    for name, value in raw.items():
        if name in _SECTIONS:
            section = _section(name, _table(name, value), _SECTIONS[name])
            cls = {
                "server": ServerConfig,
                "device_flow": DeviceFlowConfig,
                "events": EventsConfig,
                "refresh": RefreshConfig,
            }[name]
            parts[name] = cls(**section)
        elif name == "providers":
            generic = []
            for provider_id, table in _table(name, value).items():
                table = _table(f"providers.{provider_id}", table)
                if provider_id == QWEN_OAUTH_ID:
                    parts["qwen_oauth"] = QwenOAuthConfig(**_section(f"providers.{provider_id}", table, _QWEN))
                elif not PROVIDER_ID_RE.match(provider_id):
                    raise ConfigError(f"providers.{provider_id}", "a provider id is 1-64 of A-Z a-z 0-9 . _ -")
                else:
                    generic.append(_rfc8628(provider_id, table))
            parts["providers"] = tuple(generic)
        else:
            raise ConfigError(name, "unknown section")
    config = Config(**parts)
    _check_relations(config)
    return config


def _check_relations(config: Config) -> None:
    d = config.device_flow
    if d.min_interval_s > d.max_interval_s:
        raise ConfigError("device_flow.min_interval_s", "must not exceed device_flow.max_interval_s")
    if config.refresh.retry_min_s > config.refresh.retry_max_s:
        raise ConfigError("refresh.retry_min_s", "must not exceed refresh.retry_max_s")
    if d.min_expires_in_s > d.max_expires_in_s:
        raise ConfigError("device_flow.min_expires_in_s", "must not exceed device_flow.max_expires_in_s")
    s = config.server
    if (s.certfile is None) != (s.keyfile is None):
        raise ConfigError("server.keyfile" if s.keyfile is None else "server.certfile", "set both or neither")


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key (recursively); any other value replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the configuration file ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML ({exc})") from exc


def load_config(
    files: Sequence[Path] = (),
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults → files → environment → `overrides` (the flags, TOML-shaped: `{"server": {"port": 0}}`)."""
    raw: dict[str, Any] = {}
    for _source, layer in config_layers(files, env=env, overrides=overrides)[1:]:  # the code holds the defaults
        raw = merge(raw, layer)
    return build_config(raw)


DEFAULTS_FILE = Path(__file__).with_name("defaults.toml")
"""Every key with its default, commented: shipped in the package (`conf/serve.toml` links to it)."""


def config_layers(
    files: Sequence[Path] = (),
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    override_source: str = "command line",
) -> list[tuple[str, dict[str, Any]]]:
    """The layers `load_config` merges, each with where it came from: defaults, files, environment, flags."""
    layers: list[tuple[str, dict[str, Any]]] = [("default", defaults_as_toml_mapping())]
    for path in files:
        layers.append((str(path), read_toml(path)))
    env = env or {}
    if env.get("QWEN_OAUTH_BASE_URL"):
        layers.append(
            ("$QWEN_OAUTH_BASE_URL", {"providers": {QWEN_OAUTH_ID: {"base_url": env["QWEN_OAUTH_BASE_URL"]}}})
        )
    if overrides:
        layers.append((override_source, dict(overrides)))
    return layers


# A key named like a secret, but not one that only names where a secret or an endpoint is (`token_endpoint`).
_SECRET_KEY = re.compile(r"(secret|password|token)(?!_(env|file|endpoint)$)", re.IGNORECASE)
_ELIDED = '"(elided)"'


def effective_config_toml(layers: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """The merged configuration as TOML, each value followed by the layer it came from; secret-named
    values (other than the names of the env vars and files that hold secrets) are elided."""
    merged: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}

    def record(prefix: tuple[str, ...], mapping: Mapping[str, Any], source: str) -> None:
        for key, value in mapping.items():
            if isinstance(value, dict) and not (prefix[-1:] == ("extra_params",) or key == "extra_params"):
                record((*prefix, key), value, source)
            else:
                sources[(*prefix, key)] = source

    for source, layer in layers:
        merged = merge(merged, layer)
        record((), layer, source)

    lines: list[str] = []

    def emit_table(path: tuple[str, ...], table: Mapping[str, Any]) -> None:
        leaves = {k: v for k, v in table.items() if not isinstance(v, dict) or k == "extra_params"}
        if leaves:
            if path:
                lines.append("")
                lines.append("[" + ".".join(_toml_key(part) for part in path) + "]")
            for key, value in leaves.items():
                shown = _ELIDED if _SECRET_KEY.search(key) else _toml_value(value)
                lines.append(f"{_toml_key(key)} = {shown}  # {sources.get((*path, key), 'default')}")
        for key, value in table.items():
            if isinstance(value, dict) and key != "extra_params":
                emit_table((*path, key), value)

    emit_table((), merged)
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{_toml_key(k)} = {_ELIDED if _SECRET_KEY.search(k) else _toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }"
    return json.dumps(str(value))


def defaults_as_toml_mapping() -> dict[str, Any]:
    """The code's defaults, shaped as `serve/defaults.toml` parses (None-valued keys left out)."""

    def table(obj: Any) -> dict[str, Any]:
        out = {}
        for f in fields(obj):
            value = getattr(obj, f.name)
            if value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    c = Config()
    return {
        "server": table(c.server),
        "device_flow": table(c.device_flow),
        "events": table(c.events),
        "refresh": table(c.refresh),
        "providers": {QWEN_OAUTH_ID: table(c.qwen_oauth)},
    }
