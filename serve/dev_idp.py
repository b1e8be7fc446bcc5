"""A development identity provider for `qwen-serve run --dev-idp`: a login that works offline, for demos.

A small RFC 8628 authorization server on 127.0.0.1 (a free port), run in the daemon's own nursery; the
daemon registers the generic provider `dev` pointed at its issuer, so it is reached exactly as a real IdP
is (discovery, device authorization, token polling, PKCE, refresh, RFC 7009 revocation). Its verification
page is a plain HTML form: anyone who can open it and press Approve logs the daemon in, so it serves
loopback only and says on every page that it is for development.

What it still does right, because a demo teaches: user codes from RFC 8628 §6.1's consonant alphabet,
compared case-insensitively without dashes; wrong codes counted and limited (§5.1); the form CSRF-protected
(an HMAC of a cookie, and the Origin checked when a browser sends one); everything HTML-escaped; a strict
Content-Security-Policy; `slow_down` when polled faster than the interval (§3.5); a device code good for one
token reply; a Host check (DNS rebinding). It imports nothing the daemon does not already load, and keeps
everything in memory: a restart forgets every code and token it issued.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import html
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote

import hypercorn.config
import trio

from serve.config import Config, Rfc8628ProviderConfig
from serve.errors import ConfigError
from serve.http import server
from serve.http.asgi import lifespan_without_hooks
from serve.netloc import split_host

log = logging.getLogger("serve.dev_idp")

PROVIDER_ID = "dev"
CLIENT_ID = "qwen-serve-dev"
SCOPE = "openid profile offline_access"
# The demo account: the id token's `nickname` becomes the account alias the daemon shows.
SUBJECT = "dev-user"
NICKNAME = "Dev User"

# RFC 8628 §6.1: 20 consonants (no vowels: no words; no digits: no 0/O, 1/I), 8 characters ≈ 34.5 bits.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8

DEVICE_CODE_TTL_S = 600
INTERVAL_S = 2  # short, for a demo; RFC 8628's default is 5
SLOW_DOWN_STEP_S = 5  # RFC 8628 §3.5
# A poll is "too soon" when it comes earlier than this share of the interval after the previous one (the
# client's timer and the network both jitter; a well-behaved client is never that early).
POLL_TOLERANCE = 0.8
ACCESS_TOKEN_TTL_S = 3600
# Bounds on what a caller can make this server hold.
MAX_PENDING = 64
MAX_TOKENS = 1024
MAX_BODY_BYTES = 16 * 1024
# RFC 8628 §5.1: wrong user codes, across all callers, allowed per window before the form locks.
MAX_WRONG_CODES = 10
WRONG_CODE_WINDOW_S = 60.0

SESSION_COOKIE = "qwen_serve_dev_idp"
_HTML_HEADERS = (
    ("content-type", "text/html; charset=utf-8"),
    (
        "content-security-policy",
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
)
_JSON_HEADERS = (("content-type", "application/json"), ("cache-control", "no-store"), ("pragma", "no-cache"))

Clock = Callable[[], float]


def normalize_user_code(value: str) -> str:
    """RFC 8628 §6.1: what the user typed, uppercased, without dashes or spaces."""
    return "".join(c for c in value.upper() if c not in "- \t")


def _format_user_code(raw: str) -> str:
    return f"{raw[:4]}-{raw[4:]}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _s256(verifier: str) -> str:
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


@dataclass(slots=True)
class _Authorization:
    """One device authorization request, from its reply to its one token reply (RFC 8628 §3.2-3.5)."""

    device_code: str
    user_code: str  # normalized
    client_id: str
    scope: str
    code_challenge: str | None
    expires_at: float
    interval_s: float = INTERVAL_S
    last_poll: float | None = None
    decision: str | None = None  # "approve" | "deny"


@dataclass(slots=True)
class _Grant:
    """What a refresh or access token stands for."""

    client_id: str
    scope: str
    refresh_token: str
    access_tokens: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def json_reply(status: int, body: Mapping[str, object], headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, _JSON_HEADERS + headers, json.dumps(body, separators=(",", ":")).encode())


def oauth_error(code: str, status: int = 400) -> Reply:
    """RFC 6749 §5.2 (and RFC 8628 §3.5): the error code, and a description that is only ever static."""
    return json_reply(status, {"error": code})


class DevIdP:
    """The authorization server's state and its answers; `asgi` serves it over HTTP."""

    def __init__(self, issuer: str = "", *, clock: Clock = trio.current_time, wall_clock: Clock = time.time) -> None:
        self.issuer = ""
        self.allowed_hosts: frozenset[str] = frozenset()
        self.set_issuer(issuer)
        self._clock = clock
        self._wall_clock = wall_clock
        self._key = secrets.token_bytes(32)  # signs id tokens and CSRF tokens; new at every start
        self._pending: dict[str, _Authorization] = {}  # by device code
        self._by_user_code: dict[str, _Authorization] = {}
        self._grants: dict[str, _Grant] = {}  # by refresh token
        self._access: dict[str, _Grant] = {}  # by access token
        self._wrong_codes: deque[float] = deque()

    def set_issuer(self, issuer: str) -> None:
        """Its URL (known once bound), and so the Host values it answers (DNS-rebinding defence)."""
        self.issuer = issuer.rstrip("/")
        _host, port = split_host(self.issuer.partition("://")[2])
        self.allowed_hosts = frozenset({f"127.0.0.1:{port}", f"localhost:{port}"}) if port else frozenset()

    # --- metadata -----------------------------------------------------------------------------------

    def metadata(self) -> dict[str, object]:
        """RFC 8414 / OpenID Connect Discovery: what the daemon's generic provider discovers."""
        base = self.issuer
        return {
            "issuer": base,
            "device_authorization_endpoint": f"{base}/device_authorization",
            "token_endpoint": f"{base}/token",
            "revocation_endpoint": f"{base}/revoke",
            "userinfo_endpoint": f"{base}/userinfo",
            "grant_types_supported": ["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"],
            "response_types_supported": [],
            "token_endpoint_auth_methods_supported": ["none"],
            "revocation_endpoint_auth_methods_supported": ["none"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": SCOPE.split(),
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["HS256"],
        }

    # --- RFC 8628 §3.1-3.2 ------------------------------------------------------------------------------

    def device_authorization(self, form: Mapping[str, str]) -> Reply:
        if form.get("client_id") != CLIENT_ID:
            return oauth_error("invalid_client", 401)
        challenge = form.get("code_challenge")
        if challenge is not None and form.get("code_challenge_method") != "S256":
            return oauth_error("invalid_request")
        self._sweep()
        if len(self._pending) >= MAX_PENDING:
            return oauth_error("slow_down", 429)
        user_code = self._new_user_code()
        authorization = _Authorization(
            device_code=secrets.token_urlsafe(32),
            user_code=user_code,
            client_id=CLIENT_ID,
            scope=form.get("scope") or SCOPE,
            code_challenge=challenge,
            expires_at=self._clock() + DEVICE_CODE_TTL_S,
        )
        self._pending[authorization.device_code] = authorization
        self._by_user_code[user_code] = authorization
        shown = _format_user_code(user_code)
        return json_reply(
            200,
            {
                "device_code": authorization.device_code,
                "user_code": shown,
                "verification_uri": f"{self.issuer}/device",
                "verification_uri_complete": f"{self.issuer}/device?user_code={quote(shown)}",
                "expires_in": DEVICE_CODE_TTL_S,
                "interval": INTERVAL_S,
            },
        )

    def _new_user_code(self) -> str:
        while True:
            code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
            if code not in self._by_user_code:
                return code

    def _sweep(self) -> None:
        now = self._clock()
        for authorization in [a for a in self._pending.values() if a.expires_at <= now]:
            self._forget(authorization)

    def _forget(self, authorization: _Authorization) -> None:
        self._pending.pop(authorization.device_code, None)
        self._by_user_code.pop(authorization.user_code, None)

    # --- the token endpoint (RFC 8628 §3.4-3.5, RFC 6749 §6) ------------------------------------------

    def token(self, form: Mapping[str, str]) -> Reply:
        if form.get("client_id") != CLIENT_ID:
            return oauth_error("invalid_client", 401)
        grant_type = form.get("grant_type")
        if grant_type == "urn:ietf:params:oauth:grant-type:device_code":
            return self._device_code_grant(form)
        if grant_type == "refresh_token":
            return self._refresh_grant(form)
        return oauth_error("unsupported_grant_type")

    def _device_code_grant(self, form: Mapping[str, str]) -> Reply:
        authorization = self._pending.get(form.get("device_code", ""))
        if authorization is None:
            return oauth_error("invalid_grant")  # unknown, or already exchanged: a device code is good once
        now = self._clock()
        if now >= authorization.expires_at:
            self._forget(authorization)
            return oauth_error("expired_token")
        too_soon = (
            authorization.last_poll is not None
            and now - authorization.last_poll < authorization.interval_s * POLL_TOLERANCE
        )
        authorization.last_poll = now
        if too_soon:
            authorization.interval_s += SLOW_DOWN_STEP_S
            return oauth_error("slow_down")
        if authorization.decision is None:
            return oauth_error("authorization_pending")
        self._forget(authorization)
        if authorization.decision == "deny":
            return oauth_error("access_denied")
        if authorization.code_challenge is not None:
            verifier = form.get("code_verifier", "")
            if not hmac.compare_digest(_s256(verifier), authorization.code_challenge):
                return oauth_error("invalid_grant")
        return self._issue(authorization.client_id, authorization.scope, with_id_token=True)

    def _refresh_grant(self, form: Mapping[str, str]) -> Reply:
        grant = self._grants.pop(form.get("refresh_token", ""), None)
        if grant is None:
            return oauth_error("invalid_grant")
        self._revoke_grant(grant)  # rotation: the old refresh token and its access tokens end here
        return self._issue(grant.client_id, grant.scope, with_id_token=False)

    def _issue(self, client_id: str, scope: str, *, with_id_token: bool) -> Reply:
        while len(self._grants) >= MAX_TOKENS:  # the oldest grant goes first
            self._revoke_grant(next(iter(self._grants.values())))
        grant = _Grant(client_id, scope, refresh_token="dev-rt-" + secrets.token_urlsafe(32))
        access_token = "dev-at-" + secrets.token_urlsafe(32)
        grant.access_tokens.add(access_token)
        self._grants[grant.refresh_token] = grant
        self._access[access_token] = grant
        body: dict[str, object] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": ACCESS_TOKEN_TTL_S,
            "refresh_token": grant.refresh_token,
            "scope": scope,
        }
        if with_id_token and "openid" in scope.split():
            body["id_token"] = self._id_token(client_id)
        return json_reply(200, body)

    def _id_token(self, client_id: str) -> str:
        now = int(self._wall_clock())
        header = {"alg": "HS256", "typ": "JWT"}
        claims = {
            "iss": self.issuer,
            "sub": SUBJECT,
            "aud": client_id,
            "iat": now,
            "exp": now + ACCESS_TOKEN_TTL_S,
            "nickname": NICKNAME,
        }
        signing_input = ".".join(_b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims))
        signature = hmac.new(self._key, signing_input.encode("ascii"), hashlib.sha256).digest()
        return f"{signing_input}.{_b64url(signature)}"

    def _revoke_grant(self, grant: _Grant) -> None:
        self._grants.pop(grant.refresh_token, None)
        for access_token in grant.access_tokens:
            self._access.pop(access_token, None)
        grant.access_tokens.clear()

    # --- RFC 7009 revocation, and userinfo --------------------------------------------------------------

    def revoke(self, form: Mapping[str, str]) -> Reply:
        """Revoking a refresh token ends its grant; an access token ends alone. Unknown tokens: 200 too."""
        if form.get("client_id") != CLIENT_ID:
            return oauth_error("invalid_client", 401)
        token = form.get("token", "")
        grant = self._grants.get(token)
        if grant is not None:
            self._revoke_grant(grant)
        else:
            owner = self._access.pop(token, None)
            if owner is not None:
                owner.access_tokens.discard(token)
        return Reply(200, (("cache-control", "no-store"),), b"")

    def userinfo(self, authorization: str | None) -> Reply:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or token not in self._access:
            return json_reply(401, {"error": "invalid_token"}, (("www-authenticate", 'Bearer error="invalid_token"'),))
        return json_reply(200, {"sub": SUBJECT, "nickname": NICKNAME})

    # --- the verification page ------------------------------------------------------------------------

    def csrf_token(self, session: str) -> str:
        return _b64url(hmac.new(self._key, b"csrf:" + session.encode(), hashlib.sha256).digest())

    def page(self, session: str, *, user_code: str = "", message: str = "", status: int = 200) -> Reply:
        """The form: the user code (prefilled from verification_uri_complete), Approve and Deny."""
        notice = f'<p class="msg">{html.escape(message)}</p>' if message else ""
        form = (
            '<form method="post" action="/device"><p><label>Code shown by the device<br>'
            f'<input name="user_code" value="{html.escape(user_code[:64])}" autocomplete="off" autofocus required>'
            f'</label></p><input type="hidden" name="csrf" value="{html.escape(self.csrf_token(session))}">'
            '<p><button name="action" value="approve">Approve</button>'
            '<button name="action" value="deny">Deny</button></p></form>'
        )
        cookie = f"{SESSION_COOKIE}={session}; Path=/device; HttpOnly; SameSite=Strict"
        return Reply(status, (*_HTML_HEADERS, ("set-cookie", cookie)), self._document(notice + form))

    def result_page(self, text: str, status: int = 200) -> Reply:
        return Reply(status, _HTML_HEADERS, self._document(f"<p>{html.escape(text)}</p>"))

    def _document(self, inner: str) -> bytes:
        banner = (
            '<p class="dev"><strong>Development identity provider</strong> started by '
            f"<code>qwen-serve run --dev-idp</code> at {html.escape(self.issuer)}. It approves whoever presses "
            "Approve: for local demos only, never for real accounts.</p>"
        )
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>qwen-serve development IdP</title>'
            f"<style>{_STYLE}</style></head><body><h1>Log in a device</h1>{banner}{inner}</body></html>"
        ).encode()

    def decide(self, session: str, form: Mapping[str, str]) -> Reply:
        """The form's POST: checks the CSRF token, then the code, then records Approve or Deny."""
        if not session or not hmac.compare_digest(form.get("csrf", ""), self.csrf_token(session)):
            return self.result_page("This form expired or came from another page. Open the link again.", 403)
        action = form.get("action")
        if action not in ("approve", "deny"):
            return self.page(
                session, user_code=form.get("user_code", ""), message="Choose Approve or Deny.", status=400
            )
        now = self._clock()
        while self._wrong_codes and self._wrong_codes[0] <= now - WRONG_CODE_WINDOW_S:
            self._wrong_codes.popleft()
        if len(self._wrong_codes) >= MAX_WRONG_CODES:
            return self.result_page("Too many wrong codes. Wait a minute, then try again.", 429)
        self._sweep()
        authorization = self._by_user_code.get(normalize_user_code(form.get("user_code", "")))
        if authorization is None or authorization.decision is not None:
            self._wrong_codes.append(now)
            left = MAX_WRONG_CODES - len(self._wrong_codes)
            return self.page(
                session, message=f"That code is not valid, or was used already ({left} tries left).", status=400
            )
        authorization.decision = action
        if action == "approve":
            return self.result_page("Approved. The daemon finishes the login on its own; you can close this page.")
        return self.result_page("Denied. The daemon's login ends with access_denied.")


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:34em;margin:3em auto;padding:0 1em}"
    ".dev{background:#fff3cd;border:1px solid #e0b000;padding:.6em}.msg{color:#a00}"
    "input{font:1.4em monospace;letter-spacing:.1em;width:12em}button{font-size:1.1em;margin-right:.6em}"
)


