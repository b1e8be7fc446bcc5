"""The wire: internal values ⇄ camelCase JSON, in one place (SPEC §2, §4). Imports no server module.

The daemon writes with the functions at the top; the client (`serve.client`) reads with the `parse_*`
functions at the bottom, which tolerate members they do not know and raise `WireFormatError` naming a
missing or mistyped one.

Field order follows the original `qwen serve` 0.24.4 byte for byte (`tests` compare whole bodies).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from serve.errors import ServeError, UnsupportedProvider, UpstreamError
from serve.models import (
    AuthEvent,
    AuthState,
    AuthStatusSnapshot,
    Capabilities,
    CredentialsInvalid,
    CredentialsRefreshed,
    CredentialsRemoved,
    DeviceFlowInfo,
    Envelope,
    FlowAuthorized,
    FlowCancelled,
    FlowFailed,
    FlowStarted,
    FlowThrottled,
    FlowView,
    Frame,
    LoggedOut,
    PendingFlow,
    ProviderAuthStatus,
    ProviderCell,
    ReceivedEvent,
    StartOutcome,
    StreamHeartbeat,
    StreamHello,
    StreamReset,
)

PROTOCOL_VERSION = 1


def dumps(obj: Any) -> str:
    """Compact JSON as the original's `JSON.stringify` writes it: no spaces, non-ASCII kept."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


EVENT_TYPES: dict[type, str] = {
    FlowStarted: "auth_device_flow_started",
    FlowThrottled: "auth_device_flow_throttled",
    FlowAuthorized: "auth_device_flow_authorized",
    FlowFailed: "auth_device_flow_failed",
    FlowCancelled: "auth_device_flow_cancelled",
    CredentialsRefreshed: "auth_credentials_refreshed",
    CredentialsInvalid: "auth_credentials_invalid",
    CredentialsRemoved: "auth_credentials_removed",
}


def event_type(event: AuthEvent) -> str:
    return EVENT_TYPES[type(event)]


def event_data(event: AuthEvent) -> dict[str, Any]:
    """The `data` member of an event envelope."""
    match event:
        case FlowStarted():
            return {
                "deviceFlowId": event.device_flow_id,
                "providerId": event.provider_id,
                "expiresAt": event.expires_at_ms,
            }
        case FlowThrottled():
            return {"deviceFlowId": event.device_flow_id, "intervalMs": event.interval_ms}
        case FlowAuthorized():
            data: dict[str, Any] = {"deviceFlowId": event.device_flow_id, "providerId": event.provider_id}
            if event.expires_at_ms is not None:
                data["expiresAt"] = event.expires_at_ms
            if event.account_alias is not None:
                data["accountAlias"] = event.account_alias
            return data
        case FlowFailed():
            data = {"deviceFlowId": event.device_flow_id, "errorKind": event.error_kind.value}
            if event.hint is not None:
                data["hint"] = event.hint
            data["status"] = event.status.value
            return data
        case FlowCancelled():
            return {"deviceFlowId": event.device_flow_id}
        case CredentialsRefreshed():
            data = {"providerId": event.provider_id}
            if event.expires_at_ms is not None:
                data["expiresAt"] = event.expires_at_ms
            return data
        case CredentialsInvalid():
            return {"providerId": event.provider_id, "errorKind": event.error_kind.value}
        case CredentialsRemoved():
            return {"providerId": event.provider_id}
    raise TypeError(f"not an auth event: {type(event).__name__}")


def envelope_json(envelope: Envelope) -> dict[str, Any]:
    """`{"id","v","type","data","originatorClientId"?,"_meta":{"serverTimestamp"}}` (SPEC §4)."""
    out: dict[str, Any] = {
        "id": envelope.id,
        "v": PROTOCOL_VERSION,
        "type": event_type(envelope.event),
        "data": event_data(envelope.event),
    }
    if envelope.originator_client_id is not None:
        out["originatorClientId"] = envelope.originator_client_id
    out["_meta"] = {"serverTimestamp": envelope.server_timestamp_ms}
    return out


