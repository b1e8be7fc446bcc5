"""`WS /workspace/auth/events` (SPEC §4) through a real hypercorn on 127.0.0.1:0 and real trio-websocket clients.

Events are published straight onto the daemon's bus, so these tests need no registry. Real clock only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
import trio.lowlevel
import trio_websocket
from support.daemon import StartDaemon, loopback_client
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, WebSocketConnection

import serve.wire
from serve.config import Config, load_config
from serve.daemon import RunningDaemon
from serve.events import EventBus
from serve.http.stream import EVENTS_PATH
from serve.models import ErrorKind, FlowCancelled, FlowFailed, FlowStarted, FlowStatus
from serve.wire import encode_envelope

Headers = list[tuple[bytes, bytes]]

# SPEC §1 / §4 bodies, copied here so the tests read nothing outside the project.
UNAUTHORIZED = {"error": "Unauthorized"}
INVALID_HOST = {"error": "Invalid Host header"}
ORIGIN_DENIED = {"error": "Request denied by CORS policy"}
SHUTTING_DOWN = {"error": "daemon is shutting down", "code": "shutting_down"}
TOO_MANY = {"error": "Too many event stream subscribers", "code": "too_many_subscribers"}
BAD_SINCE = {"error": "`since` must be a non-negative integer", "code": "invalid_request"}

BIG_HINT = "x" * (256 * 1024)  # large frames fill loopback socket buffers in a few dozen events


def stream_config(**events: Any) -> Config:
    return load_config(overrides={"server": {"port": 0, "graceful_timeout_s": 0.5}, "events": events})


@pytest.fixture
def bearer(token: str) -> Headers:
    return [(b"Authorization", f"Bearer {token}".encode())]


@pytest.fixture
def start_stream(start_daemon: StartDaemon) -> Callable[..., AbstractAsyncContextManager[RunningDaemon]]:
    """`async with start_stream(**events_keys) as daemon:` a daemon serving the event stream."""

    def start(**events: Any) -> AbstractAsyncContextManager[RunningDaemon]:
        return start_daemon(stream_config(**events))

    return start


@pytest.fixture
async def daemon(
    start_stream: Callable[..., AbstractAsyncContextManager[RunningDaemon]],
) -> AsyncIterator[RunningDaemon]:
    async with start_stream() as running:
        yield running


def bus_of(daemon: RunningDaemon) -> EventBus:
    return daemon.services.bus


def ws_url(daemon: RunningDaemon, query: str = "") -> str:
    return daemon.url.replace("http://", "ws://") + EVENTS_PATH + query


def port_of(daemon: RunningDaemon) -> int:
    port = urlsplit(daemon.url).port
    assert port is not None
    return port


@asynccontextmanager
async def open_stream(
    daemon: RunningDaemon, headers: Headers, query: str = "", **kwargs: Any
) -> AsyncIterator[WebSocketConnection]:
    async with trio_websocket.open_websocket_url(ws_url(daemon, query), extra_headers=headers, **kwargs) as ws:
        yield ws


async def frame(ws: WebSocketConnection) -> dict[str, Any]:
    message = await ws.get_message()
    assert isinstance(message, str)
    decoded: dict[str, Any] = json.loads(message)
    return decoded


async def frames_until_close(ws: WebSocketConnection) -> tuple[list[dict[str, Any]], CloseReason]:
    frames = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            frames.append(await frame(ws))
    reason = closed.value.reason
    assert reason is not None
    return frames, reason


async def rejected(daemon: RunningDaemon, headers: Headers, query: str = "") -> ConnectionRejected:
    with pytest.raises(ConnectionRejected) as info:
        async with open_stream(daemon, headers, query):
            pass
    return info.value


def body_of(error: ConnectionRejected) -> Any:
    return json.loads(error.body or b"")


def cancelled(n: int) -> FlowCancelled:
    return FlowCancelled(f"df-{n}")


async def publish_until_stalled(bus: EventBus, *, limit: int = 400, pause_s: float = 0.005) -> int:
    """Publish large events while the bus has a subscriber, at most `limit`: a subscriber that reads nothing
    fills the socket buffers until the daemon's write stalls (or its queue overflows). Returns how many."""
    published = 0
    while bus.subscriber_count and published < limit:
        bus.publish(FlowFailed(f"df-{published}", ErrorKind.UPSTREAM_ERROR, FlowStatus.ERROR, BIG_HINT))
        published += 1
        await trio.sleep(pause_s)
    return published


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll daemon-side state that offers no event to wait on (callers bound it with `fail_after`)."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.01)


