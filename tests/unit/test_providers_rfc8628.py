"""Generic RFC 8628 providers (SPEC §5): discovery on first use and its refusals, client authentication,
PKCE, real IdPs' quirks, the account alias, and a whole login against a standards-following FakeIdP."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from support.fake_idp import ABANDONED_STREAM_WARNING, EndlessStream, FakeIdP, form_reply, json_reply

from serve.config import Config, Rfc8628ProviderConfig, build_config
from serve.errors import Diagnosis, UpstreamError, UpstreamFailure
from serve.models import AuthState, ErrorKind
from serve.providers import build_providers, oauth
from serve.providers.base import PollFailed, PollPending, PollSlowDown, PollSuccess
from serve.providers.oauth import DiagnosedFailure, DiagnosedTransient
from serve.providers.rfc8628 import (
    HINT_SECRET_UNAVAILABLE,
    Rfc8628Provider,
    account_alias,
    discovery_urls,
    id_token_claims,
    is_derived_alias,
)
from serve.status import provider_statuses
from serve.store import FileCredentialStore

NOW_MS = 1_795_830_303_695
ISSUER = "https://idp.example"
OIDC_URL = "https://idp.example/.well-known/openid-configuration"
RFC8414_URL = "https://idp.example/.well-known/oauth-authorization-server"
DISCOVERY_FAILED = "acme IdP discovery failed"
START_FAILED = "acme IdP device authorization request failed"


def config_for(**table: Any) -> Config:
    """A `Config` with one generic provider `acme`, through the real loader (defaults included)."""
    return build_config({"providers": {"qwen-oauth": {"enabled": False}, "acme": {"kind": "rfc8628", **table}}})


def acme_config(**table: Any) -> Rfc8628ProviderConfig:
    table.setdefault("client_id", "client-1")
    if "device_authorization_endpoint" not in table:
        table.setdefault("issuer", ISSUER)
    (provider,) = config_for(**table).providers
    return provider


def make_provider(http: httpx.AsyncClient, env: Mapping[str, str] | None = None, **table: Any) -> Rfc8628Provider:
    return Rfc8628Provider(acme_config(**table), http, env=env or {}, now_ms=lambda: NOW_MS)


def id_token(claims: Mapping[str, object]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "RS256"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}.c2ln"


@pytest.fixture
def idp() -> FakeIdP:
    fake = FakeIdP(base_url=ISSUER)
    fake.documents[OIDC_URL] = json_reply(200, fake.metadata())
    return fake


@pytest.fixture
async def http(idp: FakeIdP) -> AsyncIterator[httpx.AsyncClient]:
    async with idp.client() as client:
        yield client


# --- discovery --------------------------------------------------------------------------------------


async def test_discovery_happens_on_first_use_and_is_cached(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    providers = build_providers(config_for(client_id="client-1", issuer=ISSUER), http, env={})
    assert idp.requests == []  # the daemon starts without its IdP
    provider = providers["acme"]
    await provider.start()
    await provider.start()
    assert [(r.method, str(r.url)) for r in idp.requests] == [
        ("GET", OIDC_URL),
        ("POST", "https://idp.example/device"),
        ("POST", "https://idp.example/device"),
    ]


async def test_rfc8414_is_tried_after_openid_configuration_with_the_issuer_path(idp: FakeIdP) -> None:
    issuer = "https://idp.example/tenant1"
    assert discovery_urls(issuer) == (
        "https://idp.example/tenant1/.well-known/openid-configuration",
        "https://idp.example/.well-known/oauth-authorization-server/tenant1",
    )
    idp.documents.clear()
    idp.documents[discovery_urls(issuer)[1]] = json_reply(200, idp.metadata(issuer=issuer))
    async with idp.client() as http:
        authorization = await make_provider(http, issuer=issuer).start()
    assert authorization.user_code == "USER-0001"
    assert [str(r.url) for r in idp.requests] == [*discovery_urls(issuer), "https://idp.example/device"]


async def test_issuer_mismatch_is_refused(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.documents[OIDC_URL] = json_reply(200, idp.metadata(issuer="https://idp.example/"))
    idp.documents[RFC8414_URL] = json_reply(200, idp.metadata(issuer="https://evil.example"))
    with pytest.raises(UpstreamError, match=f"^{DISCOVERY_FAILED}$"):
        await make_provider(http).start()
    assert [r.method for r in idp.requests] == ["GET", "GET"]  # nothing was posted anywhere


async def test_a_plain_http_endpoint_from_discovery_is_refused(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.documents[OIDC_URL] = json_reply(200, idp.metadata(token_endpoint="http://idp.example/token"))
    with pytest.raises(UpstreamError, match=f"^{DISCOVERY_FAILED}$"):
        await make_provider(http).start()
    assert all(r.method == "GET" for r in idp.requests)


@pytest.mark.parametrize(
    "override",
    [
        {"token_endpoint": "http://idp.localhost/token"},
        {"device_authorization_endpoint": "http://idp.localhost/device"},
        {"token_endpoint": "https://idp.example@evil.example/token"},
        {"device_authorization_endpoint": "https://user:pass@idp.example/device"},
        {"token_endpoint": "https://evil.example\\@idp.example/token"},
    ],
)
async def test_a_cleartext_subdomain_or_userinfo_endpoint_from_discovery_is_refused(
    idp: FakeIdP, http: httpx.AsyncClient, override: dict[str, str]
) -> None:
    idp.documents[OIDC_URL] = json_reply(200, idp.metadata(**override))
    with pytest.raises(UpstreamError, match=f"^{DISCOVERY_FAILED}$"):
        await make_provider(http).start()
    assert all(r.method == "GET" for r in idp.requests)


async def test_http_endpoints_are_fine_on_loopback() -> None:
    idp = FakeIdP(base_url="http://127.0.0.1:9000")
    idp.documents["http://127.0.0.1:9000/.well-known/openid-configuration"] = json_reply(200, idp.metadata())
    async with idp.client() as http:
        provider = make_provider(http, issuer="http://127.0.0.1:9000")
        result = await provider.poll(await provider.start())
    assert isinstance(result, PollSuccess)


async def test_a_metadata_document_without_a_device_endpoint_is_refused(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.documents[OIDC_URL] = json_reply(200, idp.metadata(device_authorization_endpoint=None))
    with pytest.raises(UpstreamError, match=f"^{DISCOVERY_FAILED}$"):
        await make_provider(http).start()


async def test_discovery_failure_is_retried_at_the_next_start(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    good = idp.documents.pop(OIDC_URL)
    provider = make_provider(http)
    with pytest.raises(UpstreamError, match=f"^{DISCOVERY_FAILED}$"):
        await provider.start()
    idp.documents[OIDC_URL] = good
    authorization = await provider.start()
    assert authorization.device_code.reveal() == "device-code-1"


async def test_discovery_network_failure_is_upstream_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(UpstreamError, match=f"^{DISCOVERY_FAILED}$"):
            await make_provider(http).start()


async def test_a_redirected_discovery_document_is_not_followed(idp: FakeIdP) -> None:
    idp.documents[OIDC_URL] = httpx.Response(302, headers={"location": "https://evil.example/meta"})
    async with httpx.AsyncClient(transport=idp.transport(), follow_redirects=True) as http:
        with pytest.raises(UpstreamError, match=f"^{DISCOVERY_FAILED}$"):
            await make_provider(http).start()
    assert all(r.url.host == "idp.example" for r in idp.requests)


@pytest.mark.filterwarnings(ABANDONED_STREAM_WARNING)
async def test_an_oversized_discovery_document_is_refused(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.documents[OIDC_URL] = lambda request: httpx.Response(200, stream=EndlessStream())
    with trio.fail_after(5), pytest.raises(UpstreamError, match=f"^{DISCOVERY_FAILED}$"):
        await make_provider(http).start()


async def test_explicit_endpoints_skip_discovery_and_auto_pkce_is_off() -> None:
    idp = FakeIdP(base_url="https://login.example", pkce=False)
    async with idp.client() as http:
        provider = make_provider(
            http,
            device_authorization_endpoint="https://login.example/device",
            token_endpoint="https://login.example/token",
        )
        authorization = await provider.start()
        assert authorization.code_verifier is None
        assert isinstance(await provider.poll(authorization), PollSuccess)
    assert [r.method for r in idp.requests] == ["POST", "POST"]


# --- PKCE -------------------------------------------------------------------------------------------


async def test_pkce_auto_follows_the_metadata(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    provider = make_provider(http)  # metadata lists S256; the fake checks verifier against challenge
    authorization = await provider.start()
    assert authorization.code_verifier is not None
    assert isinstance(await provider.poll(authorization), PollSuccess)


async def test_pkce_auto_without_s256_in_the_metadata_is_off(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.pkce = False
    idp.documents[OIDC_URL] = json_reply(200, idp.metadata(code_challenge_methods_supported=["plain"]))
    provider = make_provider(http)
    authorization = await provider.start()
    assert authorization.code_verifier is None
    assert isinstance(await provider.poll(authorization), PollSuccess)


async def test_pkce_off_and_on_override_the_metadata(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.pkce = False
    assert (await make_provider(http, pkce="off").start()).code_verifier is None
    idp.pkce = True
    idp.documents[OIDC_URL] = json_reply(200, idp.metadata(code_challenge_methods_supported=None))
    provider = make_provider(http, pkce="on")
    authorization = await provider.start()
    assert authorization.code_verifier is not None
    assert isinstance(await provider.poll(authorization), PollSuccess)


# --- client authentication, scope, extra_params ------------------------------------------------------


async def test_client_secret_basic_from_env(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.client_auth, idp.client_secret = "client_secret_basic", "s3cret-value"
    provider = make_provider(http, env={"ACME_SECRET": "s3cret-value"}, client_secret_env="ACME_SECRET")
    assert isinstance(await provider.poll(await provider.start()), PollSuccess)
    assert repr(provider) == "Rfc8628Provider('acme')"


async def test_client_secret_basic_form_encodes_id_and_secret(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    # RFC 6749 §2.3.1: id and secret are form-urlencoded before the Basic encoding (a space is `+`, not
    # `%20`); the FakeIdP decodes them that way, so `%20` would be refused.
    idp.client_auth, idp.client_secret = "client_secret_basic", "a b+c/d"
    provider = make_provider(http, env={"ACME_SECRET": "a b+c/d"}, client_secret_env="ACME_SECRET")
    assert isinstance(await provider.poll(await provider.start()), PollSuccess)
    sent = idp.requests[-1].headers["authorization"]
    assert base64.b64decode(sent.removeprefix("Basic ")).decode() == "client-1:a+b%2Bc%2Fd"


async def test_client_secret_post_from_a_file_is_reread_each_time(
    idp: FakeIdP, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("first-secret\n")
    idp.client_auth, idp.client_secret = "client_secret_post", "first-secret"
    provider = make_provider(http, client_secret_file=str(secret_file), client_auth="client_secret_post")
    authorization = await provider.start()
    secret_file.write_text("rotated-secret\n")
    idp.client_secret = "rotated-secret"
    assert isinstance(await provider.poll(authorization), PollSuccess)


async def test_an_unavailable_client_secret_fails_the_start_without_showing_anything(
    idp: FakeIdP, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    provider = make_provider(http, env={}, client_secret_env="ACME_SECRET")
    with pytest.raises(UpstreamError, match=r"^acme: the client secret could not be read$"):
        await provider.start()
    provider = make_provider(http, client_secret_file=str(tmp_path / "missing"))
    with pytest.raises(UpstreamError, match=r"^acme: the client secret could not be read$") as caught:
        await provider.start()
    assert "missing" not in str(caught.value)


async def test_an_unavailable_client_secret_at_poll_is_upstream_error(
    idp: FakeIdP, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("s")
    idp.client_auth, idp.client_secret = "client_secret_basic", "s"
    provider = make_provider(http, client_secret_file=str(secret_file))
    authorization = await provider.start()
    secret_file.unlink()
    result = await provider.poll(authorization)
    assert isinstance(result, DiagnosedFailure)
    assert (result.kind, result.hint) == (ErrorKind.UPSTREAM_ERROR, "acme: the client secret could not be read")
    assert result.diagnosis == Diagnosis(
        UpstreamFailure.CLIENT_SECRET_UNAVAILABLE,
        HINT_SECRET_UNAVAILABLE,
        f"client_secret_file {secret_file} cannot be read or is empty",
    )


async def test_scope_and_extra_params_go_to_the_device_request_only(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.scope = "openid profile"
    idp.extra_params = {"audience": "api://x", "resource": "https://api.example"}
    provider = make_provider(
        http,
        scope="openid profile",
        extra_params={"audience": "api://x", "resource": "https://api.example", "client_id": "hijack"},
    )
    # The fake asserts client_id == client-1 and no unexpected parameter on both requests.
    assert isinstance(await provider.poll(await provider.start()), PollSuccess)


# --- tolerances of real IdPs ------------------------------------------------------------------------


async def test_google_verification_url_and_numbers_as_strings(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.device_replies.append(
        json_reply(
            200,
            {
                "device_code": "device-code-1",
                "user_code": "GQVQ-JKEC",
                "verification_url": "https://www.google.com/device",
                "expires_in": "1800",
                "interval": "5",
            },
        )
    )
    authorization = await make_provider(http).start()
    assert authorization.verification_uri == "https://www.google.com/device"
    assert (authorization.expires_in, authorization.interval) == (1800.0, 5.0)


async def test_a_missing_interval_is_none(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.device_replies.append(
        json_reply(200, {"device_code": "d", "user_code": "U", "verification_uri": "https://idp.example/activate"})
    )
    assert (await make_provider(http).start()).interval is None


async def test_github_form_encoded_replies_and_interval_inside_slow_down(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.device_replies.append(
        form_reply(
            200,
            {
                "device_code": "device-code-1",
                "user_code": "WDJB-MJHT",
                "verification_uri": "https://github.com/login/device",
                "expires_in": "899",
                "interval": "5",
            },
        )
    )
    idp.token_replies += [
        form_reply(200, {"error": "authorization_pending", "error_description": "pending"}),
        form_reply(200, {"error": "slow_down", "error_description": "Too many requests", "interval": "10"}),
        form_reply(200, {"access_token": "gho_abc", "token_type": "bearer", "scope": "repo"}),
    ]
    provider = make_provider(http)
    authorization = await provider.start()
    assert (authorization.user_code, authorization.interval) == ("WDJB-MJHT", 5.0)
    assert await provider.poll(authorization) == PollPending()
    assert await provider.poll(authorization) == PollSlowDown(10.0)
    result = await provider.poll(authorization)
    assert isinstance(result, PollSuccess)
    assert result.credentials.document.reveal()["access_token"] == "gho_abc"
    assert result.credentials.expires_at_ms is None


async def test_google_428_pending_and_403_slow_down(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.token_replies += [json_reply(428, {"error": "authorization_pending"}), json_reply(403, {"error": "slow_down"})]
    provider = make_provider(http)
    authorization = await provider.start()
    assert await provider.poll(authorization) == PollPending()
    assert await provider.poll(authorization) == PollSlowDown(None)


async def test_error_with_http_200(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.token_replies.append(json_reply(200, {"error": "access_denied", "error_description": "IDP-TEXT"}))
    provider = make_provider(http)
    result = await provider.poll(await provider.start())
    assert result == PollFailed(ErrorKind.ACCESS_DENIED, "acme IdP returned access_denied")


async def test_a_foreign_origin_complete_uri_is_dropped(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.device_replies.append(
        json_reply(
            200,
            {
                "device_code": "d",
                "user_code": "U",
                "verification_uri": "https://idp.example/activate",
                "verification_uri_complete": "https://idp.example.evil.test/activate?user_code=U",
            },
        )
    )
    authorization = await make_provider(http).start()
    assert authorization.verification_uri_complete is None


async def test_a_same_origin_complete_uri_is_kept(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    authorization = await make_provider(http).start()
    assert (
        authorization.verification_uri_complete == "https://idp.example/authorize?user_code=USER-0001&client=qwen-code"
    )


async def test_redirect_on_the_token_endpoint_is_upstream_error(idp: FakeIdP) -> None:
    idp.token_replies.append(httpx.Response(307, headers={"location": "https://evil.example/token"}))
    async with httpx.AsyncClient(transport=idp.transport(), follow_redirects=True) as http:
        provider = make_provider(http)
        result = await provider.poll(await provider.start())
    diagnosis = Diagnosis(UpstreamFailure.BAD_IDP_REPLY, oauth.HINT_REDIRECTED, "HTTP 307 from idp.example")
    assert result == DiagnosedFailure(ErrorKind.UPSTREAM_ERROR, "acme IdP redirected the token request", diagnosis)
    assert all(r.url.host == "idp.example" for r in idp.requests)


@pytest.mark.filterwarnings(ABANDONED_STREAM_WARNING)
async def test_an_oversized_token_reply_is_transient(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.token_replies.append(lambda request: httpx.Response(200, stream=EndlessStream()))
    provider = make_provider(http)
    with trio.fail_after(5):
        result = await provider.poll(await provider.start())
    diagnosis = Diagnosis(UpstreamFailure.BAD_IDP_REPLY, oauth.HINT_TOO_LARGE, "a reply over 1 MiB from idp.example")
    assert result == DiagnosedTransient("IdP reply too large", diagnosis)


async def test_start_with_an_error_reply_is_upstream_error(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.device_replies.append(json_reply(400, {"error": "invalid_client", "error_description": "IDP-TEXT"}))
    with pytest.raises(UpstreamError, match=f"^{START_FAILED}$"):
        await make_provider(http).start()


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"user_code": "W" * 33}, id="user-code-too-long"),
        pytest.param({"user_code": "WDJB\rMJHT"}, id="user-code-CR"),
        pytest.param({"user_code": "WDJB\u2066MJHT\u2069"}, id="user-code-bidi-isolate"),
        pytest.param({"user_code": "\ufeffWDJB-MJHT"}, id="user-code-BOM"),
        pytest.param({"verification_uri": "https://idp.example@evil.example/activate"}, id="uri-userinfo"),
        pytest.param({"verification_uri": "http://idp.localhost/activate"}, id="uri-dot-localhost"),
    ],
)
async def test_a_misleading_device_authorization_is_upstream_error(
    idp: FakeIdP, http: httpx.AsyncClient, fields: dict[str, str]
) -> None:
    reply = {"device_code": "d", "user_code": "WDJB-MJHT", "verification_uri": "https://idp.example/activate"}
    idp.device_replies.append(json_reply(200, {**reply, **fields}))
    with pytest.raises(UpstreamError, match=f"^{START_FAILED}$") as caught:
        await make_provider(http).start()
    assert (caught.value.code, caught.value.status) == ("upstream_error", 502)


async def test_a_complete_uri_with_userinfo_is_dropped(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.device_replies.append(
        json_reply(
            200,
            {
                "device_code": "d",
                "user_code": "U",
                "verification_uri": "https://idp.example/activate",
                "verification_uri_complete": "https://login:x@idp.example/activate?user_code=U",
            },
        )
    )
    authorization = await make_provider(http).start()
    assert authorization.verification_uri_complete is None


# --- the credentials document and the account alias --------------------------------------------------


async def test_document_is_the_token_reply_plus_our_fields(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    claims = {"iss": ISSUER, "sub": "user-42", "nickname": "Mika"}
    idp.token_fields = {
        "access_token": "at",
        "token_type": "Bearer",
        "expires_in": "3600",
        "id_token": id_token(claims),
    }
    provider = make_provider(http)
    result = await provider.poll(await provider.start())
    assert isinstance(result, PollSuccess)
    credentials = result.credentials
    assert credentials.file_name == "device-flow/acme.json" == provider.credentials_file
    assert credentials.expires_at_ms == NOW_MS + 3_600_000
    assert credentials.account_alias == "Mika"
    assert list(credentials.document.reveal().items()) == [
        ("access_token", "at"),
        ("token_type", "Bearer"),
        ("expires_in", "3600"),
        ("id_token", idp.token_fields["id_token"]),
        ("expiry_date", NOW_MS + 3_600_000),
        ("obtained_at", NOW_MS),
        ("issuer", ISSUER),
        ("account_alias", "Mika"),
    ]


async def test_document_keeps_only_the_standard_fields_and_ours(
    idp: FakeIdP, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    idp.token_fields = {
        "access_token": "at",
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": "rt",
        "scope": "openid",
        "refresh_token_expires_in": 15_897_600,
        "account_alias": "alice@example.com",  # would pose as our alias in the status snapshot
        "expiry_date": 4_102_444_800_000,  # would pose as our expiry
        "obtained_at": 0,
        "issuer": "https://evil.example",
        "email": "alice@example.com",
        "profile": {"phone": "+1 555 010 9999"},
        "id_token": {"not": "a string"},
    }
    provider = make_provider(http)
    result = await provider.poll(await provider.start())
    assert isinstance(result, PollSuccess)
    assert result.credentials.account_alias is None
    assert result.credentials.document.reveal() == {
        "access_token": "at",
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": "rt",
        "scope": "openid",
        "refresh_token_expires_in": 15_897_600,
        "expiry_date": NOW_MS + 3_600_000,
        "obtained_at": NOW_MS,
        "issuer": ISSUER,
    }
    store = FileCredentialStore(tmp_path / "home")
    await store.load([provider.credentials_file])
    await store.save(result.credentials)
    assert "alice" not in (tmp_path / "home" / provider.credentials_file).read_text()
    (cell,) = provider_statuses([provider], store, NOW_MS)
    assert (cell.account_alias, cell.expires_at_ms) == (None, NOW_MS + 3_600_000)


async def test_a_replys_account_alias_never_beats_the_derived_one(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.token_fields["account_alias"] = "alice@example.com"
    idp.token_fields["id_token"] = id_token({"iss": ISSUER, "sub": "u1", "email": "alice@example.com"})
    provider = make_provider(http)
    result = await provider.poll(await provider.start())
    assert isinstance(result, PollSuccess)
    assert result.credentials.account_alias == uid(ISSUER, "u1")
    assert result.credentials.document.reveal()["account_alias"] == uid(ISSUER, "u1")


async def test_non_finite_or_boolean_numbers_are_dropped(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.token_replies.append(
        httpx.Response(
            200,
            content=b'{"access_token": "at", "expires_in": NaN, "refresh_expires_in": true, "scope": "s"}',
            headers={"content-type": "application/json"},
        )
    )
    provider = make_provider(http)
    result = await provider.poll(await provider.start())
    assert isinstance(result, PollSuccess)
    assert result.credentials.document.reveal() == {
        "access_token": "at",
        "scope": "s",
        "obtained_at": NOW_MS,
        "issuer": ISSUER,
    }


def uid(issuer: str, sub: str) -> str:
    return "uid:" + hashlib.sha256((issuer + sub).encode()).hexdigest()[:8]


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"sub": "u1", "nickname": "Mika"}, "Mika"),
        ({"sub": "u1", "nickname": "  Mika  "}, "Mika"),
        ({"sub": "u1", "nickname": "mika@example.com"}, uid(ISSUER, "u1")),
        ({"sub": "u1", "nickname": "+1 (555) 010-9999"}, uid(ISSUER, "u1")),
        ({"sub": "u1", "nickname": "15550109999"}, uid(ISSUER, "u1")),
        ({"sub": "u1", "nickname": "mkowalski", "preferred_username": "MKowalski"}, uid(ISSUER, "u1")),
        ({"sub": "u1", "nickname": "mika", "email": "mika@example.com"}, uid(ISSUER, "u1")),
        ({"sub": "u1", "nickname": "octocat", "login": "octocat"}, uid(ISSUER, "u1")),
        ({"sub": "u1", "nickname": "x" * 65}, uid(ISSUER, "u1")),
        ({"sub": "u1", "nickname": "bad\u202econtrol"}, uid(ISSUER, "u1")),
        ({"sub": "u1", "nickname": 7}, uid(ISSUER, "u1")),
        ({"sub": "u1"}, uid(ISSUER, "u1")),
        ({"nickname": "a@b.c"}, None),
        ({}, None),
    ],
)
def test_account_alias(claims: dict[str, object], expected: str | None) -> None:
    assert account_alias(claims, ISSUER) == expected


@pytest.mark.parametrize(
    ("alias", "derived"),
    [
        ("Mika", True),
        ("uid:0a1b2c3d", True),
        (uid(ISSUER, "u1"), True),
        ("alice@example.com", False),
        ("+1 (555) 010-9999", False),
        ("15550109999", False),
        (" Mika", False),
        ("x" * 65, False),
        ("Mi\u202eka", False),
        ("Mi\nka", False),
        ("", False),
    ],
)
def test_is_derived_alias_is_the_shape_account_alias_gives(alias: str, derived: bool) -> None:
    assert is_derived_alias(alias) is derived


def test_every_alias_account_alias_gives_is_derived() -> None:
    for claims in ({"sub": "u1", "nickname": "  Mika  "}, {"sub": "u1", "nickname": "a@b.c"}, {"sub": "x"}):
        alias = account_alias(claims, ISSUER)
        assert alias is not None and is_derived_alias(alias)


def test_uid_is_the_first_8_hex_of_sha256_of_issuer_and_sub() -> None:
    assert account_alias({"sub": "248289761001"}, "https://server.example.com") == (
        "uid:" + hashlib.sha256(b"https://server.example.com248289761001").hexdigest()[:8]
    )


@pytest.mark.parametrize("token", ["", "abc", "a.!!!.c", "a.bm90IGpzb24.c", "a.WzFd.c"])
def test_a_garbled_id_token_has_no_claims(token: str) -> None:
    assert id_token_claims(token) is None


async def test_no_id_token_no_alias(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    provider = make_provider(http)
    result = await provider.poll(await provider.start())
    assert isinstance(result, PollSuccess)
    assert result.credentials.account_alias is None
    assert "account_alias" not in result.credentials.document.reveal()


async def test_a_garbled_id_token_is_no_alias_not_a_failure(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.token_fields["id_token"] = "not-a-jwt"
    provider = make_provider(http)
    result = await provider.poll(await provider.start())
    assert isinstance(result, PollSuccess) and result.credentials.account_alias is None


async def test_explicit_endpoints_hash_the_id_tokens_own_issuer() -> None:
    idp = FakeIdP(base_url="https://login.example", pkce=False)
    idp.token_fields["id_token"] = id_token({"iss": "https://login.example/v2", "sub": "s"})
    async with idp.client() as http:
        provider = make_provider(
            http,
            device_authorization_endpoint="https://login.example/device",
            token_endpoint="https://login.example/token",
        )
        result = await provider.poll(await provider.start())
    assert isinstance(result, PollSuccess)
    assert result.credentials.account_alias == uid("https://login.example/v2", "s")
    assert "issuer" not in result.credentials.document.reveal()


# --- secrets ----------------------------------------------------------------------------------------


async def test_secrets_never_show_in_reprs_or_errors(idp: FakeIdP, http: httpx.AsyncClient) -> None:
    idp.client_auth, idp.client_secret = "client_secret_post", "client-secret-xyz"
    provider = make_provider(
        http, env={"S": "client-secret-xyz"}, client_secret_env="S", client_auth="client_secret_post"
    )
    authorization = await provider.start()
    result = await provider.poll(authorization)
    assert isinstance(result, PollSuccess)
    shown = " ".join(map(repr, [provider, authorization, result, result.credentials]))
    for secret in ("client-secret-xyz", "device-code-1", "fake-access-1", "fake-refresh-1"):
        assert secret not in shown
    if authorization.code_verifier is not None:
        assert authorization.code_verifier.reveal() not in shown


# --- a whole login, as the daemon wires it -----------------------------------------------------------


async def test_a_generic_provider_logs_in_against_a_standards_following_idp(
    idp: FakeIdP, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    idp.scope = "openid offline_access"
    idp.client_auth, idp.client_secret = "client_secret_basic", "topsecret"
    idp.token_replies.append(json_reply(400, {"error": "authorization_pending"}))
    idp.token_fields = {
        "access_token": "at-1",
        "refresh_token": "rt-1",
        "token_type": "Bearer",
        "expires_in": 3600,
        "id_token": id_token({"iss": ISSUER, "sub": "u-9", "nickname": "Mika"}),
    }
    config = config_for(
        client_id="client-1", issuer=ISSUER, scope="openid offline_access", client_secret_env="ACME_SECRET"
    )
    providers = build_providers(config, http, env={"ACME_SECRET": "topsecret"}, now_ms=lambda: NOW_MS)
    assert list(providers) == ["acme"]
    provider = providers["acme"]
    store = FileCredentialStore(tmp_path / "home")
    await store.load([provider.credentials_file])
    assert provider_statuses(providers.values(), store, NOW_MS)[0].auth_state is AuthState.UNAUTHENTICATED

    authorization = await provider.start()
    assert await provider.poll(authorization) == PollPending()
    result = await provider.poll(authorization)
    assert isinstance(result, PollSuccess)
    await store.save(result.credentials)

    path = tmp_path / "home" / "device-flow" / "acme.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    document = json.loads(path.read_text())
    assert document["access_token"] == "at-1" and document["refresh_token"] == "rt-1"
    assert document["expiry_date"] == NOW_MS + 3_600_000
    assert document["issuer"] == ISSUER and document["account_alias"] == "Mika"
    (cell,) = provider_statuses(providers.values(), store, NOW_MS)
    assert (cell.provider_id, cell.auth_state, cell.expires_at_ms, cell.account_alias) == (
        "acme",
        AuthState.AUTHENTICATED,
        NOW_MS + 3_600_000,
        "Mika",
    )


async def test_build_providers_puts_qwen_first_and_honours_enabled(http: httpx.AsyncClient) -> None:
    both = build_config({"providers": {"zeta": {"kind": "rfc8628", "client_id": "c", "issuer": ISSUER}}})
    assert list(build_providers(both, http, env={})) == ["qwen-oauth", "zeta"]
    assert list(build_providers(Config(), http, env={})) == ["qwen-oauth"]
    assert list(build_providers(config_for(client_id="c", issuer=ISSUER), http, env={})) == ["acme"]