def encode_envelope(envelope: Envelope) -> str:
    """The one JSON encoding of an event, shared by every subscriber."""
    return dumps(envelope_json(envelope))


@functools.lru_cache(maxsize=64)
def websocket_text_frame(text: str) -> bytes:
    """`text` as one unmasked, final WebSocket text frame (RFC 6455 §5.2), as a server sends it.

    Cached: the fan-out asks for the same envelope string once per subscriber, and gets the bytes built once.
    """
    payload = text.encode("utf-8")
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return header + payload


def hello_frame(last_event_id: int, epoch: str) -> str:
    return dumps({"v": PROTOCOL_VERSION, "type": "hello", "data": {"lastEventId": last_event_id, "epoch": epoch}})


def reset_frame(last_event_id: int, epoch: str) -> str:
    return dumps({"v": PROTOCOL_VERSION, "type": "reset", "data": {"lastEventId": last_event_id, "epoch": epoch}})


def heartbeat_frame(last_event_id: int) -> str:
    return dumps({"v": PROTOCOL_VERSION, "type": "heartbeat", "data": {"lastEventId": last_event_id}})


# --- REST bodies (SPEC §2) ----------------------------------------------------------------------------


def is_initiator(view: FlowView, caller_client_id: str | None) -> bool:
    """SPEC §2: the caller is the initiator when its client id equals the initiator's, or both are absent."""
    return view.initiator_client_id == caller_client_id


def _verification(view: FlowView) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if view.user_code is not None:
        out["userCode"] = view.user_code
    if view.verification_uri is not None:
        out["verificationUri"] = view.verification_uri
    if view.verification_uri_complete is not None:
        out["verificationUriComplete"] = view.verification_uri_complete
    return out


def start_body(outcome: StartOutcome, caller_client_id: str | None) -> dict[str, Any]:
    """The POST answer: only the initiator sees the user code and URLs; `initiatorClientId` goes last."""
    view = outcome.view
    out: dict[str, Any] = {
        "deviceFlowId": view.device_flow_id,
        "providerId": view.provider_id,
        "status": view.status.value,
        "expiresAt": view.expires_at_ms,
        "intervalMs": view.interval_ms,
        "attached": outcome.attached,
    }
    if is_initiator(view, caller_client_id):
        out.update(_verification(view))
        if view.initiator_client_id is not None:
            out["initiatorClientId"] = view.initiator_client_id
    return out


def flow_body(view: FlowView, caller_client_id: str | None) -> dict[str, Any]:
    """The GET view, in the original's field order (WIRE-EXAMPLES): pending-only fields while pending."""
    pending = view.status.value == "pending"
    out: dict[str, Any] = {
        "deviceFlowId": view.device_flow_id,
        "providerId": view.provider_id,
        "status": view.status.value,
        "createdAt": view.created_at_ms,
    }
    if pending:
        out["expiresAt"] = view.expires_at_ms
        out["intervalMs"] = view.interval_ms
    if view.error_kind is not None:
        out["errorKind"] = view.error_kind.value
    if view.hint is not None:
        out["hint"] = view.hint
    if view.last_polled_at_ms is not None:
        out["lastPolledAt"] = view.last_polled_at_ms
    if is_initiator(view, caller_client_id):
        if pending:
            out.update(_verification(view))
        if view.initiator_client_id is not None:
            out["initiatorClientId"] = view.initiator_client_id
    return out


# The official SDK's `DaemonAuthProviderStatus.status` for each of our auth states.
CELL_STATUS = {
    AuthState.AUTHENTICATED: "ok",
    AuthState.EXPIRED: "warning",
    AuthState.UNAUTHENTICATED: "not_started",
    AuthState.INVALID: "error",
}
_CELL_HINT = {
    AuthState.EXPIRED: "access token expired; log in again",
    AuthState.UNAUTHENTICATED: "not logged in",
    AuthState.INVALID: "the identity provider refused the refresh token; log in again",
}


