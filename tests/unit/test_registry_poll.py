"""The registry's poller (SPEC §3): pace, slow_down, transient back-off, tick bound, each PollResult, expiry,
cancellation, the sweeper, eviction. Virtual time: t=0 is EPOCH_S; each flow starts at t=0."""

from __future__ import annotations

import logging

import pytest
import trio
from support.registry_fakes import (
    DEVICE_CODE,
    EPOCH_MS,
    Delayed,
    FakeProvider,
    Hang,
    Harness,
    Raise,
    make_authorization,
    open_registry,
    success,
)
from trio.testing import MockClock

from serve.errors import DeviceFlowNotFound
from serve.models import (
    ErrorKind,
    FlowAuthorized,
    FlowCancelled,
    FlowFailed,
    FlowStatus,
    FlowThrottled,
)
from serve.providers.base import PollFailed, PollPending, PollSlowDown, PollTransient
from serve.registry import EXPIRED_HINT, POLLER_FAILED_HINT, SHUTDOWN_HINT, TRANSIENT_HINT

TERMINAL_EVENTS = (FlowAuthorized, FlowFailed, FlowCancelled)


def terminal_events(h: Harness) -> list[object]:
    return [e for e in h.bus.events if isinstance(e, TERMINAL_EVENTS)]


async def start(h: Harness, client_id: str | None = None, provider_id: str = "fake") -> str:
    return (await h.registry.start(provider_id, client_id)).view.device_flow_id


async def test_polls_come_every_interval_and_slow_down_adds_five_seconds(autojump_clock: MockClock) -> None:
    provider = FakeProvider(polls=[PollPending(), PollSlowDown(), success()])
    async with open_registry(provider) as h:
        flow_id = await start(h, "cli-A")
        await trio.sleep(12)
        view = h.registry.get(flow_id)
        assert view.interval_ms == 10_000
        assert view.last_polled_at_ms == EPOCH_MS + 10_000
        await trio.sleep(20)

        assert provider.poll_times == [5, 10, 20]
        assert h.registry.get(flow_id).status is FlowStatus.AUTHORIZED
        [throttled] = h.bus.envelopes[1:2]
        assert throttled.event == FlowThrottled(flow_id, 10_000)
        assert throttled.originator_client_id == "cli-A"
        assert throttled.server_timestamp_ms == EPOCH_MS + 10_000


async def test_slow_down_is_cumulative_takes_a_larger_idp_interval_and_is_clamped(autojump_clock: MockClock) -> None:
    provider = FakeProvider(
        polls=[PollSlowDown(), PollSlowDown(interval=2), PollSlowDown(interval=31), PollSlowDown(interval=1e6)]
    )
    async with open_registry(provider) as h:
        await start(h)
        await trio.sleep(200)
        # 5 → 10 → 15 (the IdP's 2 s is smaller than the bump) → 31 (larger: taken) → 60 (clamped)
        assert provider.poll_times == [5, 15, 30, 61, 121, 181]
        assert [e.interval_ms for e in h.events_of(FlowThrottled)] == [10_000, 15_000, 31_000, 60_000]


async def test_two_transient_faults_then_success_is_authorized(autojump_clock: MockClock) -> None:
    provider = FakeProvider(polls=[PollTransient("HTTP 503"), PollTransient("connection reset"), success()])
    async with open_registry(provider) as h:
        flow_id = await start(h)
        await trio.sleep(100)
        # Back-off interval × 2^n: waits of 10 s then 20 s; no throttled event, the interval unchanged.
        assert provider.poll_times == [5, 15, 35]
        assert h.registry.get(flow_id).status is FlowStatus.AUTHORIZED
        assert h.registry.get(flow_id).interval_ms == 5000
        assert h.events_of(FlowThrottled) == []


async def test_three_transient_faults_in_a_row_end_the_flow_upstream_error(autojump_clock: MockClock) -> None:
    provider = FakeProvider(polls=[PollTransient("HTTP 502")] * 3)
    async with open_registry(provider) as h:
        flow_id = await start(h)
        await trio.sleep(100)

        assert provider.poll_times == [5, 15, 35]
        view = h.registry.get(flow_id)
        assert (view.status, view.error_kind, view.hint) == (FlowStatus.ERROR, ErrorKind.UPSTREAM_ERROR, TRANSIENT_HINT)
        [envelope] = [e for e in h.bus.envelopes if isinstance(e.event, FlowFailed)]
        assert envelope.event == FlowFailed(flow_id, ErrorKind.UPSTREAM_ERROR, FlowStatus.ERROR, TRANSIENT_HINT)
        assert envelope.server_timestamp_ms == EPOCH_MS + 35_000
        assert h.audit[-1].endswith(
            f'clientId=- status=failed errorKind=upstream_error hint="{TRANSIENT_HINT} (3 in a row; last: HTTP 502)"'
        )


