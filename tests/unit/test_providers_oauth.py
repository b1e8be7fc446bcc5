"""Shared OAuth helpers (serve.providers.oauth): SPEC §3's classification table, tolerant parsing, the
reply size cap, PKCE."""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Mapping

import httpx
import pytest
import trio
from support.fake_idp import ABANDONED_STREAM_WARNING, EndlessStream, form_reply, json_reply, text_reply

from serve.errors import Diagnosis, UpstreamFailure
from serve.models import ErrorKind
from serve.providers import oauth
from serve.providers.base import PollFailed, PollPending, PollResult, PollSlowDown
from serve.providers.oauth import DiagnosedFailure, DiagnosedTransient
from serve.secrets import Secret

UPSTREAM = ErrorKind.UPSTREAM_ERROR
BAD_REPLY = UpstreamFailure.BAD_IDP_REPLY

SUCCESS = PollPending()  # a sentinel the success callback returns, distinguishable from the rest by identity


def classify(response: httpx.Response) -> PollResult:
    reply = oauth.Reply(
        response.status_code, oauth.parse_body(response.content, response.headers.get("content-type", ""))
    )

    def on_success(fields: Mapping[str, object]) -> PollResult:
        return SUCCESS

    return oauth.classify_token_reply(reply, label="Acme", on_success=on_success)


# --- the classification table (SPEC §3): the error member first, never the HTTP status alone ---------


@pytest.mark.parametrize("status", [400, 401, 428, 429, 200])
def test_authorization_pending_is_pending_whatever_the_status(status: int) -> None:
    result = classify(json_reply(status, {"error": "authorization_pending"}))
    assert result == PollPending() and result is not SUCCESS


@pytest.mark.parametrize("status", [400, 403, 429, 200])
def test_slow_down_is_slow_down_whatever_the_status(status: int) -> None:
    assert classify(json_reply(status, {"error": "slow_down"})) == PollSlowDown(None)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("access_denied", ErrorKind.ACCESS_DENIED),
        ("expired_token", ErrorKind.EXPIRED_TOKEN),
        ("invalid_grant", ErrorKind.INVALID_GRANT),
        ("authorization_declined", ErrorKind.ACCESS_DENIED),  # Microsoft Entra
        ("token_expired", ErrorKind.EXPIRED_TOKEN),  # GitHub
    ],
)
@pytest.mark.parametrize("status", [400, 200])
def test_terminal_codes_map_to_their_kind_with_a_static_hint(code: str, kind: ErrorKind, status: int) -> None:
    assert classify(json_reply(status, {"error": code})) == PollFailed(kind, f"Acme IdP returned {code}")


@pytest.mark.parametrize("code", ["server_error", "temporarily_unavailable"])
@pytest.mark.parametrize("status", [400, 503, 200])
def test_server_error_codes_are_transient(code: str, status: int) -> None:
    diagnosis = Diagnosis(BAD_REPLY, oauth.HINT_IDP_FAILING, f"HTTP {status} error={code} from the IdP")
    assert classify(json_reply(status, {"error": code})) == DiagnosedTransient(f"IdP returned {code}", diagnosis)


def test_invalid_client_with_401_is_upstream_error() -> None:
    result = classify(json_reply(401, {"error": "invalid_client"}))
    assert result == DiagnosedFailure(
        UPSTREAM,
        "Acme IdP returned invalid_client",
        Diagnosis(
            UpstreamFailure.CLIENT_REJECTED,
            "the identity provider rejected the client: check client_id, client_auth and the client secret",
            "HTTP 401 error=invalid_client from the IdP",
        ),
    )


def test_an_unknown_error_code_is_upstream_error_and_not_echoed() -> None:
    result = classify(json_reply(400, {"error": "<script>alert(1)</script>"}))
    # The hint (the wire's) names no unknown code; the diagnosis's detail (stderr's) names it, stripped.
    assert result == DiagnosedFailure(
        UPSTREAM,
        "Acme IdP returned an unexpected error",
        Diagnosis(BAD_REPLY, oauth.HINT_OTHER_ERROR, "HTTP 400 error=<script>alert(1)</script> from the IdP"),
    )


