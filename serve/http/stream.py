"""`WS /workspace/auth/events` (SPEC §4): the workspace's auth events, live, as JSON text frames.

Gates 1–3 (Host, Origin, bearer) have already run on the handshake in `serve.http.gates`. Here,
still before the handshake is accepted, so each answer is a real HTTP response with a JSON body:

    shutting down                                       503 shutting_down
    `since` not a non-negative integer of ≤ 19 digits   400 invalid_request
    `max_subscribers` reached                           429 too_many_subscribers

Query: `?since=N&epoch=E`. An empty value counts as absent; `epoch` without `since` is ignored; an absent
`epoch` means the current one. The frames, in order:

    {"v":1,"type":"hello","data":{"lastEventId":N,"epoch":E}}     always first; N is the newest id now
    {"v":1,"type":"reset","data":{"lastEventId":N,"epoch":E}}     only when `since` fell off the ring or
                                                                   named another epoch: re-read over REST
    {"id":…,"v":1,"type":"auth_device_flow_…",…}                  the replay (ids after `since`), written
                                                                   straight from the ring, then live events
    {"v":1,"type":"heartbeat","data":{"lastEventId":N}}           after `heartbeat_s` without a frame; every
                                                                   event up to N has been sent

Event ids on one connection are contiguous after the hello's id (or after `since`): no gap, no duplicate.
The stream ends with a close frame:

    4000 "lagged"         the subscriber's queue overflowed, or a frame could not be written within
                          `heartbeat_s` (a stalled or dead peer): reconnect with `since` = the last id seen
    1001 "shutting down"  the daemon is stopping; the events queued before it are delivered first
    1011 "internal error" the handler failed after the handshake

Inbound messages are read and ignored (so a client's close is noticed at once). Hypercorn's own pings are
not used: the heartbeat frame is ours, and it is what notices a peer that stopped reading.

The stream is plain ASGI in front of Quart (behind the gates), not a Quart route: a subscriber is then two
tasks of ours (the writer, and a reader that also watches the writes) instead of four with Quart-Trio's
request machinery, which is most of what an idle subscriber costs in memory. Quart keeps a WebSocket rule on
the path only so that a plain HTTP request to it gets the answers it always got (400, 405).

Hypercorn shields its socket writes from cancellation, so a write to a peer that stopped reading cannot be
abandoned. A watchdog therefore times each write: when one has not completed within `heartbeat_s`, the
subscription is closed at once (the peer no longer holds a subscriber slot nor receives events), and the 4000
close follows the stuck write whenever the socket takes it. Until then the connection's task stays, and so
does hypercorn's graceful shutdown: only the peer leaving, the shutdown's abort or a socket-level timeout
ends it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import parse_qsl

import trio

from serve import wire
from serve.errors import InvalidRequest, ServeError, ShuttingDown, TooManySubscribers
from serve.events import EventBus, SubscriberLagged, Subscription, SubscriptionClosed
from serve.http.gates import ASGIApp, Receive, Scope, Send, send_error
from serve.http.server import RAW_SEND_EXTENSION
from serve.http.services import Services

EVENTS_PATH = "/workspace/auth/events"
# Quart's routing (strict_slashes off) also served the path with one trailing slash.
_PATHS = frozenset((EVENTS_PATH, EVENTS_PATH + "/"))

CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_LAGGED = 4000

_SINCE_RE = re.compile(r"[0-9]{1,19}")

logger = logging.getLogger(__name__)


def event_stream(app: ASGIApp, services: Services) -> ASGIApp:
    """`app`, with `WS /workspace/auth/events` served here; every other scope goes on to `app`."""
    bus = services.bus
    config = services.config.events
    shutdown = services.shutdown

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or scope["path"] not in _PATHS:
            await app(scope, receive, send)
            return
        if (await receive())["type"] != "websocket.connect":
            return  # the peer left before its handshake was read
        try:
            subscription = _subscribe(scope, bus, config.max_subscribers, shutdown.begun)
        except ServeError as exc:
            await send_error(scope, send, exc)
            return
        except Exception:
            logger.exception("event stream handshake failed")
            await send_error(scope, send, ServeError())  # a JSON 500, as every other route answers
            return
        with subscription:
            await send({"type": "websocket.accept"})
            await _EventStream(scope, receive, send, bus, subscription, config.heartbeat_s).run()

    return serve


def _subscribe(scope: Scope, bus: EventBus, max_subscribers: int, shutting_down: bool) -> Subscription:
    """The handshake's checks, in order, then the subscription; raises the `ServeError` to answer with."""
    if shutting_down:
        raise ShuttingDown()
    since, epoch = _parse_query(scope.get("query_string", b""))
    if bus.subscriber_count >= max_subscribers:
        raise TooManySubscribers()
    try:
        return bus.subscribe(since=since, epoch=epoch)
    except SubscriptionClosed:
        raise ShuttingDown() from None


