"""The device-flow REST routes and the status snapshot (SPEC §2) over real sockets, byte for byte.

A real daemon on 127.0.0.1:0 (hypercorn, `run_daemon`), `qwen-oauth` (and generic RFC 8628 providers)
pointed at fake IdPs served over real HTTP on loopback, real httpx clients and trio-websocket subscribers.
Bodies are compared as text against the original `qwen serve` 0.24.4's (WIRE-EXAMPLES, copied below), with
only ids and times substituted from the response itself. Real clock throughout; intervals come from config.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import pytest
import trio
from support.daemon import loopback_client
from support.idp_server import serve_idp
from support.login import (
    CLIENT_ID_HEADER,
    FLOWS_PATH,
    STATUS_PATH,
    GatedStore,
    NoSpaceFileSystem,
    Recorder,
    StartDaemon,
    closed_port_url,
    frames_until_close,
    generic_idp,
    generic_provider,
    json_text,
    login_config,
    next_event,
    oauth_error,
    open_events,
    pending_replies,
    qwen_daemon,
    qwen_idp,
    qwen_tokens,
    script_devices,
    token_requests,
    wait_until,
)

from serve.audit import Audit
from serve.daemon import RunningDaemon
from serve.providers.oauth import HINT_TIMEOUT, HINT_UNREACHABLE

# --- the original's bodies (WIRE-EXAMPLES), and ours for the (+) errors ----------------------------------

INVALID_REQUEST = '{"error":"`providerId` must be a non-empty string","code":"invalid_request"}'
INVALID_JSON = '{"error":"Invalid JSON in request body","code":"invalid_json"}'
UNSUPPORTED_GITHUB = (
    '{"error":"Unsupported device-flow provider: github","code":"unsupported_provider",'
    '"supportedProviders":["qwen-oauth"]}'
)
INVALID_CLIENT_ID = (
    '{"error":"`X-Qwen-Client-Id` must be a non-empty token of 128 characters or fewer","code":"invalid_client_id"}'
)
# The original's `error` and `code`, then (+) the failure's class and its static hint (issue 12).
QWEN_UPSTREAM = (
    '{"error":"Qwen IdP device authorization request failed","code":"upstream_error",'
    f'"failure":"idp_unreachable","hint":{json_text(HINT_UNREACHABLE)}}}'
)
START_TIMEOUT = (
    '{"error":"device-flow start timeout (upstream IdP unresponsive)","code":"upstream_error",'
    f'"failure":"idp_timeout","hint":{json_text(HINT_TIMEOUT)}}}'
)
TOO_MANY_ACTIVE = (
    '{"error":"Too many active device-flow attempts. Cancel one of the existing flows or wait for them to expire.",'
    '"code":"too_many_active_flows"}'
)
RATE_LIMITED = '{"error":"Too many device-flow starts; try again later","code":"rate_limited"}'
SHUTTING_DOWN = '{"error":"daemon is shutting down","code":"shutting_down"}'
PERSIST_FAILED_HINT = "credentials could not be written to the daemon filesystem — check disk space and permissions"

A = "cli-A"
B = "cli-B"
QWEN = {"providerId": "qwen-oauth"}


def not_found(device_flow_id: str) -> str:
    return f'{{"error":"Device-flow {device_flow_id} not found","code":"device_flow_not_found"}}'


def verification(base: str, user_code: str = "USER-0001") -> str:
    """The initiator's three fields, as the original writes them."""
    return (
        f'"userCode":"{user_code}","verificationUri":"{base}/authorize",'
        f'"verificationUriComplete":"{base}/authorize?user_code={user_code}&client=qwen-code"'
    )


def start_text(
    flow_id: str, expires_at: int, interval_ms: int, *, attached: bool, verify: str | None, initiator: str | None
) -> str:
    """A POST body: `{deviceFlowId, providerId, status, expiresAt, intervalMs, attached}` + initiator fields."""
    text = (
        f'{{"deviceFlowId":"{flow_id}","providerId":"qwen-oauth","status":"pending","expiresAt":{expires_at},'
        f'"intervalMs":{interval_ms},"attached":{json.dumps(attached)}'
    )
    if verify is not None:
        text += "," + verify
    if initiator is not None:
        text += f',"initiatorClientId":"{initiator}"'
    return text + "}"


def pending_text(
    flow_id: str,
    created_at: int,
    expires_at: int,
    interval_ms: int,
    *,
    polled_at: int | None = None,
    verify: str | None = None,
    initiator: str | None = None,
) -> str:
    """A GET view of a pending flow, in the original's field order."""
    text = (
        f'{{"deviceFlowId":"{flow_id}","providerId":"qwen-oauth","status":"pending","createdAt":{created_at},'
        f'"expiresAt":{expires_at},"intervalMs":{interval_ms}'
    )
    if polled_at is not None:
        text += f',"lastPolledAt":{polled_at}'
    if verify is not None:
        text += "," + verify
    if initiator is not None:
        text += f',"initiatorClientId":"{initiator}"'
    return text + "}"


def client_id(value: str | None) -> dict[str, str]:
    return {CLIENT_ID_HEADER: value} if value is not None else {}


def assert_json_error(response: httpx.Response, status: int, text: str) -> None:
    assert (response.status_code, response.text) == (status, text)
    assert response.headers["content-type"] == "application/json"


