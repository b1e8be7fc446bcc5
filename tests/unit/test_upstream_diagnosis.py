"""Diagnoses (issue 12): each way an IdP exchange fails gets its class, a static hint and a safe detail, the
502 body carries the class and the hint, and the registry writes one warning line per failed start or poll.

The building blocks against `httpx.MockTransport`; the registry under the autojump clock with exact lines.
The same failures over real sockets, end to end, are in tests/integration/test_failures.py.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import ssl
from typing import Any

import httpx
import pytest
import trio
from support.fake_idp import FakeIdP, Responder, json_reply, text_reply
from support.logs import captured, messages
from support.registry_fakes import (
    DEVICE_CODE,
    VERIFIER,
    Delayed,
    FakeProvider,
    PollStep,
    make_authorization,
    open_registry,
    success,
)
from trio.testing import MockClock

from serve import wire
from serve.config import build_config
from serve.errors import Diagnosis, UpstreamError, UpstreamFailure
from serve.models import ErrorKind, FlowStatus
from serve.providers import oauth, rfc8628
from serve.providers.base import PollFailed, PollTransient
from serve.providers.oauth import DiagnosedFailure, DiagnosedTransient
from serve.providers.rfc8628 import Rfc8628Provider, metadata_problem
from serve.registry import START_TIMEOUT_MESSAGE

HOST = "idp.example"
ISSUER = f"https://{HOST}"
OIDC_URL = f"{ISSUER}/.well-known/openid-configuration"
RFC8414_URL = f"{ISSUER}/.well-known/oauth-authorization-server"
NO_FLOW = "- (no flow yet)"


def quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# --- the safe facts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://idp.example/token", "idp.example"),
        ("https://idp.example:8443/token?x=1", "idp.example:8443"),
        ("http://127.0.0.1:4444/realms/dev", "127.0.0.1:4444"),
        ("http://[::1]:4444/device", "[::1]:4444"),
        ("https://user:pass@idp.example/token", "idp.example"),  # never the userinfo
    ],
)
def test_idp_host_is_host_and_port_only(url: str, host: str) -> None:
    assert oauth.idp_host(httpx.URL(url)) == host


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        ("invalid_client", "invalid_client"),
        ("incorrect_client_credentials", "incorrect_client_credentials"),  # GitHub's
        ("weird\r\n[serve] forged line", "weird[serve] forged line"),
        ('q"uo\\te', "quote"),  # outside RFC 6749's error-code characters
        ("\u202egnp.exe", "gnp.exe"),
        ("x" * 100, "x" * 63 + "…"),
    ],
)
def test_an_error_code_is_shown_only_as_rfc_6749_characters_and_capped(error: str, shown: str) -> None:
    assert oauth.safe_error_code(error) == shown


def _chained(outer: Exception, cause: BaseException) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("exc", "failure", "hint", "detail"),
    [
        pytest.param(
            _chained(httpx.ConnectError("x"), OSError(errno.ECONNREFUSED, "Connection refused")),
            UpstreamFailure.IDP_UNREACHABLE,
            oauth.HINT_UNREACHABLE,
            f"ConnectError (ECONNREFUSED) to {HOST}",
            id="refused",
        ),
        pytest.param(
            _chained(httpx.ConnectError("x"), ExceptionGroup("all failed", [OSError(errno.EHOSTUNREACH, "no")])),
            UpstreamFailure.IDP_UNREACHABLE,
            oauth.HINT_UNREACHABLE,
            f"ConnectError (EHOSTUNREACH) to {HOST}",
            id="refused-in-a-group",
        ),
        pytest.param(
            _chained(httpx.ConnectError("x"), socket.gaierror(socket.EAI_NONAME, "Name or service not known")),
            UpstreamFailure.IDP_UNREACHABLE,
            oauth.HINT_UNREACHABLE,
            f"ConnectError (unknown host) to {HOST}",
            id="dns",
        ),
        pytest.param(
            _chained(httpx.ConnectError("x"), ssl.SSLCertVerificationError("certificate verify failed")),
            UpstreamFailure.IDP_UNREACHABLE,
            oauth.HINT_TLS,
            f"ConnectError (TLS: SSLCertVerificationError) to {HOST}",
            id="tls",
        ),
        pytest.param(
            httpx.ProxyError("407"),
            UpstreamFailure.IDP_UNREACHABLE,
            oauth.HINT_UNREACHABLE,
            f"ProxyError to {HOST}",
            id="proxy",
        ),
        pytest.param(
            httpx.ConnectTimeout("slow"),
            UpstreamFailure.IDP_TIMEOUT,
            oauth.HINT_TIMEOUT,
            f"ConnectTimeout from {HOST}",
            id="connect-timeout",
        ),
        pytest.param(
            httpx.RemoteProtocolError("closed"),
            UpstreamFailure.BAD_IDP_REPLY,
            oauth.HINT_BROKEN_REPLY,
            f"RemoteProtocolError from {HOST}",
            id="broken",
        ),
        pytest.param(
            oauth.ReplyTooLarge(),
            UpstreamFailure.BAD_IDP_REPLY,
            oauth.HINT_TOO_LARGE,
            f"a reply over 1 MiB from {HOST}",
            id="too-large",
        ),
    ],
)
def test_transport_failures_are_told_apart(exc: Exception, failure: UpstreamFailure, hint: str, detail: str) -> None:
    assert oauth.transport_diagnosis(exc, HOST) == Diagnosis(failure, hint, detail)


@pytest.mark.parametrize(
    ("code", "client", "failure", "hint"),
    [
        ("invalid_client", "public", UpstreamFailure.CLIENT_REJECTED, oauth.HINT_CLIENT_PUBLIC),
        ("invalid_client", "confidential", UpstreamFailure.CLIENT_REJECTED, oauth.HINT_CLIENT_CONFIDENTIAL),
        ("invalid_client", "builtin", UpstreamFailure.CLIENT_REJECTED, oauth.HINT_CLIENT_BUILTIN),
        ("incorrect_client_credentials", "public", UpstreamFailure.CLIENT_REJECTED, oauth.HINT_CLIENT_PUBLIC),
        ("unauthorized_client", "public", UpstreamFailure.CLIENT_REJECTED, oauth.HINT_GRANT_NOT_ENABLED),
        ("device_flow_disabled", "confidential", UpstreamFailure.CLIENT_REJECTED, oauth.HINT_GRANT_NOT_ENABLED),
        ("unsupported_grant_type", "public", UpstreamFailure.CLIENT_REJECTED, oauth.HINT_GRANT_NOT_ENABLED),
        ("unauthorized_client", "builtin", UpstreamFailure.CLIENT_REJECTED, oauth.HINT_CLIENT_BUILTIN),
        ("invalid_scope", "public", UpstreamFailure.REQUEST_REJECTED, oauth.HINT_INVALID_SCOPE),
        ("invalid_request", "confidential", UpstreamFailure.REQUEST_REJECTED, oauth.HINT_INVALID_REQUEST),
        ("server_error", "public", UpstreamFailure.BAD_IDP_REPLY, oauth.HINT_IDP_FAILING),
        ("access_denied", "public", UpstreamFailure.BAD_IDP_REPLY, oauth.HINT_OTHER_ERROR),
        ("made_up", "public", UpstreamFailure.BAD_IDP_REPLY, oauth.HINT_OTHER_ERROR),
    ],
)
def test_an_oauth_error_code_decides_the_class_and_the_client_kind_the_fix(
    code: str, client: oauth.ClientKind, failure: UpstreamFailure, hint: str
) -> None:
    diagnosis = oauth.error_code_diagnosis(code, 400, HOST, client=client)
    assert diagnosis == Diagnosis(failure, hint, f"HTTP 400 error={code} from {HOST}")


# --- a failed start: its diagnosis, and the 502 body -----------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "failure", "hint", "detail"),
    [
        (
            json_reply(401, {"error": "invalid_client"}),
            "client_rejected",
            oauth.HINT_CLIENT_BUILTIN,
            "HTTP 401 error=invalid_client",
        ),
        (text_reply(404, "nope", "text/plain"), "bad_idp_reply", oauth.HINT_NOT_AN_ENDPOINT, "HTTP 404"),
        (text_reply(200, "<html>hi</html>"), "bad_idp_reply", oauth.HINT_NOT_JSON, "HTTP 200, not JSON,"),
        (text_reply(400, "<html>no</html>"), "bad_idp_reply", oauth.HINT_NOT_JSON, "HTTP 400, not JSON,"),
        (json_reply(403, {"message": "blocked"}), "bad_idp_reply", oauth.HINT_REFUSED_WITHOUT_CODE, "HTTP 403"),
        (httpx.Response(302, headers={"location": "/x"}), "bad_idp_reply", oauth.HINT_REDIRECTED, "HTTP 302"),
        (text_reply(502, "<html>gw</html>"), "bad_idp_reply", oauth.HINT_IDP_FAILING, "HTTP 502"),
        (
            json_reply(200, {"device_code": "d", "user_code": "U\x1b[2J", "verification_uri": f"{ISSUER}/a"}),
            "bad_idp_reply",
            oauth.HINT_UNUSABLE_AUTHORIZATION,
            "HTTP 200, not a usable reply,",
        ),
    ],
)
async def test_a_failed_device_authorization_is_diagnosed(
    reply: httpx.Response, failure: str, hint: str, detail: str
) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda request: reply)) as http:
        request = oauth.form_request(http, f"{ISSUER}/device", {"client_id": "c"})
        with pytest.raises(UpstreamError) as caught:
            await oauth.request_device_authorization(http, request, None, failure="static message", client="builtin")
    error = caught.value
    assert error.message == "static message"
    assert error.diagnosis == Diagnosis(UpstreamFailure(failure), hint, f"{detail} from {HOST}")


def test_the_502_body_adds_the_class_and_hint_after_the_originals_members() -> None:
    diagnosis = Diagnosis(UpstreamFailure.IDP_TIMEOUT, oauth.HINT_TIMEOUT, "ReadTimeout from idp.example")
    body = wire.dumps(wire.error_body(UpstreamError("acme IdP discovery failed", diagnosis)))
    assert body == (
        '{"error":"acme IdP discovery failed","code":"upstream_error","failure":"idp_timeout",'
        f'"hint":{quoted(oauth.HINT_TIMEOUT)}}}'
    )
    assert "ReadTimeout" not in body  # the detail is for stderr only
    # Without a diagnosis the body is the original's, byte for byte.
    assert wire.dumps(wire.error_body(UpstreamError("x"))) == '{"error":"x","code":"upstream_error"}'


# --- discovery: the closest refusal is the one reported ----------------------------------------------------------


def provider_for(handler: Any, **table: Any) -> tuple[Rfc8628Provider, httpx.AsyncClient]:
    acme = {"kind": "rfc8628", "client_id": "client-1", "issuer": ISSUER, **table}
    (config,) = build_config({"providers": {"qwen-oauth": {"enabled": False}, "acme": acme}}).providers
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return Rfc8628Provider(config, http, env={}, now_ms=lambda: 0), http


def refused(request: httpx.Request) -> httpx.Response:
    raise _chained(httpx.ConnectError("refused"), OSError(errno.ECONNREFUSED, "refused"))


@pytest.mark.parametrize(
    ("oidc", "rfc8414", "failure", "detail"),
    [
        pytest.param(
            text_reply(404, "no"),
            json_reply(200, FakeIdP(base_url=ISSUER).metadata(issuer="https://other.example")),
            "discovery_failed",
            f"issuer mismatch: configured <{ISSUER}>, the document from {HOST} says <https://other.example>",
            id="a-document-beats-a-404",
        ),
        pytest.param(
            text_reply(200, "<html>"),
            text_reply(404, "no"),
            "discovery_failed",
            f"HTTP 200, not JSON, from {HOST}",
            id="not-json-beats-a-404",
        ),
        pytest.param(
            refused, text_reply(404, "no"), "discovery_failed", f"HTTP 404 from {HOST}", id="404-beats-network"
        ),
        pytest.param(refused, refused, "idp_unreachable", f"ConnectError (ECONNREFUSED) to {HOST}", id="both-down"),
    ],
)
async def test_discovery_reports_its_closest_refusal(
    oidc: Responder, rfc8414: Responder, failure: str, detail: str
) -> None:
    replies = {OIDC_URL: oidc, RFC8414_URL: rfc8414}

    def handler(request: httpx.Request) -> httpx.Response:
        reply = replies[str(request.url)]
        return reply(request) if callable(reply) else reply

    provider, http = provider_for(handler)
    async with http:
        with pytest.raises(UpstreamError, match=r"^acme IdP discovery failed$") as caught:
            await provider.start()
    assert caught.value.diagnosis is not None
    assert (caught.value.diagnosis.failure.value, caught.value.diagnosis.detail) == (failure, detail)


@pytest.mark.parametrize(
    ("configured", "document", "hint"),
    [
        ("https://idp.example/realms/dev/", "https://idp.example/realms/dev", "HINT_ISSUER_TRAILING_SLASH"),
        ("https://idp.example/realms/dev", "https://idp.example/realms/dev/", "HINT_ISSUER_TRAILING_SLASH"),
        ("http://localhost:8080/realms/dev", "http://127.0.0.1:8080/realms/dev", "HINT_ISSUER_LOOPBACK_ALIAS"),
        ("http://[::1]:8080", "http://localhost:8080/", "HINT_ISSUER_LOOPBACK_ALIAS"),
        ("http://localhost:8080", "http://127.0.0.1:9090", "HINT_ISSUER_MISMATCH"),  # another port: another IdP
        ("https://idp.example/realms/dev", "https://idp.example/realms/prod", "HINT_ISSUER_MISMATCH"),
    ],
)
def test_an_issuer_mismatch_says_how_the_two_differ(configured: str, document: str, hint: str) -> None:
    reply = oauth.Reply(200, FakeIdP(base_url="https://idp.example").metadata(issuer=document))
    diagnosis = metadata_problem(reply, configured, "h:1")
    assert (diagnosis.failure, diagnosis.hint) == (UpstreamFailure.DISCOVERY_FAILED, getattr(rfc8628, hint))
    assert diagnosis.detail == f"issuer mismatch: configured <{configured}>, the document from h:1 says <{document}>"


def test_an_issuer_with_a_port_out_of_range_is_a_plain_mismatch() -> None:
    reply = oauth.Reply(200, FakeIdP(base_url="https://idp.example").metadata(issuer="http://127.0.0.1:99999"))
    diagnosis = metadata_problem(reply, "http://localhost:8080", "h:1")
    assert diagnosis.hint == rfc8628.HINT_ISSUER_MISMATCH
    assert diagnosis.detail.endswith("the document from h:1 says another")


async def test_a_poll_whose_discovery_fails_is_a_diagnosed_transient_fault() -> None:
    provider, http = provider_for(refused)
    async with http:
        result = await provider.poll(make_authorization())
    assert isinstance(result, DiagnosedTransient)
    assert result.reason == "IdP discovery failed"
    assert result.diagnosis.failure is UpstreamFailure.IDP_UNREACHABLE


@pytest.mark.parametrize(
    "issuer",
    ["https://user:password@idp.example/", "javascript:alert(1)", "https://idp.example/\u202e", 42, None],
)
def test_a_document_issuer_that_is_not_a_usable_url_is_not_repeated(issuer: object) -> None:
    fields = FakeIdP(base_url="https://idp.example").metadata()
    fields["issuer"] = issuer
    diagnosis = metadata_problem(oauth.Reply(200, fields), ISSUER, "h:1")
    assert diagnosis.failure is UpstreamFailure.DISCOVERY_FAILED
    assert "password" not in diagnosis.detail and "javascript" not in diagnosis.detail
    assert "\u202e" not in diagnosis.detail


# --- `check`'s client probe ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        (json_reply(400, {"error": "invalid_grant"}), "accepted"),
        (json_reply(400, {"error": "expired_token"}), "accepted"),
        (json_reply(200, {"error": "incorrect_device_code"}), "accepted"),  # GitHub
        (json_reply(401, {"error": "invalid_client"}), "refused"),
        (json_reply(400, {"error": "unauthorized_client"}), "refused"),
        (text_reply(404, "no"), "refused"),
        (text_reply(200, "<html>"), "refused"),
        (json_reply(400, {"error": "invalid_request"}), "unclear"),
        (text_reply(500, "oops"), "unclear"),
    ],
)
async def test_the_client_probe_sends_a_made_up_code_and_reads_the_answer(reply: httpx.Response, verdict: str) -> None:
    sent: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(dict(httpx.QueryParams(request.content.decode())))
        return reply

    provider, http = provider_for(
        handler, device_authorization_endpoint=f"{ISSUER}/device", token_endpoint=f"{ISSUER}/token"
    )
    async with http:
        probe = await provider.probe_client()
    assert probe.verdict == verdict
    assert sent == [
        {
            "client_id": "client-1",
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": "qwen-serve-check-not-a-device-code",
        }
    ]


async def test_the_client_probe_of_an_unreachable_token_endpoint_is_refused() -> None:
    provider, http = provider_for(
        refused, device_authorization_endpoint=f"{ISSUER}/device", token_endpoint=f"{ISSUER}/token"
    )
    async with http:
        probe = await provider.probe_client()
    assert probe.verdict == "refused"
    assert probe.diagnosis is not None and probe.diagnosis.failure is UpstreamFailure.IDP_UNREACHABLE


# --- the registry's warning lines --------------------------------------------------------------------------------


def start_line(detail: str, hint: str, failure: str = "client_rejected") -> str:
    return (
        f"device-flow start failed: provider=fake deviceFlowId={NO_FLOW} failure={failure} "
        f"detail={quoted(detail)} hint={quoted(hint)}"
    )


async def test_a_failed_start_logs_one_line_and_every_waiter_gets_the_diagnosis(autojump_clock: MockClock) -> None:
    diagnosis = Diagnosis(
        UpstreamFailure.CLIENT_REJECTED, oauth.HINT_CLIENT_PUBLIC, "HTTP 401 error=invalid_client from h"
    )
    provider = FakeProvider(start_delay=1, start_error=UpstreamError("fake IdP failed", diagnosis))
    with captured("serve.registry", logging.WARNING) as records:
        async with open_registry(provider) as h:
            errors: list[UpstreamError] = []

            async def post() -> None:
                with pytest.raises(UpstreamError) as caught:
                    await h.registry.start("fake", None)
                errors.append(caught.value)

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(post)
    assert [(e.message, e.diagnosis) for e in errors] == [("fake IdP failed", diagnosis)] * 3
    assert len({id(e) for e in errors}) == 3  # a fresh exception per waiter
    assert messages(records, logging.WARNING) == [
        start_line("HTTP 401 error=invalid_client from h", oauth.HINT_CLIENT_PUBLIC)
    ]


async def test_a_start_timeout_is_idp_timeout(autojump_clock: MockClock) -> None:
    with captured("serve.registry", logging.WARNING) as records:
        async with open_registry(FakeProvider(start_hang=True), start_timeout_s=30) as h:
            with pytest.raises(UpstreamError) as caught:
                await h.registry.start("fake", None)
    detail = "no device authorization within start_timeout_s (30 s)"
    assert caught.value.message == START_TIMEOUT_MESSAGE
    assert caught.value.diagnosis == Diagnosis(UpstreamFailure.IDP_TIMEOUT, oauth.HINT_TIMEOUT, detail)
    assert messages(records, logging.WARNING) == [start_line(detail, oauth.HINT_TIMEOUT, "idp_timeout")]


async def test_poll_lines_name_the_flow_the_class_and_the_outcome_and_no_secret(autojump_clock: MockClock) -> None:
    rejected = Diagnosis(
        UpstreamFailure.CLIENT_REJECTED, oauth.HINT_CLIENT_PUBLIC, "HTTP 401 error=invalid_client from h"
    )
    failing = Diagnosis(UpstreamFailure.BAD_IDP_REPLY, oauth.HINT_IDP_FAILING, "HTTP 503 from h")
    polls: list[PollStep] = [
        DiagnosedTransient("IdP answered HTTP 503", failing),
        PollTransient("connection reset"),  # a provider that gives no diagnosis still gets its line
        DiagnosedFailure(ErrorKind.UPSTREAM_ERROR, "fake IdP returned invalid_client", rejected),
    ]
    with captured("serve.registry", logging.WARNING) as records:
        async with open_registry(FakeProvider(polls=polls)) as h:
            flow_id = (await h.registry.start("fake", None)).view.device_flow_id
            await trio.sleep(100)
            assert h.registry.get(flow_id).status is FlowStatus.ERROR
    prefix = f"device-flow poll failed: provider=fake deviceFlowId={flow_id[:8]}..."
    lines = messages(records, logging.WARNING)
    assert lines == [
        f"{prefix} failure=bad_idp_reply detail={quoted('HTTP 503 from h')} "
        f"outcome={quoted('next poll in 10 s (1 of 3 faults)')} hint={quoted(oauth.HINT_IDP_FAILING)}",
        f"{prefix} detail={quoted('connection reset')} outcome={quoted('next poll in 20 s (2 of 3 faults)')}",
        f"{prefix} failure=client_rejected detail={quoted('HTTP 401 error=invalid_client from h')} "
        f"outcome={quoted('the flow ends error (upstream_error)')} hint={quoted(oauth.HINT_CLIENT_PUBLIC)}",
    ]
    assert not [line for line in lines if DEVICE_CODE in line or VERIFIER in line]


async def test_a_users_refusal_is_logged_with_its_static_hint(autojump_clock: MockClock) -> None:
    polls: list[PollStep] = [PollFailed(ErrorKind.ACCESS_DENIED, "fake IdP returned access_denied"), success()]
    with captured("serve.registry", logging.WARNING) as records:
        async with open_registry(FakeProvider(polls=polls)) as h:
            flow_id = (await h.registry.start("fake", None)).view.device_flow_id
            await trio.sleep(100)
    assert messages(records, logging.WARNING) == [
        f"device-flow poll failed: provider=fake deviceFlowId={flow_id[:8]}... "
        f"outcome={quoted('the flow ends error (access_denied)')} hint={quoted('fake IdP returned access_denied')}"
    ]


async def test_a_poll_tick_past_its_bound_is_idp_timeout(autojump_clock: MockClock) -> None:
    polls: list[PollStep] = [Delayed(60, success()), success()]
    with captured("serve.registry", logging.WARNING) as records:
        async with open_registry(FakeProvider(polls=polls), poll_timeout_s=30) as h:
            await h.registry.start("fake", None)
            await trio.sleep(50)
    (line,) = messages(records, logging.WARNING)
    assert "failure=idp_timeout" in line
    assert quoted("no token reply within poll_timeout_s (30 s)") in line