# --- the handshake --------------------------------------------------------------------------------------


async def test_handshake_needs_the_bearer(daemon: RunningDaemon) -> None:
    with trio.fail_after(5):
        for headers in ([], [(b"Authorization", b"Bearer wrong-token")], [(b"Authorization", b"Basic abc")]):
            error = await rejected(daemon, headers)
            assert error.status_code == 401
            assert body_of(error) == UNAUTHORIZED
            assert (b"www-authenticate", b"Bearer") in error.headers


async def test_handshake_from_a_foreign_origin_is_403(daemon: RunningDaemon, bearer: Headers) -> None:
    with trio.fail_after(5):
        error = await rejected(daemon, [*bearer, (b"Origin", b"https://evil.example")])
        assert error.status_code == 403
        assert body_of(error) == ORIGIN_DENIED
        assert (b"vary", b"Origin") in error.headers
        # The daemon's own origin passes.
        async with open_stream(daemon, [*bearer, (b"Origin", daemon.url.encode())]) as ws:
            assert (await frame(ws))["type"] == "hello"


async def test_handshake_with_a_foreign_host_is_403(daemon: RunningDaemon, bearer: Headers) -> None:
    # DNS rebinding: the socket is loopback, the Host header is not.
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(daemon))
        with pytest.RaisesGroup(ConnectionRejected, flatten_subgroups=True) as info:
            async with trio.open_nursery() as nursery:
                await trio_websocket.wrap_client_stream(
                    nursery, stream, f"evil.example:{port_of(daemon)}", EVENTS_PATH, extra_headers=bearer
                )
        error = info.value.exceptions[0]
        assert isinstance(error, ConnectionRejected)
        assert error.status_code == 403
        assert body_of(error) == INVALID_HOST
        await stream.aclose()


@pytest.mark.parametrize("since", ["-1", "abc", "1.5", "+3", "1e3", "99999999999999999999999"])
async def test_since_must_be_a_non_negative_integer(daemon: RunningDaemon, bearer: Headers, since: str) -> None:
    with trio.fail_after(5):
        error = await rejected(daemon, bearer, f"?since={since}")
        assert error.status_code == 400
        assert body_of(error) == BAD_SINCE
        assert bus_of(daemon).subscriber_count == 0


async def test_the_first_of_repeated_query_names_counts_and_one_trailing_slash_is_the_stream(
    daemon: RunningDaemon, bearer: Headers
) -> None:
    """The stream is served in front of Quart; it reads its path and query as Quart's routing did."""
    bus = bus_of(daemon)
    bus.publish(cancelled(1))
    with trio.fail_after(5):
        error = await rejected(daemon, bearer, "?since=zz&since=0")
        assert (error.status_code, body_of(error)) == (400, BAD_SINCE)
        async with open_stream(daemon, bearer, f"?since=0&since=zz&epoch={bus.epoch}&epoch=other") as ws:
            assert (await frame(ws))["type"] == "hello"
            assert (await frame(ws))["id"] == 1  # a replay from 0 in this epoch, not a reset
        url = daemon.url.replace("http://", "ws://") + EVENTS_PATH + "/"
        async with trio_websocket.open_websocket_url(url, extra_headers=bearer) as ws:
            assert (await frame(ws))["type"] == "hello"
        nested = daemon.url.replace("http://", "ws://") + EVENTS_PATH + "/more"
        with pytest.raises(ConnectionRejected) as info:
            async with trio_websocket.open_websocket_url(nested, extra_headers=bearer):
                pass
        assert info.value.status_code == 404