@pytest.fixture
def offline_idp_url() -> str:
    return closed_port_url()


@pytest.fixture
async def offline(start_daemon: StartDaemon, offline_idp_url: str) -> AsyncIterator[RunningDaemon]:
    """A daemon whose qwen IdP refuses connections: a test that reaches the IdP by mistake sees a 502."""
    async with start_daemon(login_config(offline_idp_url)) as daemon:
        yield daemon


@pytest.fixture
async def client(offline: RunningDaemon, auth: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with loopback_client(base_url=offline.url, headers=auth) as http:
        yield http


# --- POST: body checks, client id, their order ------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{}", "application/json"),
        (b'{"providerId":""}', "application/json"),
        (b'{"providerId":42}', "application/json"),
        (b"[1,2]", "application/json"),
        (b"null", "application/json"),
        (b'{"providerId":null}', "application/json"),
        (b"", "application/json"),  # an empty body counts as {}
        (b"", None),
        (b'{"providerId":"qwen-oauth"}', "text/plain"),  # a non-JSON content type counts as {}
        (b'{"providerId":"qwen-oauth"}', None),
    ],
    ids=["empty-object", "empty-id", "number-id", "array", "null", "null-id", "empty-body", "no-body", "text", "no-ct"],
)
async def test_post_without_a_provider_id_is_invalid_request(
    client: httpx.AsyncClient, content: bytes, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    with trio.fail_after(5):
        response = await client.post(FLOWS_PATH, content=content, headers=headers)
    assert_json_error(response, 400, INVALID_REQUEST)


@pytest.mark.parametrize(
    "content",
    [
        b'{"providerId":',
        b'{"providerId":"qwen-oauth"',
        b"NaN",
        b"{'a': 1}",
        b"[" * 50_000,  # deeper than the parser recurses: was a 500 with a traceback (review finding)
    ],
)
async def test_post_with_malformed_json_is_invalid_json(client: httpx.AsyncClient, content: bytes) -> None:
    with trio.fail_after(5):
        response = await client.post(FLOWS_PATH, content=content, headers={"Content-Type": "application/json"})
    assert_json_error(response, 400, INVALID_JSON)


async def test_post_for_an_unknown_provider_is_unsupported_provider(client: httpx.AsyncClient) -> None:
    with trio.fail_after(5):
        response = await client.post(FLOWS_PATH, json={"providerId": "github"})
    assert_json_error(response, 400, UNSUPPORTED_GITHUB)


@pytest.mark.parametrize("bad", ["bad id with spaces", "x" * 129, "cli/A", "cli@A", "tab\tid"])
async def test_post_with_a_bad_client_id_is_invalid_client_id(client: httpx.AsyncClient, bad: str) -> None:
    with trio.fail_after(5):
        response = await client.post(FLOWS_PATH, json=QWEN, headers={CLIENT_ID_HEADER: bad})
    assert_json_error(response, 400, INVALID_CLIENT_ID)


@pytest.mark.parametrize("good", ["x" * 128, "a.b_c:d-E9", ""])
async def test_good_or_empty_client_ids_pass_to_the_registry(client: httpx.AsyncClient, good: str) -> None:
    # The offline IdP answers every start that gets this far with a 502.
    with trio.fail_after(5):
        response = await client.post(FLOWS_PATH, json=QWEN, headers={CLIENT_ID_HEADER: good})
    assert_json_error(response, 502, QWEN_UPSTREAM)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{}", INVALID_REQUEST),
        (b"[1,2]", INVALID_REQUEST),
        (b'{"providerId":', INVALID_JSON),
        (b'{"providerId":"github"}', UNSUPPORTED_GITHUB),
    ],
    ids=["invalid-request", "array", "invalid-json", "unsupported"],
)
async def test_body_checks_come_before_the_client_id(client: httpx.AsyncClient, content: bytes, expected: str) -> None:
    headers = {"Content-Type": "application/json", CLIENT_ID_HEADER: "bad id with spaces"}
    with trio.fail_after(5):
        response = await client.post(FLOWS_PATH, content=content, headers=headers)
    assert_json_error(response, 400, expected)


@pytest.mark.parametrize("bad_client_id", [None, "bad id with spaces"])
async def test_get_of_an_unknown_flow_is_404_before_the_client_id_check(
    client: httpx.AsyncClient, bad_client_id: str | None
) -> None:
    with trio.fail_after(5):
        response = await client.get(f"{FLOWS_PATH}/unknown", headers=client_id(bad_client_id))
    assert_json_error(response, 404, not_found("unknown"))


async def test_delete_checks_the_client_id_before_the_lookup(client: httpx.AsyncClient) -> None:
    # Issue 9: the original orders DELETE's checks this way; the official SDK throws on this 400 but
    # treats a 404 as success, so the order is visible to its users.
    with trio.fail_after(5):
        malformed = await client.delete(f"{FLOWS_PATH}/unknown", headers=client_id("bad id with spaces"))
        unknown = await client.delete(f"{FLOWS_PATH}/unknown", headers=client_id(None))
    assert_json_error(malformed, 400, INVALID_CLIENT_ID)
    assert_json_error(unknown, 404, not_found("unknown"))


# --- POST: registry errors --------------------------------------------------------------------------------