async def test_any_oauth_reply_resets_the_transient_count(autojump_clock: MockClock) -> None:
    transient = PollTransient("HTTP 500")
    provider = FakeProvider(polls=[transient, transient, PollPending(), transient, transient, success()])
    async with open_registry(provider) as h:
        flow_id = await start(h)
        await trio.sleep(100)
        assert provider.poll_times == [5, 15, 35, 40, 50, 70]
        assert h.registry.get(flow_id).status is FlowStatus.AUTHORIZED


async def test_the_back_off_is_capped_at_the_maximum_interval(autojump_clock: MockClock) -> None:
    provider = FakeProvider(authorization=make_authorization(interval=20), polls=[PollTransient("HTTP 500")] * 5)
    async with open_registry(provider, max_transient_failures=5) as h:
        await start(h)
        await trio.sleep(500)
        assert provider.poll_times == [20, 60, 120, 180, 240]


async def test_a_hung_poll_tick_is_a_transient_fault_after_thirty_seconds(autojump_clock: MockClock) -> None:
    provider = FakeProvider(polls=[Hang(), success()])
    async with open_registry(provider) as h:
        flow_id = await start(h)
        await trio.sleep(100)
        assert provider.poll_times == [5, 45]  # tick bounded at 35, then a 10 s back-off
        assert h.registry.get(flow_id).status is FlowStatus.AUTHORIZED


@pytest.mark.parametrize(
    ("kind", "hint"),
    [
        (ErrorKind.ACCESS_DENIED, "Qwen IdP returned access_denied"),
        (ErrorKind.INVALID_GRANT, "the IdP rejected the device code (invalid_grant)"),
        (ErrorKind.UPSTREAM_ERROR, "the IdP answered invalid_client"),
    ],
)
async def test_an_oauth_error_ends_the_flow_with_the_providers_kind_and_hint(
    autojump_clock: MockClock, kind: ErrorKind, hint: str
) -> None:
    provider = FakeProvider(polls=[PollPending(), PollFailed(kind, hint)])
    async with open_registry(provider) as h:
        flow_id = await start(h, "cli-A")
        await trio.sleep(100)

        assert provider.poll_times == [5, 10]  # polling stops at the terminal answer
        view = h.registry.get(flow_id)
        assert (view.status, view.error_kind, view.hint) == (FlowStatus.ERROR, kind, hint)
        assert view.last_polled_at_ms == EPOCH_MS + 10_000
        assert view.user_code is None and view.verification_uri is None
        assert h.registry.pending() == []
        [envelope] = [e for e in h.bus.envelopes if isinstance(e.event, FlowFailed)]
        assert envelope.event == FlowFailed(flow_id, kind, FlowStatus.ERROR, hint)
        assert envelope.originator_client_id == "cli-A"
        assert h.audit[-1] == (
            f"[serve] auth.device-flow: provider=fake deviceFlowId={flow_id[:8]}... clientId=cli-A "
            f'status=failed errorKind={kind.value} hint="{hint}"'
        )


async def test_expired_token_from_the_idp_ends_the_flow_expired(autojump_clock: MockClock) -> None:
    hint = "Qwen IdP returned expired_token"
    provider = FakeProvider(polls=[PollFailed(ErrorKind.EXPIRED_TOKEN, hint)])
    async with open_registry(provider) as h:
        flow_id = await start(h)
        await trio.sleep(10)

        view = h.registry.get(flow_id)
        assert (view.status, view.error_kind, view.hint) == (FlowStatus.EXPIRED, ErrorKind.EXPIRED_TOKEN, hint)
        assert terminal_events(h) == [FlowFailed(flow_id, ErrorKind.EXPIRED_TOKEN, FlowStatus.EXPIRED, hint)]
        assert h.audit[-1].endswith(f'status=expired errorKind=expired_token hint="{hint}"')