def provider_cell(status: ProviderAuthStatus) -> dict[str, Any]:
    """One `providers` cell, in the official SDK's `DaemonAuthProviderStatus` shape, plus `authState`."""
    out: dict[str, Any] = {
        "kind": "auth_provider",
        "providerId": status.provider_id,
        "status": CELL_STATUS[status.auth_state],
    }
    if status.auth_state in _CELL_HINT:
        out["hint"] = _CELL_HINT[status.auth_state]
    if status.expires_at_ms is not None:
        out["expiresAt"] = status.expires_at_ms
    if status.account_alias is not None:
        out["accountAlias"] = status.account_alias
    out["authState"] = status.auth_state.value
    if status.updated_at_ms is not None:
        out["updatedAt"] = status.updated_at_ms
    return out


def status_body(
    *,
    workspace_cwd: str,
    providers: list[ProviderAuthStatus],
    pending: list[FlowView],
    supported_providers: list[str],
) -> dict[str, Any]:
    """`GET /workspace/auth/status`: never a token, never a user code."""
    return {
        "v": PROTOCOL_VERSION,
        "workspaceCwd": workspace_cwd,
        "providers": [provider_cell(p) for p in providers],
        "pendingDeviceFlows": [
            {"deviceFlowId": v.device_flow_id, "providerId": v.provider_id, "expiresAt": v.expires_at_ms}
            for v in pending
        ],
        "supportedDeviceFlowProviders": list(supported_providers),
    }


def logout_body(provider_id: str, removed: bool, revocation: str) -> dict[str, Any]:
    """`DELETE /workspace/auth/providers/{providerId}`: what was removed and what the IdP said; no token."""
    return {"providerId": provider_id, "removed": removed, "revocation": revocation}


def error_body(error: ServeError) -> dict[str, Any]:
    """An error's JSON body: `error` first, then `code` when the class has one, then what the class adds."""
    out: dict[str, Any] = {"error": error.message}
    if error.code is not None:
        out["code"] = error.code
    if isinstance(error, UnsupportedProvider):
        out["supportedProviders"] = error.supported
    if isinstance(error, UpstreamError) and error.diagnosis is not None:
        # (+) After the original's two members: the failure's class and what to fix (static text).
        out["failure"] = error.diagnosis.failure.value
        out["hint"] = error.diagnosis.hint
    return out


def start_request_provider_id(body: object) -> str | None:
    """The `providerId` of a POST body when it is a non-empty string, else None (`invalid_request`)."""
    provider_id = body.get("providerId") if isinstance(body, dict) else None
    return provider_id if isinstance(provider_id, str) and provider_id else None


def capabilities_body(
    *, server_version: str, features: list[str], transports: list[str], workspace_cwd: str
) -> dict[str, Any]:
    """`GET /capabilities`, in the field order of the original (the official SDK requires `modelServices`)."""
    return {
        "v": PROTOCOL_VERSION,
        "protocolVersions": {"current": "v1", "supported": ["v1"]},
        "serverVersion": server_version,
        "mode": "native",
        "features": list(features),
        "modelServices": [],
        "transports": list(transports),
        "workspaceCwd": workspace_cwd,
    }


# --- reading it back: what a client parses (serve.client) ------------------------------------------------


class WireFormatError(ValueError):
    """A body or frame is not what the contract says (a missing or mistyped member); names what is wrong."""