async def test_an_unreachable_idp_is_502_and_frees_the_slot(start_daemon: StartDaemon, auth: dict[str, str]) -> None:
    config = login_config(closed_port_url(), max_active=1)
    with trio.fail_after(10):
        async with start_daemon(config) as daemon, loopback_client(base_url=daemon.url, headers=auth) as http:
            for _ in range(2):  # the failed start holds no cap slot: the second is a 502 again, not a 409
                assert_json_error(await http.post(FLOWS_PATH, json=QWEN), 502, QWEN_UPSTREAM)
            status = (await http.get(STATUS_PATH)).json()
            assert status["pendingDeviceFlows"] == []


async def test_an_idp_that_never_answers_is_502_after_the_start_timeout(
    start_daemon: StartDaemon, auth: dict[str, str]
) -> None:
    with trio.fail_after(10):
        # Accepts connections (the kernel does) and never reads or answers.
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        try:
            config = login_config(f"http://127.0.0.1:{port}", start_timeout_s=0.3)
            async with start_daemon(config) as daemon, loopback_client(base_url=daemon.url, headers=auth) as http:
                assert_json_error(await http.post(FLOWS_PATH, json=QWEN), 502, START_TIMEOUT)
        finally:
            for listener in listeners:
                await listener.aclose()


async def test_the_cap_answers_409_with_retry_after(start_daemon: StartDaemon, auth: dict[str, str]) -> None:
    qwen, acme = qwen_idp(), generic_idp()
    script_devices(qwen, interval=30)
    script_devices(acme, interval=30)
    with trio.fail_after(10):
        async with serve_idp(qwen) as served_qwen, serve_idp(acme):
            config = login_config(served_qwen.url, max_active=1, providers={"acme": generic_provider(acme)})
            async with start_daemon(config) as daemon, loopback_client(base_url=daemon.url, headers=auth) as http:
                first = await http.post(FLOWS_PATH, json=QWEN)
                assert first.status_code == 201
                refused = await http.post(FLOWS_PATH, json={"providerId": "acme"})
                assert_json_error(refused, 409, TOO_MANY_ACTIVE)
                # Whole seconds until the earliest active flow's deadline (600 s from now).
                assert 598 <= int(refused.headers["retry-after"]) <= 600
                assert acme.requests == [], "the cap is checked before the IdP is asked"
                # An attach to the pending flow is not a new slot.
                assert (await http.post(FLOWS_PATH, json=QWEN)).status_code == 200
                # Cancelling frees the slot.
                assert (await http.delete(f"{FLOWS_PATH}/{first.json()['deviceFlowId']}")).status_code == 204
                second = await http.post(FLOWS_PATH, json={"providerId": "acme"})
                assert second.status_code == 201
                assert second.json()["providerId"] == "acme"


async def test_a_start_in_flight_holds_a_cap_slot(start_daemon: StartDaemon, auth: dict[str, str]) -> None:
    acme = generic_idp()
    script_devices(acme, interval=30)
    connected = trio.Event()

    async def never_answer(stream: trio.SocketStream) -> None:
        connected.set()
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, never_answer, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            async with serve_idp(acme):
                config = login_config(
                    f"http://127.0.0.1:{port}",
                    max_active=1,
                    start_timeout_s=0.3,
                    providers={"acme": generic_provider(acme)},
                )
                async with start_daemon(config) as daemon, loopback_client(base_url=daemon.url, headers=auth) as http:
                    hung: list[httpx.Response] = []

                    async def start_qwen() -> None:
                        hung.append(await http.post(FLOWS_PATH, json=QWEN))

                    async with trio.open_nursery() as posts:
                        posts.start_soon(start_qwen)
                        await connected.wait()  # the qwen start is at its IdP now
                        refused = await http.post(FLOWS_PATH, json={"providerId": "acme"})
                        assert_json_error(refused, 409, TOO_MANY_ACTIVE)
                        # The earliest slot frees at the start's own timeout (0.3 s away): at least 1.
                        assert refused.headers["retry-after"] == "1"
                    assert_json_error(hung[0], 502, START_TIMEOUT)
                    assert (await http.post(FLOWS_PATH, json={"providerId": "acme"})).status_code == 201
            nursery.cancel_scope.cancel()


async def test_the_default_cap_is_four_and_retry_after_names_the_earliest_deadline(
    start_daemon: StartDaemon, auth: dict[str, str]
) -> None:
    # One generic IdP behind four providers (the same client id), plus qwen-oauth: five providers, cap 4.
    qwen, shared = qwen_idp(), generic_idp()
    script_devices(qwen, interval=30)
    script_devices(shared, interval=30, expires_in=120)
    script_devices(shared, interval=30, expires_in=600, count=3)
    names = [f"acme-{n}" for n in range(4)]
    with trio.fail_after(10):
        async with serve_idp(qwen) as served_qwen, serve_idp(shared):
            providers = {name: generic_provider(shared) for name in names}
            config = login_config(served_qwen.url, providers=providers)
            assert config.device_flow.max_active == 4
            async with start_daemon(config) as daemon, loopback_client(base_url=daemon.url, headers=auth) as http:
                for name in names:
                    response = await http.post(FLOWS_PATH, json={"providerId": name})
                    assert response.status_code == 201, response.text
                refused = await http.post(FLOWS_PATH, json=QWEN)
                assert_json_error(refused, 409, TOO_MANY_ACTIVE)
                assert 118 <= int(refused.headers["retry-after"]) <= 120
                assert qwen.requests == []
                unsupported = await http.post(FLOWS_PATH, json={"providerId": "github"})
                assert unsupported.json()["supportedProviders"] == ["qwen-oauth", *names]