# --- ASGI ---------------------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


def asgi(idp: DevIdP) -> Callable[..., Awaitable[None]]:
    """The ASGI application serving `idp`: routes, the Host check, bounded form bodies, lifespan."""

    async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan_without_hooks(receive, send)
            return
        if scope["type"] != "http":
            return  # no WebSocket here: hypercorn closes the handshake
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            reply = await _route(idp, scope, headers, receive)
        except _TooLarge:
            reply = oauth_error("invalid_request", 413)
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [(k.encode(), v.encode()) for k, v in reply.headers],
            }
        )
        await send({"type": "http.response.body", "body": reply.body})

    return app


async def _route(
    idp: DevIdP,
    scope: Mapping[str, Any],
    headers: Mapping[str, str],
    receive: Callable[[], Awaitable[dict[str, Any]]],
) -> Reply:
    if headers.get("host", "").lower() not in idp.allowed_hosts or not scope.get("raw_path", b"/").startswith(b"/"):
        return oauth_error("invalid_request", 421)  # DNS rebinding, or an absolute-form target
    method, path = scope["method"], scope["path"]
    if method == "GET" and path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
        return json_reply(200, idp.metadata())
    if method == "GET" and path == "/userinfo":
        return idp.userinfo(headers.get("authorization"))
    if method == "GET" and path == "/device":
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        return idp.page(_session(headers) or secrets.token_urlsafe(24), user_code=query.get("user_code", ""))
    if method != "POST" or path not in ("/device", "/device_authorization", "/token", "/revoke"):
        return json_reply(404 if method in ("GET", "POST") else 405, {"error": "not_found"})
    form = await _read_form(receive)
    if path == "/device":
        origin = headers.get("origin")
        if origin is not None and origin.lower().removeprefix("http://") not in idp.allowed_hosts:
            return idp.result_page("This form may only be sent from its own page.", 403)
        return idp.decide(_session(headers), form)
    if path == "/device_authorization":
        return idp.device_authorization(form)
    if path == "/token":
        return idp.token(form)
    return idp.revoke(form)


