"""The provider protocol (SPEC §5): a provider builds device-flow requests and parses the replies.

Timing (intervals, back-off, deadlines, the cap) lives once, in the registry. A provider never sleeps
and never retries. `authorization_pending` and `slow_down` are values, not exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from serve.credentials import Credentials
from serve.models import ErrorKind
from serve.secrets import Secret


@dataclass(frozen=True, slots=True)
class DeviceAuthorization:
    """The IdP's device authorization response (RFC 8628 §3.2), raw: the registry clamps the numbers.

    `expires_in` / `interval` are None when missing or not a finite number the provider could parse.
    """

    device_code: Secret[str]
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None = None
    expires_in: float | None = None
    interval: float | None = None
    code_verifier: Secret[str] | None = None  # the PKCE verifier, when the provider uses PKCE


@dataclass(frozen=True, slots=True)
class PollPending:
    """`authorization_pending`: ask again after the current interval."""


@dataclass(frozen=True, slots=True)
class PollSlowDown:
    """`slow_down` (RFC 8628 §3.5); `interval` is the IdP's new interval when it sent one (GitHub does)."""

    interval: float | None = None


@dataclass(frozen=True, slots=True)
class PollSuccess:
    credentials: Credentials


@dataclass(frozen=True, slots=True)
class PollFailed:
    """A terminal OAuth error. `hint` is a static, human sentence: never raw IdP text."""

    kind: ErrorKind
    hint: str


@dataclass(frozen=True, slots=True)
class PollTransient:
    """A fault worth retrying (5xx, connection error, non-JSON body, `server_error`, ...).

    `reason` is static and short; it reaches the audit line, never the wire.
    """

    reason: str


PollResult = PollPending | PollSlowDown | PollSuccess | PollFailed | PollTransient


class DeviceFlowProvider(Protocol):
    """One identity provider the daemon can log in to."""

    @property
    def provider_id(self) -> str: ...

    @property
    def credentials_file(self) -> str:
        """Where its credentials land, relative to `$QWEN_HOME`."""

    async def start(self) -> DeviceAuthorization:
        """Ask the IdP for a device code. Raises `UpstreamError` (static message) on any failure."""

    async def poll(self, authorization: DeviceAuthorization) -> PollResult:
        """One token request. Never raises for an IdP or network fault: those are `PollResult`s."""


# --- after the login: refresh (RFC 6749 §6) and revocation (RFC 7009) ---------------------------------


@dataclass(frozen=True, slots=True)
class RefreshSucceeded:
    """The new credentials document, the old refresh token kept in it when the IdP sent none."""

    credentials: Credentials


@dataclass(frozen=True, slots=True)
class RefreshRejected:
    """The IdP refused the refresh (`invalid_grant`, or the client itself): only a new login helps."""

    kind: ErrorKind
    hint: str


@dataclass(frozen=True, slots=True)
class RefreshTransient:
    """A fault worth retrying; `reason` is static and short."""

    reason: str


RefreshResult = RefreshSucceeded | RefreshRejected | RefreshTransient
# What a logout's revocation came to: "none" when there were no credentials to revoke.
Revocation = Literal["revoked", "failed", "unsupported", "none"]


@runtime_checkable
class Refreshable(DeviceFlowProvider, Protocol):
    """A provider whose credentials the daemon can refresh."""

    @property
    def refresh_enabled(self) -> bool:
        """Whether the daemon should keep them fresh (`refresh = "auto"`)."""

    async def refresh(self, document: Secret[Mapping[str, object]]) -> RefreshResult:
        """One refresh grant with the document's refresh token. Never raises for an IdP or network fault."""


@runtime_checkable
class Revocable(DeviceFlowProvider, Protocol):
    """A provider that can revoke its tokens at the IdP on logout."""

    async def revoke(self, document: Secret[Mapping[str, object]]) -> Revocation:
        """Revoke the refresh token, then the access token; "unsupported" without a revocation endpoint."""