async def test_a_plain_http_request_on_the_stream_path_gets_a_json_error(daemon: RunningDaemon, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with loopback_client(base_url=daemon.url, headers=headers) as client:
        got = await client.get(EVENTS_PATH)
        assert (got.status_code, got.json()) == (400, {"error": "Bad Request", "code": "bad_request"})
        got = await client.post(EVENTS_PATH)
        assert got.status_code == 405
        assert got.json() == {"error": "Method not allowed", "code": "method_not_allowed"}


async def test_capabilities_list_the_stream(daemon: RunningDaemon, token: str) -> None:
    with trio.fail_after(5):
        async with loopback_client(base_url=daemon.url, headers={"Authorization": f"Bearer {token}"}) as client:
            body = (await client.get("/capabilities")).json()
    assert "workspace_auth_events" in body["features"]
    assert "ws-events" in body["transports"]


# --- frames ---------------------------------------------------------------------------------------------


async def test_hello_then_live_events_in_order(daemon: RunningDaemon, bearer: Headers) -> None:
    bus = bus_of(daemon)
    with trio.fail_after(5):
        async with open_stream(daemon, bearer) as ws:
            assert await ws.get_message() == (
                f'{{"v":1,"type":"hello","data":{{"lastEventId":0,"epoch":"{bus.epoch}"}}}}'
            )
            envelopes = [
                bus.publish(FlowStarted("df-1", "qwen-oauth", 1_700_000_600_000), originator_client_id="cli"),
                bus.publish(FlowFailed("df-1", ErrorKind.ACCESS_DENIED, FlowStatus.ERROR)),
                bus.publish(cancelled(2)),
            ]
            for envelope in envelopes:
                # Byte for byte the bus's one encoding.
                assert await ws.get_message() == encode_envelope(envelope)


async def test_hello_names_the_newest_id_and_only_later_events_follow(daemon: RunningDaemon, bearer: Headers) -> None:
    bus = bus_of(daemon)
    bus.publish(cancelled(1))
    bus.publish(cancelled(2))
    with trio.fail_after(5):
        async with open_stream(daemon, bearer) as ws:
            assert await frame(ws) == {"v": 1, "type": "hello", "data": {"lastEventId": 2, "epoch": bus.epoch}}
            bus.publish(cancelled(3))
            assert (await frame(ws))["id"] == 3


async def test_since_resumes_across_a_reconnect_with_no_gap_and_no_duplicate(
    daemon: RunningDaemon, bearer: Headers
) -> None:
    bus = bus_of(daemon)
    total = 60
    seen: list[int] = []

    async def publisher() -> None:
        for n in range(total):
            bus.publish(cancelled(n))
            await trio.sleep(0.005)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with open_stream(daemon, bearer) as ws:
                assert (await frame(ws))["data"]["lastEventId"] == 0
                nursery.start_soon(publisher)
                while len(seen) < 20:
                    seen.append((await frame(ws))["id"])
            # Events keep coming while the client is away.
            await trio.sleep(0.05)
            async with open_stream(daemon, bearer, f"?since={seen[-1]}&epoch={bus.epoch}") as ws:
                hello = await frame(ws)
                assert hello["type"] == "hello"
                assert hello["data"]["lastEventId"] > seen[-1]
                while seen[-1] < total:
                    seen.append((await frame(ws))["id"])
    assert seen == list(range(1, total + 1))


async def test_since_without_epoch_means_the_current_epoch(daemon: RunningDaemon, bearer: Headers) -> None:
    bus = bus_of(daemon)
    for n in range(3):
        bus.publish(cancelled(n))
    with trio.fail_after(5):
        async with open_stream(daemon, bearer, "?since=1") as ws:
            assert (await frame(ws))["type"] == "hello"
            assert [(await frame(ws))["id"] for _ in range(2)] == [2, 3]


async def test_since_that_fell_off_the_ring_gets_a_reset(
    start_stream: Callable[..., AbstractAsyncContextManager[RunningDaemon]], bearer: Headers
) -> None:
    with trio.fail_after(5):
        async with start_stream(ring_size=2) as daemon:
            bus = bus_of(daemon)
            for n in range(5):
                bus.publish(cancelled(n))
            async with open_stream(daemon, bearer, f"?since=1&epoch={bus.epoch}") as ws:
                assert await frame(ws) == {"v": 1, "type": "hello", "data": {"lastEventId": 5, "epoch": bus.epoch}}
                assert await frame(ws) == {"v": 1, "type": "reset", "data": {"lastEventId": 5, "epoch": bus.epoch}}
                # No replay: the next frame is the next live event.
                bus.publish(cancelled(6))
                assert (await frame(ws))["id"] == 6
            # The ring now holds 5 and 6: since=4 is whole, a replay and no reset.
            async with open_stream(daemon, bearer, "?since=4") as ws:
                assert (await frame(ws))["type"] == "hello"
                assert [(await frame(ws))["id"] for _ in range(2)] == [5, 6]


async def test_since_from_another_epoch_gets_a_reset(daemon: RunningDaemon, bearer: Headers) -> None:
    bus = bus_of(daemon)
    bus.publish(cancelled(1))
    with trio.fail_after(5):
        async with open_stream(daemon, bearer, "?since=0&epoch=a-previous-daemon") as ws:
            assert (await frame(ws))["type"] == "hello"
            assert await frame(ws) == {"v": 1, "type": "reset", "data": {"lastEventId": 1, "epoch": bus.epoch}}


async def test_heartbeat_when_idle(
    start_stream: Callable[..., AbstractAsyncContextManager[RunningDaemon]], bearer: Headers
) -> None:
    with trio.fail_after(5):
        async with start_stream(heartbeat_s=0.2) as daemon, open_stream(daemon, bearer) as ws:
            assert (await frame(ws))["type"] == "hello"
            start = trio.current_time()
            assert await ws.get_message() == '{"v":1,"type":"heartbeat","data":{"lastEventId":0}}'
            assert trio.current_time() - start >= 0.15
            bus_of(daemon).publish(cancelled(1))
            assert (await frame(ws))["id"] == 1
            assert await frame(ws) == {"v": 1, "type": "heartbeat", "data": {"lastEventId": 1}}
            assert await frame(ws) == {"v": 1, "type": "heartbeat", "data": {"lastEventId": 1}}


# --- ends -----------------------------------------------------------------------------------------------


async def test_a_full_queue_closes_4000_lagged(
    start_stream: Callable[..., AbstractAsyncContextManager[RunningDaemon]], bearer: Headers
) -> None:
    with trio.fail_after(5):
        async with start_stream(subscriber_queue=2) as daemon, open_stream(daemon, bearer) as ws:
            bus = bus_of(daemon)
            assert (await frame(ws))["type"] == "hello"
            # No checkpoint: a queue of two overflows by the fourth (the first may go straight to a waiting
            # receiver rather than into the queue). The bus's fan-out task offers the four in one step.
            for n in range(4):
                bus.publish(cancelled(n))
            while bus.subscriber_count:  # bounded by fail_after
                await trio.lowlevel.checkpoint()
            frames, reason = await frames_until_close(ws)
            # Ended, never skipping: at most the event taken before the overflow, then the close.
            assert [f["id"] for f in frames] in ([], [1])
            assert (reason.code, reason.reason) == (4000, "lagged")


async def test_a_client_that_stops_reading_is_closed_4000_after_what_it_got(
    start_stream: Callable[..., AbstractAsyncContextManager[RunningDaemon]], bearer: Headers
) -> None:
    with trio.fail_after(20):
        async with (
            start_stream(subscriber_queue=8, ring_size=4, heartbeat_s=60) as daemon,
            open_stream(daemon, bearer, message_queue_size=1) as ws,
        ):
            bus = bus_of(daemon)
            # The client reads nothing: socket buffers, then the queue, fill up.
            published = await publish_until_stalled(bus, limit=1_000_000, pause_s=0.002)
            frames, reason = await frames_until_close(ws)
    assert frames[0]["type"] == "hello"
    ids = [f["id"] for f in frames[1:]]
    assert ids == list(range(1, len(ids) + 1))
    # The queue (8) overflowed only after the socket stopped taking frames.
    assert 0 < len(ids) < published - 8
    assert (reason.code, reason.reason) == (4000, "lagged")


async def test_a_send_stalled_for_a_heartbeat_period_frees_the_slot(
    start_stream: Callable[..., AbstractAsyncContextManager[RunningDaemon]], bearer: Headers
) -> None:
    with trio.fail_after(20):
        async with (
            start_stream(subscriber_queue=1000, ring_size=4, heartbeat_s=0.5, max_subscribers=1) as daemon,
            open_stream(daemon, bearer, message_queue_size=1) as ws,
        ):
            bus = bus_of(daemon)
            # Fill the socket buffers, then stop publishing: the queue never overflows, the write just hangs.
            published = await publish_until_stalled(bus)
            assert published < 400
            # The slot is free while the peer still holds the socket.
            async with open_stream(daemon, bearer) as other:
                assert (await frame(other))["type"] == "hello"
            frames, reason = await frames_until_close(ws)
    ids = [f["id"] for f in frames[1:]]
    assert ids == list(range(1, len(ids) + 1))
    assert (reason.code, reason.reason) == (4000, "lagged")


async def test_a_stalled_peer_that_keeps_sending_is_still_closed_4000(
    start_stream: Callable[..., AbstractAsyncContextManager[RunningDaemon]], bearer: Headers
) -> None:
    """The task that reads inbound messages also times the writes: a stream of small messages from a peer
    that reads nothing must not keep postponing that check."""

    async def chatter(ws: WebSocketConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send_message("still here")
                await trio.sleep(0.02)

    with trio.fail_after(20):
        async with (
            start_stream(subscriber_queue=1000, ring_size=4, heartbeat_s=0.5, max_subscribers=1) as daemon,
            open_stream(daemon, bearer, message_queue_size=1) as ws,
        ):
            bus = bus_of(daemon)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chatter, ws)
                published = await publish_until_stalled(bus)
                await wait_until(lambda: bus.subscriber_count == 0)
                nursery.cancel_scope.cancel()
            assert published < 400
            frames, reason = await frames_until_close(ws)
    ids = [f["id"] for f in frames[1:]]
    assert ids == list(range(1, len(ids) + 1))
    assert (reason.code, reason.reason) == (4000, "lagged")


async def test_the_subscriber_cap_answers_429(
    start_stream: Callable[..., AbstractAsyncContextManager[RunningDaemon]], bearer: Headers
) -> None:
    with trio.fail_after(5):
        async with start_stream(max_subscribers=2) as daemon:
            bus = bus_of(daemon)
            async with open_stream(daemon, bearer) as first, open_stream(daemon, bearer) as second:
                assert (await frame(first))["type"] == (await frame(second))["type"] == "hello"
                error = await rejected(daemon, bearer)
                assert error.status_code == 429
                assert body_of(error) == TOO_MANY
                assert bus.subscriber_count == 2
            await wait_until(lambda: bus.subscriber_count == 0)
            async with open_stream(daemon, bearer) as third:
                assert (await frame(third))["type"] == "hello"


async def test_inbound_messages_are_ignored_and_a_client_close_frees_the_slot(
    daemon: RunningDaemon, bearer: Headers
) -> None:
    bus = bus_of(daemon)
    with trio.fail_after(5):
        async with open_stream(daemon, bearer) as ws:
            assert (await frame(ws))["type"] == "hello"
            for n in range(50):  # more than Quart-Trio buffers: it must keep reading them
                await ws.send_message(f"noise {n}")
            bus.publish(cancelled(1))
            assert (await frame(ws))["id"] == 1
            assert bus.subscriber_count == 1
        await wait_until(lambda: bus.subscriber_count == 0)


async def test_shutdown_delivers_queued_events_then_closes_1001(start_daemon: StartDaemon, bearer: Headers) -> None:
    with trio.fail_after(5):
        async with (
            start_daemon(stream_config()) as daemon,
            open_stream(daemon, bearer) as ws,
        ):
            bus = bus_of(daemon)
            assert (await frame(ws))["type"] == "hello"
            for n in range(3):
                bus.publish(cancelled(n))
            daemon.shutdown()
            frames, reason = await frames_until_close(ws)
        assert [f["id"] for f in frames] == [1, 2, 3]
        assert (reason.code, reason.reason) == (1001, "shutting down")


async def test_shutdown_closes_every_stream_without_waiting_for_the_graceful_timeout(
    start_daemon: StartDaemon, bearer: Headers
) -> None:
    config = load_config(overrides={"server": {"port": 0, "graceful_timeout_s": 5}})
    codes: list[int] = []

    async def subscriber(daemon: RunningDaemon, *, task_status: trio.TaskStatus[None]) -> None:
        async with open_stream(daemon, bearer) as ws:
            assert (await frame(ws))["type"] == "hello"
            task_status.started()
            _, reason = await frames_until_close(ws)
            codes.append(reason.code)

    with trio.fail_after(10):
        async with start_daemon(config) as daemon, trio.open_nursery() as clients:
            for _ in range(20):
                await clients.start(subscriber, daemon)
            stopped_at = trio.current_time()
            daemon.shutdown()
        # SPEC §3: hypercorn had no open stream left to wait for.
        assert trio.current_time() - stopped_at < 1
    assert codes == [1001] * 20


async def test_handshake_while_shutting_down_is_503(daemon: RunningDaemon, bearer: Headers) -> None:
    with trio.fail_after(5):
        daemon.services.shutdown.begin()
        error = await rejected(daemon, bearer)
        assert error.status_code == 503
        assert body_of(error) == SHUTTING_DOWN


async def test_handshake_after_the_bus_closed_is_503(daemon: RunningDaemon, bearer: Headers) -> None:
    with trio.fail_after(5):
        bus_of(daemon).close()
        error = await rejected(daemon, bearer)
        assert error.status_code == 503
        assert body_of(error) == SHUTTING_DOWN


async def test_a_handler_error_closes_1011(
    start_stream: Callable[..., AbstractAsyncContextManager[RunningDaemon]],
    bearer: Headers,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_heartbeat(last_event_id: int) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(serve.wire, "heartbeat_frame", broken_heartbeat)
    with trio.fail_after(5):
        async with start_stream(heartbeat_s=0.1) as daemon, open_stream(daemon, bearer) as ws:
            frames, reason = await frames_until_close(ws)
            assert [f["type"] for f in frames] == ["hello"]
            assert (reason.code, reason.reason) == (1011, "internal error")
            await wait_until(lambda: bus_of(daemon).subscriber_count == 0)
    assert "event stream failed" in caplog.text


async def test_a_handler_error_before_the_handshake_is_a_json_500(
    daemon: RunningDaemon, bearer: Headers, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_subscribe(since: int | None = None, epoch: str | None = None) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(bus_of(daemon), "subscribe", broken_subscribe)
    with trio.fail_after(5):
        error = await rejected(daemon, bearer)
    assert (error.status_code, body_of(error)) == (500, {"error": "Internal error", "code": "internal_error"})
    assert "event stream handshake failed" in caplog.text
    assert "boom" not in (error.body or b"").decode()


async def test_a_peer_that_stopped_reading_does_not_hold_shutdown(
    start_stream: Callable[..., AbstractAsyncContextManager[RunningDaemon]], bearer: Headers
) -> None:
    # Hypercorn's socket writes are shielded: a client that stops reading pinned its handler, and
    # `run_daemon` did not return while that client lived (issue 8: 26.4 s). After the graceful phase the
    # daemon now resets the connections still open.
    async def stuck_client(daemon: RunningDaemon, *, task_status: trio.TaskStatus[None]) -> None:
        with contextlib.suppress(ConnectionClosed):
            async with open_stream(daemon, bearer, message_queue_size=1):
                task_status.started()
                await trio.sleep_forever()

    with trio.fail_after(30):
        async with trio.open_nursery() as clients:
            async with start_stream(subscriber_queue=1000, heartbeat_s=0.5) as daemon:
                await clients.start(stuck_client, daemon)
                bus = bus_of(daemon)
                published = await publish_until_stalled(bus)  # fill the socket buffers until the write stalls
                assert published < 400
                stopping_at = trio.current_time()
            took = trio.current_time() - stopping_at
            # trio-websocket's client cannot close while its reader is blocked on a full queue: cancel it.
            clients.cancel_scope.cancel()
    # graceful_timeout_s is 0.5 in these tests; the bound is generous for a loaded machine.
    assert took < 3


@pytest.mark.parametrize("deflate", [False, True], ids=["raw frames", "permessage-deflate"])
async def test_frames_decode_as_rfc_6455_with_and_without_a_negotiated_extension(
    start_stream: Callable[..., AbstractAsyncContextManager[RunningDaemon]], token: str, deflate: bool
) -> None:
    """Without an extension, events go out as frames built once (`wire.websocket_text_frame`), written raw; a
    client that negotiates permessage-deflate gets them through wsproto instead. wsproto decodes both."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request, TextMessage
    from wsproto.extensions import PerMessageDeflate

    big = "x" * 70_000  # a 64-bit length field
    with trio.fail_after(10):
        async with start_stream() as daemon:
            host = urlsplit(daemon.url).netloc
            client = WSConnection(ConnectionType.CLIENT)
            stream = await trio.open_tcp_stream("127.0.0.1", urlsplit(daemon.url).port or 0)
            async with stream:
                request = Request(
                    host=host,
                    target=EVENTS_PATH,
                    extra_headers=[(b"authorization", f"Bearer {token}".encode())],
                    extensions=[PerMessageDeflate()] if deflate else [],
                )
                await stream.send_all(client.send(request))
                texts: list[str] = []
                partial = ""  # wsproto hands a message over in pieces as its bytes arrive
                accepted: AcceptConnection | None = None
                published = False
                while len(texts) < 3:
                    client.receive_data(await stream.receive_some(1 << 16))
                    for event in client.events():
                        if isinstance(event, AcceptConnection):
                            accepted = event
                        elif isinstance(event, TextMessage):
                            partial += event.data
                            if event.message_finished:
                                texts.append(partial)
                                partial = ""
                    if texts and not published:
                        bus_of(daemon).publish(FlowFailed("df-small", ErrorKind.UPSTREAM_ERROR, FlowStatus.ERROR, "h"))
                        bus_of(daemon).publish(FlowFailed("df-big", ErrorKind.UPSTREAM_ERROR, FlowStatus.ERROR, big))
                        published = True
    assert accepted is not None and bool(accepted.extensions) is deflate
    hello, small, large = (json.loads(text) for text in texts)
    assert hello["type"] == "hello"
    assert small["data"]["deviceFlowId"] == "df-small" and large["data"]["hint"] == big


async def test_frames_written_straight_to_the_socket_never_split_the_servers_own_frames(
    start_stream: Callable[..., AbstractAsyncContextManager[RunningDaemon]], token: str
) -> None:
    """Events go to the socket directly when no other write is in progress (serve.http.server's raw send),
    while hypercorn answers the client's pings with pongs of its own. With a client that pings all along and
    first reads nothing (so writes block half done), every frame still arrives whole: each event in order,
    a pong for each ping."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Ping, Pong, Request, TextMessage

    events, pings = 300, 200
    hint = "y" * 20_000
    with trio.fail_after(30):
        async with start_stream(subscriber_queue=1000, heartbeat_s=30) as daemon:
            client = WSConnection(ConnectionType.CLIENT)
            stream = await trio.open_tcp_stream("127.0.0.1", port_of(daemon))
            async with stream:
                request = Request(
                    host=urlsplit(daemon.url).netloc,
                    target=EVENTS_PATH,
                    extra_headers=[(b"authorization", f"Bearer {token}".encode())],
                )
                await stream.send_all(client.send(request))
                texts: list[str] = []
                pongs: list[bytes] = []
                partial = ""

                async def read_some() -> None:
                    nonlocal partial
                    client.receive_data(await stream.receive_some(1 << 16))
                    for event in client.events():
                        if isinstance(event, TextMessage):
                            partial += event.data
                            if event.message_finished:
                                texts.append(partial)
                                partial = ""
                        elif isinstance(event, Pong):
                            pongs.append(bytes(event.payload))
                        else:
                            assert isinstance(event, AcceptConnection)

                while not texts:  # the hello
                    await read_some()

                async def ping_all_along() -> None:
                    for n in range(pings):
                        await stream.send_all(client.send(Ping(payload=str(n).encode())))
                        await trio.sleep(0.001)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ping_all_along)
                    bus = bus_of(daemon)
                    for n in range(events):
                        bus.publish(FlowFailed(f"df-{n}", ErrorKind.UPSTREAM_ERROR, FlowStatus.ERROR, hint))
                        if n % 20 == 0:
                            await trio.sleep(0.005)
                    await trio.sleep(0.3)  # nothing read yet: the socket buffers are full by now
                    while len(texts) < events + 1 or len(pongs) < pings:
                        await read_some()
    ids = [json.loads(text)["id"] for text in texts[1:]]
    assert ids == list(range(1, events + 1))
    assert pongs == [str(n).encode() for n in range(pings)]


def _server_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Whole unmasked frames (opcode, payload) at the start of `data`, and the bytes left over."""
    frames = []
    while len(data) >= 2:
        length, at = data[1] & 0x7F, 2
        if length == 126:
            length, at = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, at = int.from_bytes(data[2:10], "big"), 10
        if len(data) < at + length:
            break
        frames.append((data[0] & 0x0F, data[at : at + length]))
        data = data[at + length :]
    return frames, data


async def test_no_event_follows_the_close_the_server_sends_for_an_oversized_message(
    start_stream: Callable[..., AbstractAsyncContextManager[RunningDaemon]], token: str
) -> None:
    """hypercorn closes 1009 for an inbound message over the limit, then waits for the peer's close; the
    events published meanwhile must not follow its close frame (RFC 6455 §5.5.1), raw writes included."""
    with trio.fail_after(10):
        async with start_stream() as daemon:
            stream = await trio.open_tcp_stream("127.0.0.1", port_of(daemon))
            async with stream:
                await stream.send_all(
                    f"GET {EVENTS_PATH} HTTP/1.1\r\nHost: {urlsplit(daemon.url).netloc}\r\n"
                    f"Authorization: Bearer {token}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
                )
                received = b""
                while b"\r\n\r\n" not in received:
                    received += await stream.receive_some(65536)
                head, rest = received.split(b"\r\n\r\n", 1)
                assert head.startswith(b"HTTP/1.1 101")
                buffer = rest

                async def frames_through(opcode: int) -> list[tuple[int, bytes]]:
                    nonlocal buffer
                    frames: list[tuple[int, bytes]] = []
                    while not any(op == opcode for op, _ in frames):
                        more, buffer = _server_frames(buffer)
                        frames += more
                        if not more:
                            buffer += await stream.receive_some(65536)
                    return frames

                assert (await frames_through(0x1))[0][0] == 0x1  # the hello
                payload = b"x" * 5000  # over the 4 KiB inbound limit, masked as a client must
                mask = b"\x01\x02\x03\x04"
                masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
                await stream.send_all(b"\x81\xfe" + len(payload).to_bytes(2, "big") + mask + masked)
                frames = await frames_through(0x8)
                assert frames[-1] == (0x8, (1009).to_bytes(2, "big"))
                bus = bus_of(daemon)
                for n in range(5):
                    bus.publish(cancelled(n))
                after = b""
                with trio.move_on_after(0.5):
                    while True:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            break
                        after += chunk
    assert after == b""
