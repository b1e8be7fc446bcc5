"""Generic RFC 8628 providers from `[providers.<id>] kind = "rfc8628"` (SPEC §5), after authlib's `rfc8628`.

Endpoints come from the configuration, or from discovery on first use (not at start-up, so the daemon
starts while its IdP is down): `{issuer}/.well-known/openid-configuration`, then RFC 8414's
`/.well-known/oauth-authorization-server{path}`. A document is accepted only when its `issuer` equals the
configured one exactly and both endpoints are https (or http to a loopback host); the first good one is
kept for the daemon's life, a failure is retried at the next start. With explicit endpoints nothing is
discovered, so `pkce = "auto"` means no PKCE there (no metadata lists S256).

The client secret, when there is one, is read from its environment variable or file each time a request
needs it (a rotated file is picked up) and travels only inside a `Secret`.

Every failure carries a `Diagnosis` (see `serve.providers.oauth`); a failed discovery says which of its
two documents came closest and why it was refused (an issuer that differs by a trailing slash or by
`localhost` vs `127.0.0.1`, no device endpoint, not JSON, an HTTP status), or that the IdP was unreachable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote_plus, urlsplit

import httpx
import trio

from serve.config import Rfc8628ProviderConfig
from serve.credentials import Credentials, credentials_file
from serve.errors import Diagnosis, UpstreamError, UpstreamFailure
from serve.models import ErrorKind
from serve.netloc import is_loopback_host, url_problem
from serve.providers import oauth
from serve.providers.base import (
    DeviceAuthorization,
    PollFailed,
    PollResult,
    PollSuccess,
    PollTransient,
    RefreshRejected,
    RefreshResult,
    RefreshSucceeded,
    RefreshTransient,
    Revocation,
)
from serve.secrets import Secret

_MAX_ALIAS_CHARS = 64
_UID_ALIAS_RE = re.compile(r"uid:[0-9a-f]{8}")
# What the credentials document keeps of a token reply: RFC 6749 §5.1's members, the OIDC id token (the
# alias's source, and what an OIDC client reads), and the refresh token's lifetime under the names GitHub
# and Keycloak send it. Anything else an IdP adds stays out: the document is read back for the status
# snapshot, so a reply's `account_alias` or `expiry_date` would otherwise pose as ours.
_TOKEN_REPLY_KEYS = (
    "access_token",
    "token_type",
    "expires_in",
    "refresh_token",
    "scope",
    "id_token",
    "refresh_token_expires_in",
    "refresh_expires_in",
)
_PHONE_RE = re.compile(r"^\+?[0-9 ().\-]+$")
# Claims that name the account itself: a nickname equal to one of them is a username, not an alias.
_ACCOUNT_NAME_CLAIMS = ("preferred_username", "username", "login", "email", "upn", "unique_name", "sub")


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where to send the two requests, and what PKCE methods the metadata lists (empty when configured)."""

    device_authorization_endpoint: str
    token_endpoint: str
    code_challenge_methods_supported: tuple[str, ...] = ()
    revocation_endpoint: str | None = None  # RFC 7009, from the metadata


class _ClientSecretUnavailable(Exception):
    """The configured environment variable is unset or empty, or the file cannot be read."""


# --- what to fix when discovery fails (static sentences: they reach the wire as a 502's `hint`) ----------

