"""EventBus (SPEC §4): monotonic ids, a ring for `since` replay, bounded per-subscriber queues.

`publish` never blocks: each subscriber has a bounded queue, and one that is full is closed as *lagged*
(the stream then closes it with 4000) rather than silently skipping an event. Each envelope is encoded to
JSON once, and every subscriber gets the same string.

`subscribe` takes no checkpoint between reading the ring and registering the subscriber, so a replay and
the live events that follow it have no gap and no duplicate.

While `run()` runs (the daemon runs it), `publish` only numbers, encodes and rings the event, and `run()`
offers it to the subscribers in slices of `FANOUT_SLICE`, yielding between slices. Offering wakes the
subscriber's task, which writes to its socket; done all at once, a thousand such writes would run ahead
of every later step of the task that published (the request whose answer is the `201`), in each of
Trio's scheduling batches. In slices, that task waits for at most a slice's writes per step. Without
`run()` (unit tests), `publish` offers at once.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterable
from types import TracebackType

import trio

from serve.clock import WallClock
from serve.lifecycle import Shutdown
from serve.models import AuthEvent, Envelope
from serve.wire import encode_envelope


class SubscriptionClosed(Exception):
    """The subscription ended: the bus closed (shutdown) or the subscriber closed it."""


class SubscriberLagged(SubscriptionClosed):
    """The subscriber's queue overflowed; events were not skipped, the subscription was ended instead."""


# Subscribers offered an event per scheduling batch by `EventBus.run`.
FANOUT_SLICE = 16


class Subscription:
    """One subscriber's view of the bus. Use as a context manager so it always unregisters.

    `replay` holds the encoded envelopes after `since` (empty without `since`); `reset` is True when
    `since` fell off the ring or named another epoch, in which case `replay` is empty and the client must
    re-read state over REST. `last_event_id` is the newest id at the instant of subscribing.
    """

    def __init__(self, bus: EventBus, queue_size: int, *, last_event_id: int, replay: list[str], reset: bool) -> None:
        self._bus = bus
        self._send, self._receive = trio.open_memory_channel[str](queue_size)
        self.last_event_id = last_event_id
        self.replay = replay
        self.reset = reset
        self.lagged = False
        self.closed = False

    def _offer(self, encoded: str) -> None:
        try:
            self._send.send_nowait(encoded)
        except trio.WouldBlock:
            self.lagged = True
            self.close()
        except trio.ClosedResourceError:
            pass

    async def receive(self) -> str:
        """The next live envelope, as JSON. Queued events are delivered before a close is reported.

        Raises `SubscriberLagged` if this subscriber fell behind, `SubscriptionClosed` once closed.
        """
        if self.lagged:
            raise SubscriberLagged
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise SubscriberLagged if self.lagged else SubscriptionClosed from None

    def receive_queued(self) -> list[str]:
        """Every envelope already queued, without waiting (a burst is written in one go)."""
        frames: list[str] = []
        while not self.lagged:
            try:
                frames.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        return frames

    def close(self) -> None:
        """Stop receiving; queued events are still delivered unless the subscriber lagged."""
        if not self.closed:
            self.closed = True
            self._send.close()
            self._bus._subscribers.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        self._receive.close()


