"""The wire: internal values ⇄ camelCase JSON, in one place (SPEC §2, §4). Imports no server module.

Field order follows the original `qwen serve` 0.24.4 byte for byte (`tests` compare whole bodies).
"""

from __future__ import annotations

import json
from typing import Any

from serve.models import (
    AuthEvent,
    Envelope,
    FlowAuthorized,
    FlowCancelled,
    FlowFailed,
    FlowStarted,
    FlowThrottled,
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


def hello_frame(last_event_id: int, epoch: str) -> str:
    return dumps({"v": PROTOCOL_VERSION, "type": "hello", "data": {"lastEventId": last_event_id, "epoch": epoch}})


def reset_frame(last_event_id: int, epoch: str) -> str:
    return dumps({"v": PROTOCOL_VERSION, "type": "reset", "data": {"lastEventId": last_event_id, "epoch": epoch}})


def heartbeat_frame(last_event_id: int) -> str:
    return dumps({"v": PROTOCOL_VERSION, "type": "heartbeat", "data": {"lastEventId": last_event_id}})