HINT_ISSUER_TRAILING_SLASH = (
    "the discovery document's issuer differs from the configured one by a trailing slash: write issuer "
    "exactly as the IdP's metadata does (the daemon's stderr and `qwen-serve check` show it)"
)
HINT_ISSUER_LOOPBACK_ALIAS = (
    "the discovery document's issuer names this machine differently (localhost vs 127.0.0.1): write issuer "
    "with the host the IdP's metadata uses (the daemon's stderr and `qwen-serve check` show it)"
)
HINT_ISSUER_MISMATCH = (
    "the discovery document's issuer differs from the configured one (a trailing slash? localhost vs "
    "127.0.0.1? http vs https? the realm or tenant path?): set issuer to the IdP's own (the daemon's stderr "
    "and `qwen-serve check` show it)"
)
HINT_NO_DEVICE_ENDPOINT = (
    "the IdP's metadata has no device_authorization_endpoint: enable the device authorization grant at the "
    "IdP, or set device_authorization_endpoint and token_endpoint explicitly"
)
HINT_NO_TOKEN_ENDPOINT = (
    "the IdP's metadata has no token_endpoint: set device_authorization_endpoint and token_endpoint explicitly"
)
HINT_ENDPOINT_REFUSED = (
    "the IdP's metadata names an endpoint the daemon will not use (plain http to a non-loopback host, "
    "userinfo, not a URL): fix the IdP's public URL, or set the endpoints explicitly"
)
HINT_METADATA_NOT_JSON = (
    "the issuer's discovery URL answered with something other than a JSON document (a web page?): check "
    "issuer, or set device_authorization_endpoint and token_endpoint explicitly"
)
HINT_NO_METADATA = (
    "no discovery document at the issuer (an HTTP error): check issuer (its realm or tenant path), or set "
    "device_authorization_endpoint and token_endpoint explicitly"
)
HINT_SECRET_UNAVAILABLE = (
    "the client secret could not be read: set the variable client_secret_env names in the daemon's "
    "environment, or make client_secret_file readable and not empty"
)
# How close a refused discovery attempt came: the closest one is the one reported.
_DISCOVERY_RANK = {HINT_NO_METADATA: 1, HINT_METADATA_NOT_JSON: 2}  # any other document problem: 3
_MAX_SHOWN_ISSUER_CHARS = 256
# (`qwen-serve check`) A device code no IdP issued, and the codes an IdP that knows the client refuses it with.
PROBE_DEVICE_CODE = "qwen-serve-check-not-a-device-code"
_UNKNOWN_DEVICE_CODE_ERRORS = frozenset(
    {"invalid_grant", "expired_token", "token_expired", "incorrect_device_code", "bad_verification_code"}
)


@dataclass(frozen=True, slots=True)
class ClientProbe:
    """What a token endpoint said of the client when sent `PROBE_DEVICE_CODE` (`Rfc8628Provider.probe_client`).

    `verdict`: "accepted" (it refused only the code), "refused" (the client, or no usable answer: see
    `diagnosis`), or "unclear" (an answer that tells neither: `diagnosis` says what it was). `detail` holds
    the safe facts (HTTP status, `error` code, IdP host).
    """

    verdict: Literal["accepted", "refused", "unclear"]
    detail: str
    diagnosis: Diagnosis | None = None


