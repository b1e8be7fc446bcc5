"""The hot GETs answered without Quart: `/health`, `/capabilities`, `/workspace/auth/status`.

A monitor or a UI polls these many times a second; through Quart each costs a request context, werkzeug
routing, a `Response` and `after_request` hooks, which is most of the daemon's CPU per request. This layer
sits behind the gates (so every gate runs first, exactly as for Quart's routes) and answers an exact
`GET` of one of these paths with the same bytes Quart's route would send: the bodies come from the same
functions (`serve.wire`, `status_snapshot` here), `health` and `capabilities` built once. Anything else
(HEAD, a trailing slash, another path or method) goes on to Quart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from serve import __version__, wire
from serve.http.gates import ASGIApp, Receive, Scope, Send
from serve.http.services import Services
from serve.status import provider_statuses

FEATURES = (
    "health",
    "capabilities",
    "auth_device_flow",
    "auth_status_providers",
    "workspace_auth_events",
    "auth_token_refresh",
    "auth_logout",
)
TRANSPORTS = ("rest", "ws-events")


def capabilities_bytes(services: Services) -> bytes:
    body = wire.capabilities_body(
        server_version=__version__,
        features=list(FEATURES),
        transports=list(TRANSPORTS),
        workspace_cwd=str(services.workspace),
    )
    return wire.dumps(body).encode()


HEALTH_BYTES = wire.dumps({"status": "ok"}).encode()


def status_snapshot(services: Services) -> dict[str, Any]:
    """`GET /workspace/auth/status`'s body, here and in Quart's route (`serve.http.routes`) alike."""
    keeper = services.keeper
    cells = provider_statuses(
        services.providers.values(),
        services.store,
        services.clock.now_ms(),
        is_invalid=keeper.is_invalid if keeper is not None else None,
    )
    registry = services.registry
    return wire.status_body(
        workspace_cwd=str(services.workspace),
        providers=cells,
        pending=registry.pending(),
        supported_providers=registry.supported_providers,
    )


def fast_gets(app: ASGIApp, services: Services) -> ASGIApp:
    """`app`, with the hot GETs answered here."""
    capabilities = capabilities_bytes(services)
    bodies: dict[str, Callable[[], bytes]] = {
        "/health": lambda: HEALTH_BYTES,
        "/capabilities": lambda: capabilities,
        "/workspace/auth/status": lambda: wire.dumps(status_snapshot(services)).encode(),
    }

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        body = bodies.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "GET" else None
        if body is None:
            await app(scope, receive, send)
            return
        data = body()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    return answer
