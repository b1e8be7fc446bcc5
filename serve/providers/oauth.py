"""What every device-flow provider shares: sending a form POST, reading a bounded reply, classifying it.

- `send`: one request, never following redirects, the reply body capped at `MAX_REPLY_BYTES` (read as a
  stream and abandoned beyond the cap), parsed tolerantly (JSON, or form-encoded as GitHub answers).
- `classify_token_reply`: SPEC §3's table, by the `error` member first, never by HTTP status alone.
- `parse_device_authorization`: RFC 8628 §3.2 with real IdPs' quirks (Google's `verification_url`, numbers
  sent as strings, a missing `interval`, a `verification_uri_complete` on a foreign origin), refusing
  what would mislead a user (a long or unprintable user code, a URL with userinfo).
- PKCE (RFC 7636, S256 only).

Hints and reasons built here are static sentences: an IdP's `error_description` (or any other text it sends)
never reaches one. Only error codes from the fixed RFC 6749 / RFC 8628 vocabulary are named.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import httpx

from serve.errors import UpstreamError
from serve.models import ErrorKind
from serve.netloc import url_problem
from serve.providers.base import (
    DeviceAuthorization,
    PollFailed,
    PollPending,
    PollResult,
    PollSlowDown,
    PollTransient,
)
from serve.secrets import Secret

MAX_REPLY_BYTES = 1 << 20  # 1 MiB: an IdP reply is a few hundred bytes; anything near this is hostile.
# RFC 8628 §6.1: a user code is short enough to type by hand; its example and real IdPs' (Google, GitHub,
# Microsoft) are 8-9 characters. 32 leaves room for any of them and none for a sentence of instructions.
MAX_USER_CODE_CHARS = 32

DEVICE_CODE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"  # RFC 8628 §3.4

# RFC 8628 §3.5 / RFC 6749 §5.2 codes. Only these literals may appear in a hint; anything else is "unexpected".
_TERMINAL_KINDS = {
    "access_denied": ErrorKind.ACCESS_DENIED,
    "expired_token": ErrorKind.EXPIRED_TOKEN,
    "invalid_grant": ErrorKind.INVALID_GRANT,
    # The same outcomes under the names IdPs really send: Microsoft Entra's refusal, GitHub's expiry.
    "authorization_declined": ErrorKind.ACCESS_DENIED,
    "token_expired": ErrorKind.EXPIRED_TOKEN,
}
_TRANSIENT_CODES = frozenset({"server_error", "temporarily_unavailable"})
_KNOWN_UPSTREAM_CODES = frozenset(
    {"invalid_request", "invalid_client", "unauthorized_client", "unsupported_grant_type", "invalid_scope"}
)


class ReplyTooLarge(Exception):
    """The IdP's reply body exceeded `MAX_REPLY_BYTES`; the rest was not read."""


@dataclass(frozen=True, slots=True)
class Reply:
    """An IdP reply: its HTTP status and its body as a flat mapping, or None when the body was not JSON
    (an object) nor form-encoded."""

    status_code: int
    fields: Mapping[str, object] | None


# --- requests ---------------------------------------------------------------------------------------


async def send(http: httpx.AsyncClient, request: httpx.Request) -> Reply:
    """Send one request without following redirects and read at most `MAX_REPLY_BYTES` of its body.

    Raises `httpx.HTTPError` (connection errors, timeouts, ...) and `ReplyTooLarge`.
    """
    response = await http.send(request, stream=True, follow_redirects=False)
    try:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_REPLY_BYTES:
            raise ReplyTooLarge
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_REPLY_BYTES:
                raise ReplyTooLarge
    finally:
        await response.aclose()
    return Reply(response.status_code, parse_body(bytes(body), response.headers.get("content-type", "")))


def form_request(
    http: httpx.AsyncClient,
    url: str,
    form: Mapping[str, str],
    *,
    headers: Mapping[str, str] | None = None,
) -> httpx.Request:
    """A form-encoded POST that asks for JSON (RFC 8628 §3.1 / §3.4)."""
    return http.build_request(
        "POST",
        url,
        data=dict(form),
        headers={"Accept": "application/json", **(headers or {})},
    )


