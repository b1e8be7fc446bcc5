"""EventBus (SPEC §4): ids, the one encoding, ring replay and resets, bounded queues, shutdown."""

from __future__ import annotations

from typing import TypedDict, Unpack

import pytest
import trio
import trio.lowlevel
import trio.testing

from serve.clock import WallClock
from serve.events import EventBus, SubscriberLagged, Subscription, SubscriptionClosed
from serve.models import (
    ErrorKind,
    FlowAuthorized,
    FlowCancelled,
    FlowFailed,
    FlowStarted,
    FlowStatus,
    FlowThrottled,
)

EPOCH_S = 1_700_000_000  # the wall time at Trio's virtual t=0


@pytest.fixture
def clock() -> WallClock:
    """Exact wire times: each test also takes `autojump_clock` (pytest-trio runs Trio on it), so t=0 is EPOCH_S."""
    return WallClock(epoch_offset_s=EPOCH_S)


class BusSizes(TypedDict, total=False):
    """The sizes a test may set; the rest of `EventBus`'s keywords keep their defaults."""

    ring_size: int
    subscriber_queue: int


def make_bus(clock: WallClock, **sizes: Unpack[BusSizes]) -> EventBus:
    return EventBus(clock=clock, epoch="epoch-1", **sizes)


def cancelled(n: int) -> FlowCancelled:
    return FlowCancelled(f"df-{n}")


def event_id(encoded: str) -> int:
    """The id of an encoded envelope: it is the first member."""
    prefix = '{"id":'
    assert encoded.startswith(prefix)
    return int(encoded[len(prefix) : encoded.index(",")])


def drain_nowait(subscription: Subscription, count: int) -> list[str]:
    return [subscription._receive.receive_nowait() for _ in range(count)]


