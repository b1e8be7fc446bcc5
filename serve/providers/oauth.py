"""What every device-flow provider shares: sending a form POST, reading a bounded reply, classifying it.

- `send`: one request, never following redirects, the reply body capped at `MAX_REPLY_BYTES` (read as a
  stream and abandoned beyond the cap), parsed tolerantly (JSON, or form-encoded as GitHub answers).
- `classify_token_reply`: SPEC §3's table, by the `error` member first, never by HTTP status alone.
- `parse_device_authorization`: RFC 8628 §3.2 with real IdPs' quirks (Google's `verification_url`, numbers
  sent as strings, a missing `interval`, a `verification_uri_complete` on a foreign origin), refusing
  what would mislead a user (a long or unprintable user code, a URL with userinfo).
- PKCE (RFC 7636, S256 only).
- Diagnoses (`serve.errors.Diagnosis`): each failure's class, the static hint saying what to fix, and the
  safe facts behind it (exception type, IdP host, HTTP status, the OAuth `error` code) for stderr. A failed
  start raises `UpstreamError` with one; a failed or transient poll returns `DiagnosedFailure` /
  `DiagnosedTransient`, which the registry's warning line reads.

Hints and reasons built here are static sentences: an IdP's `error_description` (or any other text it sends)
never reaches one. Only error codes from the fixed RFC 6749 / RFC 8628 vocabulary are named; any other
code reaches a diagnosis's `detail` only, stripped to RFC 6749's error-code characters and capped.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import math
import re
import secrets
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

import httpx

from serve.errors import Diagnosis, UpstreamError, UpstreamFailure
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
    {
        "invalid_request",
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        # GitHub's names for an unknown client and for an app whose device flow is not enabled.
        "incorrect_client_credentials",
        "device_flow_disabled",
    }
)
# Codes that say the client itself is refused: unknown, wrongly authenticated, or without the grant.
_CLIENT_CODES = frozenset({"invalid_client", "incorrect_client_credentials"})
_GRANT_CODES = frozenset({"unauthorized_client", "unsupported_grant_type", "device_flow_disabled"})
MAX_ERROR_CODE_CHARS = 64  # an unknown `error` code in a diagnosis's detail, after stripping

# How the provider authenticates, which decides what a client refusal asks a person to fix: "public" sends
# no secret, "confidential" sends one, "builtin" is qwen-oauth's fixed client (only base_url can be wrong).
ClientKind = Literal["public", "confidential", "builtin"]

# --- what to fix, per failure (static sentences: they reach the wire as a 502's `hint`) --------------------

HINT_UNREACHABLE = (
    "the identity provider could not be reached (connection refused, unknown host or a proxy): check the "
    "provider's URL (issuer, endpoints or base_url), that the IdP is running, and HTTPS_PROXY / NO_PROXY"
)
HINT_TLS = (
    "the identity provider's TLS certificate was not accepted: if a private CA signed it, point SSL_CERT_FILE "
    "at that CA's bundle, and check that the URL's host is the one the certificate names"
)
HINT_TIMEOUT = (
    "the identity provider did not answer in time: check that it is healthy and that the URL reaches it "
    "(a firewall that drops packets looks like this)"
)
HINT_TOO_LARGE = "the identity provider's reply was over 1 MiB: the URL does not point at an OAuth endpoint"
HINT_BROKEN_REPLY = "the connection to the identity provider broke mid-reply: check the URL and any proxy in between"
HINT_REDIRECTED = (
    "the identity provider answered with a redirect, which the daemon never follows: configure the URL the "
    "redirect points to"
)
HINT_NOT_AN_ENDPOINT = (
    "the URL is not an endpoint the identity provider serves (HTTP 404 or 405): check the configured URL "
    "(device_authorization_endpoint, token_endpoint, issuer or base_url)"
)
HINT_REFUSED_WITHOUT_CODE = (
    "the identity provider refused the request without an OAuth error code: check that the URL is the IdP's "
    "endpoint, not a web page or a proxy's"
)
HINT_IDP_FAILING = "the identity provider failed (HTTP 5xx or server_error): try again later; its own logs say why"
HINT_NOT_JSON = "the identity provider's reply was not JSON: the URL probably serves a web page, not the IdP's endpoint"
HINT_UNUSABLE_AUTHORIZATION = (
    "the device authorization reply lacks device_code, user_code or verification_uri, or holds something "
    "unsafe to show (a URL with userinfo or plain http to another host, a user code with control characters)"
)
HINT_NO_ACCESS_TOKEN = "the token reply carried no access_token: the identity provider does not speak RFC 8628 there"
HINT_OTHER_ERROR = (
    "the identity provider refused the request with an error code that does not fit here: its own logs say why "
    "(the daemon's stderr names the code)"
)
HINT_CLIENT_PUBLIC = (
    "the identity provider rejected the client: check client_id (is it registered at this issuer, in this "
    "realm or tenant?); a confidential client also needs client_secret_env or client_secret_file"
)
HINT_CLIENT_CONFIDENTIAL = (
    "the identity provider rejected the client: check client_id and its secret; if the IdP registers the "
    "client as public, remove client_secret_env / client_secret_file and client_auth"
)
HINT_CLIENT_BUILTIN = (
    "the identity provider at base_url does not accept qwen-code's client: check [providers.qwen-oauth] "
    "base_url or $QWEN_OAUTH_BASE_URL"
)
HINT_GRANT_NOT_ENABLED = (
    "the identity provider does not let this client use the device authorization grant: enable it for the "
    'client (Keycloak: "OAuth 2.0 Device Authorization Grant"; Entra ID: "Allow public client flows"; '
    'GitHub: "Enable Device Flow")'
)
HINT_INVALID_SCOPE = "the identity provider refused the requested scope: check the provider's scope"
HINT_INVALID_REQUEST = (
    "the identity provider refused the request as malformed: check client_auth, pkce, scope and extra_params "
    "against what it expects (some IdPs answer so to a secret sent for a public client)"
)
_REQUEST_HINTS = {"invalid_scope": HINT_INVALID_SCOPE, "invalid_request": HINT_INVALID_REQUEST}


@dataclass(frozen=True, slots=True)
class DiagnosedFailure(PollFailed):
    """A terminal `upstream_error` and why: the wire shows `hint`, the daemon's warning line the diagnosis."""

    diagnosis: Diagnosis