def test_error_with_http_200_beats_an_access_token() -> None:
    result = classify(json_reply(200, {"error": "access_denied", "access_token": "x"}))
    assert result == PollFailed(ErrorKind.ACCESS_DENIED, "Acme IdP returned access_denied")


@pytest.mark.parametrize("code", ["access_denied", "invalid_client", "weird_code", "server_error"])
def test_error_description_never_reaches_a_hint_or_reason(code: str) -> None:
    result = classify(
        json_reply(400, {"error": code, "error_description": "SECRET-IDP-TEXT", "error_uri": "https://x"})
    )
    assert "SECRET-IDP-TEXT" not in repr(result)
    assert "https://x" not in repr(result)


def test_2xx_with_an_access_token_is_success() -> None:
    assert classify(json_reply(200, {"access_token": "a", "token_type": "Bearer"})) is SUCCESS


def test_2xx_without_an_access_token_is_upstream_error() -> None:
    result = classify(json_reply(200, {"token_type": "Bearer"}))
    diagnosis = Diagnosis(BAD_REPLY, oauth.HINT_NO_ACCESS_TOKEN, "HTTP 200, no access_token, from the IdP")
    assert result == DiagnosedFailure(UPSTREAM, "Acme IdP returned no access token", diagnosis)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_without_an_error_member_is_transient(status: int) -> None:
    diagnosis = Diagnosis(BAD_REPLY, oauth.HINT_IDP_FAILING, f"HTTP {status} from the IdP")
    assert classify(text_reply(status, "<html>oops</html>")) == DiagnosedTransient(
        f"IdP answered HTTP {status}", diagnosis
    )


def test_a_non_json_body_is_transient() -> None:
    for status in (400, 200):
        diagnosis = Diagnosis(BAD_REPLY, oauth.HINT_NOT_JSON, f"HTTP {status}, not JSON, from the IdP")
        assert classify(text_reply(status, "<html>Bad gateway</html>")) == DiagnosedTransient(
            "IdP reply was not JSON", diagnosis
        )


def test_a_json_body_without_error_on_4xx_is_upstream_error() -> None:
    result = classify(json_reply(404, {"message": "nope"}))
    diagnosis = Diagnosis(BAD_REPLY, oauth.HINT_NOT_AN_ENDPOINT, "HTTP 404 from the IdP")
    assert result == DiagnosedFailure(UPSTREAM, "Acme IdP returned an unexpected response", diagnosis)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_upstream_error(status: int) -> None:
    response = httpx.Response(status, headers={"location": "https://evil.example/token"})
    diagnosis = Diagnosis(BAD_REPLY, oauth.HINT_REDIRECTED, f"HTTP {status} from the IdP")
    assert classify(response) == DiagnosedFailure(UPSTREAM, "Acme IdP redirected the token request", diagnosis)


def test_a_non_string_error_member_is_ignored() -> None:
    assert classify(json_reply(200, {"error": {"code": 1}, "access_token": "a"})) is SUCCESS


# --- tolerances -------------------------------------------------------------------------------------


def test_slow_down_carries_the_new_interval_even_as_a_string() -> None:
    assert classify(json_reply(400, {"error": "slow_down", "interval": 10})) == PollSlowDown(10.0)
    assert classify(json_reply(400, {"error": "slow_down", "interval": "15"})) == PollSlowDown(15.0)
    assert classify(json_reply(400, {"error": "slow_down", "interval": "soon"})) == PollSlowDown(None)


def test_form_encoded_replies_are_parsed() -> None:
    reply = form_reply(200, {"error": "slow_down", "error_description": "Too many requests", "interval": "10"})
    assert classify(reply) == PollSlowDown(10.0)
    assert classify(form_reply(200, {"access_token": "gho_x", "token_type": "bearer", "scope": ""})) is SUCCESS


