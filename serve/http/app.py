"""The HTTP application: gates 1–5 (SPEC §1), error rendering, `/health` and `/capabilities`.

Layers, outermost first, as hypercorn calls them:

    shield_final_send   runs the last body send shielded (STACK-NOTES 1: otherwise quart-trio's cancel
                        kills hypercorn's close/keep-alive work and connections are never closed)
    Gates               pure ASGI: Host, Origin, bearer, strict, body size, for HTTP requests and WebSocket
                        handshakes alike, before routing and before any body byte is read
    QuartTrio           routing, the JSON error handlers, the core routes and every `RouteSet` the daemon adds

Everything the app answers is JSON; nothing renders HTML.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast

import trio
from quart import Quart, Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from serve import __version__, wire
from serve.audit import sanitize
from serve.clock import WallClock
from serve.config import Config, is_loopback_host
from serve.credentials import CredentialStore
from serve.errors import (
    InvalidHost,
    InvalidJson,
    InvalidRequestTarget,
    MethodNotAllowed,
    OriginDenied,
    PayloadTooLarge,
    RouteNotFound,
    ServeError,
    TokenRequired,
    Unauthorized,
)
from serve.events import EventBus
from serve.http.server import CONTINUE_STATE_KEY
from serve.providers.base import DeviceFlowProvider
from serve.registry import DeviceFlowRegistry

log = logging.getLogger("serve.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BASE_FEATURES = ("health", "capabilities")
BASE_TRANSPORTS = ("rest",)
STRICT_PREFIX = "/workspace/auth/device-flow"
# A final body send that cannot finish in this long (a peer that stopped reading) is abandoned.
FINAL_SEND_BOUND_S = 10.0


@dataclass(slots=True)
class Services:
    """What the HTTP layer serves from, built by the daemon (the composition root) and shared by reference.

    `token` None means token-less (strict routes answer `token_required`). `shutting_down` is set first at
    shutdown (SPEC §3).
    """

    config: Config
    token: bytes | None
    workspace: Path
    clock: WallClock
    bus: EventBus
    registry: DeviceFlowRegistry
    store: CredentialStore
    providers: Mapping[str, DeviceFlowProvider]
    shutting_down: bool = False


@dataclass(frozen=True, slots=True)
class RouteSet:
    """Routes the daemon adds to the app, and the `/capabilities` features and transports they make work.

    `install(app, services)` registers routes or blueprints; it runs after the error handlers and the
    no-strict-slashes rule are in place, so added routes get JSON errors like the core ones.
    """

    install: Callable[[Quart, Services], None]
    features: tuple[str, ...] = ()
    transports: tuple[str, ...] = ()


def create_app(services: Services, route_sets: Sequence[RouteSet] = ()) -> QuartTrio:
    """The ASGI app hypercorn serves: gates, then Quart with the core routes and every `route_sets` entry."""
    app = QuartTrio("serve", static_folder=None)  # no default `/static` route: every route is documented
    app.config["MAX_CONTENT_LENGTH"] = services.config.server.max_body_bytes
    app.extensions["qwen_serve"] = services
    # Before any route exists (STACK-NOTES 7): a redirect would answer with an HTML body.
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False
    _install_error_handlers(app)

    features = _unique([*BASE_FEATURES, *(f for rs in route_sets for f in rs.features)])
    transports = _unique([*BASE_TRANSPORTS, *(t for rs in route_sets for t in rs.transports)])

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok"})

    @app.get("/capabilities")
    async def capabilities() -> Response:
        return json_response(
            wire.capabilities_body(
                server_version=__version__,
                features=features,
                transports=transports,
                workspace_cwd=str(services.workspace),
            )
        )

    for route_set in route_sets:
        route_set.install(app, services)

    # Quart's documented middleware seam is replacing `asgi_app`; its hypercorn TypedDicts are looser here.
    quart_asgi = cast(ASGIApp, app.asgi_app)
    app.asgi_app = cast(Any, shield_final_send(Gates(quart_asgi, services)))  # type: ignore[method-assign]
    return app


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --- bodies -----------------------------------------------------------------------------------------


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A compact JSON response, encoded as the original encodes (`serve.wire.dumps`)."""
    return Response(wire.dumps(body), status=status, headers=headers, content_type="application/json")


def error_response(error: ServeError) -> Response:
    """The one rendering of every wire error: its status, its body, its headers."""
    return json_response(error.body(), error.status, error.headers())


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_json_body() -> Any:
    """Gate 5's parse of the current request's body.

    An empty body or a non-JSON content type counts as `{}`; malformed JSON (including NaN and Infinity,
    which `JSON.parse` rejects too) raises `InvalidJson`. A chunked body over `max_body_bytes` raises
    werkzeug's 413, rendered as `payload_too_large`.
    """
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        return {}
    raw = await request.get_data(as_text=False)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: `[[[[…` nested deeper than the parser goes
        raise InvalidJson from exc


