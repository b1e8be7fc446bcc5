"""Logins against a real identity provider: panva's certified `oidc-provider` (tests/e2e/oidc_idp.mjs).

Each test starts the provider on 127.0.0.1 (a free port) and a daemon, in this Trio loop, whose generic
`rfc8628` provider `oidc` knows only the issuer (discovery). The test is the person: it submits the provider's
own HTML forms (code entry, confirmation, sign-in, consent) over httpx with a cookie jar, and checks what the
daemon's clients see (REST, the WebSocket events, the status snapshot) and what it wrote to disk. The provider
reports each token request it answered (the outcome only), so the tests also check how the daemon polled.

The provider comes from tests/e2e/node_modules, installed from the committed lockfile by
`npm ci --prefix tests/e2e --omit=peer` (the nox `tests` session does it); without it these tests fail, they do
not skip. Codes and tokens stay inside `Secret`s: no assertion message here can print one.
"""

from __future__ import annotations

import json
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from support.daemon import StartDaemon, loopback_client
from support.html_forms import Page
from support.login import FLOWS_PATH, STATUS_PATH, next_event, open_events, wait_until
from support.oidc_provider import (
    ABORTED_TEXT,
    CODE_ENTRY_FORM,
    CONFIRM_TITLE,
    LOGIN,
    NICKNAME,
    WRONG_CODE_TEXT,
    OidcProvider,
    Person,
    node_for_oidc_provider,
    open_person,
    serve_oidc_provider,
)
from trio_websocket import WebSocketConnection

from serve.config import Config, load_config
from serve.providers.rfc8628 import id_token_claims
from serve.registry import EXPIRED_HINT
from serve.secrets import Secret

PROVIDER_ID = "oidc"
SCOPE = "openid profile offline_access"
SECRET_ENV = "QWEN_SERVE_E2E_OIDC_CLIENT_SECRET"  # the daemon's name for the confidential client's secret
TEST_TIMEOUT_S = 30
# The script's default `interval` (0.2 s): the daemon polls that fast (its `min_interval_s` is 0.05 here).
IDP_INTERVAL_S = 0.2
TOKEN_KEYS = ("access_token", "refresh_token", "id_token")


# --- the setting: a provider, a daemon, a client of the daemon, its event stream and a person --------------


def daemon_config(idp: OidcProvider, *, confidential: bool, device_flow: dict[str, Any]) -> Config:
    """A daemon on 127.0.0.1:0 whose only provider is `oidc`, by discovery from the issuer alone."""
    provider: dict[str, Any] = {"kind": "rfc8628", "issuer": idp.issuer, "scope": SCOPE}
    if confidential:
        provider |= {
            "client_id": idp.confidential_client_id,
            "client_auth": "client_secret_basic",
            "client_secret_env": SECRET_ENV,
        }
    else:
        provider["client_id"] = idp.public_client_id
    return load_config(
        overrides={
            "server": {"port": 0, "graceful_timeout_s": 0.5},
            "device_flow": {"min_interval_s": 0.05, **device_flow},
            "providers": {"qwen-oauth": {"enabled": False}, PROVIDER_ID: provider},
        }
    )