@dataclass(frozen=True, slots=True)
class DiagnosedTransient(PollTransient):
    """A fault worth retrying, and why (for the daemon's warning line)."""

    diagnosis: Diagnosis


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


def timed_out(awaited: str, setting: str, seconds: float) -> Diagnosis:
    """The diagnosis of a step the daemon's own bound cut short: no `awaited` within `setting`."""
    return Diagnosis(UpstreamFailure.IDP_TIMEOUT, HINT_TIMEOUT, f"no {awaited} within {setting} ({seconds:g} s)")


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


# --- diagnoses: why an exchange failed, and what to fix -----------------------------------------------


def idp_host(url: httpx.URL) -> str:
    """`host[:port]` of an IdP URL, never its userinfo, path or query: where a diagnosis says it failed."""
    host = url.host
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"{host}:{url.port}" if url.port is not None else host


# RFC 6749 §5.2: error codes are %x20-21 / %x23-5B / %x5D-7E (printable ASCII without `"` and `\`).
_NOT_ERROR_CODE_CHARS = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def safe_error_code(error: str) -> str:
    """An IdP's `error` code fit for a log line: a known code as is, any other one stripped to RFC 6749's
    error-code characters and capped at `MAX_ERROR_CODE_CHARS`."""
    if error in _KNOWN_UPSTREAM_CODES or error in _TERMINAL_KINDS or error in _TRANSIENT_CODES:
        return error
    clean = _NOT_ERROR_CODE_CHARS.sub("", error)
    return clean if len(clean) <= MAX_ERROR_CODE_CHARS else clean[: MAX_ERROR_CODE_CHARS - 1] + "…"