class EventBus:
    """The daemon's one stream of auth events."""

    def __init__(
        self,
        *,
        clock: WallClock,
        ring_size: int = 1024,
        subscriber_queue: int = 256,
        epoch: str | None = None,
        shutdown: Shutdown | None = None,
    ) -> None:
        self._clock = clock
        self._shutdown = shutdown or Shutdown()
        self._ring: deque[tuple[int, str]] = deque(maxlen=ring_size)
        self._queue_size = subscriber_queue
        self._subscribers: set[Subscription] = set()
        self.epoch = epoch or str(uuid.uuid4())
        self.last_event_id = 0
        self._backlog: deque[tuple[int, str]] = deque()  # published, not yet offered (while `run()` runs)
        self._backlog_added = trio.Event()
        self._fanning_out = False
        self._closing = False
        self._not_yet_offered: list[Subscription] | None = None  # the rest of the event `run()` is slicing

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def closed(self) -> bool:
        """True once the daemon began to stop: no new subscriber is taken from then on."""
        return self._shutdown.begun

    def publish(self, event: AuthEvent, originator_client_id: str | None = None) -> Envelope:
        """Number, stamp, encode once, keep in the ring and offer to every subscriber. Never blocks."""
        self.last_event_id += 1
        envelope = Envelope(self.last_event_id, event, self._clock.now_ms(), originator_client_id)
        encoded = encode_envelope(envelope)
        self._ring.append((envelope.id, encoded))
        if self._fanning_out:
            self._backlog.append((envelope.id, encoded))
            self._backlog_added.set()
        else:
            _offer(list(self._subscribers), envelope.id, encoded)
        return envelope

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Offer published events to the subscribers, a slice per scheduling batch, until `close()` (then
        every subscription is closed once the backlog is offered) or cancellation (then the backlog is
        offered at once)."""
        self._fanning_out = True
        task_status.started()
        try:
            while True:
                while not self._backlog:
                    if self._closing:
                        return
                    self._backlog_added = trio.Event()
                    await self._backlog_added.wait()
                event_id, encoded = self._backlog[0]  # stays first until everyone was offered it
                subscribers = list(self._subscribers)
                for start in range(0, len(subscribers), FANOUT_SLICE):
                    if start:
                        self._not_yet_offered = subscribers[start:]
                        await trio.lowlevel.checkpoint()
                        if self._not_yet_offered is None:  # close() offered the rest meanwhile
                            break
                    _offer(subscribers[start : start + FANOUT_SLICE], event_id, encoded)
                else:
                    self._backlog.popleft()
                self._not_yet_offered = None
        finally:
            self._fanning_out = False
            self._offer_backlog_now()
            if self._closing:
                self._close_all()

    def _offer_backlog_now(self) -> None:
        """Offer everything not yet offered, in order: the rest of the event being sliced, then the others."""
        if self._not_yet_offered is not None and self._backlog:
            event_id, encoded = self._backlog.popleft()
            _offer(self._not_yet_offered, event_id, encoded)
        self._not_yet_offered = None
        while self._backlog:
            event_id, encoded = self._backlog.popleft()
            _offer(list(self._subscribers), event_id, encoded)

    def subscribe(self, *, since: int | None = None, epoch: str | None = None) -> Subscription:
        """Register a subscriber; with `since`, prepare the replay of everything after it (or a reset).

        Raises `SubscriptionClosed` once the bus is closed (the daemon is shutting down).
        """
        if self._shutdown.begun:
            raise SubscriptionClosed
        replay: list[str] = []
        reset = False
        if since is not None:
            oldest = self._ring[0][0] if self._ring else self.last_event_id + 1
            if (epoch is not None and epoch != self.epoch) or since > self.last_event_id or since < oldest - 1:
                reset = True
            else:
                replay = [encoded for event_id, encoded in self._ring if event_id > since]
        subscription = Subscription(
            self, self._queue_size, last_event_id=self.last_event_id, replay=replay, reset=reset
        )
        self._subscribers.add(subscription)
        return subscription

    def close(self) -> None:
        """Shutdown: refuse new subscribers, offer what was published to everyone at once (no request is
        left to protect from the writes, and the streams' drain has only `graceful_timeout_s`), then end
        every subscription (each still drains what it queued). `run()` then returns."""
        self._shutdown.begin()
        self._closing = True
        self._offer_backlog_now()
        self._close_all()
        self._backlog_added.set()

    def _close_all(self) -> None:
        for subscription in list(self._subscribers):
            subscription.close()


def _offer(subscribers: Iterable[Subscription], event_id: int, encoded: str) -> None:
    """Offer one event to each subscriber that subscribed before it (a later one has it in its replay or
    counts it in its hello's `lastEventId`)."""
    for subscription in subscribers:
        if subscription.last_event_id < event_id and not subscription.closed:
            subscription._offer(encoded)
