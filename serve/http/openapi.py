"""The OpenAPI 3.1 description of every route (served at `GET /openapi.json`).

Schemas are JSON Schema 2020-12, so a test validates the daemon's real responses against them.
`additionalProperties: false` on the compatible bodies: a field the contract does not name is a bug.
"""

from __future__ import annotations

from typing import Any

from serve import __version__, wire
from serve.errors import UpstreamFailure
from serve.models import AuthState, ErrorKind, FlowStatus


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_MS = {"type": "integer", "description": "epoch milliseconds"}
_FLOW_ID = {"type": "string", "minLength": 1}
# Enums come from the models (and the wire's mapping), so the document cannot drift from what is sent.
_STATUS = {"type": "string", "enum": [status.value for status in FlowStatus]}
_ERROR_KIND = {"type": "string", "enum": [kind.value for kind in ErrorKind]}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "code": {"type": "string"},
            "supportedProviders": {"type": "array", "items": {"type": "string"}},
        },
        "additionalProperties": False,
    },
    "UpstreamError": {
        "type": "object",
        "required": ["error", "code"],
        "properties": {
            "error": {"type": "string"},
            "code": {"const": "upstream_error"},
            "failure": {
                "type": "string",
                "enum": [failure.value for failure in UpstreamFailure],
                "description": "why, as a class a person can act on (absent when unknown)",
            },
            "hint": {"type": "string", "description": "what to fix: a static sentence, never the IdP's text"},
        },
        "additionalProperties": False,
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ok"}},
        "additionalProperties": False,
    },
    "Capabilities": {
        "type": "object",
        "required": ["v", "protocolVersions", "serverVersion", "mode", "features", "modelServices", "transports"],
        "properties": {
            "v": {"const": 1},
            "protocolVersions": {
                "type": "object",
                "required": ["current", "supported"],
                "properties": {
                    "current": {"type": "string"},
                    "supported": {"type": "array", "items": {"type": "string"}},
                },
            },
            "serverVersion": {"type": "string"},
            "mode": {"type": "string", "enum": ["native", "http-bridge"]},
            "features": {"type": "array", "items": {"type": "string"}},
            "modelServices": {"type": "array"},
            "transports": {"type": "array", "items": {"type": "string"}},
            "workspaceCwd": {"type": "string"},
        },
    },
    "StartRequest": {
        "type": "object",
        "required": ["providerId"],
        "properties": {"providerId": {"type": "string", "minLength": 1}},
    },
    "StartResult": {
        "type": "object",
        "required": ["deviceFlowId", "providerId", "status", "expiresAt", "intervalMs", "attached"],
        "properties": {
            "deviceFlowId": _FLOW_ID,
            "providerId": {"type": "string"},
            "status": {"const": "pending"},
            "expiresAt": _MS,
            "intervalMs": {"type": "integer", "minimum": 0},
            "attached": {"type": "boolean"},
            "userCode": {"type": "string", "description": "initiator only"},
            "verificationUri": {"type": "string", "description": "initiator only"},
            "verificationUriComplete": {"type": "string", "description": "initiator only, when the IdP gave one"},
            "initiatorClientId": {"type": "string"},
        },
        "additionalProperties": False,
    },
    "FlowState": {
        "type": "object",
        "required": ["deviceFlowId", "providerId", "status", "createdAt"],
        "properties": {
            "deviceFlowId": _FLOW_ID,
            "providerId": {"type": "string"},
            "status": _STATUS,
            "createdAt": _MS,
            "expiresAt": _MS,
            "intervalMs": {"type": "integer", "minimum": 0},
            "errorKind": _ERROR_KIND,
            "hint": {"type": "string"},
            "lastPolledAt": _MS,
            "userCode": {"type": "string"},
            "verificationUri": {"type": "string"},
            "verificationUriComplete": {"type": "string"},
            "initiatorClientId": {"type": "string"},
        },
        "additionalProperties": False,
    },
    "ProviderStatus": {
        "type": "object",
        "required": ["kind", "providerId", "status", "authState"],
        "properties": {
            "kind": {"const": "auth_provider"},
            "providerId": {"type": "string"},
            "status": {"type": "string", "enum": list(dict.fromkeys(wire.CELL_STATUS.values()))},
            "hint": {"type": "string"},
            "expiresAt": _MS,
            "accountAlias": {"type": "string"},
            "authState": {"type": "string", "enum": [state.value for state in AuthState]},
            "updatedAt": _MS,
        },
        "additionalProperties": False,
    },
    "Logout": {
        "type": "object",
        "required": ["providerId", "removed", "revocation"],
        "properties": {
            "providerId": {"type": "string"},
            "removed": {"type": "boolean", "description": "a credentials file was there and is deleted"},
            "revocation": {
                "type": "string",
                "enum": ["revoked", "failed", "unsupported", "none"],
                "description": "RFC 7009 at the IdP: done, not confirmed (the local logout still happened), "
                "no revocation endpoint, or nothing to revoke",
            },
        },
        "additionalProperties": False,
    },
    "AuthStatus": {
        "type": "object",
        "required": ["v", "workspaceCwd", "providers", "pendingDeviceFlows", "supportedDeviceFlowProviders"],
        "properties": {
            "v": {"const": 1},
            "workspaceCwd": {"type": "string"},
            "providers": {"type": "array", "items": _ref("ProviderStatus")},
            "pendingDeviceFlows": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["deviceFlowId", "providerId", "expiresAt"],
                    "properties": {"deviceFlowId": _FLOW_ID, "providerId": {"type": "string"}, "expiresAt": _MS},
                    "additionalProperties": False,
                },
            },
            "supportedDeviceFlowProviders": {"type": "array", "items": {"type": "string"}},
        },
        "additionalProperties": False,
    },
}