def _parse_query(query_string: bytes) -> tuple[int | None, str | None]:
    """`since` and `epoch` from the query; the first of repeated names counts, as it did under Quart."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, errors="replace"):
        params.setdefault(name, value)
    raw_since = params.get("since", "")
    if raw_since == "":
        return None, None
    if not _SINCE_RE.fullmatch(raw_since):
        raise InvalidRequest("`since` must be a non-negative integer")
    return int(raw_since), params.get("epoch") or None


class _EventStream:
    """One accepted connection: hello, reset or replay, then live events and heartbeats until a close.

    This task writes every frame itself. Where the connection allows it (no WebSocket extension
    negotiated), a frame is written as bytes built once per event (`wire.websocket_text_frame`) straight to
    the socket through `RAW_SEND_EXTENSION`: one wake-up and one `send` per subscriber and event, so an
    event reaches a thousand subscribers quickly and the request that published it is not kept waiting
    behind their writes. A second task reads (and drops) inbound messages and, every quarter heartbeat,
    notices a write that has not completed within `heartbeat_s` (the write itself cannot be abandoned: see
    above) and frees the subscriber slot at once.
    """

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, bus: EventBus, subscription: Subscription, heartbeat_s: float
    ) -> None:
        self._receive = receive
        self._asgi_send = send
        self._bus = bus
        self._subscription = subscription
        self._heartbeat_s = heartbeat_s
        self._raw_send = _raw_send_of(scope)
        self._writing_since: float | None = None
        self._stalled = False
        self._peer_gone = False

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_and_watch, nursery.cancel_scope)
                code, reason = await self._stream()
                # Free the subscriber slot now: the close may wait behind a write the peer is not reading.
                self._subscription.close()
                nursery.cancel_scope.cancel()
            if self._stalled:
                code, reason = CLOSE_LAGGED, "lagged"
        except Exception:
            # STACK-NOTES 7: a raise after accept would show the client a plain close; say 1011 instead.
            logger.exception("event stream failed")
            self._subscription.close()
            code, reason = CLOSE_INTERNAL_ERROR, "internal error"
        if not self._peer_gone:
            await self._asgi_send({"type": "websocket.close", "code": code, "reason": reason})

    async def _stream(self) -> tuple[int, str]:
        """Write every frame owed to this subscriber; return the close code once the subscription ends."""
        subscription = self._subscription
        await self._send(wire.hello_frame(subscription.last_event_id, self._bus.epoch))
        if subscription.reset:
            await self._send(wire.reset_frame(subscription.last_event_id, self._bus.epoch))
        for frame in subscription.replay:
            await self._send(frame)
        while not self._stalled:
            with trio.move_on_after(self._heartbeat_s) as idle:
                try:
                    frame = await subscription.receive()
                except SubscriberLagged:
                    return CLOSE_LAGGED, "lagged"
                except SubscriptionClosed:
                    return CLOSE_GOING_AWAY, "shutting down"
            if idle.cancelled_caught:
                # The queue is empty at this instant, so every event up to the newest id has been sent.
                await self._send(wire.heartbeat_frame(self._bus.last_event_id))
            else:
                # A burst (the flows a shutdown cancels, say) goes out in one write.
                await self._send(frame, *subscription.receive_queued())
        return CLOSE_LAGGED, "lagged"

    async def _send(self, *frames: str) -> None:
        self._writing_since = trio.current_time()
        if self._raw_send is not None:
            await self._raw_send(b"".join(wire.websocket_text_frame(frame) for frame in frames))
        else:
            for frame in frames:
                await self._asgi_send({"type": "websocket.send", "text": frame})
        self._writing_since = None

    async def _read_and_watch(self, stream_scope: trio.CancelScope) -> None:
        """Drain inbound messages, so the peer's close is noticed at once (the server's inbound queue would
        otherwise fill and stop its reader), and every quarter heartbeat check the pending write: one
        pending for a whole heartbeat means a stalled peer."""
        check_every = self._heartbeat_s / 4
        next_check = trio.current_time() + check_every
        while True:
            with trio.move_on_at(next_check):
                message = await self._receive()
                if message["type"] == "websocket.disconnect":
                    self._peer_gone = True
                    self._subscription.close()
                    stream_scope.cancel()
                    return
            now = trio.current_time()
            if now < next_check:
                continue
            next_check = now + check_every
            since = self._writing_since
            if since is not None and now - since >= self._heartbeat_s:
                self._stalled = True
                self._subscription.close()  # the slot is free now; the 4000 close follows the stuck write
                stream_scope.cancel()
                return


def _raw_send_of(scope: Scope) -> Callable[[bytes], Awaitable[None]] | None:
    """The connection's raw frame writer, unless the client negotiated an extension (permessage-deflate
    would have to compress every frame) or the server is not ours (the in-memory test client)."""
    raw_send: Any = (scope.get("extensions") or {}).get(RAW_SEND_EXTENSION)
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    if raw_send is None or any(name == b"sec-websocket-extensions" for name, _ in headers):
        return None
    return cast(Callable[[bytes], Awaitable[None]], raw_send)
