"""Logins against a real identity provider: panva's certified `oidc-provider` (tests/e2e/oidc_idp.mjs).

Each test starts the provider on 127.0.0.1 (a free port) and a daemon, in this Trio loop, whose generic
`rfc8628` provider `oidc` knows only the issuer (discovery). The test is the person: it submits the provider's
own HTML forms (code entry, confirmation, sign-in, consent) over httpx with a cookie jar, and checks what the
daemon's clients see (REST, the WebSocket events, the status snapshot) and what it wrote to disk. The provider
reports each token request it answered (the outcome only), so the tests also check how the daemon polled.
After the login, the tests ask the provider itself (RFC 7662 introspection) whether the daemon's refreshes
kept the grant alive and whether its logout revoked it.

The provider comes from tests/e2e/node_modules, installed from the committed lockfile by
`npm ci --prefix tests/e2e --omit=peer` (the nox `tests` session does it); without it these tests fail, they do
not skip. Codes and tokens stay inside `Secret`s: no assertion message here can print one.
"""

from __future__ import annotations

import itertools
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
REFRESH_GRANT_TYPE = "refresh_token"


# --- the setting: a provider, a daemon, a client of the daemon, its event stream and a person --------------


def daemon_config(
    idp: OidcProvider, *, confidential: bool, device_flow: dict[str, Any], refresh: dict[str, Any] | None = None
) -> Config:
    """A daemon on 127.0.0.1:0 whose only provider is `oidc`, by discovery from the issuer alone (its `refresh`
    is the default, "auto"); `refresh` overrides the `[refresh]` section."""
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
            "refresh": refresh or {},
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
    refresh: dict[str, Any] | None = None,
    **device_flow: Any,
) -> AsyncIterator[Setting]:
    """`oidc_idp.mjs *script_args` and a daemon logging in to it (`[refresh]` overrides as `refresh`,
    `[device_flow]` overrides as keywords)."""
    node = node_for_oidc_provider()
    async with (
        serve_oidc_provider(node, *script_args, log_dir=tmp_path) as idp,
        daemon_for(
            idp, start_daemon, auth, qwen_home, confidential=confidential, refresh=refresh, device_flow=device_flow
        ) as s,
    ):
        yield s


@asynccontextmanager
async def daemon_for(
    idp: OidcProvider,
    start_daemon: StartDaemon,
    auth: dict[str, str],
    qwen_home: Path,
    *,
    confidential: bool = False,
    refresh: dict[str, Any] | None = None,
    device_flow: dict[str, Any] | None = None,
) -> AsyncIterator[Setting]:
    """A daemon (and its client, its event stream, a person) for a provider already running: leaving the block
    stops the daemon only, so a test can start another one on the same `$QWEN_HOME`."""
    env = {SECRET_ENV: idp.client_secret.reveal()} if confidential else {}
    config = daemon_config(idp, confidential=confidential, device_flow=device_flow or {}, refresh=refresh)
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


# --- after the login: refresh (RFC 6749 §6) and logout (RFC 7009) ---------------------------------------------

# The provider's access-token lifetime for the refresh tests (whole seconds), and the daemon's skew: each
# access token is refreshed 1 s before it expires, so a refresh lands every second or so.
ACCESS_TOKEN_TTL_S = 2
REFRESH = {"skew_s": 1}
# How many access-token lifetimes the login must stay `ok` through, with nobody touching it.
LIFETIMES = 3
# How often the refresh tests read the status snapshot, as a client showing it would.
STATUS_SAMPLE_S = 0.1
LOGOUT_PATH = f"/workspace/auth/providers/{PROVIDER_ID}"


async def sample_cells(s: Setting, samples: list[tuple[str, str]]) -> None:
    """Read the provider's status cell every `STATUS_SAMPLE_S`, forever: `(status, authState)` per reading."""
    while True:
        [cell] = await s.provider_cells()
        samples.append((cell["status"], cell["authState"]))
        await trio.sleep(STATUS_SAMPLE_S)