class Rfc8628Provider:
    """A standards-following IdP, with the quirks real ones have (see `serve.providers.oauth`)."""

    def __init__(
        self,
        config: Rfc8628ProviderConfig,
        http: httpx.AsyncClient,
        *,
        env: Mapping[str, str],
        now_ms: Callable[[], int],
    ) -> None:
        self._config = config
        self._http = http
        self._env = env
        self._now_ms = now_ms
        self._start_failed = f"{config.provider_id} IdP device authorization request failed"
        self._endpoints: Endpoints | None = None
        if config.device_authorization_endpoint is not None and config.token_endpoint is not None:
            self._endpoints = Endpoints(config.device_authorization_endpoint, config.token_endpoint)
        self._discovery_lock = trio.Lock()
        secret_file = config.client_secret_file
        self._client_secret_path = Path(secret_file).expanduser() if secret_file is not None else None

    def __repr__(self) -> str:
        return f"Rfc8628Provider({self._config.provider_id!r})"

    @property
    def provider_id(self) -> str:
        return self._config.provider_id

    @property
    def credentials_file(self) -> str:
        return credentials_file(self._config.provider_id)

    # --- the protocol -------------------------------------------------------------------------------

    async def start(self) -> DeviceAuthorization:
        """Discover (first time), then POST the device authorization request (RFC 8628 §3.1).

        Raises `UpstreamError` with a static message on any failure, discovery included.
        """
        endpoints = await self.endpoints()
        code_verifier = oauth.new_code_verifier() if self._uses_pkce(endpoints) else None
        form: dict[str, str] = {}
        if self._config.scope is not None:
            form["scope"] = self._config.scope
        if code_verifier is not None:
            form["code_challenge"] = oauth.s256_code_challenge(code_verifier)
            form["code_challenge_method"] = "S256"
        try:
            request = await self._authenticated_request(
                endpoints.device_authorization_endpoint, form, extra=self._config.extra_params
            )
        except _ClientSecretUnavailable as exc:
            raise UpstreamError(self._secret_failed, self._secret_diagnosis()) from exc
        return await oauth.request_device_authorization(
            self._http, request, code_verifier, failure=self._start_failed, client=self._client_kind
        )

    async def poll(self, authorization: DeviceAuthorization) -> PollResult:
        """One device access token request (RFC 8628 §3.4); faults come back as `PollResult`s."""
        try:
            endpoints = await self.endpoints()
        except UpstreamError as exc:
            if exc.diagnosis is None:
                return PollTransient("IdP discovery failed")
            return oauth.DiagnosedTransient("IdP discovery failed", exc.diagnosis)
        form = {"grant_type": oauth.DEVICE_CODE_GRANT_TYPE, "device_code": authorization.device_code.reveal()}
        if authorization.code_verifier is not None:
            form["code_verifier"] = authorization.code_verifier.reveal()
        try:
            request = await self._authenticated_request(endpoints.token_endpoint, form)
        except _ClientSecretUnavailable:
            return oauth.DiagnosedFailure(ErrorKind.UPSTREAM_ERROR, self._secret_failed, self._secret_diagnosis())
        return await oauth.poll_token_endpoint(
            self._http, request, label=self.provider_id, on_success=self._success, client=self._client_kind
        )

    async def probe_client(self) -> ClientProbe:
        """(`qwen-serve check`) Whether the token endpoint accepts this client, without minting a device code.

        Sends a device access token request for `PROBE_DEVICE_CODE`, authenticated as the client: an IdP
        that knows the client refuses only the code (`invalid_grant` and the like); one that does not
        answers `invalid_client` or `unauthorized_client`. Raises `UpstreamError` when discovery fails or
        the client secret cannot be read.
        """
        endpoints = await self.endpoints()
        form = {"grant_type": oauth.DEVICE_CODE_GRANT_TYPE, "device_code": PROBE_DEVICE_CODE}
        try:
            request = await self._authenticated_request(endpoints.token_endpoint, form)
        except _ClientSecretUnavailable as exc:
            raise UpstreamError(self._secret_failed, self._secret_diagnosis()) from exc
        where = oauth.idp_host(request.url)
        try:
            reply = await oauth.send(self._http, request)
        except (httpx.HTTPError, oauth.ReplyTooLarge) as exc:
            diagnosis = oauth.transport_diagnosis(exc, where)
            return ClientProbe("refused", diagnosis.detail, diagnosis)
        error = reply.fields.get("error") if reply.fields is not None else None
        if isinstance(error, str) and error in _UNKNOWN_DEVICE_CODE_ERRORS:
            return ClientProbe("accepted", f"HTTP {reply.status_code} error={error} from {where}")
        diagnosis = oauth.reply_diagnosis(reply, where, client=self._client_kind)
        # An OAuth error that is not about the client, or an IdP failing, tells nothing either way.
        unclear = diagnosis.failure is not UpstreamFailure.CLIENT_REJECTED and (
            isinstance(error, str) or reply.status_code >= 500
        )
        return ClientProbe("unclear" if unclear else "refused", diagnosis.detail, diagnosis)

    # --- why a request could not be made ------------------------------------------------------------

    @property
    def _client_kind(self) -> oauth.ClientKind:
        return "public" if self._config.client_auth == "none" else "confidential"

    @property
    def _secret_failed(self) -> str:
        return f"{self.provider_id}: the client secret could not be read"

    def _secret_diagnosis(self) -> Diagnosis:
        config = self._config
        if config.client_secret_env is not None:
            detail = f"${config.client_secret_env} is unset or empty"
        else:
            detail = f"client_secret_file {config.client_secret_file} cannot be read or is empty"
        return Diagnosis(UpstreamFailure.CLIENT_SECRET_UNAVAILABLE, HINT_SECRET_UNAVAILABLE, detail)

    # --- discovery ----------------------------------------------------------------------------------

    async def endpoints(self) -> Endpoints:
        """The configured endpoints, or the discovered ones (cached once good). Raises `UpstreamError`."""
        if self._endpoints is not None:
            return self._endpoints
        async with self._discovery_lock:
            if self._endpoints is None:
                self._endpoints = await self._discover()
            return self._endpoints

    async def _discover(self) -> Endpoints:
        """The endpoints of the first acceptable metadata document. Raises `UpstreamError` diagnosed with
        the closest refusal: a document's own problem, then not JSON, then an HTTP error, then the network."""
        failed = f"{self.provider_id} IdP discovery failed"
        issuer = self._config.issuer
        if issuer is None:  # config validation guarantees endpoints or an issuer
            raise UpstreamError(failed)
        refusals: list[Diagnosis] = []
        for url in discovery_urls(issuer):
            request = self._http.build_request("GET", url, headers={"Accept": "application/json"})
            where = oauth.idp_host(request.url)
            try:
                reply = await oauth.send(self._http, request)
            except (httpx.HTTPError, oauth.ReplyTooLarge) as exc:
                refusals.append(oauth.transport_diagnosis(exc, where))
                continue
            endpoints = endpoints_from_metadata(reply, issuer)
            if endpoints is not None:
                return endpoints
            refusals.append(metadata_problem(reply, issuer, where))
        raise UpstreamError(failed, max(refusals, key=_discovery_rank))

    def _uses_pkce(self, endpoints: Endpoints) -> bool:
        if self._config.pkce == "auto":
            return "S256" in endpoints.code_challenge_methods_supported
        return self._config.pkce == "on"

    # --- client authentication (RFC 6749 §2.3.1) ----------------------------------------------------

    async def _authenticated_request(
        self, url: str, form: Mapping[str, str], *, extra: Iterable[tuple[str, str]] = ()
    ) -> httpx.Request:
        """A form POST authenticated as the configured client; `extra` parameters never replace ours."""
        auth = self._config.client_auth
        body: dict[str, str] = {} if auth == "client_secret_basic" else {"client_id": self._config.client_id}
        body.update(form)
        headers: dict[str, str] = {}
        if auth != "none":
            secret = await self._client_secret()
            if auth == "client_secret_basic":
                pair = f"{quote_plus(self._config.client_id)}:{quote_plus(secret.reveal())}"
                headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
            else:
                body["client_secret"] = secret.reveal()
        for key, value in extra:
            body.setdefault(key, value)
        return oauth.form_request(self._http, url, body, headers=headers)

    async def _client_secret(self) -> Secret[str]:
        config = self._config
        value: str | None = None
        if config.client_secret_env is not None:
            value = self._env.get(config.client_secret_env)
        elif self._client_secret_path is not None:
            try:
                value = await trio.Path(self._client_secret_path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise _ClientSecretUnavailable from exc
        value = value.strip() if value is not None else ""
        if not value:
            raise _ClientSecretUnavailable
        return Secret(value)

    # --- success ------------------------------------------------------------------------------------

    def _success(self, fields: Mapping[str, object]) -> PollResult:
        """The credentials for a token reply, its document built by us rather than copied.

        `_TOKEN_REPLY_KEYS` the reply sent as strings or finite numbers, in that order; then `expiry_date`,
        `obtained_at`, `issuer` (when configured) and `account_alias` (only as `account_alias()` derives it).
        """
        now_ms = self._now_ms()
        expires_at_ms = oauth.expiry_ms(now_ms, fields.get("expires_in"))
        id_token = fields.get("id_token")
        claims = id_token_claims(id_token) if isinstance(id_token, str) else None
        alias = account_alias(claims, self._alias_namespace(claims)) if claims is not None else None
        document: dict[str, object] = {
            key: value for key in _TOKEN_REPLY_KEYS if _is_plain_value(value := fields.get(key))
        }
        if expires_at_ms is not None:
            document["expiry_date"] = expires_at_ms
        document["obtained_at"] = now_ms
        if self._config.issuer is not None:
            document["issuer"] = self._config.issuer
        if alias is not None:
            document["account_alias"] = alias
        return PollSuccess(
            Credentials(
                file_name=self.credentials_file,
                document=Secret(document),
                expires_at_ms=expires_at_ms,
                account_alias=alias,
            )
        )

    def _alias_namespace(self, claims: Mapping[str, object]) -> str:
        """The issuer the `sub` belongs to: configured, else the id token's own `iss`, else the token URL."""
        if self._config.issuer is not None:
            return self._config.issuer
        iss = claims.get("iss")
        if isinstance(iss, str) and iss:
            return iss
        return self._config.token_endpoint or ""

    # --- after the login: refresh (RFC 6749 §6) and revocation (RFC 7009) ---------------------------

    @property
    def refresh_enabled(self) -> bool:
        return self._config.refresh == "auto"

    async def refresh(self, document: Secret[Mapping[str, object]]) -> RefreshResult:
        """One refresh grant. The new document keeps what the reply leaves out: the refresh token (RFC 6749
        §6: the IdP MAY issue a new one), the id token and the alias."""
        old = document.reveal()
        refresh_token = old.get("refresh_token")
        if not isinstance(refresh_token, str) or not refresh_token:
            return RefreshRejected(ErrorKind.INVALID_GRANT, "the credentials hold no refresh token")
        try:
            endpoints = await self.endpoints()
        except UpstreamError:
            return RefreshTransient("IdP discovery failed")
        try:
            request = await self._authenticated_request(
                endpoints.token_endpoint, {"grant_type": "refresh_token", "refresh_token": refresh_token}
            )
        except _ClientSecretUnavailable:
            return RefreshTransient("the client secret could not be read")
        result = await oauth.poll_token_endpoint(self._http, request, label=self.provider_id, on_success=self._success)
        match result:
            case PollSuccess(credentials=fresh):
                merged = dict(fresh.document.reveal())
                for key in (
                    "refresh_token",
                    "id_token",
                    "account_alias",
                    "refresh_token_expires_in",
                    "refresh_expires_in",
                ):
                    if key not in merged and key in old:
                        merged[key] = old[key]
                alias = merged.get("account_alias")  # the reply's, else the one kept from the old file
                return RefreshSucceeded(
                    Credentials(
                        fresh.file_name, Secret(merged), fresh.expires_at_ms, alias if isinstance(alias, str) else None
                    )
                )
            case PollFailed(kind=kind, hint=hint):
                return RefreshRejected(kind, hint)
            case PollTransient(reason=reason):
                return RefreshTransient(reason)
            case _:  # authorization_pending or slow_down have no meaning for a refresh grant
                return RefreshTransient("unexpected reply to a refresh grant")

    async def revoke(self, document: Secret[Mapping[str, object]]) -> Revocation:
        """RFC 7009: the refresh token first (which ends the grant at most IdPs), then the access token."""
        endpoint = self._config.revocation_endpoint
        if endpoint is None:
            try:
                endpoint = (await self.endpoints()).revocation_endpoint
            except UpstreamError:
                return "failed"
        if endpoint is None:
            return "unsupported"
        tokens = document.reveal()
        outcome: Revocation = "revoked"
        for hint in ("refresh_token", "access_token"):
            token = tokens.get(hint)
            if not isinstance(token, str) or not token:
                continue
            try:
                request = await self._authenticated_request(endpoint, {"token": token, "token_type_hint": hint})
                reply = await oauth.send(self._http, request)
            except (_ClientSecretUnavailable, httpx.HTTPError, oauth.ReplyTooLarge):
                outcome = "failed"
                continue
            if reply.status_code != 200:  # RFC 7009 §2.2: 200 also for a token already invalid
                outcome = "failed"
        return outcome


def _is_plain_value(value: object) -> bool:
    """A string or a finite number (json.loads lets NaN through; booleans are not numbers here)."""
    if isinstance(value, str):
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def discovery_urls(issuer: str) -> tuple[str, str]:
    """OpenID Connect Discovery 1.0 §4, then RFC 8414 §3.1 (well-known segment before the issuer's path)."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    return (
        issuer.rstrip("/") + "/.well-known/openid-configuration",
        f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{path}",
    )


def metadata_problem(reply: oauth.Reply, issuer: str, where: str) -> Diagnosis:
    """Why `endpoints_from_metadata` refused this reply, for the person who can fix it (`where`: the IdP's host).

    It explains and never decides: the refusal itself is `endpoints_from_metadata`'s.
    """
    fields = reply.fields
    status = reply.status_code
    if not 200 <= status < 300:
        return _discovery_failed(HINT_NO_METADATA, f"HTTP {status} from {where}")
    if fields is None:
        return _discovery_failed(HINT_METADATA_NOT_JSON, f"HTTP {status}, not JSON, from {where}")
    found = fields.get("issuer")
    if found != issuer:
        return _issuer_mismatch(issuer, found, where)
    for key, hint in (
        ("device_authorization_endpoint", HINT_NO_DEVICE_ENDPOINT),
        ("token_endpoint", HINT_NO_TOKEN_ENDPOINT),
    ):
        url = fields.get(key)
        if not isinstance(url, str):
            return _discovery_failed(hint, f"the document from {where} has no {key}")
        problem = url_problem(url)  # a static reason that never repeats the URL
        if problem is not None:
            return _discovery_failed(HINT_ENDPOINT_REFUSED, f"the document's {key} {problem}, from {where}")
    return _discovery_failed(HINT_ISSUER_MISMATCH, f"the document from {where} was refused")


def _discovery_failed(hint: str, detail: str) -> Diagnosis:
    return Diagnosis(UpstreamFailure.DISCOVERY_FAILED, hint, detail)


def _discovery_rank(diagnosis: Diagnosis) -> int:
    if diagnosis.failure is not UpstreamFailure.DISCOVERY_FAILED:
        return 0  # no answer at all
    return _DISCOVERY_RANK.get(diagnosis.hint, 3)


def _issuer_mismatch(configured: str, found: object, where: str) -> Diagnosis:
    """An `issuer` other than the configured one (OIDC Discovery §4.3, RFC 8414 §3.3 require equality).

    The detail quotes the document's issuer only when it is a URL the daemon would use (no userinfo,
    printable ASCII), so a person can copy it into the configuration.
    """
    if not isinstance(found, str) or not found:
        return _discovery_failed(HINT_ISSUER_MISMATCH, f"the document from {where} names no issuer")
    # URLs in angle brackets (RFC 3986 Appendix C): a trailing slash stays visible, and no quote needs escaping.
    shown = f"<{found}>" if oauth.is_allowed_url(found) and len(found) <= _MAX_SHOWN_ISSUER_CHARS else None
    detail = f"issuer mismatch: configured <{configured}>, the document from {where} says {shown or 'another'}"
    if configured.rstrip("/") == found.rstrip("/"):
        return _discovery_failed(HINT_ISSUER_TRAILING_SLASH, detail)
    if _differ_in_loopback_name_only(configured, found):
        return _discovery_failed(HINT_ISSUER_LOOPBACK_ALIAS, detail)
    return _discovery_failed(HINT_ISSUER_MISMATCH, detail)


def _differ_in_loopback_name_only(a: str, b: str) -> bool:
    """Whether two URLs name this machine differently (`localhost`, `127.0.0.1`, `[::1]`) and agree on the rest."""
    try:
        x, y = urlsplit(a), urlsplit(b)
        ports = (x.port, y.port)
    except ValueError:
        return False
    hosts = (x.hostname or "", y.hostname or "")
    return (
        hosts[0] != hosts[1]
        and all(is_loopback_host(host) for host in hosts)
        and x.scheme == y.scheme
        and ports[0] == ports[1]
        and x.path.rstrip("/") == y.path.rstrip("/")
    )


def endpoints_from_metadata(reply: oauth.Reply, issuer: str) -> Endpoints | None:
    """Endpoints from a metadata document, or None unless it is for exactly `issuer` and uses https."""
    fields = reply.fields
    if not 200 <= reply.status_code < 300 or fields is None or fields.get("issuer") != issuer:
        return None
    device = fields.get("device_authorization_endpoint")
    token = fields.get("token_endpoint")
    if not (isinstance(device, str) and isinstance(token, str)):
        return None
    if not (oauth.is_allowed_url(device) and oauth.is_allowed_url(token)):
        return None
    methods = fields.get("code_challenge_methods_supported")
    listed = tuple(m for m in methods if isinstance(m, str)) if isinstance(methods, list) else ()
    revocation = fields.get("revocation_endpoint")
    if not (isinstance(revocation, str) and oauth.is_allowed_url(revocation)):
        revocation = None
    return Endpoints(device, token, listed, revocation)


# --- account alias (SPEC §5) ------------------------------------------------------------------------


def id_token_claims(id_token: str) -> Mapping[str, object] | None:
    """The id token's payload, decoded without verification (it only names the account), or None."""
    parts = id_token.split(".")
    if len(parts) < 2 or len(parts[1]) > oauth.MAX_REPLY_BYTES:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def account_alias(claims: Mapping[str, object], issuer: str) -> str | None:
    """The `nickname` claim when it is not an email, phone number or username; else `uid:` + 8 hex digits
    of SHA-256(issuer + sub); None without a `sub`."""
    nickname = claims.get("nickname")
    if isinstance(nickname, str) and _is_safe_nickname(nickname.strip(), claims):
        return nickname.strip()
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        return None
    return "uid:" + hashlib.sha256((issuer + sub).encode("utf-8")).hexdigest()[:8]


def is_derived_alias(alias: str) -> bool:
    """Whether `account_alias()` could have produced `alias`, judged by its shape alone.

    `uid:` + 8 lowercase hex digits, or a stripped nickname passing the same checks (bar the comparison
    with the id token's other claims, which a stored alias no longer has).
    """
    return bool(_UID_ALIAS_RE.fullmatch(alias)) or (alias == alias.strip() and _is_safe_nickname(alias, {}))


def _is_safe_nickname(nickname: str, claims: Mapping[str, object]) -> bool:
    if not nickname or len(nickname) > _MAX_ALIAS_CHARS or not nickname.isprintable():
        return False
    if "@" in nickname:  # an email, or a handle written as one
        return False
    digits = sum(c.isdigit() for c in nickname)
    if _PHONE_RE.fullmatch(nickname) and digits >= 6:
        return False
    folded = nickname.casefold()
    for claim in _ACCOUNT_NAME_CLAIMS:
        value = claims.get(claim)
        if isinstance(value, str) and value and folded in {value.casefold(), value.split("@", 1)[0].casefold()}:
            return False
    return True