async def test_ids_are_monotonic_from_one(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    bus = make_bus(clock)
    assert bus.last_event_id == 0
    ids = [bus.publish(cancelled(n)).id for n in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    assert bus.last_event_id == 5


async def test_envelope_bytes_started_with_wire_time(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    bus = make_bus(clock)
    with bus.subscribe() as subscription:
        autojump_clock.jump(1.5)
        bus.publish(FlowStarted("df-abc", "qwen-oauth", 1_700_000_600_000))
        assert await subscription.receive() == (
            '{"id":1,"v":1,"type":"auth_device_flow_started",'
            '"data":{"deviceFlowId":"df-abc","providerId":"qwen-oauth","expiresAt":1700000600000},'
            '"_meta":{"serverTimestamp":1700000001500}}'
        )


async def test_envelope_bytes_originator_before_meta(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    bus = make_bus(clock)
    with bus.subscribe() as subscription:
        bus.publish(FlowThrottled("df-abc", 10_000), originator_client_id="cli-1")
        bus.publish(FlowCancelled("df-abc"))
        assert await subscription.receive() == (
            '{"id":1,"v":1,"type":"auth_device_flow_throttled","data":{"deviceFlowId":"df-abc","intervalMs":10000},'
            '"originatorClientId":"cli-1","_meta":{"serverTimestamp":1700000000000}}'
        )
        # Anonymous: no originatorClientId member at all.
        assert await subscription.receive() == (
            '{"id":2,"v":1,"type":"auth_device_flow_cancelled","data":{"deviceFlowId":"df-abc"},'
            '"_meta":{"serverTimestamp":1700000000000}}'
        )


async def test_envelope_bytes_failed_and_authorized(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    bus = make_bus(clock)
    with bus.subscribe() as subscription:
        bus.publish(FlowFailed("df-1", ErrorKind.EXPIRED_TOKEN, FlowStatus.EXPIRED, hint="code expired — retry"))
        bus.publish(FlowAuthorized("df-2", "qwen-oauth"), originator_client_id="cli-2")
        assert await subscription.receive() == (
            '{"id":1,"v":1,"type":"auth_device_flow_failed","data":{"deviceFlowId":"df-1",'
            '"errorKind":"expired_token","hint":"code expired — retry","status":"expired"},'
            '"_meta":{"serverTimestamp":1700000000000}}'
        )
        assert await subscription.receive() == (
            '{"id":2,"v":1,"type":"auth_device_flow_authorized","data":{"deviceFlowId":"df-2",'
            '"providerId":"qwen-oauth"},"originatorClientId":"cli-2","_meta":{"serverTimestamp":1700000000000}}'
        )


async def test_one_encoding_shared_by_every_subscriber_and_the_ring(
    clock: WallClock, autojump_clock: trio.testing.MockClock
) -> None:
    bus = make_bus(clock)
    with bus.subscribe() as first, bus.subscribe() as second:
        bus.publish(cancelled(1))
        a = await first.receive()
        b = await second.receive()
        with bus.subscribe(since=0) as late:
            assert a is b
            assert late.replay[0] is a


async def test_replay_after_since(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    bus = make_bus(clock)
    for n in range(5):
        bus.publish(cancelled(n))
    with bus.subscribe(since=2) as subscription:
        assert not subscription.reset
        assert subscription.last_event_id == 5
        assert [event_id(e) for e in subscription.replay] == [3, 4, 5]
    with bus.subscribe(since=0) as subscription:
        assert [event_id(e) for e in subscription.replay] == [1, 2, 3, 4, 5]
    with bus.subscribe(since=5) as subscription:
        assert not subscription.reset
        assert subscription.replay == []


async def test_no_since_means_no_replay(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    bus = make_bus(clock)
    bus.publish(cancelled(1))
    with bus.subscribe() as subscription:
        assert subscription.replay == []
        assert not subscription.reset
        assert subscription.last_event_id == 1


async def test_since_that_fell_off_the_ring_resets(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    bus = make_bus(clock, ring_size=3)
    for n in range(5):
        bus.publish(cancelled(n))
    # The ring holds 3, 4, 5: since=2 is still complete, since=1 would miss event 2.
    with bus.subscribe(since=2) as subscription:
        assert not subscription.reset
        assert [event_id(e) for e in subscription.replay] == [3, 4, 5]
    with bus.subscribe(since=1) as subscription:
        assert subscription.reset
        assert subscription.replay == []
        assert subscription.last_event_id == 5


async def test_since_from_the_future_resets(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    bus = make_bus(clock)
    bus.publish(cancelled(1))
    with bus.subscribe(since=7) as subscription:
        assert subscription.reset
        assert subscription.replay == []


async def test_epoch_mismatch_resets(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    bus = make_bus(clock)
    bus.publish(cancelled(1))
    with bus.subscribe(since=0, epoch="another-daemon-start") as subscription:
        assert subscription.reset
        assert subscription.replay == []
    with bus.subscribe(since=0, epoch="epoch-1") as subscription:
        assert not subscription.reset
        assert [event_id(e) for e in subscription.replay] == [1]


async def test_each_bus_has_its_own_epoch(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    first, second = EventBus(clock=clock), EventBus(clock=clock)
    assert first.epoch != second.epoch
    assert len(first.epoch) == 36  # a uuid


async def test_replay_then_live_has_no_gap_and_no_duplicate(
    clock: WallClock, autojump_clock: trio.testing.MockClock
) -> None:
    bus = make_bus(clock, subscriber_queue=1000)
    seen: list[int] = []

    async def publisher() -> None:
        for n in range(200):
            bus.publish(cancelled(n))
            await trio.lowlevel.checkpoint()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher)
            for _ in range(50):
                await trio.lowlevel.checkpoint()
            with bus.subscribe(since=10) as subscription:
                assert not subscription.reset
                seen.extend(event_id(e) for e in subscription.replay)
                while not seen or seen[-1] < 200:
                    seen.append(event_id(await subscription.receive()))
    assert seen == list(range(11, 201))


async def test_full_queue_ends_the_subscriber_as_lagged_never_skipping(
    clock: WallClock, autojump_clock: trio.testing.MockClock
) -> None:
    bus = make_bus(clock, subscriber_queue=2)
    with bus.subscribe() as slow, bus.subscribe() as fast:
        bus.publish(cancelled(1))
        bus.publish(cancelled(2))
        assert [event_id(e) for e in drain_nowait(fast, 2)] == [1, 2]
        bus.publish(cancelled(3))
        assert [event_id(await fast.receive())] == [3]
        # `slow` had 1 and 2 queued when 3 arrived: it is ended instead of receiving 1, 2 and never 3.
        with pytest.raises(SubscriberLagged):
            await slow.receive()
        with pytest.raises(SubscriberLagged):
            await slow.receive()
        assert bus.subscriber_count == 1
        bus.publish(cancelled(4))
        assert event_id(await fast.receive()) == 4


async def test_close_drains_queued_events_then_reports_closed(
    clock: WallClock, autojump_clock: trio.testing.MockClock
) -> None:
    bus = make_bus(clock)
    with bus.subscribe() as subscription:
        bus.publish(cancelled(1))
        bus.publish(cancelled(2))
        bus.close()
        assert bus.closed
        assert bus.subscriber_count == 0
        assert event_id(await subscription.receive()) == 1
        assert event_id(await subscription.receive()) == 2
        with pytest.raises(SubscriptionClosed) as info:
            await subscription.receive()
        assert type(info.value) is SubscriptionClosed


async def test_close_wakes_a_waiting_receiver(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    bus = make_bus(clock)
    with trio.fail_after(5), bus.subscribe() as subscription:
        async with trio.open_nursery() as nursery:

            async def close_soon() -> None:
                await trio.sleep(1)
                bus.close()

            nursery.start_soon(close_soon)
            with pytest.raises(SubscriptionClosed):
                await subscription.receive()


async def test_subscribe_after_close_is_refused(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    bus = make_bus(clock)
    bus.close()
    with pytest.raises(SubscriptionClosed):
        bus.subscribe()
    with pytest.raises(SubscriptionClosed):
        bus.subscribe(since=0)


async def test_leaving_the_context_unregisters(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    bus = make_bus(clock)
    with bus.subscribe():
        with bus.subscribe():
            assert bus.subscriber_count == 2
        assert bus.subscriber_count == 1
    assert bus.subscriber_count == 0
    bus.publish(cancelled(1))  # no subscriber left to offer it to: nothing breaks


async def test_ring_keeps_only_the_newest(clock: WallClock, autojump_clock: trio.testing.MockClock) -> None:
    bus = make_bus(clock, ring_size=2)
    for n in range(4):
        bus.publish(cancelled(n))
    with bus.subscribe(since=2) as subscription:
        assert [event_id(e) for e in subscription.replay] == [3, 4]


# --- the fan-out task (`EventBus.run`) -----------------------------------------------------------------------


def queued(subscription: Subscription) -> list[int]:
    out = []
    while True:
        try:
            out.append(event_id(subscription._receive.receive_nowait()))
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


async def test_with_run_publish_returns_before_any_subscriber_is_offered_then_slices_reach_all_in_order(
    clock: WallClock, autojump_clock: trio.testing.MockClock
) -> None:
    from serve.events import FANOUT_SLICE

    bus = make_bus(clock)
    subscriptions = [bus.subscribe() for _ in range(3 * FANOUT_SLICE + 1)]
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        for n in range(3):
            bus.publish(cancelled(n))
        assert all(queued(s) == [] for s in subscriptions)  # the publisher was not held up
        got: list[list[int]] = [[] for _ in subscriptions]
        while not any(got):  # one scheduling batch at a time, until the fan-out task has run
            await trio.lowlevel.checkpoint()
            got = [queued(s) for s in subscriptions]
        # It offers a slice per batch: the test task ran again long before everyone had the first event.
        assert sum(map(len, got)) <= 2 * FANOUT_SLICE
        await trio.testing.wait_all_tasks_blocked()
        got = [ids + queued(s) for ids, s in zip(got, subscriptions, strict=True)]
        assert got == [[1, 2, 3]] * len(subscriptions)
        nursery.cancel_scope.cancel()


async def test_with_run_a_subscriber_newer_than_an_event_is_not_offered_it(
    clock: WallClock, autojump_clock: trio.testing.MockClock
) -> None:
    bus = make_bus(clock)
    older = bus.subscribe()
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        bus.publish(cancelled(1))
        newer = bus.subscribe()  # its hello counts event 1: offering it too would be a duplicate
        assert newer.last_event_id == 1
        bus.publish(cancelled(2))
        await trio.testing.wait_all_tasks_blocked()
        assert (queued(older), queued(newer)) == ([1, 2], [2])
        nursery.cancel_scope.cancel()


async def test_with_run_close_offers_the_backlog_first_and_cancellation_flushes_it(
    clock: WallClock, autojump_clock: trio.testing.MockClock
) -> None:
    bus = make_bus(clock)
    subscription = bus.subscribe()
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        bus.publish(cancelled(1))
        bus.close()  # offers event 1 at once, then closes; `run` returns by itself
    assert subscription.closed and [event_id(await subscription.receive())] == [1]
    with pytest.raises(SubscriptionClosed):
        await subscription.receive()

    bus = make_bus(clock)
    subscription = bus.subscribe()
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        bus.publish(cancelled(1))
        nursery.cancel_scope.cancel()
    assert queued(subscription) == [1] and not subscription.closed


async def test_a_close_while_an_event_is_half_offered_still_offers_every_event_once_in_order(
    clock: WallClock, autojump_clock: trio.testing.MockClock
) -> None:
    from serve.events import FANOUT_SLICE

    bus = make_bus(clock)
    subscriptions = [bus.subscribe() for _ in range(3 * FANOUT_SLICE)]
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        bus.publish(cancelled(1))
        got: list[list[int]] = [[] for _ in subscriptions]
        while not any(got):  # the fan-out task has offered its first slice of event 1
            await trio.lowlevel.checkpoint()
            got = [ids + queued(s) for ids, s in zip(got, subscriptions, strict=True)]
        assert not all(got)
        bus.publish(cancelled(2))
        bus.close()  # the shutdown: the rest of event 1 first, then event 2, then the closes
    got = [ids + queued(s) for ids, s in zip(got, subscriptions, strict=True)]
    assert got == [[1, 2]] * len(subscriptions)
    assert all(s.closed for s in subscriptions)