async def test_the_flows_deadline_expires_it_even_with_the_sweeper_far_away(autojump_clock: MockClock) -> None:
    provider = FakeProvider(authorization=make_authorization(interval=7, expires_in=30))
    async with open_registry(provider, sweep_interval_s=10_000) as h:
        flow_id = await start(h)
        await trio.sleep(29.5)
        assert h.registry.get(flow_id).status is FlowStatus.PENDING
        await trio.sleep(1)

        view = h.registry.get(flow_id)
        assert (view.status, view.error_kind, view.hint) == (FlowStatus.EXPIRED, ErrorKind.EXPIRED_TOKEN, EXPIRED_HINT)
        [envelope] = [e for e in h.bus.envelopes if isinstance(e.event, FlowFailed)]
        assert envelope.event == FlowFailed(flow_id, ErrorKind.EXPIRED_TOKEN, FlowStatus.EXPIRED, EXPIRED_HINT)
        assert envelope.server_timestamp_ms == EPOCH_MS + 30_000
        assert provider.poll_times == [7, 14, 21, 28]
        await trio.sleep(100)
        assert provider.poll_times == [7, 14, 21, 28]  # the poller is gone
        assert h.audit[-1].endswith(f'status=expired errorKind=expired_token hint="{EXPIRED_HINT}"')


async def test_the_deadline_waits_for_a_poll_in_flight_and_an_approval_wins(autojump_clock: MockClock) -> None:
    # Issue 8: the IdP spends the device code when it grants; cutting the request would lose the approval.
    provider = FakeProvider(authorization=make_authorization(expires_in=30), polls=[Delayed(100, success())])
    async with open_registry(provider, poll_timeout_s=300) as h:
        flow_id = await start(h)
        await trio.sleep(50)
        assert h.registry.get(flow_id).status is FlowStatus.PENDING  # past its expiry, the request in flight
        await trio.sleep(150)
        assert h.registry.get(flow_id).status is FlowStatus.AUTHORIZED
        assert h.store.save_started == [105]
        assert [type(e) for e in terminal_events(h)] == [FlowAuthorized]


async def test_a_poll_in_flight_at_the_deadline_that_is_still_pending_ends_expired(autojump_clock: MockClock) -> None:
    provider = FakeProvider(authorization=make_authorization(expires_in=30), polls=[Delayed(100, PollPending())])
    async with open_registry(provider, poll_timeout_s=300) as h:
        flow_id = await start(h)
        await trio.sleep(200)
        view = h.registry.get(flow_id)
        assert (view.status, view.error_kind) == (FlowStatus.EXPIRED, ErrorKind.EXPIRED_TOKEN)
        [event] = terminal_events(h)
        assert isinstance(event, FlowFailed)
        assert h.store.save_started == []


async def test_the_sweeper_expires_a_pending_flow_past_its_deadline(autojump_clock: MockClock) -> None:
    provider = FakeProvider(authorization=make_authorization(interval=7, expires_in=30))
    async with open_registry(provider, sweep_interval_s=10_000) as h:
        flow_id = await start(h, "cli-A")
        await trio.sleep(29)
        # Move past the deadline and sweep before any task runs again (no checkpoint in between), so the
        # sweeper, not the poller's own deadline, is what ends the flow.
        autojump_clock.jump(2)
        h.registry._sweep()

        view = h.registry.get(flow_id)
        assert (view.status, view.error_kind, view.hint) == (FlowStatus.EXPIRED, ErrorKind.EXPIRED_TOKEN, EXPIRED_HINT)
        await trio.sleep(100)
        [envelope] = [e for e in h.bus.envelopes if isinstance(e.event, FlowFailed)]
        assert envelope.event == FlowFailed(flow_id, ErrorKind.EXPIRED_TOKEN, FlowStatus.EXPIRED, EXPIRED_HINT)
        assert envelope.originator_client_id == "cli-A"
        assert provider.poll_times == [7, 14, 21, 28]
        assert len(h.audit_with("status=expired")) == 1


@pytest.mark.parametrize("run", range(8))
async def test_sweeper_deadline_and_poll_reply_at_one_instant_make_one_terminal_event(
    autojump_clock: MockClock, run: int
) -> None:
    # At t=30 the deadline, the sweeper (every 10 s) and an access_denied reply (sent at t=25, 5 s late) meet;
    # Trio orders them at random, so several runs exercise each path. Exactly one of them may end the flow.
    denied = PollFailed(ErrorKind.ACCESS_DENIED, "Qwen IdP returned access_denied")
    polls = [PollPending()] * 4 + [Delayed(5, denied)]
    provider = FakeProvider(authorization=make_authorization(expires_in=30), polls=polls)
    async with open_registry(provider, sweep_interval_s=10) as h:
        flow_id = await start(h)
        await trio.sleep(100)
        [event] = terminal_events(h)
        assert isinstance(event, FlowFailed)
        assert event.status is h.registry.get(flow_id).status
        assert len([line for line in h.audit if "status=started" not in line]) == 1


