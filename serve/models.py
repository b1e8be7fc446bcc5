"""Frozen value objects shared by the registry, the HTTP layer and the client. snake_case only here:
the wire's camelCase lives in `serve.wire`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class FlowStatus(StrEnum):
    PENDING = "pending"
    AUTHORIZED = "authorized"
    EXPIRED = "expired"
    ERROR = "error"
    CANCELLED = "cancelled"


class ErrorKind(StrEnum):
    EXPIRED_TOKEN = "expired_token"
    ACCESS_DENIED = "access_denied"
    INVALID_GRANT = "invalid_grant"
    UPSTREAM_ERROR = "upstream_error"
    PERSIST_FAILED = "persist_failed"


@dataclass(frozen=True, slots=True)
class FlowView:
    """What the registry shows of one flow at one instant. Times are epoch milliseconds.

    `user_code` and the verification URIs are set only while the flow is pending; the HTTP layer decides
    who may see them (the initiator rule of SPEC §2). `expires_at_ms` and `interval_ms` are always set
    (fixed at start / current interval); the wire shows them only while pending.
    """

    device_flow_id: str
    provider_id: str
    status: FlowStatus
    created_at_ms: int
    expires_at_ms: int
    interval_ms: int
    initiator_client_id: str | None = None
    last_polled_at_ms: int | None = None
    error_kind: ErrorKind | None = None
    hint: str | None = None
    user_code: str | None = None
    verification_uri: str | None = None
    verification_uri_complete: str | None = None


@dataclass(frozen=True, slots=True)
class StartOutcome:
    """The answer to a start: the flow, and whether the caller attached to one already running."""

    view: FlowView
    attached: bool


# Events (SPEC §4). The bus wraps each in an envelope; `serve.wire` turns them into JSON.


@dataclass(frozen=True, slots=True)
class FlowStarted:
    device_flow_id: str
    provider_id: str
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class FlowThrottled:
    device_flow_id: str
    interval_ms: int


@dataclass(frozen=True, slots=True)
class FlowAuthorized:
    device_flow_id: str
    provider_id: str
    expires_at_ms: int | None = None  # the access token's expiry, not the flow's
    account_alias: str | None = None


@dataclass(frozen=True, slots=True)
class FlowFailed:
    device_flow_id: str
    error_kind: ErrorKind
    status: FlowStatus  # EXPIRED or ERROR, equal to what GET shows
    hint: str | None = None


@dataclass(frozen=True, slots=True)
class FlowCancelled:
    device_flow_id: str


@dataclass(frozen=True, slots=True)
class CredentialsRefreshed:
    """The daemon refreshed a provider's access token (RFC 6749 §6); `expires_at_ms` is the new expiry."""

    provider_id: str
    expires_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class CredentialsInvalid:
    """The IdP refused the refresh token: the credentials need a new login."""

    provider_id: str
    error_kind: ErrorKind


@dataclass(frozen=True, slots=True)
class CredentialsRemoved:
    """A logout deleted the provider's credentials file."""

    provider_id: str


FlowEvent = FlowStarted | FlowThrottled | FlowAuthorized | FlowFailed | FlowCancelled
CredentialsEvent = CredentialsRefreshed | CredentialsInvalid | CredentialsRemoved
AuthEvent = FlowEvent | CredentialsEvent


@dataclass(frozen=True, slots=True)
class Envelope:
    """One published event: its id (monotonic from 1 per daemon), wire time and originator."""

    id: int
    event: AuthEvent
    server_timestamp_ms: int
    originator_client_id: str | None = None


class AuthState(StrEnum):
    AUTHENTICATED = "authenticated"
    EXPIRED = "expired"
    UNAUTHENTICATED = "unauthenticated"
    INVALID = "invalid"  # the IdP refused the refresh token: log in again


@dataclass(frozen=True, slots=True)
class CredentialSummary:
    """What the store knows of one provider's credentials file; never a token."""

    expires_at_ms: int | None  # the access token's expiry (`expiry_date`), if the file says
    updated_at_ms: int  # the file's mtime
    account_alias: str | None = None
    obtained_at_ms: int | None = None  # when the tokens were issued (`obtained_at`), if the file says


@dataclass(frozen=True, slots=True)
class ProviderAuthStatus:
    """One cell of the status snapshot's `providers` (the official SDK's DaemonAuthProviderStatus)."""

    provider_id: str
    auth_state: AuthState
    expires_at_ms: int | None = None
    updated_at_ms: int | None = None
    account_alias: str | None = None


# --- what a client reads back (serve.client) -------------------------------------------------------------
# Statuses and error kinds stay strings here: a client must tolerate values a newer daemon adds.


@dataclass(frozen=True, slots=True)
class LoggedOut:
    """`DELETE /workspace/auth/providers/{providerId}`: `revocation` is revoked, failed, unsupported or none."""

    provider_id: str
    removed: bool
    revocation: str


@dataclass(frozen=True, slots=True)
class Capabilities:
    """`GET /capabilities`."""

    version: int
    server_version: str
    mode: str
    features: tuple[str, ...]
    transports: tuple[str, ...]
    workspace_cwd: str


@dataclass(frozen=True, slots=True)
class DeviceFlowInfo:
    """A device flow as `POST` or `GET /workspace/auth/device-flow…` shows it to this caller.

    `attached` is set by a start only. The user code and URIs are there only for the initiator of a pending
    flow (SPEC §2). Times are epoch milliseconds.
    """

    device_flow_id: str
    provider_id: str
    status: str
    expires_at_ms: int | None = None
    interval_ms: int | None = None
    attached: bool | None = None
    created_at_ms: int | None = None
    last_polled_at_ms: int | None = None
    user_code: str | None = None
    verification_uri: str | None = None
    verification_uri_complete: str | None = None
    initiator_client_id: str | None = None
    error_kind: str | None = None
    hint: str | None = None


@dataclass(frozen=True, slots=True)
class ProviderCell:
    """One provider of `GET /workspace/auth/status`."""

    provider_id: str
    status: str  # ok | warning | not_started (the official SDK's cell status)
    auth_state: str | None = None  # authenticated | expired | unauthenticated
    hint: str | None = None
    expires_at_ms: int | None = None
    account_alias: str | None = None
    updated_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class PendingFlow:
    device_flow_id: str
    provider_id: str
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class AuthStatusSnapshot:
    """`GET /workspace/auth/status`."""

    workspace_cwd: str
    providers: tuple[ProviderCell, ...]
    pending_device_flows: tuple[PendingFlow, ...]
    supported_providers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """One event envelope as a subscriber receives it; `data` keeps the wire's keys (camelCase)."""

    id: int
    type: str
    data: Mapping[str, Any]
    server_timestamp_ms: int | None = None
    originator_client_id: str | None = None


@dataclass(frozen=True, slots=True)
class StreamHello:
    last_event_id: int
    epoch: str


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The daemon could not replay from where the subscriber was (ring moved on, or a restart): re-read
    the state over REST. Events from `last_event_id` on follow."""

    last_event_id: int
    epoch: str


@dataclass(frozen=True, slots=True)
class StreamHeartbeat:
    last_event_id: int


Frame = StreamHello | StreamReset | StreamHeartbeat | ReceivedEvent