def test_form_parsing_needs_the_form_content_type() -> None:
    assert oauth.parse_body(b"access_token=x", "text/plain") is None
    assert oauth.parse_body(b"access_token=x", "application/x-www-form-urlencoded; charset=utf-8") == {
        "access_token": "x"
    }


def test_json_is_parsed_whatever_the_content_type() -> None:
    assert oauth.parse_body(b'{"error":"slow_down"}', "text/plain") == {"error": "slow_down"}
    assert oauth.parse_body(b"[1, 2]", "application/json") is None
    assert oauth.parse_body(b"[" * 100_000, "application/json") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, 5.0),
        (2.5, 2.5),
        ("5", 5.0),
        (" 7 ", 7.0),
        ("1e1", 10.0),
        ("NaN", None),
        ("inf", None),
        (math.nan, None),
        (True, None),
        (None, None),
        ("five", None),
        ([5], None),
    ],
)
def test_parse_number(value: object, expected: float | None) -> None:
    assert oauth.parse_number(value) == expected


def test_expiry_ms() -> None:
    assert oauth.expiry_ms(1_000, 3600) == 3_601_000
    assert oauth.expiry_ms(1_000, "60") == 61_000
    assert oauth.expiry_ms(1_000, 0) is None
    assert oauth.expiry_ms(1_000, -5) is None
    assert oauth.expiry_ms(1_000, None) is None


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://idp.example/token", True),
        ("http://127.0.0.1:8080/token", True),
        ("http://localhost/token", True),
        ("http://[::1]:9/token", True),
        ("http://idp.example/token", False),
        # RFC 6761 §6.3 leaves *.localhost to resolvers, which may send it anywhere: cleartext is refused.
        ("http://evil.localhost/token", False),
        ("http://localhost./token", False),
        # RFC 9110 §4.2.4: userinfo obscures the authority (this one goes to evil.example).
        ("https://chat.qwen.ai@evil.example/token", False),
        ("https://user:pass@idp.example/token", False),
        ("https://@idp.example/token", False),
        # A browser reads `\` as `/` and would open evil.example; urlsplit sees chat.qwen.ai.
        ("https://evil.example\\@chat.qwen.ai/", False),
        ("https://evil.example\\.chat.qwen.ai/", False),
        ("https://idp.example:99999/token", False),
        ("https://idp.example:abc/token", False),
        ("https://idp.example/\u202egnp.exe", False),
        ("https://idp.example/a\tb", False),
        ("https://idp.exam\u0440le/token", False),  # a Cyrillic `р`
        ("https://idp.example/token?next=a@b", True),
        ("ftp://idp.example/token", False),
        ("javascript:alert(1)", False),
        ("/relative", False),
        (42, False),
    ],
)
def test_https_only_except_loopback(url: object, allowed: bool) -> None:
    assert oauth.is_allowed_url(url) is allowed


# --- the device authorization response (RFC 8628 §3.2) ----------------------------------------------


def device_reply(**overrides: object) -> oauth.Reply:
    fields: dict[str, object] = {
        "device_code": "dc",
        "user_code": "WDJB-MJHT",
        "verification_uri": "https://idp.example/device",
        "verification_uri_complete": "https://idp.example/device?user_code=WDJB-MJHT",
        "expires_in": 900,
        "interval": 5,
    }
    fields.update(overrides)
    return oauth.Reply(200, {k: v for k, v in fields.items() if v is not None})


@pytest.mark.parametrize(
    "user_code",
    ["WDJB-MJHT", "GQVQ-JKEC", "12345678", "ABCD EFGH", "КОД-4821", "x" * oauth.MAX_USER_CODE_CHARS],
)
def test_ordinary_user_codes_are_accepted(user_code: str) -> None:
    authorization = oauth.parse_device_authorization(device_reply(user_code=user_code), None)
    assert authorization is not None and authorization.user_code == user_code