@pytest.mark.parametrize("run", range(4))
async def test_a_cancel_at_the_instant_a_success_arrives_makes_one_terminal_event(
    autojump_clock: MockClock, run: int
) -> None:
    provider = FakeProvider(polls=[Delayed(5, success())])
    async with open_registry(provider) as h:
        flow_id = await start(h)
        await trio.sleep_until(10)
        h.registry.cancel(flow_id, "cli-B")
        await trio.sleep(10)
        [event] = terminal_events(h)
        if isinstance(event, FlowCancelled):
            assert h.store.save_started == []  # the poll was cancelled: nothing written
        else:
            # The reply won: the cancel was deferred behind the write, and authorized wins.
            assert isinstance(event, FlowAuthorized)
            assert len(h.store.saved) == 1


async def test_a_cancel_during_a_granting_poll_waits_for_it_and_the_approval_wins(autojump_clock: MockClock) -> None:
    # Issue 8: a DELETE while the token request is in flight used to end the flow cancelled although the
    # IdP had granted (device code spent, refresh token orphaned at the IdP).
    provider = FakeProvider(polls=[Delayed(0.5, success())])
    async with open_registry(provider) as h:
        flow_id = await start(h)
        await trio.sleep(5.25)  # the poll went out at t=5; its reply comes at t=5.5
        h.registry.cancel(flow_id, "cli-B")
        assert h.registry.get(flow_id).status is FlowStatus.PENDING
        await trio.sleep(1)

        assert h.registry.get(flow_id).status is FlowStatus.AUTHORIZED
        assert [type(e) for e in terminal_events(h)] == [FlowAuthorized]
        assert len(h.store.saved) == 1
        assert not any("lost_success" in line for line in h.audit)


async def test_a_cancel_during_a_poll_that_is_still_pending_ends_cancelled_by_the_first_canceller(
    autojump_clock: MockClock,
) -> None:
    provider = FakeProvider(polls=[Delayed(2, PollPending())])
    async with open_registry(provider) as h:
        flow_id = await start(h)
        await trio.sleep(5.5)
        h.registry.cancel(flow_id, "cli-B")
        h.registry.cancel(flow_id, "cli-C")
        await trio.sleep(1)
        assert h.registry.get(flow_id).status is FlowStatus.PENDING
        await trio.sleep(1)

        view = h.registry.get(flow_id)
        assert (view.status, view.hint) == (FlowStatus.CANCELLED, None)
        [envelope] = [e for e in h.bus.envelopes if isinstance(e.event, FlowCancelled)]
        assert envelope.originator_client_id == "cli-B"
        assert envelope.server_timestamp_ms == EPOCH_MS + 7_000
        assert provider.poll_times == [5]


async def test_dispose_waits_for_a_granting_poll_and_keeps_the_login(autojump_clock: MockClock) -> None:
    provider = FakeProvider(polls=[Delayed(2, success())])
    async with open_registry(provider) as h:
        flow_id = await start(h)
        await trio.sleep(5.5)
        await h.registry.dispose()

        assert trio.current_time() == 7
        assert h.registry.get(flow_id).status is FlowStatus.AUTHORIZED
        assert len(h.store.saved) == 1


async def test_dispose_bounds_a_hung_poll_by_its_grace_and_ends_the_flow_cancelled(autojump_clock: MockClock) -> None:
    provider = FakeProvider(polls=[Hang()])
    async with open_registry(provider, poll_timeout_s=300) as h:
        flow_id = await start(h)
        await trio.sleep(6)
        await h.registry.dispose()

        assert trio.current_time() == 11  # SPEC §3: at most 5 s past dispose()
        view = h.registry.get(flow_id)
        assert (view.status, view.hint) == (FlowStatus.CANCELLED, SHUTDOWN_HINT)
        assert [type(e) for e in terminal_events(h)] == [FlowCancelled]


