"""The development IdP's protocol (`serve.dev_idp.DevIdP`), called directly with a hand-moved clock."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from typing import Any

import pytest

from serve import dev_idp
from serve.config import load_config
from serve.dev_idp import CLIENT_ID, DevIdP, Reply, normalize_user_code
from serve.errors import ConfigError

ISSUER = "http://127.0.0.1:4999"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def idp(clock: Clock) -> DevIdP:
    return DevIdP(ISSUER, clock=clock, wall_clock=lambda: 1_800_000_000.0)


def body(reply: Reply) -> dict[str, Any]:
    value = json.loads(reply.body)
    assert isinstance(value, dict)
    return value


def start(idp: DevIdP, **form: str) -> dict[str, Any]:
    reply = idp.device_authorization({"client_id": CLIENT_ID, **form})
    assert reply.status == 200
    return body(reply)


def poll(idp: DevIdP, device_code: str, **form: str) -> Reply:
    return idp.token({"client_id": CLIENT_ID, "grant_type": DEVICE_GRANT, "device_code": device_code, **form})


def decide(idp: DevIdP, user_code: str, action: str = "approve", session: str = "s1") -> Reply:
    return idp.decide(session, {"csrf": idp.csrf_token(session), "user_code": user_code, "action": action})


def test_metadata_is_a_discovery_document_for_its_issuer(idp: DevIdP) -> None:
    meta = idp.metadata()
    assert meta["issuer"] == ISSUER
    assert meta["device_authorization_endpoint"] == f"{ISSUER}/device_authorization"
    assert meta["token_endpoint"] == f"{ISSUER}/token"
    assert meta["revocation_endpoint"] == f"{ISSUER}/revoke"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert idp.allowed_hosts == {"127.0.0.1:4999", "localhost:4999"}


def test_the_device_authorization_reply(idp: DevIdP) -> None:
    reply = start(idp, scope="openid")
    assert set(reply) == {
        "device_code",
        "user_code",
        "verification_uri",
        "verification_uri_complete",
        "expires_in",
        "interval",
    }
    code = reply["user_code"]
    assert len(code) == 9 and code[4] == "-"
    assert set(code.replace("-", "")) <= set(dev_idp.USER_CODE_ALPHABET)
    assert reply["verification_uri"] == f"{ISSUER}/device"
    assert reply["verification_uri_complete"] == f"{ISSUER}/device?user_code={code}"
    assert reply["expires_in"] == dev_idp.DEVICE_CODE_TTL_S and reply["interval"] == dev_idp.INTERVAL_S


def test_an_unknown_client_or_a_plain_pkce_method_is_refused(idp: DevIdP) -> None:
    assert idp.device_authorization({"client_id": "someone-else"}).status == 401
    assert body(idp.device_authorization({"client_id": "x"})) == {"error": "invalid_client"}
    refused = idp.device_authorization(
        {"client_id": CLIENT_ID, "code_challenge": "abc", "code_challenge_method": "plain"}
    )
    assert (refused.status, body(refused)) == (400, {"error": "invalid_request"})
    assert idp.token({"client_id": "x", "grant_type": DEVICE_GRANT}).status == 401
    assert body(idp.token({"client_id": CLIENT_ID, "grant_type": "password"})) == {"error": "unsupported_grant_type"}


def test_pending_then_approved_gives_tokens_once_with_a_nickname_in_the_id_token(idp: DevIdP, clock: Clock) -> None:
    reply = start(idp)
    assert body(poll(idp, reply["device_code"])) == {"error": "authorization_pending"}
    # RFC 8628 §6.1: lower case, no dash, spaces: the same code.
    typed = " " + reply["user_code"].lower().replace("-", "") + " "
    assert decide(idp, typed).status == 200
    clock.now += dev_idp.INTERVAL_S
    tokens = body(poll(idp, reply["device_code"]))
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == dev_idp.ACCESS_TOKEN_TTL_S
    assert tokens["access_token"].startswith("dev-at-") and tokens["refresh_token"].startswith("dev-rt-")
    _header, payload, _signature = tokens["id_token"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["iss"] == ISSUER and claims["aud"] == CLIENT_ID and claims["nickname"] == dev_idp.NICKNAME
    clock.now += dev_idp.INTERVAL_S
    # A device code is good for one token reply.
    assert body(poll(idp, reply["device_code"])) == {"error": "invalid_grant"}
    assert (idp.userinfo(f"Bearer {tokens['access_token']}")).status == 200


def test_denied_and_expired(idp: DevIdP, clock: Clock) -> None:
    denied = start(idp)
    decide(idp, denied["user_code"], "deny")
    assert body(poll(idp, denied["device_code"])) == {"error": "access_denied"}
    late = start(idp)
    clock.now += dev_idp.DEVICE_CODE_TTL_S
    assert body(poll(idp, late["device_code"])) == {"error": "expired_token"}
    # An expired code can no longer be approved either.
    assert decide(idp, late["user_code"]).status == 400


def test_polling_faster_than_the_interval_is_slowed_down_for_good(idp: DevIdP, clock: Clock) -> None:
    reply = start(idp)
    assert body(poll(idp, reply["device_code"])) == {"error": "authorization_pending"}
    clock.now += dev_idp.INTERVAL_S * 0.5
    assert body(poll(idp, reply["device_code"])) == {"error": "slow_down"}
    clock.now += dev_idp.INTERVAL_S  # no longer enough: the interval grew by 5 s (RFC 8628 §3.5)
    assert body(poll(idp, reply["device_code"])) == {"error": "slow_down"}
    clock.now += dev_idp.INTERVAL_S + dev_idp.SLOW_DOWN_STEP_S * 2
    assert body(poll(idp, reply["device_code"])) == {"error": "authorization_pending"}


def test_pkce_is_checked(idp: DevIdP, clock: Clock) -> None:
    verifier = "v" * 50
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    for sent, expected in (("w" * 50, "invalid_grant"), (verifier, None)):
        reply = start(idp, code_challenge=challenge, code_challenge_method="S256")
        decide(idp, reply["user_code"])
        clock.now += 10
        answer = body(poll(idp, reply["device_code"], code_verifier=sent))
        assert answer.get("error") == expected


def approved_tokens(idp: DevIdP, clock: Clock) -> dict[str, Any]:
    reply = start(idp)
    decide(idp, reply["user_code"])
    clock.now += 10
    return body(poll(idp, reply["device_code"]))


def test_refresh_rotates_and_revocation_ends_the_grant(idp: DevIdP, clock: Clock) -> None:
    first = approved_tokens(idp, clock)
    refreshed = body(
        idp.token({"client_id": CLIENT_ID, "grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    )
    assert refreshed["refresh_token"] != first["refresh_token"] and "id_token" not in refreshed
    assert idp.userinfo(f"Bearer {first['access_token']}").status == 401  # rotation ended the old pair
    again = idp.token({"client_id": CLIENT_ID, "grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert body(again) == {"error": "invalid_grant"}
    assert idp.userinfo(f"Bearer {refreshed['access_token']}").status == 200
    assert idp.revoke({"client_id": CLIENT_ID, "token": refreshed["refresh_token"]}).status == 200
    assert idp.userinfo(f"Bearer {refreshed['access_token']}").status == 401
    assert idp.revoke({"client_id": CLIENT_ID, "token": "unknown"}).status == 200  # RFC 7009 §2.2
    other = approved_tokens(idp, clock)
    idp.revoke({"client_id": CLIENT_ID, "token": other["access_token"]})
    assert idp.userinfo(f"Bearer {other['access_token']}").status == 401
    refresh = {"client_id": CLIENT_ID, "grant_type": "refresh_token", "refresh_token": other["refresh_token"]}
    assert "access_token" in body(idp.token(refresh))  # revoking an access token leaves its grant


def test_the_form_needs_the_csrf_token_of_its_own_session(idp: DevIdP) -> None:
    reply = start(idp)
    code = reply["user_code"]
    assert idp.decide("s1", {"user_code": code, "action": "approve"}).status == 403
    assert idp.decide("s1", {"csrf": idp.csrf_token("s2"), "user_code": code, "action": "approve"}).status == 403
    assert idp.decide("", {"csrf": idp.csrf_token(""), "user_code": code, "action": "approve"}).status == 403
    assert decide(idp, code, action="maybe").status == 400
    assert decide(idp, code).status == 200
    assert decide(idp, code, "deny").status == 400  # decided once


def test_wrong_codes_are_counted_and_limited(idp: DevIdP, clock: Clock) -> None:
    reply = start(idp)
    for left in range(dev_idp.MAX_WRONG_CODES - 1, -1, -1):
        wrong = decide(idp, "BBBB-BBBB")
        assert wrong.status == 400 and f"({left} tries left)" in wrong.body.decode()
    # Locked: even the right code waits for the window to pass.
    assert decide(idp, reply["user_code"]).status == 429
    clock.now += dev_idp.WRONG_CODE_WINDOW_S
    assert decide(idp, reply["user_code"]).status == 200


def test_pages_escape_what_they_show(idp: DevIdP) -> None:
    hostile = '"><script>alert(1)</script>'
    page = idp.page("s1", user_code=hostile).body.decode()
    assert "<script>" not in page and "&quot;&gt;&lt;script&gt;" in page
    assert "Development identity provider" in page
    headers = dict(idp.page("s1").headers)
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]


def test_pending_authorizations_are_bounded(idp: DevIdP, clock: Clock) -> None:
    for _ in range(dev_idp.MAX_PENDING):
        start(idp)
    assert idp.device_authorization({"client_id": CLIENT_ID}).status == 429
    clock.now += dev_idp.DEVICE_CODE_TTL_S  # expired ones are swept
    start(idp)


def test_normalize_user_code() -> None:
    assert normalize_user_code("wdjb-mjht") == normalize_user_code("WDJB MJHT") == "WDJBMJHT"


def test_a_configured_provider_named_dev_conflicts() -> None:
    config = load_config(
        overrides={"providers": {"dev": {"kind": "rfc8628", "client_id": "c", "issuer": "https://x.example"}}}
    )
    with pytest.raises(ConfigError) as raised:
        dev_idp.check_config(config)
    assert raised.value.key == "providers.dev"
    added = dev_idp.with_dev_provider(load_config(), ISSUER)
    [dev] = added.providers
    assert (dev.provider_id, dev.client_id, dev.issuer, dev.pkce) == ("dev", CLIENT_ID, ISSUER, "auto")


def test_it_imports_nothing_the_daemon_does_not_already_load() -> None:
    script = (
        "import sys, serve.daemon, serve.http.app; before = set(sys.modules); import serve.dev_idp; "
        "print(sorted(set(sys.modules) - before))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['serve.dev_idp']"
