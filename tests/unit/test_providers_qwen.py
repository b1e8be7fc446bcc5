"""qwen-oauth (SPEC §5): requests exactly as the original sent them, qwen-code's credentials file byte for
byte, and SPEC §3's classification through the provider."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import pytest
import trio
from support.fake_idp import ABANDONED_STREAM_WARNING, EndlessStream, FakeIdP, json_reply, text_reply

from serve.config import QwenOAuthConfig
from serve.errors import Diagnosis, UpstreamError, UpstreamFailure
from serve.models import ErrorKind
from serve.providers import oauth
from serve.providers.base import (
    DeviceAuthorization,
    PollFailed,
    PollPending,
    PollSlowDown,
    PollSuccess,
)
from serve.providers.oauth import DiagnosedFailure, DiagnosedTransient
from serve.providers.qwen import QwenOAuthProvider
from serve.store import FileCredentialStore

# Facts copied from the original's capture (WIRE-EXAMPLES): nothing here reads ../shared.
CLIENT_ID = "f0304373b74a44d2b584a3fb70ca9e56"
SCOPE = "openid profile email model.completion"
NOW_MS = 1795830303695  # when the tokens arrived; expiry_date = NOW_MS + 3600 s
CREDENTIALS_FIXTURE = """{
  "access_token": "fake-access-1",
  "refresh_token": "fake-refresh-1",
  "token_type": "Bearer",
  "resource_url": "portal.qwen.ai",
  "expiry_date": 1795833903695
}"""
START_FAILED = "Qwen IdP device authorization request failed"


def qwen_idp(base_url: str = "https://chat.qwen.ai") -> FakeIdP:
    idp = FakeIdP(
        base_url=base_url,
        device_path="/api/v1/oauth2/device/code",
        token_path="/api/v1/oauth2/token",
        client_id=CLIENT_ID,
        scope=SCOPE,
        expect_request_id=True,
    )
    idp.token_fields["resource_url"] = "portal.qwen.ai"
    return idp


@pytest.fixture
def idp() -> FakeIdP:
    return qwen_idp()


@pytest.fixture
async def http(idp: FakeIdP) -> AsyncIterator[httpx.AsyncClient]:
    async with idp.client() as client:
        yield client


@pytest.fixture
def provider(http: httpx.AsyncClient) -> QwenOAuthProvider:
    return QwenOAuthProvider(QwenOAuthConfig(), http, now_ms=lambda: NOW_MS)


def form_of(request: httpx.Request) -> list[tuple[str, str]]:
    return parse_qsl(request.content.decode(), keep_blank_values=True)


# --- the requests, as WIRE-EXAMPLES captured them ---------------------------------------------------


async def test_device_code_request_is_exactly_the_originals(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    authorization = await provider.start()
    (request,) = idp.requests
    assert request.method == "POST"
    assert str(request.url) == "https://chat.qwen.ai/api/v1/oauth2/device/code"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["accept"] == "application/json"
    assert uuid.UUID(request.headers["x-request-id"]).version == 4
    form = form_of(request)
    assert [k for k, _ in form] == ["client_id", "scope", "code_challenge", "code_challenge_method"]
    assert dict(form)["client_id"] == CLIENT_ID
    assert dict(form)["scope"] == "openid profile email model.completion"
    assert dict(form)["code_challenge_method"] == "S256"
    assert authorization.code_verifier is not None
    verifier = authorization.code_verifier.reveal()
    assert len(verifier) == 43
    digest = hashlib.sha256(verifier.encode()).digest()
    assert dict(form)["code_challenge"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def test_each_start_has_a_fresh_request_id_and_verifier(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    first = await provider.start()
    second = await provider.start()
    assert idp.requests[0].headers["x-request-id"] != idp.requests[1].headers["x-request-id"]
    assert first.code_verifier is not None and second.code_verifier is not None
    assert first.code_verifier.reveal() != second.code_verifier.reveal()


async def test_device_authorization_is_parsed(provider: QwenOAuthProvider) -> None:
    authorization = await provider.start()
    assert authorization.device_code.reveal() == "device-code-1"
    assert authorization.user_code == "USER-0001"
    assert authorization.verification_uri == "https://chat.qwen.ai/authorize"
    assert (
        authorization.verification_uri_complete == "https://chat.qwen.ai/authorize?user_code=USER-0001&client=qwen-code"
    )
    assert authorization.expires_in == 600
    assert authorization.interval == 5


async def test_token_request_is_exactly_the_originals(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    authorization = await provider.start()
    result = await provider.poll(authorization)
    assert isinstance(result, PollSuccess)
    request = idp.requests[1]
    assert request.method == "POST"
    assert str(request.url) == "https://chat.qwen.ai/api/v1/oauth2/token"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["accept"] == "application/json"
    assert "x-request-id" not in request.headers
    assert form_of(request) == [
        ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
        ("client_id", CLIENT_ID),
        ("device_code", "device-code-1"),
        ("code_verifier", authorization.code_verifier.reveal() if authorization.code_verifier else ""),
    ]


async def test_base_url_override_is_used_without_a_double_slash() -> None:
    idp = qwen_idp("http://127.0.0.1:8765")
    async with idp.client() as http:
        provider = QwenOAuthProvider(QwenOAuthConfig(base_url="http://127.0.0.1:8765/"), http, now_ms=lambda: NOW_MS)
        await provider.poll(await provider.start())
    assert [str(r.url) for r in idp.requests] == [
        "http://127.0.0.1:8765/api/v1/oauth2/device/code",
        "http://127.0.0.1:8765/api/v1/oauth2/token",
    ]


async def test_identity(provider: QwenOAuthProvider) -> None:
    assert provider.provider_id == "qwen-oauth"
    assert provider.credentials_file == "oauth_creds.json"


# --- the credentials file ---------------------------------------------------------------------------


async def test_credentials_file_matches_qwen_codes_byte_for_byte(provider: QwenOAuthProvider, tmp_path: Path) -> None:
    result = await provider.poll(await provider.start())
    assert isinstance(result, PollSuccess)
    assert result.credentials.file_name == "oauth_creds.json"
    assert result.credentials.expires_at_ms == 1795833903695
    assert result.credentials.account_alias is None  # qwen's token reply has no identity
    store = FileCredentialStore(tmp_path / ".qwen")
    await store.save(result.credentials)
    path = tmp_path / ".qwen" / "oauth_creds.json"
    assert path.read_bytes() == CREDENTIALS_FIXTURE.encode()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


async def test_document_keys_in_qwen_codes_order_whatever_the_reply_order(
    provider: QwenOAuthProvider, idp: FakeIdP
) -> None:
    idp.token_replies.append(
        json_reply(
            200,
            {
                "expires_in": "3600",
                "resource_url": "portal.qwen.ai",
                "scope": "openid",
                "token_type": "Bearer",
                "refresh_token": "fake-refresh-1",
                "access_token": "fake-access-1",
                "id_token": "x.y.z",
                "account_alias": "alice@example.com",
                "expiry_date": 1,
            },
        )
    )
    result = await provider.poll(await provider.start())
    assert isinstance(result, PollSuccess)
    assert result.credentials.account_alias is None
    assert list(result.credentials.document.reveal().items()) == [
        ("access_token", "fake-access-1"),
        ("refresh_token", "fake-refresh-1"),
        ("token_type", "Bearer"),
        ("resource_url", "portal.qwen.ai"),
        ("expiry_date", 1795833903695),
    ]


async def test_absent_keys_are_omitted(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    idp.token_replies.append(json_reply(200, {"access_token": "a", "token_type": "Bearer"}))
    result = await provider.poll(await provider.start())
    assert isinstance(result, PollSuccess)
    assert result.credentials.document.reveal() == {"access_token": "a", "token_type": "Bearer"}
    assert result.credentials.expires_at_ms is None


# --- classification through the provider (SPEC §3) --------------------------------------------------


@pytest.mark.parametrize("status", [400, 429, 200])
async def test_pending_carried_by_any_status(provider: QwenOAuthProvider, idp: FakeIdP, status: int) -> None:
    idp.token_replies.append(json_reply(status, {"error": "authorization_pending"}))
    assert await provider.poll(await provider.start()) == PollPending()


@pytest.mark.parametrize("status", [400, 429, 200])
async def test_slow_down_carried_by_any_status(provider: QwenOAuthProvider, idp: FakeIdP, status: int) -> None:
    idp.token_replies.append(json_reply(status, {"error": "slow_down"}))
    assert await provider.poll(await provider.start()) == PollSlowDown(None)


async def test_access_denied_hint_is_the_originals(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    idp.token_replies.append(json_reply(400, {"error": "access_denied", "error_description": "User said no"}))
    result = await provider.poll(await provider.start())
    assert result == PollFailed(ErrorKind.ACCESS_DENIED, "Qwen IdP returned access_denied")


@pytest.mark.parametrize("code", ["expired_token", "invalid_grant"])
async def test_terminal_codes(provider: QwenOAuthProvider, idp: FakeIdP, code: str) -> None:
    idp.token_replies.append(json_reply(400, {"error": code}))
    assert await provider.poll(await provider.start()) == PollFailed(ErrorKind(code), f"Qwen IdP returned {code}")


async def test_invalid_client_with_401_is_upstream_error(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    idp.token_replies.append(json_reply(401, {"error": "invalid_client", "error_description": "IDP-TEXT-XYZ"}))
    result = await provider.poll(await provider.start())
    # qwen-oauth's client is built in: only base_url can be wrong.
    diagnosis = Diagnosis(
        UpstreamFailure.CLIENT_REJECTED, oauth.HINT_CLIENT_BUILTIN, "HTTP 401 error=invalid_client from chat.qwen.ai"
    )
    assert result == DiagnosedFailure(ErrorKind.UPSTREAM_ERROR, "Qwen IdP returned invalid_client", diagnosis)
    assert "IDP-TEXT-XYZ" not in repr(result)


async def test_server_error_is_transient(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    idp.token_replies.append(json_reply(503, {"error": "temporarily_unavailable"}))
    diagnosis = Diagnosis(
        UpstreamFailure.BAD_IDP_REPLY,
        oauth.HINT_IDP_FAILING,
        "HTTP 503 error=temporarily_unavailable from chat.qwen.ai",
    )
    result = await provider.poll(await provider.start())
    assert result == DiagnosedTransient("IdP returned temporarily_unavailable", diagnosis)


async def test_html_502_is_transient(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    idp.token_replies.append(text_reply(502, "<html>Bad Gateway</html>"))
    diagnosis = Diagnosis(UpstreamFailure.BAD_IDP_REPLY, oauth.HINT_IDP_FAILING, "HTTP 502 from chat.qwen.ai")
    assert await provider.poll(await provider.start()) == DiagnosedTransient("IdP answered HTTP 502", diagnosis)


async def test_redirect_on_the_token_endpoint_is_refused_not_followed(idp: FakeIdP) -> None:
    idp.token_replies.append(httpx.Response(302, headers={"location": "https://evil.example/steal"}))
    async with httpx.AsyncClient(transport=idp.transport(), follow_redirects=True) as http:
        provider = QwenOAuthProvider(QwenOAuthConfig(), http, now_ms=lambda: NOW_MS)
        result = await provider.poll(await provider.start())
    diagnosis = Diagnosis(UpstreamFailure.BAD_IDP_REPLY, oauth.HINT_REDIRECTED, "HTTP 302 from chat.qwen.ai")
    assert result == DiagnosedFailure(ErrorKind.UPSTREAM_ERROR, "Qwen IdP redirected the token request", diagnosis)
    assert [r.url.host for r in idp.requests] == ["chat.qwen.ai", "chat.qwen.ai"]


async def test_network_faults_on_poll_are_transient(idp: FakeIdP) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/token"):
            raise httpx.ConnectError("connection refused")
        return idp(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        provider = QwenOAuthProvider(QwenOAuthConfig(), http, now_ms=lambda: NOW_MS)
        result = await provider.poll(await provider.start())
    diagnosis = Diagnosis(UpstreamFailure.IDP_UNREACHABLE, oauth.HINT_UNREACHABLE, "ConnectError to chat.qwen.ai")
    assert result == DiagnosedTransient("IdP connection failed", diagnosis)


@pytest.mark.filterwarnings(ABANDONED_STREAM_WARNING)
async def test_oversized_token_reply_is_transient(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    idp.token_replies.append(httpx.Response(200, stream=EndlessStream()))
    with trio.fail_after(5):
        result = await provider.poll(await provider.start())
    diagnosis = Diagnosis(UpstreamFailure.BAD_IDP_REPLY, oauth.HINT_TOO_LARGE, "a reply over 1 MiB from chat.qwen.ai")
    assert result == DiagnosedTransient("IdP reply too large", diagnosis)


# --- start failures: one static message -------------------------------------------------------------


def device_code_reply(**fields: str) -> httpx.Response:
    """A device code reply like Qwen's, with `fields` replaced."""
    body = {
        "device_code": "device-code-1",
        "user_code": "WDJB-MJHT",
        "verification_uri": "https://chat.qwen.ai/authorize",
        "expires_in": 900,
        "interval": 5,
    }
    return json_reply(200, {**body, **fields})


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(text_reply(500, "<html>oops</html>"), id="500"),
        pytest.param(json_reply(400, {"error": "invalid_client", "error_description": "IDP-TEXT"}), id="400-error"),
        pytest.param(json_reply(200, {"error": "server_error"}), id="200-error"),
        pytest.param(text_reply(200, "not json"), id="non-json"),
        pytest.param(json_reply(200, {"user_code": "U", "verification_uri": "https://chat.qwen.ai/a"}), id="no-code"),
        pytest.param(json_reply(200, {"device_code": "d", "user_code": "U"}), id="no-uri"),
        pytest.param(
            json_reply(200, {"device_code": "d", "user_code": "U", "verification_uri": "javascript:alert(1)"}),
            id="bad-uri",
        ),
        pytest.param(httpx.Response(302, headers={"location": "https://evil.example/"}), id="redirect"),
        pytest.param(device_code_reply(user_code="W" * 33), id="user-code-too-long"),
        pytest.param(device_code_reply(user_code="WDJB\x1b[2JMJHT"), id="user-code-escape"),
        pytest.param(device_code_reply(user_code="WDJB\u202eTHJM"), id="user-code-bidi"),
        pytest.param(device_code_reply(user_code="WDJB\u200bMJHT"), id="user-code-zero-width"),
        pytest.param(device_code_reply(user_code="WDJB\u2028MJHT"), id="user-code-line-separator"),
        pytest.param(device_code_reply(user_code="WDJB\x85MJHT"), id="user-code-c1"),
        pytest.param(device_code_reply(verification_uri="https://chat.qwen.ai@evil.example/authorize"), id="userinfo"),
        pytest.param(device_code_reply(verification_uri="http://chat.qwen.localhost/authorize"), id="dot-localhost"),
    ],
)
async def test_start_failures_raise_upstream_error_with_the_static_message(
    provider: QwenOAuthProvider, idp: FakeIdP, reply: httpx.Response
) -> None:
    idp.device_replies.append(reply)
    with pytest.raises(UpstreamError) as caught:
        await provider.start()
    assert caught.value.message == START_FAILED
    assert caught.value.code == "upstream_error" and caught.value.status == 502
    assert "IDP-TEXT" not in str(caught.value)


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow"), httpx.ReadTimeout("x")])
async def test_start_network_faults_raise_upstream_error(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        provider = QwenOAuthProvider(QwenOAuthConfig(), http, now_ms=lambda: NOW_MS)
        with pytest.raises(UpstreamError, match=f"^{START_FAILED}$"):
            await provider.start()


@pytest.mark.filterwarnings(ABANDONED_STREAM_WARNING)
async def test_start_oversized_reply_raises_upstream_error(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    idp.device_replies.append(httpx.Response(200, stream=EndlessStream()))
    with trio.fail_after(5), pytest.raises(UpstreamError, match=f"^{START_FAILED}$"):
        await provider.start()


# --- tolerances the qwen IdP shares with the rest ---------------------------------------------------


async def test_the_idps_interval_is_honoured_even_as_a_string(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    idp.device_replies.append(
        json_reply(
            200,
            {
                "device_code": "device-code-1",
                "user_code": "U",
                "verification_uri": "https://chat.qwen.ai/authorize",
                "expires_in": "900",
                "interval": "7",
            },
        )
    )
    authorization = await provider.start()
    assert (authorization.interval, authorization.expires_in) == (7.0, 900.0)
    assert authorization.verification_uri_complete is None


async def test_a_missing_interval_is_left_to_the_registry(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    idp.device_replies.append(
        json_reply(
            200, {"device_code": "device-code-1", "user_code": "U", "verification_uri": "https://chat.qwen.ai/a"}
        )
    )
    authorization = await provider.start()
    assert authorization.interval is None and authorization.expires_in is None


async def test_a_foreign_origin_complete_uri_is_dropped(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    idp.device_replies.append(
        json_reply(
            200,
            {
                "device_code": "device-code-1",
                "user_code": "U",
                "verification_uri": "https://chat.qwen.ai/authorize",
                "verification_uri_complete": "https://phish.example/authorize?user_code=U",
            },
        )
    )
    authorization = await provider.start()
    assert authorization.verification_uri == "https://chat.qwen.ai/authorize"
    assert authorization.verification_uri_complete is None


async def test_a_complete_uri_with_userinfo_is_dropped(provider: QwenOAuthProvider, idp: FakeIdP) -> None:
    complete = "https://user@chat.qwen.ai/authorize?user_code=WDJB-MJHT"
    idp.device_replies.append(device_code_reply(verification_uri_complete=complete))
    authorization = await provider.start()
    assert authorization.verification_uri == "https://chat.qwen.ai/authorize"
    assert authorization.verification_uri_complete is None


# --- secrets ----------------------------------------------------------------------------------------


async def test_secrets_never_show_in_reprs(provider: QwenOAuthProvider) -> None:
    authorization = await provider.start()
    result = await provider.poll(authorization)
    assert isinstance(authorization, DeviceAuthorization) and isinstance(result, PollSuccess)
    assert authorization.code_verifier is not None
    shown = " ".join([repr(authorization), str(authorization), repr(result), str(result), repr(provider)])
    for secret in ("device-code-1", authorization.code_verifier.reveal(), "fake-access-1", "fake-refresh-1"):
        assert secret not in shown