def parse_body(body: bytes, content_type: str) -> Mapping[str, object] | None:
    """A JSON object, else (when the content type says so) a form-encoded body, else None."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict):
        return value
    media_type = content_type.split(";", 1)[0].strip().lower()
    if value is None and media_type == "application/x-www-form-urlencoded":
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return dict(parse_qsl(text, keep_blank_values=True))
    return None


# --- tolerant values --------------------------------------------------------------------------------


def parse_number(value: object) -> float | None:
    """A finite number, also when sent as a string ("5"); None for anything else (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def expiry_ms(now_ms: int, expires_in: object) -> int | None:
    """Epoch ms at which a token with this `expires_in` (seconds) expires; None unless positive and finite."""
    seconds = parse_number(expires_in)
    if seconds is None or seconds <= 0:
        return None
    return now_ms + round(seconds * 1000)


def is_allowed_url(url: object) -> bool:
    """A URL `serve.config.url_problem` accepts: https (or http to a loopback host), no userinfo, ASCII.

    Applied to everything an IdP names: discovered endpoints, `verification_uri` and its `_complete`.
    """
    return isinstance(url, str) and url_problem(url) is None


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with default ports filled in, for same-origin comparison."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"https": 443, "http": 80}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


# --- PKCE (RFC 7636) --------------------------------------------------------------------------------


def new_code_verifier() -> Secret[str]:
    """32 random bytes, base64url without padding: 43 characters (RFC 7636 §4.1)."""
    return Secret(base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii"))


def s256_code_challenge(code_verifier: Secret[str]) -> str:
    """BASE64URL(SHA256(verifier)) without padding (RFC 7636 §4.2)."""
    digest = hashlib.sha256(code_verifier.reveal().encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# --- device authorization response (RFC 8628 §3.2) -------------------------------------------------


def parse_device_authorization(reply: Reply, code_verifier: Secret[str] | None) -> DeviceAuthorization | None:
    """The device authorization, or None when the reply is not a usable one.

    Tolerates Google's `verification_url` and numbers sent as strings. Refuses a user code that is not
    `is_displayable_user_code`, and a `verification_uri` that is not `is_allowed_url`; drops (rather than
    refuses) a `verification_uri_complete` that is not allowed or whose origin differs from
    `verification_uri` (a user would be sent somewhere the code was not issued).
    """
    fields = reply.fields
    if not 200 <= reply.status_code < 300 or fields is None or "error" in fields:
        return None
    device_code = fields.get("device_code")
    user_code = fields.get("user_code")
    verification_uri = fields.get("verification_uri", fields.get("verification_url"))
    if not (isinstance(device_code, str) and device_code and isinstance(user_code, str)):
        return None
    if not is_displayable_user_code(user_code):
        return None
    # The one URI a user must open: without an acceptable one there is no flow to offer.
    if not isinstance(verification_uri, str) or not is_allowed_url(verification_uri):
        return None
    # RFC 8628 §3.2: `verification_uri_complete` is OPTIONAL, so a doubtful one (foreign origin, userinfo,
    # cleartext) is dropped, as SPEC §5 drops a foreign one: the user still has `verification_uri` + code.
    complete = fields.get("verification_uri_complete", fields.get("verification_url_complete"))
    if not (isinstance(complete, str) and is_allowed_url(complete) and origin(complete) == origin(verification_uri)):
        complete = None
    return DeviceAuthorization(
        device_code=Secret(device_code),
        user_code=user_code,
        verification_uri=verification_uri,
        verification_uri_complete=complete,
        expires_in=parse_number(fields.get("expires_in")),
        interval=parse_number(fields.get("interval")),
        code_verifier=code_verifier,
    )


def is_displayable_user_code(user_code: str) -> bool:
    """Not blank, at most `MAX_USER_CODE_CHARS` characters, and every one printable.

    The code is shown to a person (wire, events, audit): `str.isprintable` refuses C0, DEL and C1 controls,
    line and paragraph separators (U+2028/2029), format characters (zero-width U+200B-200F, bidi embeddings
    and isolates U+202A-202E / U+2066-2069, U+FEFF), unassigned and private-use code points, and every
    space but U+0020: all that could hide, reorder or forge what the user reads and types.
    """
    return 0 < len(user_code) <= MAX_USER_CODE_CHARS and user_code.isprintable() and not user_code.isspace()


# --- token response classification (SPEC §3) ------------------------------------------------------


def classify_token_reply(
    reply: Reply,
    *,
    label: str,
    on_success: Callable[[Mapping[str, object]], PollResult],
) -> PollResult:
    """Classify a token endpoint reply by its `error` member first, then by HTTP status.

    `label` names the IdP in hints ("Qwen" → "Qwen IdP returned access_denied"). `on_success` turns a 2xx
    reply carrying an access token into the provider's `PollSuccess`.
    """
    fields = reply.fields
    error = fields.get("error") if fields is not None else None
    if isinstance(error, str) and error:
        return _classify_error_code(error, label, fields or {})
    status = reply.status_code
    if 200 <= status < 300 and fields is not None:
        token = fields.get("access_token")
        if isinstance(token, str) and token:
            return on_success(fields)
        return PollFailed(ErrorKind.UPSTREAM_ERROR, f"{label} IdP returned no access token")
    if 300 <= status < 400:
        # Token POSTs never follow redirects: a redirected credential is a credential sent elsewhere.
        return PollFailed(ErrorKind.UPSTREAM_ERROR, f"{label} IdP redirected the token request")
    if status >= 500:
        return PollTransient(f"IdP answered HTTP {status}")
    if fields is None:
        return PollTransient("IdP reply was not JSON")
    return PollFailed(ErrorKind.UPSTREAM_ERROR, f"{label} IdP returned an unexpected response")


def _classify_error_code(error: str, label: str, fields: Mapping[str, object]) -> PollResult:
    if error == "authorization_pending":
        return PollPending()
    if error == "slow_down":
        # GitHub sends the new interval with the error; RFC 8628 §3.5 otherwise adds 5 s (the registry's job).
        return PollSlowDown(parse_number(fields.get("interval")))
    kind = _TERMINAL_KINDS.get(error)
    if kind is not None:
        return PollFailed(kind, f"{label} IdP returned {error}")
    if error in _TRANSIENT_CODES:
        return PollTransient(f"IdP returned {error}")
    if error in _KNOWN_UPSTREAM_CODES:
        return PollFailed(ErrorKind.UPSTREAM_ERROR, f"{label} IdP returned {error}")
    return PollFailed(ErrorKind.UPSTREAM_ERROR, f"{label} IdP returned an unexpected error")


async def request_device_authorization(
    http: httpx.AsyncClient, request: httpx.Request, code_verifier: Secret[str] | None, *, failure: str
) -> DeviceAuthorization:
    """Send a device authorization request and parse its reply (RFC 8628 §3.1-3.2), for every provider.

    Raises `UpstreamError(failure)` (a static message) when the IdP cannot be reached, answers too much, or
    answers anything but a usable device authorization.
    """
    try:
        reply = await send(http, request)
    except (httpx.HTTPError, ReplyTooLarge) as exc:
        raise UpstreamError(failure) from exc
    authorization = parse_device_authorization(reply, code_verifier)
    if authorization is None:
        raise UpstreamError(failure)
    return authorization


async def poll_token_endpoint(
    http: httpx.AsyncClient,
    request: httpx.Request,
    *,
    label: str,
    on_success: Callable[[Mapping[str, object]], PollResult],
) -> PollResult:
    """Send one token request and classify the reply; network faults and oversized replies are transient."""
    try:
        reply = await send(http, request)
    except httpx.TimeoutException:
        return PollTransient("IdP request timed out")
    except httpx.HTTPError:
        return PollTransient("IdP connection failed")
    except ReplyTooLarge:
        return PollTransient("IdP reply too large")
    return classify_token_reply(reply, label=label, on_success=on_success)
