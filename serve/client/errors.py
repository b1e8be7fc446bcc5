"""What the client raises. Messages are one line a person can act on; they never carry the token.

DaemonError
├── DaemonUnreachable     no answer: refused, timed out, DNS, TLS (the daemon is not there)
├── DaemonHTTPError       the daemon answered non-2xx: `status`, `code`, `message`, `body`
└── DaemonProtocolError   an answer that is not the daemon's contract (not qwen-serve, or a newer one)
"""

from __future__ import annotations

from typing import Any


class DaemonError(Exception):
    """Base of every error `serve.client` raises."""


class DaemonUnreachable(DaemonError):
    """The daemon could not be reached at all."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach the daemon at {url}: {reason}")


class DaemonHTTPError(DaemonError):
    """A non-2xx answer. `code` is the wire's `code` (None when the body has none, as for 401 and 403)."""

    def __init__(self, status: int, code: str | None, message: str, body: Any) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        super().__init__(f"{status} {code}: {message}" if code else f"{status}: {message}")


class DaemonProtocolError(DaemonError):
    """The peer answered, but not as a qwen-serve daemon does."""