@dataclass
class Setting:
    idp: OidcProvider
    client: httpx.AsyncClient  # the daemon's REST API, with the bearer token
    events: WebSocketConnection  # subscribed before the login starts
    person: Person
    credentials_path: Path

    async def start_login(self) -> dict[str, Any]:
        reply = await self.client.post(FLOWS_PATH, json={"providerId": PROVIDER_ID})
        assert reply.status_code == 201, reply.text
        flow: dict[str, Any] = reply.json()
        assert flow["providerId"] == PROVIDER_ID and flow["status"] == "pending" and flow["attached"] is False
        assert flow["verificationUri"] == f"{self.idp.issuer}/device"
        started = await next_event(self.events)
        assert started["type"] == "auth_device_flow_started"
        assert started["data"] == {
            "deviceFlowId": flow["deviceFlowId"],
            "providerId": PROVIDER_ID,
            "expiresAt": flow["expiresAt"],
        }
        return flow

    async def get_flow(self, flow_id: str) -> dict[str, Any]:
        reply = await self.client.get(f"{FLOWS_PATH}/{flow_id}")
        assert reply.status_code == 200, reply.text
        view: dict[str, Any] = reply.json()
        return view

    async def provider_cells(self) -> list[dict[str, Any]]:
        reply = await self.client.get(STATUS_PATH)
        assert reply.status_code == 200, reply.text
        status = reply.json()
        assert status["pendingDeviceFlows"] == []
        assert status["supportedDeviceFlowProviders"] == [PROVIDER_ID]
        cells: list[dict[str, Any]] = status["providers"]
        return cells

    async def polls_after(self, count: int) -> list[str]:
        """The daemon's token requests once the provider has answered more than `count` of them."""
        await wait_until(lambda: len(self.idp.token_outcomes()) > count)
        return self.idp.token_outcomes()


@asynccontextmanager
async def setting(
    start_daemon: StartDaemon,
    auth: dict[str, str],
    qwen_home: Path,
    tmp_path: Path,
    *script_args: str,
    confidential: bool = False,
    **device_flow: Any,
) -> AsyncIterator[Setting]:
    """`oidc_idp.mjs *script_args` and a daemon logging in to it (`[device_flow]` overrides as keywords)."""
    node = node_for_oidc_provider()
    async with serve_oidc_provider(node, *script_args, log_dir=tmp_path) as idp:
        env = {SECRET_ENV: idp.client_secret.reveal()} if confidential else {}
        config = daemon_config(idp, confidential=confidential, device_flow=device_flow)
        async with (
            start_daemon(config, env=env) as daemon,
            loopback_client(base_url=daemon.url, headers=auth) as client,
            open_events(daemon, auth) as events,
            open_person() as person,
        ):
            yield Setting(idp, client, events, person, qwen_home / "device-flow" / f"{PROVIDER_ID}.json")


# --- reading the credentials file without printing a token ---------------------------------------------------


def read_credentials(path: Path) -> tuple[dict[str, Any], dict[str, Secret[str]]]:
    """The file's plain members, and its tokens (each a non-empty string) kept secret."""
    document = json.loads(path.read_text())
    tokens: dict[str, Secret[str]] = {}
    for key in TOKEN_KEYS:
        if key in document:
            value = Secret(document.pop(key))
            usable = isinstance(value.reveal(), str) and bool(value)
            assert usable, f"{key} is not a non-empty string"
            tokens[key] = value
    return document, tokens


def other_code(user_code: str) -> str:
    """A well-formed user code (oidc-provider's `base-20` charset and mask) that is not `user_code`."""
    wrong = "BBBB-BBBB"
    return wrong if user_code.upper() != wrong else "CCCC-CCCC"


async def approve(person: Person, flow: dict[str, Any]) -> Page:
    return await person.approve(await person.enter_code(flow["verificationUri"], flow["userCode"]))


async def expect_authorized(s: Setting, flow: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Secret[str]]]:
    """The `authorized` event, GET and the credentials file agree; returns the file's plain members and tokens."""
    flow_id = flow["deviceFlowId"]
    ended = await next_event(s.events)
    assert ended["type"] == "auth_device_flow_authorized", ended
    facts, tokens = read_credentials(s.credentials_path)
    assert ended["data"] == {
        "deviceFlowId": flow_id,
        "providerId": PROVIDER_ID,
        "expiresAt": facts["expiry_date"],
        "accountAlias": NICKNAME,
    }
    view = await s.get_flow(flow_id)
    assert view["status"] == "authorized"
    assert "errorKind" not in view and "userCode" not in view
    return facts, tokens


# --- the scenarios -------------------------------------------------------------------------------------------