async def test_cancel_ends_a_pending_flow_once_and_stops_its_poller(autojump_clock: MockClock) -> None:
    provider = FakeProvider()
    async with open_registry(provider) as h:
        flow_id = await start(h, "cli-A")
        await trio.sleep(7)
        h.registry.cancel(flow_id, "cli-B")
        h.registry.cancel(flow_id, "cli-C")  # terminal: a no-op

        view = h.registry.get(flow_id)
        assert view.status is FlowStatus.CANCELLED
        assert (view.hint, view.error_kind, view.user_code) == (None, None, None)
        assert view.initiator_client_id == "cli-A"
        [envelope] = [e for e in h.bus.envelopes if isinstance(e.event, FlowCancelled)]
        assert envelope.event == FlowCancelled(flow_id)
        assert envelope.originator_client_id == "cli-B"
        assert h.audit[-1] == (
            f"[serve] auth.device-flow: provider=fake deviceFlowId={flow_id[:8]}... clientId=cli-B status=cancelled"
        )
        await trio.sleep(60)
        assert provider.poll_times == [5]
        assert len(terminal_events(h)) == 1
        # The provider's slot is free again: the next start is fresh.
        assert (await h.registry.start("fake", None)).attached is False


async def test_cancelling_a_terminal_flow_changes_nothing(autojump_clock: MockClock) -> None:
    async with open_registry(FakeProvider(polls=[success()])) as h:
        flow_id = await start(h)
        await trio.sleep(10)
        h.registry.cancel(flow_id, None)
        assert h.registry.get(flow_id).status is FlowStatus.AUTHORIZED
        assert len(terminal_events(h)) == 1


async def test_an_unknown_id_is_not_found(autojump_clock: MockClock) -> None:
    async with open_registry() as h:
        with pytest.raises(DeviceFlowNotFound):
            h.registry.get("nope")
        with pytest.raises(DeviceFlowNotFound):
            h.registry.cancel("nope", None)


async def test_a_terminal_flow_is_gone_at_its_grace_even_before_the_sweeper_runs(autojump_clock: MockClock) -> None:
    async with open_registry(sweep_interval_s=10_000) as h:
        flow_id = await start(h)
        await trio.sleep(1)
        h.registry.cancel(flow_id, None)
        await trio.sleep(299.5)
        assert h.registry.get(flow_id).status is FlowStatus.CANCELLED
        await trio.sleep(0.5)
        with pytest.raises(DeviceFlowNotFound):
            h.registry.get(flow_id)
        with pytest.raises(DeviceFlowNotFound):
            h.registry.cancel(flow_id, None)


async def test_the_sweeper_evicts_terminal_flows_after_the_grace(autojump_clock: MockClock) -> None:
    async with open_registry(terminal_grace_s=300, sweep_interval_s=30) as h:
        flow_id = await start(h)
        h.registry.cancel(flow_id, None)
        await trio.sleep(299)
        assert flow_id in h.registry._flows
        await trio.sleep(31)  # the sweep at t=300 evicts it
        assert flow_id not in h.registry._flows


async def test_pending_lists_pending_flows_in_start_order(autojump_clock: MockClock) -> None:
    async with open_registry(FakeProvider("b"), FakeProvider("a"), FakeProvider("c")) as h:
        first = await start(h, provider_id="b")
        await trio.sleep(1)
        second = await start(h, provider_id="a")
        third = await start(h, provider_id="c")
        h.registry.cancel(second, None)
        assert [v.device_flow_id for v in h.registry.pending()] == [first, third]


async def test_a_provider_that_raises_fails_only_its_own_flow(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    broken = FakeProvider("broken", polls=[Raise(RuntimeError(f"bug while polling {DEVICE_CODE}"))])
    healthy = FakeProvider("healthy", polls=[success()])
    async with open_registry(broken, healthy) as h:
        with caplog.at_level(logging.ERROR, logger="serve.registry"):
            broken_id = await start(h, provider_id="broken")
            healthy_id = await start(h, provider_id="healthy")
            await trio.sleep(10)

        view = h.registry.get(broken_id)
        assert (view.status, view.error_kind, view.hint) == (
            FlowStatus.ERROR,
            ErrorKind.UPSTREAM_ERROR,
            POLLER_FAILED_HINT,
        )
        assert h.registry.get(healthy_id).status is FlowStatus.AUTHORIZED
        assert "RuntimeError" in caplog.text
        assert DEVICE_CODE not in caplog.text