async def follow_refreshes(
    s: Setting, login_facts: dict[str, Any], login_tokens: dict[str, Secret[str]]
) -> list[dict[str, Any]]:
    """Follow the daemon refreshing the login until `LIFETIMES` access-token lifetimes have passed since it was
    obtained, checking each refresh as it lands: its event, the rewritten file, and what the provider says of the
    new tokens and of the refresh token it replaced. Returns each refresh's file members (no token)."""
    refreshed: list[dict[str, Any]] = []
    previous = login_tokens
    end_ms = login_facts["obtained_at"] + LIFETIMES * ACCESS_TOKEN_TTL_S * 1000
    while time.time() * 1000 < end_ms:
        # Each refresh before the access token it replaces expires, or a client would see `expired`.
        event: dict[str, Any] | None = None
        with trio.move_on_after(ACCESS_TOKEN_TTL_S):
            event = await next_event(s.events)
        assert event is not None, f"no refresh within an access-token lifetime ({len(refreshed)} so far)"
        assert event["type"] == "auth_credentials_refreshed", event
        facts, tokens = read_credentials(s.credentials_path)
        assert event["data"] == {"providerId": PROVIDER_ID, "expiresAt": facts["expiry_date"]}
        assert sorted(tokens) == ["access_token", "id_token", "refresh_token"]
        assert facts["expiry_date"] == facts["obtained_at"] + ACCESS_TOKEN_TTL_S * 1000
        assert facts["account_alias"] == NICKNAME
        assert stat.S_IMODE(s.credentials_path.stat().st_mode) == 0o600
        assert tokens["access_token"].reveal() != previous["access_token"].reveal(), "the access token did not change"
        # oidc-provider rotates a public client's refresh token at each use: the new one is what the file holds.
        assert tokens["refresh_token"].reveal() != previous["refresh_token"].reveal(), (
            "the refresh token was not rotated"
        )
        access = await s.idp.introspect(tokens["access_token"])
        refresh = await s.idp.introspect(tokens["refresh_token"])
        replaced = await s.idp.introspect(previous["refresh_token"])
        assert (access["active"], access["client_id"], access["sub"]) == (True, s.idp.public_client_id, LOGIN)
        assert (refresh["active"], refresh["sub"]) == (True, LOGIN)
        assert replaced == {"active": False}, "the rotated-away refresh token is still usable"
        refreshed.append(facts)
        previous = tokens
    return refreshed


async def expect_refreshed_through_several_lifetimes(
    s: Setting, login_facts: dict[str, Any], login_tokens: dict[str, Secret[str]]
) -> None:
    """The login stays `ok` through `LIFETIMES` access-token lifetimes with no person involved: refreshed at the
    provider each time, the status cell `ok` at every reading, the first access token dead by the end."""
    samples: list[tuple[str, str]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_cells, s, samples)
        refreshed = await follow_refreshes(s, login_facts, login_tokens)
        nursery.cancel_scope.cancel()
    first_access = await s.idp.introspect(login_tokens["access_token"])
    first_refresh = await s.idp.introspect(login_tokens["refresh_token"])

    # One refresh per (lifetime - skew) or so: at least one per lifetime, each a fresh lifetime.
    assert len(refreshed) >= LIFETIMES, len(refreshed)
    obtained = [login_facts["obtained_at"], *(facts["obtained_at"] for facts in refreshed)]
    assert obtained == sorted(set(obtained))
    assert max(b - a for a, b in itertools.pairwise(obtained)) < ACCESS_TOKEN_TTL_S * 1000
    assert len(samples) >= LIFETIMES * ACCESS_TOKEN_TTL_S / STATUS_SAMPLE_S / 2, len(samples)
    assert set(samples) == {("ok", "authenticated")}, sorted(set(samples))
    # The provider refreshed exactly that often, never refusing (a reused refresh token would revoke the grant).
    assert s.idp.token_outcomes(REFRESH_GRANT_TYPE) == ["ok"] * len(refreshed)
    assert first_access == {"active": False}, "the first access token outlived its lifetime"
    assert first_refresh == {"active": False}


