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
abandoned. Frames therefore go through one writer task per connection: when a write has not completed within
`heartbeat_s`, the subscription is closed at once (the peer no longer holds a subscriber slot nor receives
events), and the 4000 close follows the stuck write whenever the socket takes it. Until then the connection's
task stays, and so does hypercorn's graceful shutdown: only the peer leaving (or a socket-level timeout) ends it.
"""

from __future__ import annotations

import logging
import re

import trio
from quart import Quart, Response, websocket

from serve import wire
from serve.errors import InvalidRequest, ShuttingDown, TooManySubscribers
from serve.events import EventBus, SubscriberLagged, Subscription, SubscriptionClosed
from serve.http.responses import error_response
from serve.http.services import Services

EVENTS_PATH = "/workspace/auth/events"

CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_LAGGED = 4000

_SINCE_RE = re.compile(r"[0-9]{1,19}")

logger = logging.getLogger(__name__)


class _PeerStalled(Exception):
    """A frame was not written within the heartbeat period."""


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
    """One accepted connection: hello, reset or replay, then live events and heartbeats until a close."""

    def __init__(self, bus: EventBus, subscription: Subscription, heartbeat_s: float) -> None:
        self._bus = bus
        self._subscription = subscription
        self._heartbeat_s = heartbeat_s
        # One writer task owns the socket's send side, so a write that hangs can be timed out (see above).
        self._frames_send, self._frames_receive = trio.open_memory_channel[tuple[str, trio.Event]](0)

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._discard_inbound)
                nursery.start_soon(self._write_frames)
                try:
                    code, reason = await self._stream()
                except _PeerStalled:
                    code, reason = CLOSE_LAGGED, "lagged"
                # Free the subscriber slot now: the close may wait behind a write the peer is not reading.
                self._subscription.close()
                nursery.cancel_scope.cancel()
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
        while True:
            with trio.move_on_after(self._heartbeat_s) as idle:
                try:
                    frame = await subscription.receive()
                except SubscriberLagged:
                    return CLOSE_LAGGED, "lagged"
                except SubscriptionClosed:
                    return CLOSE_GOING_AWAY, "shutting down"
            if idle.cancelled_caught:
                # The queue is empty at this instant, so every event up to the newest id has been sent.
                frame = wire.heartbeat_frame(self._bus.last_event_id)
            await self._send(frame)

    async def _send(self, frame: str) -> None:
        """Hand one frame to the writer task; raise `_PeerStalled` if it is not written within `heartbeat_s`."""
        written = trio.Event()
        with trio.move_on_after(self._heartbeat_s) as scope:
            await self._frames_send.send((frame, written))
            await written.wait()
        if scope.cancelled_caught:
            raise _PeerStalled

    async def _write_frames(self) -> None:
        async for frame, written in self._frames_receive:
            await websocket.send(frame)
            written.set()

    async def _discard_inbound(self) -> None:
        # Quart-Trio notices the client's close only while its inbound buffer has room: keep draining it.
        while True:
            await websocket.receive()