async def test_the_start_rate_answers_429_with_retry_after(start_daemon: StartDaemon, auth: dict[str, str]) -> None:
    idp = qwen_idp()
    script_devices(idp, interval=30, count=2)
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp, max_starts_per_minute=2) as (_, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
        ):
            for _ in range(2):
                started = await http.post(FLOWS_PATH, json=QWEN)
                assert started.status_code == 201
                assert (await http.delete(f"{FLOWS_PATH}/{started.json()['deviceFlowId']}")).status_code == 204
            refused = await http.post(FLOWS_PATH, json=QWEN)
            assert_json_error(refused, 429, RATE_LIMITED)
            assert 58 <= int(refused.headers["retry-after"]) <= 60
    device_requests = [r for r in idp.requests if str(r.url) == idp.device_url]
    assert len(device_requests) == 2, "a refused start never reaches the IdP"


async def test_post_once_shutdown_is_marked_is_503(offline: RunningDaemon, client: httpx.AsyncClient) -> None:
    with trio.fail_after(5):
        offline.services.shutdown.begin()
        assert_json_error(await client.post(FLOWS_PATH, json=QWEN), 503, SHUTTING_DOWN)
        # The body checks still come first.
        assert_json_error(await client.post(FLOWS_PATH, json={}), 400, INVALID_REQUEST)


async def test_post_during_shutdown_while_a_write_is_in_flight_is_503_and_the_write_lands(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path
) -> None:
    idp = qwen_idp(token_replies=[qwen_tokens()])
    script_devices(idp, interval=0.05)
    store = GatedStore(qwen_home)
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp, daemon_kwargs={"credential_store": store}) as (_, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
        ):
            flow_id = (await http.post(FLOWS_PATH, json=QWEN)).json()["deviceFlowId"]
            await store.entered.wait()
            daemon.shutdown()  # dispose() waits for the write (≤ 5 s); hypercorn still answers meanwhile
            await wait_until(lambda: daemon.services.shutdown.begun)
            assert_json_error(await http.post(FLOWS_PATH, json=QWEN), 503, SHUTTING_DOWN)
            # While persisting, the flow reads pending.
            assert (await http.get(f"{FLOWS_PATH}/{flow_id}")).json()["status"] == "pending"
            store.release.set()
            await wait_until(lambda: daemon.services.registry.get(flow_id).status.value == "authorized")
    assert json.loads((qwen_home / "oauth_creds.json").read_text())["access_token"] == "fake-access-1"


# --- initiator rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("initiator", "caller"),
    [(None, None), (A, A), (A, B), (A, None), (None, B)],
    ids=["anonymous-anonymous", "A-A", "A-B", "A-anonymous", "anonymous-B"],
)
async def test_initiator_rules_on_post_and_get(
    start_daemon: StartDaemon, auth: dict[str, str], initiator: str | None, caller: str | None
) -> None:
    idp = qwen_idp()
    script_devices(idp, interval=30)
    lines: list[str] = []
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp, daemon_kwargs={"audit": Audit(lines.append)}) as (served, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
        ):
            verify = verification(served.url)
            first = await http.post(FLOWS_PATH, json=QWEN, headers=client_id(initiator))
            assert first.status_code == 201
            flow_id, expires_at = first.json()["deviceFlowId"], first.json()["expiresAt"]
            assert first.text == start_text(
                flow_id, expires_at, 30000, attached=False, verify=verify, initiator=initiator
            )

            second = await http.post(FLOWS_PATH, json=QWEN, headers=client_id(caller))
            assert second.status_code == 200
            sees = caller == initiator  # equal ids, or both absent
            assert second.text == start_text(
                flow_id,
                expires_at,
                30000,
                attached=True,
                verify=verify if sees else None,
                initiator=initiator if sees else None,
            )

            as_caller = await http.get(f"{FLOWS_PATH}/{flow_id}", headers=client_id(caller))
            created_at = as_caller.json()["createdAt"]
            assert abs(expires_at - created_at - 600_000) <= 1
            assert as_caller.text == pending_text(
                flow_id,
                created_at,
                expires_at,
                30000,
                verify=verify if sees else None,
                initiator=initiator if sees else None,
            )
            as_initiator = await http.get(f"{FLOWS_PATH}/{flow_id}", headers=client_id(initiator))
            assert as_initiator.text == pending_text(
                flow_id, created_at, expires_at, 30000, verify=verify, initiator=initiator
            )
            events = daemon.services.bus.last_event_id
    assert events == 1, "an attach is no event"
    assert len([r for r in idp.requests if str(r.url) == idp.device_url]) == 1, "an attach never calls the IdP"
    take_overs = [line for line in lines if "take-over" in line]
    if sees:
        assert take_overs == []
    else:
        [line] = take_overs
        original = initiator if initiator is not None else "(none)"
        assert f"clientId={caller or '-'} status=started " in line
        assert line.endswith(f'hint="take-over (per-provider singleton; original initiator={original})"')


# --- GET views, one per status ------------------------------------------------------------------------------