async def test_a_short_lived_access_token_is_refreshed_so_the_login_stays_ok_with_no_person_involved(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path, tmp_path: Path
) -> None:
    """Issue 12: with a 2 s access token the login stays `ok` through three lifetimes on the daemon's refreshes."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with setting(
            start_daemon, auth, qwen_home, tmp_path, "--access-token-ttl", str(ACCESS_TOKEN_TTL_S), refresh=REFRESH
        ) as s:
            flow = await s.start_login()
            await approve(s.person, flow)
            facts, tokens = await expect_authorized(s, flow)
            assert facts["expires_in"] == ACCESS_TOKEN_TTL_S
            await expect_refreshed_through_several_lifetimes(s, facts, tokens)


async def test_a_daemon_started_over_a_login_keeps_it_fresh(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path, tmp_path: Path
) -> None:
    """A daemon (re)started over the credentials another one wrote refreshes them before they expire, rotating the
    refresh token as the provider asks, and its status stays `ok` through three access-token lifetimes."""
    node = node_for_oidc_provider()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with serve_oidc_provider(node, "--access-token-ttl", str(ACCESS_TOKEN_TTL_S), log_dir=tmp_path) as idp:
            async with daemon_for(idp, start_daemon, auth, qwen_home, refresh=REFRESH) as first:
                flow = await first.start_login()
                await approve(first.person, flow)
                facts, tokens = await expect_authorized(first, flow)
            assert facts["expires_in"] == ACCESS_TOKEN_TTL_S
            # The first daemon has stopped within the access token's first second: the second one refreshes it.
            async with daemon_for(idp, start_daemon, auth, qwen_home, refresh=REFRESH) as second:
                await expect_refreshed_through_several_lifetimes(second, facts, tokens)


async def test_logout_revokes_the_grant_at_the_provider_and_removes_the_credentials(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path, tmp_path: Path
) -> None:
    """Issue 12: `DELETE /workspace/auth/providers/oidc` revokes at the provider's `revocation_endpoint`."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with setting(start_daemon, auth, qwen_home, tmp_path) as s:
            metadata = await s.idp.metadata()
            flow = await s.start_login()
            await approve(s.person, flow)
            _, tokens = await expect_authorized(s, flow)
            active_before = [
                (await s.idp.introspect(tokens[key]))["active"] for key in ("access_token", "refresh_token")
            ]
            reply = await s.client.delete(LOGOUT_PATH)
            removed = await next_event(s.events)
            cells = await s.provider_cells()
            access = await s.idp.introspect(tokens["access_token"])
            refresh = await s.idp.introspect(tokens["refresh_token"])
            again = await s.client.delete(LOGOUT_PATH)

    assert metadata["revocation_endpoint"] == f"{s.idp.issuer}/token/revocation"
    assert active_before == [True, True]
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"providerId": PROVIDER_ID, "removed": True, "revocation": "revoked"}
    assert not s.credentials_path.exists()
    assert removed["type"] == "auth_credentials_removed"
    assert removed["data"] == {"providerId": PROVIDER_ID}
    assert [(c["providerId"], c["status"], c["authState"]) for c in cells] == [
        (PROVIDER_ID, "not_started", "unauthenticated")
    ]
    # RFC 7009 §2.1: revoking the refresh token may end the whole grant; oidc-provider does, so both are dead.
    assert access == {"active": False}
    assert refresh == {"active": False}
    # A second logout has nothing to remove and nothing to revoke.
    assert again.status_code == 200, again.text
    assert again.json() == {"providerId": PROVIDER_ID, "removed": False, "revocation": "none"}