@pytest.mark.parametrize(
    "user_code",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("x" * (oauth.MAX_USER_CODE_CHARS + 1), id="too-long"),
        pytest.param("WDJB-MJHT visit https://evil.example and enter it", id="a-sentence"),
        pytest.param("WDJB\x00MJHT", id="NUL"),
        pytest.param("WDJB\nMJHT", id="LF"),
        pytest.param("WDJB\x1b[2JMJHT", id="ESC"),
        pytest.param("WDJB\x7fMJHT", id="DEL"),
        pytest.param("WDJB\x85MJHT", id="C1-NEL"),
        pytest.param("WDJB\x9bMJHT", id="C1-CSI"),
        pytest.param("WDJB\u2028MJHT", id="U+2028"),
        pytest.param("WDJB\u2029MJHT", id="U+2029"),
        *(pytest.param(f"WDJB{c}MJHT", id=f"U+{ord(c):04X}") for c in "\u200b\u200c\u200d\u200e\u200f"),
        *(pytest.param(f"WDJB{c}MJHT", id=f"U+{ord(c):04X}") for c in "\u202a\u202b\u202c\u202d\u202e"),
        *(pytest.param(f"WDJB{c}MJHT", id=f"U+{ord(c):04X}") for c in "\u2066\u2067\u2068\u2069"),
        pytest.param("\ufeffWDJB-MJHT", id="U+FEFF"),
        pytest.param("WDJB\u00a0MJHT", id="NBSP"),
        pytest.param(42, id="a-number"),
    ],
)
def test_a_long_or_unprintable_user_code_refuses_the_reply(user_code: object) -> None:
    assert oauth.parse_device_authorization(device_reply(user_code=user_code), None) is None


@pytest.mark.parametrize(
    "uri",
    [
        "https://chat.qwen.ai@evil.example/device",
        "https://user:pass@idp.example/device",
        "https://evil.example\\@idp.example/device",
        "http://evil.localhost/device",
    ],
)
def test_a_verification_uri_with_userinfo_or_cleartext_refuses_the_reply(uri: str) -> None:
    # The URI the user must open: there is no flow without a trustworthy one.
    assert oauth.parse_device_authorization(device_reply(verification_uri=uri), None) is None
    assert oauth.parse_device_authorization(device_reply(verification_uri=None, verification_url=uri), None) is None


@pytest.mark.parametrize(
    "complete",
    [
        "https://user@idp.example/device?user_code=WDJB-MJHT",
        "https://idp.example:443@idp.example/device?user_code=WDJB-MJHT",
        "https://idp.example\\@idp.example/device?user_code=WDJB-MJHT",
        "https://idp.example/device?user_code=WDJB-MJHT\u202e",
    ],
)
def test_a_complete_uri_with_userinfo_is_dropped_even_on_the_same_origin(complete: str) -> None:
    # RFC 8628 §3.2: it is OPTIONAL; the user still has verification_uri and the code (SPEC §5's rule for a
    # foreign origin, applied to a disguised one).
    authorization = oauth.parse_device_authorization(device_reply(verification_uri_complete=complete), None)
    assert authorization is not None
    assert authorization.verification_uri == "https://idp.example/device"
    assert authorization.verification_uri_complete is None


@pytest.mark.parametrize("uri", ["https://idp.example:abc/device", "https://idp.example:99999/device"])
def test_a_verification_uri_with_a_bad_port_is_refused_not_a_crash(uri: str) -> None:
    # The origin comparison reads the port: it used to raise ValueError out of start() (a 500, not a 502).
    assert oauth.parse_device_authorization(device_reply(verification_uri=uri), None) is None


def test_origin_fills_default_ports() -> None:
    assert oauth.origin("https://Chat.Qwen.ai/authorize") == oauth.origin("https://chat.qwen.ai:443/x?y=1")
    assert oauth.origin("https://chat.qwen.ai/") != oauth.origin("https://chat.qwen.ai:8443/")
    assert oauth.origin("https://chat.qwen.ai/") != oauth.origin("http://chat.qwen.ai/")


# --- PKCE (RFC 7636) --------------------------------------------------------------------------------


