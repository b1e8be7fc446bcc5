"""The device-flow routes, the status route and `/openapi.json` (SPEC §2), wire-compatible with
`qwen serve` 0.24.4.

Gates 1–5 (Host, Origin, bearer, strict, body size) have already run in `serve.http.gates` before any
of these handlers; gate 6 (`X-Qwen-Client-Id`) is checked here, at the point SPEC §1 gives, as the
original orders it: after the body checks on POST, after the 404 lookup on GET, before it on DELETE.
"""

from __future__ import annotations

import re

from quart import Quart, Response, request

from serve import wire
from serve.errors import InvalidClientId, InvalidRequest, LogoutFailed, PersistError, ShuttingDown, UnsupportedProvider
from serve.http.fast import status_snapshot
from serve.http.openapi import openapi_document
from serve.http.responses import json_response, read_json_body
from serve.http.services import Services

CLIENT_ID_HEADER = "X-Qwen-Client-Id"
_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def client_id_from_request() -> str | None:
    """Gate 6: an empty header is absent; anything else must be a short token (attribution, not identity)."""
    value = request.headers.get(CLIENT_ID_HEADER, "")
    if value == "":
        return None
    if not _CLIENT_ID_RE.fullmatch(value):
        raise InvalidClientId
    return value


def install(app: Quart, services: Services) -> None:
    """Register the device-flow routes, the status snapshot and `/openapi.json` on `app`."""
    registry = services.registry

    @app.post("/workspace/auth/device-flow")
    async def start_device_flow() -> Response:
        provider_id = wire.start_request_provider_id(await read_json_body())
        if provider_id is None:
            raise InvalidRequest
        if provider_id not in registry.supported_providers:
            raise UnsupportedProvider(provider_id, registry.supported_providers)
        client_id = client_id_from_request()
        if services.shutdown.begun:
            # SPEC §3: once shutdown is marked, new POSTs get 503, even before the registry is disposed.
            raise ShuttingDown
        outcome = await registry.start(provider_id, client_id)
        return json_response(wire.start_body(outcome, client_id), 200 if outcome.attached else 201)

    @app.get("/workspace/auth/device-flow/<device_flow_id>")
    async def get_device_flow(device_flow_id: str) -> Response:
        view = registry.get(device_flow_id)
        return json_response(wire.flow_body(view, client_id_from_request()))

    @app.delete("/workspace/auth/device-flow/<device_flow_id>")
    async def cancel_device_flow(device_flow_id: str) -> Response:
        # The original checks the client id before the lookup: a malformed header is 400 even for an
        # unknown id (the official SDK throws on that 400 but treats a 404 as success).
        client_id = client_id_from_request()
        registry.cancel(device_flow_id, client_id)
        return Response(b"", status=204, content_type="application/json")

    @app.get("/workspace/auth/status")
    async def auth_status() -> Response:
        return json_response(status_snapshot(services))

    @app.delete("/workspace/auth/providers/<provider_id>")
    async def logout(provider_id: str) -> Response:
        """Revoke at the IdP (RFC 7009) when it can, delete the credentials file, end a pending login."""
        if provider_id not in registry.supported_providers or services.keeper is None:
            raise UnsupportedProvider(provider_id, registry.supported_providers)
        client_id = client_id_from_request()
        if services.shutdown.begun:
            raise ShuttingDown
        for flow in registry.pending():
            if flow.provider_id == provider_id:
                registry.cancel(flow.device_flow_id, client_id)
        try:
            result = await services.keeper.logout(provider_id)
        except PersistError as exc:
            raise LogoutFailed from exc
        return json_response(wire.logout_body(result.provider_id, result.removed, result.revocation))

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(openapi_document())
