"""Gates 1–5 of SPEC §1, in one place, for HTTP requests and WebSocket handshakes alike.

`Gates.check(scope)` is pure: it reads only the ASGI scope (and the settings it was built with) and says
which gate the request fails, if any. `Gates` itself is the ASGI layer in front of Quart that answers a
rejected request at once, before routing and before a body byte is read, so an unknown path without a
token is a 401 and a strict path is gated even where no route serves it. The order:

    target      origin-form only (`/path`): an absolute-form or `*` target is 400 invalid_request_target (+)
    1 Host      loopback binds (or with extra_hosts): 127.0.0.1:P, localhost:P, [::1]:P or an extra host
    2 Origin    absent, the daemon's own, or in allow_origins
    3 bearer    every route but GET /health, when a token is configured (constant-time, as bytes)
    4 strict    POST/DELETE /workspace/auth/device-flow* and /workspace/auth/providers/* (logout) on a
                token-less daemon: 401 token_required
    5 body      a declared Content-Length over max_body_bytes: 413
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serve import wire
from serve.config import ServerConfig
from serve.errors import (
    InvalidHost,
    InvalidRequestTarget,
    OriginDenied,
    PayloadTooLarge,
    ServeError,
    TokenRequired,
    Unauthorized,
)
from serve.http.server import CONTINUE_STATE_KEY
from serve.netloc import is_loopback_host, split_host

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STRICT_PREFIXES = ("/workspace/auth/device-flow", "/workspace/auth/providers")


class Gates:
    """Gates 1–5 of SPEC §1 in one place, in front of Quart, for `http` and `websocket` scopes alike.

    A rejected request is answered here, before routing and before a body byte is read, so an unknown
    path without a token is a 401 and a strict path is gated even if no route serves it.
    """

    def __init__(self, app: ASGIApp, server: ServerConfig, token: bytes | None) -> None:
        self._app = app
        self._token_digest = hashlib.sha256(token).digest() if token is not None else None
        self._loopback_bind = is_loopback_host(server.host)
        self._extra_hosts = tuple(h.lower() for h in server.extra_hosts)
        self._check_host = self._loopback_bind or bool(self._extra_hosts)
        self._allow_origins = frozenset(o.lower().rstrip("/") for o in server.allow_origins)
        self._max_body = server.max_body_bytes
        self._default_port = server.port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            error = self.check(scope)
            if error is not None:
                await send_error(scope, send, error)
                return
            # Passed: only now may a client waiting on `Expect: 100-continue` be told to send its body.
            send_continue = scope.get("state", {}).get(CONTINUE_STATE_KEY)
            if send_continue is not None and scope["type"] == "http":
                await send_continue()
        await self._app(scope, receive, send)

    def check(self, scope: Scope) -> ServeError | None:
        """The first gate the request fails, or None when it passes all five."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        is_http = scope["type"] == "http"
        method = scope.get("method", "GET") if is_http else "GET"
        # SPEC §2 (+): gates and router must see one path. An absolute-form target (`GET http://host/p`)
        # reaches us with the whole URI in `path` while Quart routes on its parsed path, and its authority
        # would bypass the Host gate; an origin server need not accept it (RFC 9112 §3.2.2), so refuse it,
        # and `*` (asterisk-form) with it.
        if not scope.get("raw_path", b"/").startswith(b"/") or not scope["path"].startswith("/"):
            return InvalidRequestTarget()
        path: str = scope["path"]

        hosts = _values(headers, b"host")
        host = hosts[0].decode("latin-1").strip().lower() if len(hosts) == 1 else None
        if self._check_host and (host is None or not self._host_allowed(host, scope)):
            return InvalidHost()

        origins = _values(headers, b"origin")
        if origins and (len(origins) != 1 or not self._origin_allowed(origins[0], scope, host)):
            return OriginDenied()

        if self._token_digest is not None:
            if not (is_http and method in ("GET", "HEAD") and path == "/health") and not self._bearer_ok(headers):
                return Unauthorized()
        elif is_http and method in ("POST", "DELETE") and _is_strict_path(path):
            return TokenRequired()

        if is_http:
            lengths = _values(headers, b"content-length")
            if lengths and any(v.strip().isdigit() and int(v) > self._max_body for v in lengths):
                return PayloadTooLarge()
        return None

    def _host_allowed(self, host: str, scope: Scope) -> bool:
        name, port = split_host(host)
        if host in self._extra_hosts or name in self._extra_hosts:
            return True
        server = scope.get("server")
        bound_port = str(server[1]) if server else str(self._default_port)
        default_port = "443" if scope.get("scheme") in ("https", "wss") else "80"
        if port is None:
            port = default_port
        return name in ("127.0.0.1", "localhost", "[::1]") and port == bound_port

    def _origin_allowed(self, raw: bytes, scope: Scope, host: str | None) -> bool:
        origin = raw.decode("latin-1").strip().lower().rstrip("/")
        if origin in self._allow_origins:
            return True
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        return host is not None and origin == f"{scheme}://{host}"

    def _bearer_ok(self, headers: list[tuple[bytes, bytes]]) -> bool:
        values = _values(headers, b"authorization")
        if len(values) != 1 or self._token_digest is None:
            return False
        parts = values[0].split(None, 1)
        if len(parts) != 2 or parts[0].lower() != b"bearer":
            return False
        # Bytes, not str: compare_digest raises on non-ASCII str (STACK-NOTES 6).
        return hmac.compare_digest(hashlib.sha256(parts[1].strip()).digest(), self._token_digest)


def _values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


def _is_strict_path(path: str) -> bool:
    path = re.sub(r"/{2,}", "/", path)
    return any(path == prefix or path.startswith(prefix + "/") for prefix in STRICT_PREFIXES)


async def send_error(scope: Scope, send: Send, error: ServeError) -> None:
    """Answer a rejected request or handshake with the error's JSON (a WebSocket handshake gets real HTTP)."""
    body = wire.dumps(wire.error_body(error)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers().items()),
    ]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": error.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})