async def test_get_pending_before_and_after_the_first_poll(start_daemon: StartDaemon, auth: dict[str, str]) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    script_devices(idp, interval=0.2)  # the first poll comes one interval after the start
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp) as (served, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
        ):
            started = (await http.post(FLOWS_PATH, json=QWEN)).json()
            flow_id, expires_at = started["deviceFlowId"], started["expiresAt"]
            before = await http.get(f"{FLOWS_PATH}/{flow_id}")
            created_at = before.json()["createdAt"]
            verify = verification(served.url)
            assert before.text == pending_text(flow_id, created_at, expires_at, 200, verify=verify)

            await wait_until(lambda: len(token_requests(idp)) >= 1)
            after = await http.get(f"{FLOWS_PATH}/{flow_id}")
            polled_at = after.json()["lastPolledAt"]
            assert after.text == pending_text(flow_id, created_at, expires_at, 200, polled_at=polled_at, verify=verify)
            assert created_at + 150 <= polled_at <= created_at + 5000


async def test_get_authorized_and_delete_leaves_it_authorized(start_daemon: StartDaemon, auth: dict[str, str]) -> None:
    idp = qwen_idp(token_replies=[oauth_error("authorization_pending"), qwen_tokens()])
    script_devices(idp, interval=0.05)
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp) as (_, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
            open_events(daemon, auth) as ws,
        ):
            flow_id = (await http.post(FLOWS_PATH, json=QWEN)).json()["deviceFlowId"]
            assert (await next_event(ws))["type"] == "auth_device_flow_started"
            assert (await next_event(ws))["type"] == "auth_device_flow_authorized"
            view = await http.get(f"{FLOWS_PATH}/{flow_id}")
            created_at, polled_at = view.json()["createdAt"], view.json()["lastPolledAt"]
            assert view.text == (
                f'{{"deviceFlowId":"{flow_id}","providerId":"qwen-oauth","status":"authorized",'
                f'"createdAt":{created_at},"lastPolledAt":{polled_at}}}'
            )
            last_event_id = daemon.services.bus.last_event_id
            deleted = await http.delete(f"{FLOWS_PATH}/{flow_id}", headers=client_id(B))
            assert (deleted.status_code, deleted.content) == (204, b"")
            assert (await http.get(f"{FLOWS_PATH}/{flow_id}")).text == view.text
            assert daemon.services.bus.last_event_id == last_event_id, "no event for a no-op cancel"


async def test_get_error_access_denied(start_daemon: StartDaemon, auth: dict[str, str]) -> None:
    idp = qwen_idp(token_replies=[oauth_error("access_denied")])
    script_devices(idp, interval=0.05)
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp) as (_, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
            open_events(daemon, auth) as ws,
        ):
            flow_id = (await http.post(FLOWS_PATH, json=QWEN)).json()["deviceFlowId"]
            assert (await next_event(ws))["type"] == "auth_device_flow_started"
            failed = await next_event(ws)
            assert failed["data"] == {
                "deviceFlowId": flow_id,
                "errorKind": "access_denied",
                "hint": "Qwen IdP returned access_denied",
                "status": "error",
            }
            view = await http.get(f"{FLOWS_PATH}/{flow_id}")
            created_at, polled_at = view.json()["createdAt"], view.json()["lastPolledAt"]
            assert view.text == (
                f'{{"deviceFlowId":"{flow_id}","providerId":"qwen-oauth","status":"error","createdAt":{created_at},'
                f'"errorKind":"access_denied","hint":"Qwen IdP returned access_denied","lastPolledAt":{polled_at}}}'
            )
    assert len(token_requests(idp)) == 1


async def test_get_expired_when_the_idp_says_expired_token(start_daemon: StartDaemon, auth: dict[str, str]) -> None:
    idp = qwen_idp(token_replies=[oauth_error("expired_token")])
    script_devices(idp, interval=0.05)
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp) as (_, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
            open_events(daemon, auth) as ws,
        ):
            flow_id = (await http.post(FLOWS_PATH, json=QWEN, headers=client_id(A))).json()["deviceFlowId"]
            assert (await next_event(ws))["type"] == "auth_device_flow_started"
            failed = await next_event(ws)
            assert failed["data"] == {
                "deviceFlowId": flow_id,
                "errorKind": "expired_token",
                "hint": "Qwen IdP returned expired_token",
                "status": "expired",
            }
            assert failed["originatorClientId"] == A
            view = await http.get(f"{FLOWS_PATH}/{flow_id}", headers=client_id(A))
            created_at, polled_at = view.json()["createdAt"], view.json()["lastPolledAt"]
            assert view.text == (
                f'{{"deviceFlowId":"{flow_id}","providerId":"qwen-oauth","status":"expired","createdAt":{created_at},'
                f'"errorKind":"expired_token","hint":"Qwen IdP returned expired_token","lastPolledAt":{polled_at},'
                f'"initiatorClientId":"{A}"}}'
            )


