"""serve.client against a real daemon on 127.0.0.1:0 whose qwen-oauth talks to the fake IdP over real HTTP.

Every REST method; logins completed through the event stream and, with the stream refused, through
polling; throttling, the 404 mapping, the timeout and cancellation; a stream the daemon drops mid-flow
that resumes with no lost or repeated id; a resume after the ring moved on that yields a reset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from support.daemon import StartDaemon
from support.fake_idp import FakeIdP, json_reply
from support.idp_server import ServedIdP, serve_idp
from support.login import (
    bearer_headers,
    closed_port_url,
    device_reply,
    login_config,
    oauth_error,
    pending_replies,
    qwen_idp,
    qwen_tokens,
    ws_url,
)

from serve.client import (
    AuthResult,
    DaemonClient,
    DaemonHTTPError,
    DaemonProtocolError,
    DaemonUnreachable,
    ReceivedEvent,
    StreamLagged,
    StreamReset,
)
from serve.config import Config, load_config
from serve.daemon import RunningDaemon
from serve.models import ErrorKind, FlowFailed, FlowStatus, StreamHello

QWEN = "qwen-oauth"


@asynccontextmanager
async def qwen_daemon(
    start_daemon: StartDaemon, idp: FakeIdP, **config: Any
) -> AsyncIterator[tuple[ServedIdP, RunningDaemon]]:
    events = config.pop("events", {})
    async with serve_idp(idp) as served:
        idp.device_replies.append(device_reply(served.url, interval=0.05))
        async with start_daemon(with_events(login_config(served.url, **config), **events)) as daemon:
            yield served, daemon


def with_events(config: Config, **events: Any) -> Config:
    """`config` with some `[events]` keys changed (validated as the loader validates them)."""
    return dataclasses.replace(config, events=load_config(overrides={"events": events}).events)


def client_of(daemon: RunningDaemon, token: str, **kwargs: Any) -> DaemonClient:
    return DaemonClient(daemon.url, token=token, **kwargs)


# --- REST ----------------------------------------------------------------------------------------------------


async def test_every_rest_method_parses_the_daemons_answers(
    start_daemon: StartDaemon, token: str, workspace: Path
) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    with trio.fail_after(10):
        async with qwen_daemon(start_daemon, idp) as (served, daemon), client_of(daemon, token, client_id="A") as c:
            capabilities = await c.capabilities()
            assert capabilities.mode == "native" and capabilities.workspace_cwd == str(workspace)
            assert "auth_device_flow" in capabilities.features

            started = await c.start_device_flow(QWEN)
            assert (started.status, started.attached, started.user_code) == ("pending", False, "USER-0001")
            assert started.verification_uri == f"{served.url}/authorize"
            assert started.initiator_client_id == "A"

            view = await c.get_device_flow(started.device_flow_id)
            assert (view.device_flow_id, view.status, view.user_code) == (
                started.device_flow_id,
                "pending",
                "USER-0001",
            )
            assert view.expires_at_ms == started.expires_at_ms

            status = await c.get_auth_status()
            assert [p.device_flow_id for p in status.pending_device_flows] == [started.device_flow_id]
            assert [cell.provider_id for cell in status.providers] == [QWEN]
            assert status.providers[0].status == "not_started"

            assert await c.cancel_device_flow(started.device_flow_id) is True
            assert (await c.get_device_flow(started.device_flow_id)).status == "cancelled"
            assert await c.cancel_device_flow("00000000-0000-0000-0000-000000000000") is False


async def test_http_errors_carry_status_code_and_message(start_daemon: StartDaemon, token: str) -> None:
    with trio.fail_after(10):
        async with start_daemon(login_config(closed_port_url())) as daemon:
            async with client_of(daemon, token) as c:
                with pytest.raises(DaemonHTTPError) as unsupported:
                    await c.start_device_flow("github")
                assert (unsupported.value.status, unsupported.value.code) == (400, "unsupported_provider")
                assert unsupported.value.body["supportedProviders"] == [QWEN]
                with pytest.raises(DaemonHTTPError) as upstream:
                    await c.start_device_flow(QWEN)
                assert (upstream.value.status, upstream.value.code) == (502, "upstream_error")
                with pytest.raises(DaemonHTTPError) as missing:
                    await c.get_device_flow("nope")
                assert (missing.value.status, missing.value.code) == (404, "device_flow_not_found")
            async with client_of(daemon, "wrong-token") as c:
                with pytest.raises(DaemonHTTPError) as unauthorized:
                    await c.capabilities()
                assert (unauthorized.value.status, unauthorized.value.code) == (401, None)
                assert "wrong-token" not in str(unauthorized.value)


async def test_no_daemon_is_unreachable_and_a_stranger_is_a_protocol_error(token: str) -> None:
    with trio.fail_after(10):
        async with DaemonClient(closed_port_url(), token=token) as c:
            with pytest.raises(DaemonUnreachable) as unreachable:
                await c.capabilities()
            assert "cannot reach the daemon" in str(unreachable.value)

        async def stranger(stream: trio.SocketStream) -> None:
            await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot here!")
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(partial(trio.serve_tcp, stranger, 0, host="127.0.0.1"))
            port = listener.socket.getsockname()[1]
            async with DaemonClient(f"http://127.0.0.1:{port}", token=token) as c:
                with pytest.raises(DaemonProtocolError, match="without a qwen-serve error body"):
                    await c.capabilities()
            nursery.cancel_scope.cancel()


async def test_a_closed_client_refuses_use(start_daemon: StartDaemon, token: str) -> None:
    async with start_daemon() as daemon:
        client = client_of(daemon, token)
        async with client:
            await client.capabilities()
        with pytest.raises(RuntimeError, match="closed"):
            await client.capabilities()


async def test_the_token_defaults_to_the_environment(
    start_daemon: StartDaemon, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN_SERVER_TOKEN", f"  {token}  ")
    async with start_daemon() as daemon, DaemonClient(daemon.url) as c:
        assert (await c.capabilities()).version == 1


# --- logins ----------------------------------------------------------------------------------------------


async def test_a_login_completes_through_events_with_throttling(start_daemon: StartDaemon, token: str) -> None:
    idp = qwen_idp(token_replies=[oauth_error("authorization_pending"), oauth_error("slow_down"), qwen_tokens()])
    throttled: list[int] = []
    with trio.fail_after(15):
        async with qwen_daemon(start_daemon, idp, slow_down_step_s=0.1) as (_, daemon), client_of(daemon, token) as c:
            login = await c.auth.start(QWEN)
            assert login.user_code == "USER-0001" and login.attached is False
            result = await login.await_completion(timeout=10, on_throttled=throttled.append)
    assert result == AuthResult(login.device_flow_id, QWEN, "authorized", expires_at_ms=result.expires_at_ms)
    assert result.authorized and result.expires_at_ms is not None
    assert throttled == [150]


async def test_with_the_stream_refused_a_login_completes_by_polling(start_daemon: StartDaemon, token: str) -> None:
    idp = qwen_idp(token_replies=[oauth_error("authorization_pending"), qwen_tokens()])
    with trio.fail_after(15):
        # The one subscriber slot is taken: the client's handshake is refused (429) and it polls.
        async with (
            qwen_daemon(start_daemon, idp, events={"max_subscribers": 1}) as (_, daemon),
            trio_websocket.open_websocket_url(ws_url(daemon), extra_headers=bearer_headers(_auth(token))),
            client_of(daemon, token) as c,
        ):
            login = await c.auth.start(QWEN)
            result = await login.await_completion(timeout=10)
    assert result.status == "authorized"


async def test_a_denied_login_ends_in_error_with_the_kind(start_daemon: StartDaemon, token: str) -> None:
    idp = qwen_idp(token_replies=[oauth_error("access_denied")])
    with trio.fail_after(15):
        async with qwen_daemon(start_daemon, idp) as (_, daemon), client_of(daemon, token) as c:
            result = await (await c.auth.start(QWEN)).await_completion(timeout=10)
    assert (result.status, result.error_kind) == ("error", "access_denied")
    assert result.hint


async def test_a_flow_the_daemon_does_not_know_is_not_found_or_evicted(start_daemon: StartDaemon, token: str) -> None:
    from serve.client.auth import LoginHandle
    from serve.models import DeviceFlowInfo

    with trio.fail_after(10):
        async with start_daemon(login_config(closed_port_url())) as daemon, client_of(daemon, token) as c:
            gone = LoginHandle(c, DeviceFlowInfo("00000000-0000-0000-0000-000000000000", QWEN, "pending"))
            result = await gone.await_completion(timeout=5)
    assert (result.status, result.error_kind) == ("error", "not_found_or_evicted")


async def test_await_completion_times_out_and_the_flow_stays_pending(start_daemon: StartDaemon, token: str) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    with trio.fail_after(10):
        async with qwen_daemon(start_daemon, idp) as (_, daemon), client_of(daemon, token) as c:
            login = await c.auth.start(QWEN)
            with pytest.raises(TimeoutError):
                await login.await_completion(timeout=0.3)
            assert (await c.get_device_flow(login.device_flow_id)).status == "pending"
            await login.cancel()
            assert (await c.get_device_flow(login.device_flow_id)).status == "cancelled"


async def test_cancel_while_waiting_ends_the_wait_cancelled(start_daemon: StartDaemon, token: str) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    with trio.fail_after(10):
        async with qwen_daemon(start_daemon, idp) as (_, daemon), client_of(daemon, token) as c:
            login = await c.auth.start(QWEN)
            results: list[AuthResult] = []
            async with trio.open_nursery() as nursery:

                async def wait() -> None:
                    results.append(await login.await_completion(timeout=5))

                nursery.start_soon(wait)
                await trio.sleep(0.2)
                await login.cancel()
    assert [r.status for r in results] == ["cancelled"]


async def test_a_second_start_attaches_and_the_initiator_sees_the_same_code(
    start_daemon: StartDaemon, token: str
) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp) as (_, daemon),
            client_of(daemon, token, client_id="me") as first,
            client_of(daemon, token) as other,
        ):
            login = await first.auth.start(QWEN)
            again = await first.auth.start(QWEN)
            stranger = await other.auth.start(QWEN)
    assert (again.attached, again.device_flow_id, again.user_code) == (True, login.device_flow_id, login.user_code)
    assert (stranger.attached, stranger.user_code) == (True, None)


# --- the event stream ---------------------------------------------------------------------------------------


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _failed(n: int) -> FlowFailed:
    return FlowFailed(f"flow-{n}", ErrorKind.UPSTREAM_ERROR, FlowStatus.ERROR, "x" * 200)


async def test_a_dropped_stream_resumes_with_no_lost_or_repeated_event(start_daemon: StartDaemon, token: str) -> None:
    # A subscriber queue of 2 makes the daemon drop a slow subscriber (4000 lagged) again and again; the
    # client reconnects with since/epoch and the ring (1024) replays what it missed.
    config = with_events(login_config(closed_port_url()), subscriber_queue=2)
    ids: list[int] = []
    lagged = 0
    with trio.fail_after(20):
        async with start_daemon(config) as daemon, client_of(daemon, token) as c, c.events() as stream:
            hello = await stream.receive()
            assert isinstance(hello, StreamHello)
            for n in range(60):
                daemon.services.bus.publish(_failed(n))
            async for item in stream:
                if isinstance(item, StreamLagged):
                    lagged += 1
                elif isinstance(item, ReceivedEvent):
                    ids.append(item.id)
                    if item.id == 60:
                        break
                    await trio.sleep(0.01)  # a slow reader
    assert lagged >= 1, "the daemon never dropped the slow subscriber: the test proves nothing"
    assert ids == list(range(1, 61))


async def test_a_resume_after_the_ring_moved_on_yields_a_reset(start_daemon: StartDaemon, token: str) -> None:
    config = with_events(login_config(closed_port_url()), ring_size=3)
    with trio.fail_after(10):
        async with start_daemon(config) as daemon, client_of(daemon, token) as c:
            for n in range(10):
                daemon.services.bus.publish(_failed(n))
            async with c.events(since=2) as stream:
                assert isinstance(await stream.receive(), StreamHello)
                reset = await stream.receive()
                assert isinstance(reset, StreamReset) and reset.last_event_id == 10
                daemon.services.bus.publish(_failed(10))
                event = await stream.receive()
                assert isinstance(event, ReceivedEvent) and event.id == 11


async def test_a_refused_handshake_raises(start_daemon: StartDaemon) -> None:
    with trio.fail_after(10):
        async with start_daemon() as daemon, DaemonClient(daemon.url, token="wrong") as c:
            with pytest.raises(DaemonHTTPError) as refused:
                async with c.events() as stream:
                    async for _ in stream:
                        raise AssertionError("a refused stream yields nothing")
    assert refused.value.status == 401


async def test_the_stream_of_a_daemon_that_is_not_there_raises_unreachable(token: str) -> None:
    with trio.fail_after(10):
        async with DaemonClient(closed_port_url(), token=token) as c:
            with pytest.raises(DaemonUnreachable):
                async with c.events() as stream:
                    async for _ in stream:
                        raise AssertionError("no daemon, no frame")


async def test_unknown_event_types_reach_the_caller_untouched(start_daemon: StartDaemon, token: str) -> None:
    idp = qwen_idp(token_replies=[json_reply(200, {"access_token": "a", "token_type": "Bearer", "expires_in": 60})])
    with trio.fail_after(10):
        async with (
            qwen_daemon(start_daemon, idp) as (_, daemon),
            client_of(daemon, token) as c,
            c.events() as stream,
        ):
            assert isinstance(await stream.receive(), StreamHello)
            await c.start_device_flow(QWEN)
            seen = [await stream.receive(), await stream.receive()]
    assert [getattr(item, "type", None) for item in seen] == [
        "auth_device_flow_started",
        "auth_device_flow_authorized",
    ]