def transport_diagnosis(exc: Exception, where: str) -> Diagnosis:
    """Why a request got no usable answer: a timeout, a connection that failed (TLS and unknown hosts told
    apart), a reply over `MAX_REPLY_BYTES`, or one that broke mid-way."""
    name = type(exc).__name__
    if isinstance(exc, ReplyTooLarge):
        return Diagnosis(UpstreamFailure.BAD_IDP_REPLY, HINT_TOO_LARGE, f"a reply over 1 MiB from {where}")
    if isinstance(exc, httpx.TimeoutException):
        return Diagnosis(UpstreamFailure.IDP_TIMEOUT, HINT_TIMEOUT, f"{name} from {where}")
    if isinstance(exc, httpx.NetworkError | httpx.ProxyError | httpx.UnsupportedProtocol):
        causes = list(_causes(exc))
        tls = next((cause for cause in causes if isinstance(cause, ssl.SSLError)), None)
        if tls is not None:
            return Diagnosis(
                UpstreamFailure.IDP_UNREACHABLE, HINT_TLS, f"{name} (TLS: {type(tls).__name__}) to {where}"
            )
        if any(isinstance(cause, socket.gaierror) for cause in causes):
            return Diagnosis(UpstreamFailure.IDP_UNREACHABLE, HINT_UNREACHABLE, f"{name} (unknown host) to {where}")
        numbers = [cause.errno for cause in causes if isinstance(cause, OSError)]
        codes = [errno.errorcode[number] for number in numbers if number is not None and number in errno.errorcode]
        why = f" ({codes[0]})" if codes else ""
        return Diagnosis(UpstreamFailure.IDP_UNREACHABLE, HINT_UNREACHABLE, f"{name}{why} to {where}")
    return Diagnosis(UpstreamFailure.BAD_IDP_REPLY, HINT_BROKEN_REPLY, f"{name} from {where}")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes and contexts, and the members of exception groups among them, each once."""
    seen: set[int] = set()
    stack = [exc]
    while stack and len(seen) < 64:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        stack.extend(linked for linked in (current.__cause__, current.__context__) if linked is not None)


def reply_diagnosis(
    reply: Reply, where: str, *, client: ClientKind | None = None, unusable_hint: str = HINT_OTHER_ERROR
) -> Diagnosis:
    """Why an IdP's answer is not the one asked for: its OAuth `error` code first, then its HTTP status, then
    its body; `unusable_hint` for a 2xx JSON reply that still lacks what was asked for."""
    fields = reply.fields
    status = reply.status_code
    error = fields.get("error") if fields is not None else None
    if isinstance(error, str) and error:
        return error_code_diagnosis(error, status, where, client=client)
    detail = f"HTTP {status} from {where}"
    if 300 <= status < 400:
        return Diagnosis(UpstreamFailure.BAD_IDP_REPLY, HINT_REDIRECTED, detail)
    if status >= 500:
        return Diagnosis(UpstreamFailure.BAD_IDP_REPLY, HINT_IDP_FAILING, detail)
    if status in (404, 405, 410):
        return Diagnosis(UpstreamFailure.BAD_IDP_REPLY, HINT_NOT_AN_ENDPOINT, detail)
    if fields is None:
        return Diagnosis(UpstreamFailure.BAD_IDP_REPLY, HINT_NOT_JSON, f"HTTP {status}, not JSON, from {where}")
    if status >= 400:
        return Diagnosis(UpstreamFailure.BAD_IDP_REPLY, HINT_REFUSED_WITHOUT_CODE, detail)
    return Diagnosis(UpstreamFailure.BAD_IDP_REPLY, unusable_hint, f"HTTP {status}, not a usable reply, from {where}")


def error_code_diagnosis(error: str, status: int, where: str, *, client: ClientKind | None = None) -> Diagnosis:
    """Why an IdP answered with OAuth `error` code `error` (RFC 6749 §5.2, RFC 8628 §3.5, GitHub's names)."""
    detail = f"HTTP {status} error={safe_error_code(error)} from {where}"
    if error in _CLIENT_CODES or (error in _GRANT_CODES and client == "builtin"):
        return Diagnosis(UpstreamFailure.CLIENT_REJECTED, _client_hint(client), detail)
    if error in _GRANT_CODES:
        return Diagnosis(UpstreamFailure.CLIENT_REJECTED, HINT_GRANT_NOT_ENABLED, detail)
    request_hint = _REQUEST_HINTS.get(error)
    if request_hint is not None:
        return Diagnosis(UpstreamFailure.REQUEST_REJECTED, request_hint, detail)
    if error in _TRANSIENT_CODES:
        return Diagnosis(UpstreamFailure.BAD_IDP_REPLY, HINT_IDP_FAILING, detail)
    return Diagnosis(UpstreamFailure.BAD_IDP_REPLY, HINT_OTHER_ERROR, detail)


def _client_hint(client: ClientKind | None) -> str:
    match client:
        case "builtin":
            return HINT_CLIENT_BUILTIN
        case "confidential":
            return HINT_CLIENT_CONFIDENTIAL
        case "public":
            return HINT_CLIENT_PUBLIC
    return "the identity provider rejected the client: check client_id, client_auth and the client secret"


# --- token response classification (SPEC §3) ------------------------------------------------------


def classify_token_reply(
    reply: Reply,
    *,
    label: str,
    on_success: Callable[[Mapping[str, object]], PollResult],
    where: str = "the IdP",
    client: ClientKind | None = None,
) -> PollResult:
    """Classify a token endpoint reply by its `error` member first, then by HTTP status.

    `label` names the IdP in hints ("Qwen" → "Qwen IdP returned access_denied"). `on_success` turns a 2xx
    reply carrying an access token into the provider's `PollSuccess`. Upstream errors and transient faults
    come back diagnosed (`where`, the IdP's host, and `client` shape the diagnosis).
    """
    fields = reply.fields
    error = fields.get("error") if fields is not None else None
    if isinstance(error, str) and error:
        return _classify_error_code(error, label, reply, where, client)
    status = reply.status_code
    if 200 <= status < 300 and fields is not None:
        token = fields.get("access_token")
        if isinstance(token, str) and token:
            return on_success(fields)
        diagnosis = Diagnosis(
            UpstreamFailure.BAD_IDP_REPLY, HINT_NO_ACCESS_TOKEN, f"HTTP {status}, no access_token, from {where}"
        )
        return DiagnosedFailure(ErrorKind.UPSTREAM_ERROR, f"{label} IdP returned no access token", diagnosis)
    diagnosis = reply_diagnosis(reply, where, client=client)
    if 300 <= status < 400:
        # Token POSTs never follow redirects: a redirected credential is a credential sent elsewhere.
        return DiagnosedFailure(ErrorKind.UPSTREAM_ERROR, f"{label} IdP redirected the token request", diagnosis)
    if status >= 500:
        return DiagnosedTransient(f"IdP answered HTTP {status}", diagnosis)
    if fields is None:
        return DiagnosedTransient("IdP reply was not JSON", diagnosis)
    return DiagnosedFailure(ErrorKind.UPSTREAM_ERROR, f"{label} IdP returned an unexpected response", diagnosis)


def _classify_error_code(error: str, label: str, reply: Reply, where: str, client: ClientKind | None) -> PollResult:
    fields = reply.fields or {}
    if error == "authorization_pending":
        return PollPending()
    if error == "slow_down":
        # GitHub sends the new interval with the error; RFC 8628 §3.5 otherwise adds 5 s (the registry's job).
        return PollSlowDown(parse_number(fields.get("interval")))
    kind = _TERMINAL_KINDS.get(error)
    if kind is not None:
        return PollFailed(kind, f"{label} IdP returned {error}")
    diagnosis = error_code_diagnosis(error, reply.status_code, where, client=client)
    if error in _TRANSIENT_CODES:
        return DiagnosedTransient(f"IdP returned {error}", diagnosis)
    if error in _KNOWN_UPSTREAM_CODES:
        return DiagnosedFailure(ErrorKind.UPSTREAM_ERROR, f"{label} IdP returned {error}", diagnosis)
    return DiagnosedFailure(ErrorKind.UPSTREAM_ERROR, f"{label} IdP returned an unexpected error", diagnosis)


async def request_device_authorization(
    http: httpx.AsyncClient,
    request: httpx.Request,
    code_verifier: Secret[str] | None,
    *,
    failure: str,
    client: ClientKind | None = None,
) -> DeviceAuthorization:
    """Send a device authorization request and parse its reply (RFC 8628 §3.1-3.2), for every provider.

    Raises `UpstreamError(failure)` (a static message) with a diagnosis when the IdP cannot be reached,
    answers too much, or answers anything but a usable device authorization.
    """
    where = idp_host(request.url)
    try:
        reply = await send(http, request)
    except (httpx.HTTPError, ReplyTooLarge) as exc:
        raise UpstreamError(failure, transport_diagnosis(exc, where)) from exc
    authorization = parse_device_authorization(reply, code_verifier)
    if authorization is None:
        diagnosis = reply_diagnosis(reply, where, client=client, unusable_hint=HINT_UNUSABLE_AUTHORIZATION)
        raise UpstreamError(failure, diagnosis)
    return authorization


async def poll_token_endpoint(
    http: httpx.AsyncClient,
    request: httpx.Request,
    *,
    label: str,
    on_success: Callable[[Mapping[str, object]], PollResult],
    client: ClientKind | None = None,
) -> PollResult:
    """Send one token request and classify the reply; network faults and oversized replies are transient."""
    where = idp_host(request.url)
    try:
        reply = await send(http, request)
    except httpx.TimeoutException as exc:
        return DiagnosedTransient("IdP request timed out", transport_diagnosis(exc, where))
    except httpx.HTTPError as exc:
        return DiagnosedTransient("IdP connection failed", transport_diagnosis(exc, where))
    except ReplyTooLarge as exc:
        return DiagnosedTransient("IdP reply too large", transport_diagnosis(exc, where))
    return classify_token_reply(reply, label=label, on_success=on_success, where=where, client=client)