def test_code_verifier_is_43_chars_of_base64url_and_secret() -> None:
    verifier = oauth.new_code_verifier()
    assert isinstance(verifier, Secret)
    value = verifier.reveal()
    assert len(value) == 43 and "=" not in value
    assert len(base64.urlsafe_b64decode(value + "=")) == 32
    assert value not in repr(verifier) and value not in str(verifier)
    assert oauth.new_code_verifier().reveal() != value


def test_s256_challenge_matches_rfc7636_appendix_b() -> None:
    verifier = Secret("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
    assert oauth.s256_code_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    digest = hashlib.sha256(verifier.reveal().encode()).digest()
    assert oauth.s256_code_challenge(verifier) == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# --- the 1 MiB reply cap ----------------------------------------------------------------------------


@pytest.mark.filterwarnings(ABANDONED_STREAM_WARNING)
async def test_send_stops_reading_an_endless_reply() -> None:
    stream = EndlessStream()
    transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=stream))
    with trio.fail_after(5):
        async with httpx.AsyncClient(transport=transport) as http:
            with pytest.raises(oauth.ReplyTooLarge):
                await oauth.send(http, http.build_request("POST", "https://idp.example/token"))
    assert stream.chunks_read == oauth.MAX_REPLY_BYTES // len(stream.chunk) + 1
    assert stream.closed


async def test_send_refuses_a_declared_oversized_body_without_reading_it() -> None:
    stream = EndlessStream()
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, stream=stream, headers={"content-length": str(2 << 20)})
    )
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(oauth.ReplyTooLarge):
            await oauth.send(http, http.build_request("POST", "https://idp.example/token"))
    assert stream.chunks_read == 0


async def test_send_accepts_a_reply_of_exactly_the_cap() -> None:
    body = b'{"access_token": "a"}'.ljust(oauth.MAX_REPLY_BYTES, b" ")
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    async with httpx.AsyncClient(transport=transport) as http:
        reply = await oauth.send(http, http.build_request("POST", "https://idp.example/token"))
    assert reply == oauth.Reply(200, {"access_token": "a"})


async def test_send_never_follows_redirects() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(307, headers={"location": "https://elsewhere.example/token"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), follow_redirects=True) as http:
        reply = await oauth.send(http, http.build_request("POST", "https://idp.example/token", data={"a": "b"}))
    assert reply.status_code == 307
    assert seen == ["https://idp.example/token"]


@pytest.mark.parametrize(
    ("exc", "reason", "diagnosis"),
    [
        (
            httpx.ConnectError("refused"),
            "IdP connection failed",
            Diagnosis(UpstreamFailure.IDP_UNREACHABLE, oauth.HINT_UNREACHABLE, "ConnectError to idp.example"),
        ),
        (
            httpx.ReadTimeout("slow"),
            "IdP request timed out",
            Diagnosis(UpstreamFailure.IDP_TIMEOUT, oauth.HINT_TIMEOUT, "ReadTimeout from idp.example"),
        ),
        (
            httpx.RemoteProtocolError("bad"),
            "IdP connection failed",
            Diagnosis(BAD_REPLY, oauth.HINT_BROKEN_REPLY, "RemoteProtocolError from idp.example"),
        ),
    ],
)
async def test_poll_token_endpoint_network_faults_are_transient(
    exc: Exception, reason: str, diagnosis: Diagnosis
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        result = await oauth.poll_token_endpoint(
            http, http.build_request("POST", "https://idp.example/token"), label="Acme", on_success=lambda f: SUCCESS
        )
    assert result == DiagnosedTransient(reason, diagnosis)


@pytest.mark.filterwarnings(ABANDONED_STREAM_WARNING)
async def test_poll_token_endpoint_oversized_reply_is_transient() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=EndlessStream()))
    async with httpx.AsyncClient(transport=transport) as http:
        result = await oauth.poll_token_endpoint(
            http, http.build_request("POST", "https://idp.example/token"), label="Acme", on_success=lambda f: SUCCESS
        )
    diagnosis = Diagnosis(BAD_REPLY, oauth.HINT_TOO_LARGE, "a reply over 1 MiB from idp.example")
    assert result == DiagnosedTransient("IdP reply too large", diagnosis)
