"""EventBus (SPEC §4): monotonic ids, a ring for `since` replay, bounded per-subscriber queues.

`publish` never blocks: each subscriber has a bounded queue, and one that is full is closed as *lagged*
(the stream then closes it with 4000) rather than silently skipping an event. Each envelope is encoded to
JSON once, and every subscriber gets the same string.

`subscribe` takes no checkpoint between reading the ring and registering the subscriber, so a replay and
the live events that follow it have no gap and no duplicate.
"""

from __future__ import annotations

import uuid
from collections import deque
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
        for subscription in list(self._subscribers):
            subscription._offer(encoded)
        return envelope

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
        """Shutdown: end every subscription (each still drains what was queued) and refuse new ones."""
        self._shutdown.begin()
        for subscription in list(self._subscribers):
            subscription.close()
