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
from typing import cast

import trio
from quart import Quart, Response, websocket

from serve import wire
from serve.errors import InvalidRequest, ShuttingDown, TooManySubscribers
from serve.events import EventBus, SubscriberLagged, Subscription, SubscriptionClosed
from serve.http.responses import error_response
from serve.http.server import RAW_SEND_EXTENSION
from serve.http.services import Services

EVENTS_PATH = "/workspace/auth/events"

CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_LAGGED = 4000

_SINCE_RE = re.compile(r"[0-9]{1,19}")

logger = logging.getLogger(__name__)


def install(app: Quart, services: Services) -> None:
    """Register `WS /workspace/auth/events` on `app`, streaming the daemon's event bus."""
    bus = services.bus
    config = services.config.events
    shutdown = services.shutdown

    @app.websocket(EVENTS_PATH)
    async def auth_events() -> Response | None:
        if shutdown.begun:
            return error_response(ShuttingDown())
        try:
            since, epoch = _parse_query()
        except InvalidRequest as exc:
            return error_response(exc)
        if bus.subscriber_count >= config.max_subscribers:
            return error_response(TooManySubscribers())
        try:
            subscription = bus.subscribe(since=since, epoch=epoch)
        except SubscriptionClosed:
            return error_response(ShuttingDown())
        with subscription:
            await websocket.accept()
            await _EventStream(bus, subscription, config.heartbeat_s).run()
        return None


def _parse_query() -> tuple[int | None, str | None]:
    raw_since = websocket.args.get("since", "")
    raw_epoch = websocket.args.get("epoch", "")
    if raw_since == "":
        return None, None
    if not _SINCE_RE.fullmatch(raw_since):
        raise InvalidRequest("`since` must be a non-negative integer")
    return int(raw_since), raw_epoch or None


class _EventStream:
    """One accepted connection: hello, reset or replay, then live events and heartbeats until a close.

    This task writes every frame itself. Where the connection allows it (no WebSocket extension
    negotiated), a frame is written as bytes built once per event (`wire.websocket_text_frame`) straight to
    the socket through `RAW_SEND_EXTENSION`: one wake-up and one `send` per subscriber and event, so an
    event reaches a thousand subscribers quickly and the request that published it is not kept waiting
    behind their writes. A watchdog task notices a write that has not completed within `heartbeat_s` (the
    write itself cannot be abandoned: see above) and frees the subscriber slot at once.
    """

    def __init__(self, bus: EventBus, subscription: Subscription, heartbeat_s: float) -> None:
        self._bus = bus
        self._subscription = subscription
        self._heartbeat_s = heartbeat_s
        self._raw_send = _raw_send_of_this_connection()
        self._writing_since: float | None = None
        self._stalled = False

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._discard_inbound)
                nursery.start_soon(self._watch_writes, nursery.cancel_scope)
                code, reason = await self._stream()
                # Free the subscriber slot now: the close may wait behind a write the peer is not reading.
                self._subscription.close()
                nursery.cancel_scope.cancel()
            if self._stalled:
                code, reason = CLOSE_LAGGED, "lagged"
        except Exception:
            # STACK-NOTES 7: left to Quart, a raise after accept shows the client a plain 1000.
            logger.exception("event stream failed")
            self._subscription.close()
            code, reason = CLOSE_INTERNAL_ERROR, "internal error"
        await websocket.close(code, reason)

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
                await websocket.send(frame)
        self._writing_since = None

    async def _watch_writes(self, stream_scope: trio.CancelScope) -> None:
        """Every quarter heartbeat: a write pending for a whole heartbeat means a stalled peer."""
        while True:
            await trio.sleep(self._heartbeat_s / 4)
            since = self._writing_since
            if since is not None and trio.current_time() - since >= self._heartbeat_s:
                self._stalled = True
                self._subscription.close()  # the slot is free now; the 4000 close follows the stuck write
                stream_scope.cancel()
                return

    async def _discard_inbound(self) -> None:
        # Quart-Trio notices the client's close only while its inbound buffer has room: keep draining it.
        while True:
            await websocket.receive()


def _raw_send_of_this_connection() -> Callable[[bytes], Awaitable[None]] | None:
    """The connection's raw frame writer, unless the client negotiated an extension (permessage-deflate
    would have to compress every frame) or the server is not ours (the in-memory test client)."""
    extensions = websocket.scope.get("extensions") or {}
    raw_send = extensions.get(RAW_SEND_EXTENSION)
    if raw_send is None or websocket.headers.get("Sec-WebSocket-Extensions"):
        return None
    return cast(Callable[[bytes], Awaitable[None]], raw_send)