async def test_get_expired_at_the_flows_deadline(start_daemon: StartDaemon, auth: dict[str, str]) -> None:
    idp = qwen_idp()
    script_devices(idp, interval=30, expires_in=0.3)  # the deadline comes long before the first poll
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp, min_expires_in_s=0.3) as (_, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
            open_events(daemon, auth) as ws,
        ):
            started = (await http.post(FLOWS_PATH, json=QWEN)).json()
            flow_id = started["deviceFlowId"]
            assert (await next_event(ws))["type"] == "auth_device_flow_started"
            failed = await next_event(ws)
            assert failed["data"] == {
                "deviceFlowId": flow_id,
                "errorKind": "expired_token",
                "hint": "device-flow expired without authorization",
                "status": "expired",
            }
            assert failed["_meta"]["serverTimestamp"] >= started["expiresAt"] - 5
            view = await http.get(f"{FLOWS_PATH}/{flow_id}")
            created_at = view.json()["createdAt"]
            assert view.text == (
                f'{{"deviceFlowId":"{flow_id}","providerId":"qwen-oauth","status":"expired","createdAt":{created_at},'
                f'"errorKind":"expired_token","hint":"device-flow expired without authorization"}}'
            )
            status = (await http.get(STATUS_PATH)).json()
            assert status["pendingDeviceFlows"] == []
    assert token_requests(idp) == []


# --- DELETE ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("canceller", [B, None], ids=["by-B", "anonymous"])
async def test_cancel_a_pending_flow(start_daemon: StartDaemon, auth: dict[str, str], canceller: str | None) -> None:
    idp = qwen_idp()
    script_devices(idp, interval=30)
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp) as (_, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
            open_events(daemon, auth) as ws,
        ):
            flow_id = (await http.post(FLOWS_PATH, json=QWEN, headers=client_id(A))).json()["deviceFlowId"]
            started = await next_event(ws)
            assert started["originatorClientId"] == A

            deleted = await http.delete(f"{FLOWS_PATH}/{flow_id}", headers=client_id(canceller))
            assert (deleted.status_code, deleted.content) == (204, b"")
            cancelled = await ws.get_message()
            stamp = json.loads(cancelled)["_meta"]["serverTimestamp"]
            originator = f'"originatorClientId":"{canceller}",' if canceller is not None else ""
            assert cancelled == (
                f'{{"id":2,"v":1,"type":"auth_device_flow_cancelled","data":{{"deviceFlowId":"{flow_id}"}},'
                f'{originator}"_meta":{{"serverTimestamp":{stamp}}}}}'
            )

            as_initiator = await http.get(f"{FLOWS_PATH}/{flow_id}", headers=client_id(A))
            created_at = as_initiator.json()["createdAt"]
            assert as_initiator.text == (
                f'{{"deviceFlowId":"{flow_id}","providerId":"qwen-oauth","status":"cancelled","createdAt":{created_at},'
                f'"initiatorClientId":"{A}"}}'
            )
            as_other = await http.get(f"{FLOWS_PATH}/{flow_id}", headers=client_id(B))
            assert as_other.text == (
                f'{{"deviceFlowId":"{flow_id}","providerId":"qwen-oauth","status":"cancelled","createdAt":{created_at}}}'
            )

            again = await http.delete(f"{FLOWS_PATH}/{flow_id}")
            assert (again.status_code, again.content) == (204, b"")
            assert daemon.services.bus.last_event_id == 2, "a terminal flow is left as it is: no second event"
            # The provider's slot is free again: a new POST starts a new flow.
            fresh = await http.post(FLOWS_PATH, json=QWEN)
            assert fresh.status_code == 201
            assert fresh.json()["deviceFlowId"] != flow_id


async def test_an_existing_flow_with_a_bad_client_id_is_400(start_daemon: StartDaemon, auth: dict[str, str]) -> None:
    idp = qwen_idp()
    script_devices(idp, interval=30)
    bad = client_id("bad id with spaces")
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp) as (_, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
        ):
            flow_id = (await http.post(FLOWS_PATH, json=QWEN)).json()["deviceFlowId"]
            assert_json_error(await http.get(f"{FLOWS_PATH}/{flow_id}", headers=bad), 400, INVALID_CLIENT_ID)
            assert_json_error(await http.delete(f"{FLOWS_PATH}/{flow_id}", headers=bad), 400, INVALID_CLIENT_ID)
            assert (await http.get(f"{FLOWS_PATH}/{flow_id}")).json()["status"] == "pending", "not cancelled"


async def test_delete_during_the_credential_write_defers_and_authorized_wins(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path
) -> None:
    idp = qwen_idp(token_replies=[qwen_tokens()])
    script_devices(idp, interval=0.05)
    store = GatedStore(qwen_home)
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp, daemon_kwargs={"credential_store": store}) as (_, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
            open_events(daemon, auth) as ws,
        ):
            flow_id = (await http.post(FLOWS_PATH, json=QWEN)).json()["deviceFlowId"]
            assert (await next_event(ws))["type"] == "auth_device_flow_started"
            await store.entered.wait()
            deleted = await http.delete(f"{FLOWS_PATH}/{flow_id}", headers=client_id(B))
            assert (deleted.status_code, deleted.content) == (204, b"")
            view = (await http.get(f"{FLOWS_PATH}/{flow_id}")).json()
            assert view["status"] == "pending", "a flow writing its credentials reads pending"
            assert "userCode" in view
            assert [p["deviceFlowId"] for p in (await http.get(STATUS_PATH)).json()["pendingDeviceFlows"]] == [flow_id]

            store.release.set()
            authorized = await next_event(ws)
            assert authorized["type"] == "auth_device_flow_authorized"
            assert "originatorClientId" not in authorized
            final = await http.get(f"{FLOWS_PATH}/{flow_id}")
            assert final.json()["status"] == "authorized"
            assert daemon.services.bus.last_event_id == 2, "no cancelled event"
    assert json.loads((qwen_home / "oauth_creds.json").read_text())["access_token"] == "fake-access-1"