def _session(headers: Mapping[str, str]) -> str:
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == SESSION_COOKIE and value.replace("-", "").replace("_", "").isalnum():
            return value
    return ""


async def _read_form(receive: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, str]:
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            raise _TooLarge
        if not message.get("more_body"):
            break
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        return {}


# --- the daemon's side ----------------------------------------------------------------------------------


def check_config(config: Config) -> None:
    """Raise `ConfigError` when the configuration already has a provider with the dev IdP's id."""
    if any(provider.provider_id == PROVIDER_ID for provider in config.providers):
        raise ConfigError(f"providers.{PROVIDER_ID}", "--dev-idp registers a provider with this id: rename yours")


def with_dev_provider(config: Config, issuer: str) -> Config:
    """`config` plus the generic provider `dev`, discovered from the dev IdP at `issuer` like any other."""
    dev = Rfc8628ProviderConfig(provider_id=PROVIDER_ID, client_id=CLIENT_ID, issuer=issuer, scope=SCOPE)
    return dataclasses.replace(config, providers=(*config.providers, dev))


# --- serving ------------------------------------------------------------------------------------------


async def serve_dev_idp(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve a `DevIdP` on 127.0.0.1 (a free port) until cancelled; `task_status.started()` gets its issuer."""
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 0.1
    # The issuer names the port, known only once bound: until then the IdP answers no Host at all.
    idp = DevIdP()

    async def serving(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await server.serve(
            asgi(idp), config, shutdown_trigger=trio.sleep_forever, max_connections=64, task_status=task_status
        )

    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(serving)
        idp.set_issuer(urls[0])
        log.warning(
            "development IdP (for local demos only: it approves whoever presses Approve) at %s: provider %r",
            idp.issuer,
            PROVIDER_ID,
        )
        task_status.started(idp.issuer)