def _obj(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireFormatError(f"{what}: expected a JSON object")
    return value


def _req(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise WireFormatError(f"{what}: `{key}` is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _opt(obj: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(key)
    if isinstance(value, bool) and kind is not bool:
        return None
    return value if isinstance(value, kind) else None


def parse_capabilities(body: object) -> Capabilities:
    what = "GET /capabilities"
    obj = _obj(body, what)
    features = _req(obj, "features", list, what)
    raw_transports = obj.get("transports")
    transports: list[Any] = raw_transports if isinstance(raw_transports, list) else []
    return Capabilities(
        version=_req(obj, "v", int, what),
        server_version=_req(obj, "serverVersion", str, what),
        mode=_req(obj, "mode", str, what),
        features=tuple(f for f in features if isinstance(f, str)),
        transports=tuple(t for t in transports if isinstance(t, str)),
        workspace_cwd=_req(obj, "workspaceCwd", str, what),
    )


def parse_logout(body: object) -> LoggedOut:
    what = "DELETE /workspace/auth/providers/{providerId}"
    obj = _obj(body, what)
    return LoggedOut(
        provider_id=_req(obj, "providerId", str, what),
        removed=_req(obj, "removed", bool, what),
        revocation=_req(obj, "revocation", str, what),
    )


def parse_device_flow(body: object, what: str = "device flow") -> DeviceFlowInfo:
    """A start (`POST`) or view (`GET`) body."""
    obj = _obj(body, what)
    return DeviceFlowInfo(
        device_flow_id=_req(obj, "deviceFlowId", str, what),
        provider_id=_req(obj, "providerId", str, what),
        status=_req(obj, "status", str, what),
        expires_at_ms=_opt(obj, "expiresAt", int),
        interval_ms=_opt(obj, "intervalMs", int),
        attached=_opt(obj, "attached", bool),
        created_at_ms=_opt(obj, "createdAt", int),
        last_polled_at_ms=_opt(obj, "lastPolledAt", int),
        user_code=_opt(obj, "userCode", str),
        verification_uri=_opt(obj, "verificationUri", str),
        verification_uri_complete=_opt(obj, "verificationUriComplete", str),
        initiator_client_id=_opt(obj, "initiatorClientId", str),
        error_kind=_opt(obj, "errorKind", str),
        hint=_opt(obj, "hint", str),
    )


def parse_auth_status(body: object) -> AuthStatusSnapshot:
    what = "GET /workspace/auth/status"
    obj = _obj(body, what)
    cells = []
    for raw in _req(obj, "providers", list, what):
        cell = _obj(raw, f"{what} provider")
        cells.append(
            ProviderCell(
                provider_id=_req(cell, "providerId", str, what),
                status=_req(cell, "status", str, what),
                auth_state=_opt(cell, "authState", str),
                hint=_opt(cell, "hint", str),
                expires_at_ms=_opt(cell, "expiresAt", int),
                account_alias=_opt(cell, "accountAlias", str),
                updated_at_ms=_opt(cell, "updatedAt", int),
            )
        )
    pending = []
    for raw in _req(obj, "pendingDeviceFlows", list, what):
        flow = _obj(raw, f"{what} pending flow")
        pending.append(
            PendingFlow(
                device_flow_id=_req(flow, "deviceFlowId", str, what),
                provider_id=_req(flow, "providerId", str, what),
                expires_at_ms=_req(flow, "expiresAt", int, what),
            )
        )
    supported = _req(obj, "supportedDeviceFlowProviders", list, what)
    return AuthStatusSnapshot(
        workspace_cwd=_req(obj, "workspaceCwd", str, what),
        providers=tuple(cells),
        pending_device_flows=tuple(pending),
        supported_providers=tuple(p for p in supported if isinstance(p, str)),
    )


def parse_frame(text: str) -> Frame:
    """One text frame of the event stream (SPEC §4): hello, reset, heartbeat, or an event envelope."""
    what = "event stream frame"
    try:
        obj = _obj(json.loads(text), what)
    except (ValueError, RecursionError) as exc:
        raise WireFormatError(f"{what}: not JSON") from exc
    kind = _req(obj, "type", str, what)
    raw_data = obj.get("data")
    data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
    if kind in ("hello", "reset") and "id" not in obj:
        last = _req(data, "lastEventId", int, what)
        epoch = _req(data, "epoch", str, what)
        return StreamHello(last, epoch) if kind == "hello" else StreamReset(last, epoch)
    if kind == "heartbeat" and "id" not in obj:
        return StreamHeartbeat(_req(data, "lastEventId", int, what))
    raw_meta = obj.get("_meta")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    return ReceivedEvent(
        id=_req(obj, "id", int, what),
        type=kind,
        data=data,
        server_timestamp_ms=_opt(meta, "serverTimestamp", int),
        originator_client_id=_opt(obj, "originatorClientId", str),
    )