async def test_delete_during_a_credential_write_that_fails_ends_cancelled(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path
) -> None:
    idp = qwen_idp(token_replies=[qwen_tokens()])
    script_devices(idp, interval=0.05)
    store = GatedStore(qwen_home, fs=NoSpaceFileSystem())
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp, daemon_kwargs={"credential_store": store}) as (_, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
            open_events(daemon, auth) as ws,
        ):
            flow_id = (await http.post(FLOWS_PATH, json=QWEN, headers=client_id(A))).json()["deviceFlowId"]
            assert (await next_event(ws))["type"] == "auth_device_flow_started"
            await store.entered.wait()
            for canceller in (B, A):  # the first canceller is the one recorded
                deleted = await http.delete(f"{FLOWS_PATH}/{flow_id}", headers=client_id(canceller))
                assert (deleted.status_code, deleted.content) == (204, b"")
            store.release.set()
            cancelled = await next_event(ws)
            assert cancelled["type"] == "auth_device_flow_cancelled"
            assert cancelled["data"] == {"deviceFlowId": flow_id}
            assert cancelled["originatorClientId"] == B
            view = await http.get(f"{FLOWS_PATH}/{flow_id}", headers=client_id(A))
            created_at = view.json()["createdAt"]
            assert view.text == (
                f'{{"deviceFlowId":"{flow_id}","providerId":"qwen-oauth","status":"cancelled","createdAt":{created_at},'
                f'"lastPolledAt":{view.json()["lastPolledAt"]},"initiatorClientId":"{A}"}}'
            )
    assert not (qwen_home / "oauth_creds.json").exists()


async def test_a_credential_write_that_fails_without_a_cancel_is_persist_failed(
    start_daemon: StartDaemon, auth: dict[str, str], qwen_home: Path
) -> None:
    idp = qwen_idp(token_replies=[qwen_tokens()])
    script_devices(idp, interval=0.05)
    store = GatedStore(qwen_home, fs=NoSpaceFileSystem())
    store.release.set()
    lines: list[str] = []
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp, daemon_kwargs={"credential_store": store, "audit": Audit(lines.append)}) as (
                _,
                daemon,
            ),
            loopback_client(base_url=daemon.url, headers=auth) as http,
            open_events(daemon, auth) as ws,
        ):
            flow_id = (await http.post(FLOWS_PATH, json=QWEN)).json()["deviceFlowId"]
            assert (await next_event(ws))["type"] == "auth_device_flow_started"
            failed = await next_event(ws)
            assert failed["data"] == {
                "deviceFlowId": flow_id,
                "errorKind": "persist_failed",
                "hint": PERSIST_FAILED_HINT,
                "status": "error",
            }
            view = await http.get(f"{FLOWS_PATH}/{flow_id}")
            created_at, polled_at = view.json()["createdAt"], view.json()["lastPolledAt"]
            assert view.text == (
                f'{{"deviceFlowId":"{flow_id}","providerId":"qwen-oauth","status":"error","createdAt":{created_at},'
                f'"errorKind":"persist_failed","hint":"{PERSIST_FAILED_HINT}","lastPolledAt":{polled_at}}}'
            )
            cell = (await http.get(STATUS_PATH)).json()["providers"][0]
            assert cell["status"] == "not_started"
    [line] = [line for line in lines if "status=failed" in line]
    assert "errorKind=persist_failed" in line and "ENOSPC" in line


# --- the status snapshot -------------------------------------------------------------------------------------


async def test_status_while_pending(start_daemon: StartDaemon, auth: dict[str, str], workspace: Path) -> None:
    idp = qwen_idp()
    script_devices(idp, interval=30)
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp) as (_, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
        ):
            empty = await http.get(STATUS_PATH)
            not_started = (
                '{"kind":"auth_provider","providerId":"qwen-oauth","status":"not_started",'
                '"hint":"not logged in","authState":"unauthenticated"}'
            )
            assert empty.text == (
                f'{{"v":1,"workspaceCwd":{json_text(str(workspace))},"providers":[{not_started}],'
                '"pendingDeviceFlows":[],"supportedDeviceFlowProviders":["qwen-oauth"]}'
            )
            started = (await http.post(FLOWS_PATH, json=QWEN)).json()
            flow_id, expires_at = started["deviceFlowId"], started["expiresAt"]
            status = await http.get(STATUS_PATH)
            assert status.text == (
                f'{{"v":1,"workspaceCwd":{json_text(str(workspace))},"providers":[{not_started}],'
                f'"pendingDeviceFlows":[{{"deviceFlowId":"{flow_id}","providerId":"qwen-oauth","expiresAt":{expires_at}}}],'
                '"supportedDeviceFlowProviders":["qwen-oauth"]}'
            )
            assert "USER-0001" not in status.text and "device-code" not in status.text
            assert "authorize" not in status.text