# --- error handlers ---------------------------------------------------------------------------------


def _install_error_handlers(app: Quart) -> None:
    @app.errorhandler(ServeError)
    async def on_serve_error(error: ServeError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def on_http_exception(exc: HTTPException) -> Response:
        return _http_exception_response(exc)

    @app.errorhandler(Exception)
    async def on_unexpected(exc: Exception) -> Response:
        # The traceback goes to the log (stderr); the client learns nothing about it.
        log.error("unhandled error in %s %s", request.method, sanitize(request.path), exc_info=exc)
        return error_response(ServeError())

    @app.after_request
    async def never_html(response: Response) -> Response:
        return _never_html(response)


def _http_exception_response(exc: HTTPException) -> Response:
    code = exc.code or 500
    if code == 404:
        return error_response(RouteNotFound())
    if code == 405:
        return error_response(MethodNotAllowed(list(getattr(exc, "valid_methods", None) or [])))
    if code == 413:
        return error_response(PayloadTooLarge())
    return _status_response(code)


def _status_response(status: int) -> Response:
    """A JSON error for a status no `ServeError` names: the reason phrase and its snake_case code."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    code = re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")
    return json_response({"error": phrase, "code": code}, status)


def _never_html(response: Response) -> Response:
    """Quart's automatic OPTIONS reply and redirects are `text/html`: make them empty or JSON."""
    if response.mimetype != "text/html":
        return response
    if response.status_code < 300:
        # The automatic OPTIONS reply: empty, with `Allow`.
        response.status_code = 204
        response.set_data(b"")
        del response.headers["Content-Type"]
        del response.headers["Content-Length"]
        return response
    replacement = _status_response(response.status_code if response.status_code >= 400 else 500)
    if "Allow" in response.headers:
        replacement.headers["Allow"] = response.headers["Allow"]
    return replacement


# --- gates 1–5 --------------------------------------------------------------------------------------


def _split_host(value: str) -> tuple[str, str | None]:
    """`host[:port]` → (host, port or None); IPv6 literals keep their brackets."""
    if value.startswith("["):
        end = value.find("]")
        if end == -1:
            return value, None
        rest = value[end + 1 :]
        return value[: end + 1], rest[1:] if rest.startswith(":") else None
    host, sep, port = value.rpartition(":")
    return (host, port) if sep and port.isdigit() else (value, None)


class Gates:
    """Gates 1–5 of SPEC §1 in one place, in front of Quart, for `http` and `websocket` scopes alike.

    A rejected request is answered here, before routing and before a body byte is read, so an unknown
    path without a token is a 401 and a strict path is gated even if no route serves it.
    """

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self._app = app
        server = services.config.server
        self._token_digest = hashlib.sha256(services.token).digest() if services.token is not None else None
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
                await _send_error(scope, send, error)
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
        name, port = _split_host(host)
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
    return path == STRICT_PREFIX or path.startswith(STRICT_PREFIX + "/")


async def _send_error(scope: Scope, send: Send, error: ServeError) -> None:
    """Answer a rejected request or handshake with the error's JSON (a WebSocket handshake gets real HTTP)."""
    body = wire.dumps(error.body()).encode()
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


# --- the connection fix -----------------------------------------------------------------------------


def shield_final_send(app: ASGIApp) -> ASGIApp:
    """Run the final `http.response.body` send inside a shielded, bounded cancel scope.

    quart-trio cancels its request nursery as soon as hypercorn reports the disconnect that follows the
    last body chunk, which cancels hypercorn's own follow-up work inside that send (closing the socket,
    re-arming keep-alive). Shielded, it completes; the bound keeps a peer that stopped reading from pinning
    the task.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_final_shielded(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True, deadline=trio.current_time() + FINAL_SEND_BOUND_S):
                    try:
                        await send(message)
                    except (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError):
                        # The peer hung up while its body was still arriving (an early 401/413 is the usual
                        # case) and hypercorn's reader is already closing the socket without taking the
                        # send lock. Nothing is left to deliver; without this, each such request logged an
                        # "Error in ASGI Framework" traceback, a log flood anyone could trigger.
                        log.debug(
                            "peer closed before the final body was sent: %s %s",
                            scope["method"],
                            sanitize(scope["path"]),
                        )
            else:
                await send(message)

        await app(scope, receive, send_final_shielded)

    return wrapped