async def test_an_approved_login_is_authorized_with_a_refresh_token_and_the_nickname_as_alias(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with setting(start_daemon, auth, qwen_home, tmp_path) as s:
            before_ms = time.time() * 1000
            flow = await s.start_login()
            assert flow["intervalMs"] == 200
            assert flow["verificationUriComplete"] == f"{s.idp.issuer}/device?user_code={flow['userCode']}"
            # The person opens the complete URL (the code is in it), then confirms, signs in, consents.
            confirmation = await s.person.open_complete(flow["verificationUriComplete"])
            assert flow["userCode"] in confirmation.text
            await s.person.approve(confirmation)
            facts, tokens = await expect_authorized(s, flow)
            cells = await s.provider_cells()
            polls = s.idp.token_outcomes()

    assert s.idp.device_authorization_events == [{"event": "device_authorization", "status": 200, "interval": 0.2}]
    assert polls[-1] == "ok" and set(polls[:-1]) <= {"authorization_pending"}, polls

    assert stat.S_IMODE(s.credentials_path.stat().st_mode) == 0o600
    assert sorted(tokens) == ["access_token", "id_token", "refresh_token"]
    assert facts["token_type"] == "Bearer"
    assert set(facts["scope"].split()) == set(SCOPE.split())
    assert facts["expires_in"] == 3600
    assert facts["issuer"] == s.idp.issuer
    assert facts["account_alias"] == NICKNAME
    assert before_ms < facts["obtained_at"] <= time.time() * 1000
    assert facts["expiry_date"] == facts["obtained_at"] + 3600 * 1000
    assert sorted(facts) == [
        "account_alias",
        "expires_in",
        "expiry_date",
        "issuer",
        "obtained_at",
        "scope",
        "token_type",
    ]
    claims = id_token_claims(tokens["id_token"].reveal())
    assert claims is not None
    assert (claims["iss"], claims["sub"], claims["nickname"]) == (s.idp.issuer, LOGIN, NICKNAME)

    [cell] = cells
    # The file's mtime, which the kernel's coarse clock may put a few ms before `obtained_at`.
    updated_at = cell.pop("updatedAt")
    assert isinstance(updated_at, int) and before_ms - 1000 < updated_at <= time.time() * 1000
    assert cell == {
        "kind": "auth_provider",
        "providerId": PROVIDER_ID,
        "status": "ok",
        "expiresAt": facts["expiry_date"],
        "accountAlias": NICKNAME,
        "authState": "authenticated",
    }


async def test_aborting_on_the_confirmation_page_ends_the_login_access_denied(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with setting(start_daemon, auth, qwen_home, tmp_path) as s:
            flow = await s.start_login()
            confirmation = await s.person.enter_code(flow["verificationUri"], flow["userCode"])
            assert confirmation.title == CONFIRM_TITLE
            aborted = await s.person.deny(confirmation)
            assert ABORTED_TEXT in aborted.text
            ended = await next_event(s.events)
            view = await s.get_flow(flow["deviceFlowId"])
            cells = await s.provider_cells()
            polls = s.idp.token_outcomes()

    hint = f"{PROVIDER_ID} IdP returned access_denied"
    assert ended["type"] == "auth_device_flow_failed"
    assert ended["data"] == {
        "deviceFlowId": flow["deviceFlowId"],
        "errorKind": "access_denied",
        "hint": hint,
        "status": "error",
    }
    assert (view["status"], view["errorKind"], view["hint"]) == ("error", "access_denied", hint)
    assert polls[-1] == "access_denied" and set(polls[:-1]) <= {"authorization_pending"}, polls
    assert not s.credentials_path.exists()
    assert [(c["providerId"], c["authState"], c["status"]) for c in cells] == [
        (PROVIDER_ID, "unauthenticated", "not_started")
    ]


async def test_a_wrong_user_code_leaves_the_login_pending_and_the_right_one_then_approves(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with setting(start_daemon, auth, qwen_home, tmp_path) as s:
            flow = await s.start_login()
            again = await s.person.enter_code(flow["verificationUri"], other_code(flow["userCode"]))
            assert WRONG_CODE_TEXT in again.text
            assert [form.id for form in again.forms] == [CODE_ENTRY_FORM]  # the code entry page, to try again
            # The daemon keeps polling: two more polls after the wrong code, both still pending.
            polls = await s.polls_after(len(s.idp.token_outcomes()) + 1)
            assert set(polls) == {"authorization_pending"}, polls
            view = await s.get_flow(flow["deviceFlowId"])
            assert view["status"] == "pending" and view["userCode"] == flow["userCode"]
            assert "errorKind" not in view and "lastPolledAt" in view

            await approve(s.person, flow)
            await expect_authorized(s, flow)
            polls = s.idp.token_outcomes()

    assert polls[-1] == "ok" and set(polls[:-1]) == {"authorization_pending"}, polls


async def test_a_device_code_that_outlives_its_lifetime_ends_the_login_expired(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        # A 2 s device code; the daemon's floor on `expires_in` (30 s by default) lowered to 1 s.
        async with setting(start_daemon, auth, qwen_home, tmp_path, "--device-code-ttl", "2", min_expires_in_s=1) as s:
            before_ms = time.time() * 1000
            flow = await s.start_login()
            assert before_ms + 2000 <= flow["expiresAt"] <= time.time() * 1000 + 2000
            ended = await next_event(s.events)
            ended_ms = time.time() * 1000
            view = await s.get_flow(flow["deviceFlowId"])
            polls = s.idp.token_outcomes()

    # Whichever notices first: the provider (usually: its code's `exp` is in whole seconds, so it expires
    # between 1 and 2 s after it was issued), by answering expired_token, or the daemon's own deadline.
    assert ended["type"] == "auth_device_flow_failed"
    hint = ended["data"]["hint"]
    if hint == EXPIRED_HINT:
        assert set(polls) == {"authorization_pending"}, polls
    else:
        assert hint == f"{PROVIDER_ID} IdP returned expired_token"
        assert polls[-1] == "expired_token" and set(polls[:-1]) == {"authorization_pending"}, polls
    assert ended["data"] == {
        "deviceFlowId": flow["deviceFlowId"],
        "errorKind": "expired_token",
        "hint": hint,
        "status": "expired",
    }
    assert ended_ms - before_ms >= 1000
    assert (view["status"], view["errorKind"], view["hint"]) == ("expired", "expired_token", hint)
    assert "userCode" not in view and "expiresAt" not in view
    assert not s.credentials_path.exists()


async def test_without_an_interval_in_the_reply_the_daemon_polls_every_5_s(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with setting(start_daemon, auth, qwen_home, tmp_path, "--no-interval") as s:
            flow = await s.start_login()
            assert flow["intervalMs"] == 5000
            # RFC 8628 §3.4: no poll before one interval has passed (at 0.2 s or 0.05 s it would have by now).
            await trio.sleep(1)
            view = await s.get_flow(flow["deviceFlowId"])
            cancelled = await s.client.delete(f"{FLOWS_PATH}/{flow['deviceFlowId']}")
            ended = await next_event(s.events)

    assert s.idp.device_authorization_events == [{"event": "device_authorization", "status": 200, "interval": None}]
    assert view["status"] == "pending" and view["intervalMs"] == 5000
    assert "lastPolledAt" not in view
    assert s.idp.token_outcomes() == []
    assert cancelled.status_code == 204
    assert ended["type"] == "auth_device_flow_cancelled"
    assert ended["data"] == {"deviceFlowId": flow["deviceFlowId"]}


async def test_a_slow_down_from_the_provider_is_a_throttled_event_and_a_longer_interval(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        # The provider advertises 0.2 s but answers slow_down to polls less than 0.5 s apart; after one
        # slow_down the daemon adds its step (0.5 s here; RFC 8628 §3.5 says 5 s) and polls every 0.7 s.
        async with setting(
            start_daemon, auth, qwen_home, tmp_path, "--enforce-interval", "0.5", slow_down_step_s=0.5
        ) as s:
            flow = await s.start_login()
            assert flow["intervalMs"] == 200
            throttled = await next_event(s.events)
            assert throttled["type"] == "auth_device_flow_throttled"
            assert throttled["data"] == {"deviceFlowId": flow["deviceFlowId"], "intervalMs": 700}
            view = await s.get_flow(flow["deviceFlowId"])
            assert view["status"] == "pending" and view["intervalMs"] == 700
            # One poll at the new pace, accepted, before the person approves.
            polls = await s.polls_after(2)
            assert polls[:3] == ["authorization_pending", "slow_down", "authorization_pending"], polls

            await approve(s.person, flow)
            await expect_authorized(s, flow)
            polls = s.idp.token_outcomes()

    assert polls[:2] == ["authorization_pending", "slow_down"]
    assert polls[-1] == "ok" and set(polls[2:-1]) == {"authorization_pending"}, polls


async def test_a_confidential_client_authenticating_with_client_secret_basic_logs_in(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with setting(start_daemon, auth, qwen_home, tmp_path, confidential=True) as s:
            flow = await s.start_login()
            await approve(s.person, flow)
            _, tokens = await expect_authorized(s, flow)
            introspected = await s.idp.introspect(tokens["access_token"])
            polls = s.idp.token_outcomes()

    assert polls[-1] == "ok" and set(polls[:-1]) <= {"authorization_pending"}, polls
    assert introspected["active"] is True
    assert introspected["client_id"] == s.idp.confidential_client_id
    assert introspected["sub"] == LOGIN
    assert sorted(tokens) == ["access_token", "id_token", "refresh_token"]


async def test_the_daemon_never_polls_a_redeemed_device_code_so_the_grant_survives(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path, tmp_path: Path
) -> None:
    """oidc-provider revokes every token of a grant when its device code is redeemed twice (the next test shows
    it): the daemon stops at the first success, so the tokens it wrote stay valid."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with setting(start_daemon, auth, qwen_home, tmp_path) as s:
            flow = await s.start_login()
            await approve(s.person, flow)
            _, tokens = await expect_authorized(s, flow)
            await trio.sleep(3 * IDP_INTERVAL_S)  # three more polls, had the daemon kept polling
            access = await s.idp.introspect(tokens["access_token"])
            refresh = await s.idp.introspect(tokens["refresh_token"])
            polls = s.idp.token_outcomes()

    assert polls.count("ok") == 1 and polls[-1] == "ok", polls
    assert (access["active"], access["client_id"], access["sub"]) == (True, s.idp.public_client_id, LOGIN)
    assert (refresh["active"], refresh["client_id"], refresh["sub"]) == (True, s.idp.public_client_id, LOGIN)


async def test_the_provider_revokes_the_grant_when_a_redeemed_device_code_is_polled_again(tmp_path: Path) -> None:
    """The quirk the previous test guards against, shown with the test as the provider's client: if this
    stopped holding, that test would prove nothing."""
    node = node_for_oidc_provider()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with serve_oidc_provider(node, log_dir=tmp_path) as idp, open_person() as person:
            authorization = await idp.authorize_device(SCOPE)
            await person.approve(await person.enter_code(authorization.verification_uri, authorization.user_code))
            first, reply = await idp.redeem(authorization)
            assert first == "ok"
            tokens = {key: Secret(reply.reveal()[key]) for key in ("access_token", "refresh_token")}
            active_before = [(await idp.introspect(token))["active"] for token in tokens.values()]
            second, _ = await idp.redeem(authorization)
            active_after = [(await idp.introspect(token))["active"] for token in tokens.values()]

    assert active_before == [True, True]
    assert second == "invalid_grant"
    assert active_after == [False, False]