async def test_status_after_a_login(
    start_daemon: StartDaemon, auth: dict[str, str], workspace: Path, qwen_home: Path
) -> None:
    idp = qwen_idp(token_replies=[qwen_tokens()])
    script_devices(idp, interval=0.05)
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp) as (_, daemon),
            loopback_client(base_url=daemon.url, headers=auth) as http,
            open_events(daemon, auth) as ws,
        ):
            await http.post(FLOWS_PATH, json=QWEN)
            assert (await next_event(ws))["type"] == "auth_device_flow_started"
            authorized = await next_event(ws)
            assert authorized["type"] == "auth_device_flow_authorized"
            status = await http.get(STATUS_PATH)
            expiry = json.loads((qwen_home / "oauth_creds.json").read_text())["expiry_date"]
            assert authorized["data"]["expiresAt"] == expiry
            updated_at = status.json()["providers"][0]["updatedAt"]
            assert status.text == (
                f'{{"v":1,"workspaceCwd":{json_text(str(workspace))},"providers":[{{"kind":"auth_provider",'
                f'"providerId":"qwen-oauth","status":"ok","expiresAt":{expiry},"authState":"authenticated",'
                f'"updatedAt":{updated_at}}}],"pendingDeviceFlows":[],"supportedDeviceFlowProviders":["qwen-oauth"]}}'
            )
            for secret in ("fake-access-1", "fake-refresh-1", "USER-0001", "device-code"):
                assert secret not in status.text


# --- secrets never reach the wire -------------------------------------------------------------------------------


async def test_device_code_verifier_and_tokens_never_reach_a_body_or_a_frame(
    start_daemon: StartDaemon, auth: dict[str, str]
) -> None:
    idp = qwen_idp(token_replies=[oauth_error("authorization_pending"), oauth_error("slow_down"), qwen_tokens()])
    script_devices(idp, interval=0.05)
    recorder = Recorder()
    lines: list[str] = []
    frames: list[str] = []
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp, daemon_kwargs={"audit": Audit(lines.append)}) as (_, daemon),
            recorder.client(daemon, auth) as http,
            open_events(daemon, auth) as ws,
        ):
            await http.get("/capabilities")
            started = await http.post(FLOWS_PATH, json=QWEN, headers=client_id(A))
            flow_id = started.json()["deviceFlowId"]
            assert started.json()["userCode"] == "USER-0001"  # what a human needs does reach the initiator
            await http.post(FLOWS_PATH, json=QWEN, headers=client_id(B))
            await http.get(f"{FLOWS_PATH}/{flow_id}", headers=client_id(A))
            await http.get(STATUS_PATH)
            while True:
                frame = await ws.get_message()
                assert isinstance(frame, str)
                frames.append(frame)
                if json.loads(frame)["type"] == "auth_device_flow_authorized":
                    break
            await http.get(f"{FLOWS_PATH}/{flow_id}", headers=client_id(A))
            await http.get(STATUS_PATH)
            await http.delete(f"{FLOWS_PATH}/{flow_id}")
            daemon.shutdown()
            rest, reason = await frames_until_close(ws)
            frames += rest
            assert reason.code == 1001

    [device_request] = [r for r in idp.requests if str(r.url) == idp.device_url]
    polls = token_requests(idp)
    assert len(polls) == 3
    forms = [dict(parse_qsl(r.content.decode())) for r in polls]
    verifier = forms[0]["code_verifier"]
    assert {f["code_verifier"] for f in forms} == {verifier}
    device_code = forms[0]["device_code"]
    assert device_code == "device-code-1"
    challenge = dict(parse_qsl(device_request.content.decode()))["code_challenge"]
    secrets = [device_code, verifier, challenge, "fake-access-1", "fake-refresh-1"]

    assert len(recorder.responses) == 8 and len(frames) >= 3
    for response in recorder.responses:
        for secret in secrets:
            assert secret not in response.text, (response.request.method, response.request.url.path)
            assert secret not in str(response.headers)
    for frame in frames:
        for secret in secrets:
            assert secret not in frame
    assert any("status=authorized" in line for line in lines)
    for line in lines:
        for secret in secrets:
            assert secret not in line


async def test_concurrent_posts_coalesce_on_one_idp_start(start_daemon: StartDaemon, auth: dict[str, str]) -> None:
    # SPEC §2/§3: concurrent POSTs for one provider share one in-flight start (exactly one device code is
    # minted); the first caller is the initiator (201), every other caller attaches (200).
    idp = qwen_idp()
    script_devices(idp, interval=60)
    async with qwen_daemon(start_daemon, idp) as (served, daemon):
        served.device_delay_s = 0.5  # hold the start open so every POST arrives while it is in flight
        answers: list[httpx.Response] = []
        async with loopback_client(base_url=daemon.url, headers=auth) as http:

            async def post(n: int) -> None:
                headers = {} if n == 0 else {"X-Qwen-Client-Id": f"client-{n}"}
                answers.append(await http.post(FLOWS_PATH, json={"providerId": "qwen-oauth"}, headers=headers))

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(post, 0)
                    await served.device_request_arrived.wait()  # the anonymous caller's start is in flight
                    for n in range(1, 6):
                        nursery.start_soon(post, n)
    assert sorted(a.status_code for a in answers) == [200] * 5 + [201]
    assert len({a.json()["deviceFlowId"] for a in answers}) == 1
    first = next(a.json() for a in answers if a.status_code == 201)
    assert first["attached"] is False and first["userCode"] == "USER-0001"
    for attached in (a.json() for a in answers if a.status_code == 200):
        assert attached["attached"] is True
        assert "userCode" not in attached and "initiatorClientId" not in attached
    assert [r.url.path for r in idp.requests].count("/api/v1/oauth2/device/code") == 1
