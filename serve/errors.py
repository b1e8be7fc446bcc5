"""The error tree. Each wire error carries its HTTP `status` and wire `code`; one handler renders them.

    ServeError                      500 internal_error   (anything unexpected is rendered as this)
    ├── InvalidRequest              400 invalid_request
    ├── InvalidJson                 400 invalid_json
    ├── InvalidClientId             400 invalid_client_id
    ├── InvalidRequestTarget        400 invalid_request_target (+)  an absolute-form or `*` request target
    ├── UnsupportedProvider         400 unsupported_provider  (+ the supported providers)
    ├── Unauthorized                401 (no code, as the original)   + WWW-Authenticate: Bearer
    ├── TokenRequired               401 token_required
    ├── InvalidHost                 403 (no code)
    ├── OriginDenied                403 (no code)                     + Vary: Origin
    ├── RouteNotFound               404 not_found
    ├── DeviceFlowNotFound          404 device_flow_not_found
    ├── MethodNotAllowed            405 method_not_allowed            + Allow
    ├── TooManyActiveFlows          409 too_many_active_flows         + Retry-After
    ├── PayloadTooLarge             413 payload_too_large
    ├── RateLimited                 429 rate_limited                  + Retry-After
    ├── TooManySubscribers          429 too_many_subscribers   (the event stream's handshake)
    ├── UpstreamError               502 upstream_error   (static message; IdP text never reaches the wire)
    │                                   (+ `failure` and a static `hint` when a `Diagnosis` says why)
    └── ShuttingDown                503 shutting_down

    ConfigError      start-up only: a bad configuration key (exit 2)
    PersistError     the credential store could not write (becomes persist_failed; detail for the audit only)

Bodies are rendered by `serve.wire.error_body`. Messages are static or built from values the caller sent; never a token, device code, verifier or raw IdP text.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Self


class ServeError(Exception):
    """Base of every error the daemon renders on the wire."""

    status: ClassVar[int] = 500
    code: ClassVar[str | None] = "internal_error"
    default_message: ClassVar[str] = "Internal error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message if message is not None else self.default_message
        super().__init__(self.message)

    def headers(self) -> dict[str, str]:
        return {}

    def copy(self) -> Self:
        """A fresh exception of the same class, message and fields, without a traceback: raise one per task
        when several tasks report one failure (one instance raised in many would share a traceback)."""
        return copy.copy(self)


class InvalidRequest(ServeError):
    status = 400
    code = "invalid_request"
    default_message = "`providerId` must be a non-empty string"


class InvalidJson(ServeError):
    status = 400
    code = "invalid_json"
    default_message = "Invalid JSON in request body"


class InvalidClientId(ServeError):
    status = 400
    code = "invalid_client_id"
    default_message = "`X-Qwen-Client-Id` must be a non-empty token of 128 characters or fewer"


class InvalidRequestTarget(ServeError):
    """(+) The request target is not origin-form (`/path`): refused so gates and router see one path."""

    status = 400
    code = "invalid_request_target"
    default_message = "The request target must be a path (origin-form), not an absolute URI"


class UnsupportedProvider(ServeError):
    status = 400
    code = "unsupported_provider"

    def __init__(self, provider_id: str, supported: list[str]) -> None:
        super().__init__(f"Unsupported device-flow provider: {provider_id}")
        self.supported = list(supported)


class Unauthorized(ServeError):
    status = 401
    code = None
    default_message = "Unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class TokenRequired(ServeError):
    status = 401
    code = "token_required"
    default_message = (
        "This route requires the daemon to be configured with a bearer token. "
        "Set QWEN_SERVER_TOKEN or pass --token to enable bearer auth."
    )


class InvalidHost(ServeError):
    status = 403
    code = None
    default_message = "Invalid Host header"


class OriginDenied(ServeError):
    status = 403
    code = None
    default_message = "Request denied by CORS policy"

    def headers(self) -> dict[str, str]:
        return {"Vary": "Origin"}


class RouteNotFound(ServeError):
    status = 404
    code = "not_found"
    default_message = "Not found"


class DeviceFlowNotFound(ServeError):
    status = 404
    code = "device_flow_not_found"

    def __init__(self, device_flow_id: str) -> None:
        super().__init__(f"Device-flow {device_flow_id} not found")


class MethodNotAllowed(ServeError):
    status = 405
    code = "method_not_allowed"
    default_message = "Method not allowed"

    def __init__(self, allowed: list[str] | None = None) -> None:
        super().__init__()
        self.allowed = sorted(allowed or [])

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)} if self.allowed else {}


class _RetryAfter(ServeError):
    """An error that tells the client when to try again (whole seconds, at least 1)."""

    def __init__(self, retry_after_s: float, message: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(-(-retry_after_s // 1)))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class TooManyActiveFlows(_RetryAfter):
    status = 409
    code = "too_many_active_flows"
    default_message = (
        "Too many active device-flow attempts. Cancel one of the existing flows or wait for them to expire."
    )


class PayloadTooLarge(ServeError):
    status = 413
    code = "payload_too_large"
    default_message = "Request body too large"


class RateLimited(_RetryAfter):
    status = 429
    code = "rate_limited"
    default_message = "Too many device-flow starts; try again later"


class TooManySubscribers(ServeError):
    status = 429
    code = "too_many_subscribers"
    default_message = "Too many event stream subscribers"


class UpstreamFailure(StrEnum):
    """Why an exchange with an identity provider failed, as a class a person can act on (a 502's `failure`)."""

    IDP_UNREACHABLE = "idp_unreachable"  # connection refused, DNS, TLS, a proxy
    IDP_TIMEOUT = "idp_timeout"
    DISCOVERY_FAILED = "discovery_failed"  # no usable metadata document for the configured issuer
    CLIENT_REJECTED = "client_rejected"  # invalid_client, unauthorized_client (and GitHub's names for them)
    REQUEST_REJECTED = "request_rejected"  # invalid_request, invalid_scope: the configuration asks wrongly
    CLIENT_SECRET_UNAVAILABLE = "client_secret_unavailable"  # the configured variable or file holds none
    BAD_IDP_REPLY = "bad_idp_reply"  # an answer, but not a usable one (HTTP status, not JSON, unknown error)


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """What went wrong with an IdP, for the person who can fix it.

    `hint` is a static sentence saying what to check or change: it may reach the wire. `detail` holds the
    facts behind it (exception type, IdP host, HTTP status, OAuth `error` code, sanitised and capped) for
    stderr and `qwen-serve check` only, never the wire. Neither holds a secret or the IdP's free text.
    """

    failure: UpstreamFailure
    hint: str
    detail: str = ""


class UpstreamError(ServeError):
    """The IdP failed. The message stays static (the original's bodies); `diagnosis`, when known, adds the
    body's `failure` and `hint` and the daemon's warning line."""

    status = 502
    code = "upstream_error"
    default_message = "device-flow upstream request failed"

    def __init__(self, message: str | None = None, diagnosis: Diagnosis | None = None) -> None:
        super().__init__(message)
        self.diagnosis = diagnosis


class LogoutFailed(ServeError):
    status = 500
    code = "logout_failed"
    default_message = "the credentials file could not be deleted"


class ShuttingDown(ServeError):
    status = 503
    code = "shutting_down"
    default_message = "daemon is shutting down"


class ConfigError(Exception):
    """A configuration key is unknown or has a bad value; the message names the key (exit 2)."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


class PersistError(Exception):
    """The credential store could not write. `detail` (an errno name, say) goes to the audit line only."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)