# Gates 1–2 (SPEC §1) run on every route, /health and the WebSocket handshake included.
_FORBIDDEN = {"403": _error("`Host` not allowed (DNS-rebinding defence) or `Origin` denied by the CORS policy")}
_UNAUTHORIZED = {"401": _error("missing or wrong bearer token"), **_FORBIDDEN}
_STRICT = {
    "401": _error("missing or wrong bearer token, or `token_required` on a token-less daemon"),
    **_FORBIDDEN,
}
_FLOW_PARAM = [{"name": "deviceFlowId", "in": "path", "required": True, "schema": {"type": "string"}}]
_CLIENT_ID = {
    "name": "X-Qwen-Client-Id",
    "in": "header",
    "required": False,
    "description": "best-effort attribution, not identity; `^[A-Za-z0-9._:-]{1,128}$`",
    "schema": {"type": "string"},
}


def openapi_document() -> dict[str, Any]:
    """The whole document; built per call (it is small and rarely read)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "qwen-serve",
            "version": __version__,
            "description": "Brokers OAuth 2.0 device logins (RFC 8628) for remote clients.",
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/health": {
                "get": {
                    "security": [],
                    "summary": "Liveness; the only route open without a token",
                    "responses": {"200": _json(_ref("Health"), "alive"), **_FORBIDDEN},
                }
            },
            "/capabilities": {
                "get": {
                    "summary": "What this daemon can do",
                    "responses": {"200": _json(_ref("Capabilities"), "capabilities"), **_UNAUTHORIZED},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1"), **_UNAUTHORIZED},
                }
            },
            "/workspace/auth/device-flow": {
                "post": {
                    "summary": "Start (201) or attach to (200) the provider's device flow",
                    "parameters": [_CLIENT_ID],
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": _ref("StartRequest")}},
                    },
                    "responses": {
                        "201": _json(_ref("StartResult"), "a fresh flow"),
                        "200": _json(_ref("StartResult"), "attached to the provider's pending flow"),
                        "400": _error("invalid_request, invalid_json, unsupported_provider or invalid_client_id"),
                        **_STRICT,
                        "409": _error("too_many_active_flows (Retry-After)"),
                        "413": _error("payload_too_large"),
                        "429": _error("rate_limited (Retry-After)"),
                        "502": _json(_ref("UpstreamError"), "upstream_error; `failure` and `hint` say why"),
                        "503": _error("shutting_down"),
                    },
                }
            },
            "/workspace/auth/device-flow/{deviceFlowId}": {
                "parameters": _FLOW_PARAM,
                "get": {
                    "summary": "A flow's state",
                    "parameters": [_CLIENT_ID],
                    "responses": {
                        "200": _json(_ref("FlowState"), "the flow"),
                        "400": _error("invalid_client_id"),
                        **_UNAUTHORIZED,
                        "404": _error("device_flow_not_found"),
                    },
                },
                "delete": {
                    "summary": "Cancel a flow (idempotent; a finished flow is left as it is)",
                    "parameters": [_CLIENT_ID],
                    "responses": {
                        "204": {"description": "cancelled, already finished, or deferred during a credential write"},
                        "400": _error("invalid_client_id"),
                        **_STRICT,
                        "404": _error("device_flow_not_found"),
                    },
                },
            },
            "/workspace/auth/providers/{providerId}": {
                "parameters": [{"name": "providerId", "in": "path", "required": True, "schema": {"type": "string"}}],
                "delete": {
                    "summary": "Log out: cancel its pending login, revoke its tokens at the IdP, delete its credentials",
                    "parameters": [_CLIENT_ID],
                    "responses": {
                        "200": _json(_ref("Logout"), "logged out (also when there was nothing to remove)"),
                        "400": _error("unsupported_provider or invalid_client_id"),
                        **_STRICT,
                        "500": _error("logout_failed: the credentials file could not be deleted"),
                        "503": _error("shutting_down"),
                    },
                },
            },
            "/workspace/auth/status": {
                "get": {
                    "summary": "Providers' login state and pending flows",
                    "responses": {"200": _json(_ref("AuthStatus"), "the snapshot"), **_UNAUTHORIZED},
                }
            },
            "/workspace/auth/events": {
                "get": {
                    "summary": "WebSocket stream of auth events (hello, replay or reset, live, heartbeat)",
                    "parameters": [
                        {
                            "name": "since",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 0},
                        },
                        {"name": "epoch", "in": "query", "required": False, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "101": {"description": "switching to the WebSocket protocol"},
                        "400": _error("bad `since`"),
                        **_UNAUTHORIZED,
                        "429": _error("too many subscribers"),
                        "503": _error("shutting_down"),
                    },
                }
            },
        },
    }
