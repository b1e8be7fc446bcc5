"""Success → persist (SPEC §3): disk first, shielded and bounded, deferred cancels, late writes, and dispose.
Virtual time: t=0 is EPOCH_S; each flow starts at t=0 and gets its tokens at the first poll, t=5."""

from __future__ import annotations

import math

import pytest
import trio
from support.registry_fakes import (
    EPOCH_MS,
    FakeProvider,
    FakeStore,
    Harness,
    make_authorization,
    open_registry,
    success,
)
from trio.testing import MockClock

from serve.errors import PersistError, ShuttingDown
from serve.models import Envelope, ErrorKind, FlowAuthorized, FlowCancelled, FlowFailed, FlowStarted, FlowStatus
from serve.registry import PERSIST_FAILED_HINT, SHUTDOWN_HINT


def terminal_envelopes(h: Harness) -> list[Envelope]:
    return [e for e in h.bus.envelopes if not isinstance(e.event, FlowStarted)]


async def start(h: Harness, provider_id: str = "fake", client_id: str | None = "cli-A") -> str:
    return (await h.registry.start(provider_id, client_id)).view.device_flow_id


async def test_success_writes_the_credentials_first_then_the_flow_is_authorized(autojump_clock: MockClock) -> None:
    provider = FakeProvider(polls=[success()])
    async with open_registry(provider, store=FakeStore(delay=2)) as h:
        flow_id = await start(h)
        await trio.sleep(6)
        assert h.registry.get(flow_id).status is FlowStatus.PENDING  # writing: still pending
        assert h.store.save_started == [5]
        await trio.sleep(2)

        view = h.registry.get(flow_id)
        assert view.status is FlowStatus.AUTHORIZED
        assert (view.hint, view.error_kind, view.user_code) == (None, None, None)
        [saved] = h.store.saved
        assert saved.file_name == "oauth_creds.json"
        [envelope] = [e for e in h.bus.envelopes if isinstance(e.event, FlowAuthorized)]
        assert envelope.event == FlowAuthorized(flow_id, "fake", 1_700_003_600_000, "uid:0a1b2c3d")
        assert envelope.server_timestamp_ms == EPOCH_MS + 7000
        assert envelope.originator_client_id == "cli-A"
        assert h.audit[-1] == (
            f"[serve] auth.device-flow: provider=fake deviceFlowId={flow_id[:8]}... clientId=cli-A status=authorized"
        )
        await trio.sleep(60)
        assert provider.poll_times == [5]  # the device code is never polled again after a success


async def test_a_failed_write_is_persist_failed_with_the_detail_in_the_audit_only(autojump_clock: MockClock) -> None:
    store = FakeStore(delay=1, error=PersistError("ENOSPC"))
    async with open_registry(FakeProvider(polls=[success()]), store=store) as h:
        flow_id = await start(h)
        await trio.sleep(10)

        view = h.registry.get(flow_id)
        assert (view.status, view.error_kind, view.hint) == (
            FlowStatus.ERROR,
            ErrorKind.PERSIST_FAILED,
            PERSIST_FAILED_HINT,
        )
        assert [e.event for e in terminal_envelopes(h)] == [
            FlowFailed(flow_id, ErrorKind.PERSIST_FAILED, FlowStatus.ERROR, PERSIST_FAILED_HINT)
        ]
        assert not any("ENOSPC" in encoded for encoded in h.bus.encoded)
        assert h.audit[-1].endswith(
            f'clientId=cli-A status=failed errorKind=persist_failed hint="{PERSIST_FAILED_HINT} (ENOSPC)"'
        )


async def test_a_hung_write_fails_at_its_bound_and_can_no_longer_land(autojump_clock: MockClock) -> None:
    # Issue 8: the reported outcome follows what is on disk; a write given up on must not land afterwards.
    async with open_registry(FakeProvider(polls=[success()]), store=FakeStore(delay=40)) as h:
        flow_id = await start(h)
        await trio.sleep(34.5)
        assert h.registry.get(flow_id).status is FlowStatus.PENDING
        await trio.sleep(1)

        assert h.registry.get(flow_id).error_kind is ErrorKind.PERSIST_FAILED
        [envelope] = terminal_envelopes(h)
        assert envelope.server_timestamp_ms == EPOCH_MS + 35_000
        assert h.audit[-1].endswith(f'hint="{PERSIST_FAILED_HINT} (the write did not finish in time)"')

        await trio.sleep(10)  # the write, left running in the registry's nursery, ends at t=45: abandoned
        assert h.store.save_finished == [45]
        assert h.store.saved == []
        assert h.registry.get(flow_id).status is FlowStatus.ERROR  # one terminal state, one event
        assert len(terminal_envelopes(h)) == 1


async def test_a_writing_flow_reads_pending_past_its_expiry(autojump_clock: MockClock) -> None:
    provider = FakeProvider(authorization=make_authorization(interval=25, expires_in=30), polls=[success()])
    async with open_registry(provider, store=FakeStore(delay=10), sweep_interval_s=1) as h:
        flow_id = await start(h)
        await trio.sleep(32)  # the write runs from t=25 to t=35; the deadline t=30 and sweeps pass
        assert h.registry.get(flow_id).status is FlowStatus.PENDING
        assert [v.device_flow_id for v in h.registry.pending()] == [flow_id]
        await trio.sleep(5)
        assert h.registry.get(flow_id).status is FlowStatus.AUTHORIZED
        assert len(terminal_envelopes(h)) == 1


async def test_a_cancel_during_the_write_is_deferred_and_authorized_wins(autojump_clock: MockClock) -> None:
    async with open_registry(FakeProvider(polls=[success()]), store=FakeStore(delay=3)) as h:
        flow_id = await start(h)
        await trio.sleep(6)
        h.registry.cancel(flow_id, "cli-B")
        assert h.registry.get(flow_id).status is FlowStatus.PENDING
        await trio.sleep(3)

        assert h.registry.get(flow_id).status is FlowStatus.AUTHORIZED
        assert [type(e.event) for e in terminal_envelopes(h)] == [FlowAuthorized]
        assert len(h.store.saved) == 1


async def test_a_cancel_during_a_failing_write_ends_cancelled_by_the_first_canceller(
    autojump_clock: MockClock,
) -> None:
    store = FakeStore(delay=3, error=PersistError("EACCES"))
    async with open_registry(FakeProvider(polls=[success()]), store=store) as h:
        flow_id = await start(h)
        await trio.sleep(6)
        h.registry.cancel(flow_id, "cli-B")
        await trio.sleep(1)
        h.registry.cancel(flow_id, "cli-C")
        await trio.sleep(2)

        view = h.registry.get(flow_id)
        assert (view.status, view.error_kind, view.hint) == (FlowStatus.CANCELLED, None, None)
        [envelope] = terminal_envelopes(h)
        assert envelope.event == FlowCancelled(flow_id)
        assert envelope.originator_client_id == "cli-B"
        assert h.audit[-1].endswith(
            'clientId=cli-B status=cancelled hint="cancelled during persist; credentials not written (EACCES)"'
        )


async def test_a_cancel_during_a_write_that_times_out_ends_cancelled(autojump_clock: MockClock) -> None:
    async with open_registry(FakeProvider(polls=[success()]), store=FakeStore(delay=40)) as h:
        flow_id = await start(h)
        await trio.sleep(10)
        h.registry.cancel(flow_id, None)
        await trio.sleep(26)
        assert h.registry.get(flow_id).status is FlowStatus.CANCELLED
        assert h.audit[-1].endswith(
            'hint="cancelled during persist; credentials not written (the write did not finish in time)"'
        )
        await trio.sleep(10)
        assert h.store.saved == []  # given up on, so it never lands


async def test_dispose_cancels_pending_flows_and_lets_a_write_in_flight_finish(autojump_clock: MockClock) -> None:
    waiting = FakeProvider("waiting")
    writing = FakeProvider("writing", polls=[success()])
    async with open_registry(waiting, writing, store=FakeStore(delay=3)) as h:
        waiting_id = await start(h, "waiting", "cli-A")
        writing_id = await start(h, "writing", "cli-A")
        await trio.sleep(6)
        await h.registry.dispose()

        assert trio.current_time() == 8  # returned once the write landed
        assert h.registry.shutting_down
        assert h.registry.get(waiting_id).status is FlowStatus.CANCELLED
        assert h.registry.get(waiting_id).hint == SHUTDOWN_HINT
        assert h.registry.get(writing_id).status is FlowStatus.AUTHORIZED
        cancelled, authorized = terminal_envelopes(h)
        assert cancelled.event == FlowCancelled(waiting_id)
        assert cancelled.originator_client_id is None
        assert isinstance(authorized.event, FlowAuthorized) and authorized.event.device_flow_id == writing_id
        assert f'status=cancelled hint="{SHUTDOWN_HINT}"' in h.audit_with(waiting_id[:8])[-1]
        with pytest.raises(ShuttingDown):
            await h.registry.start("waiting", None)
        await trio.sleep(100)
        assert waiting.poll_times == [5]


async def test_dispose_waits_at_most_five_seconds_for_a_hung_write(autojump_clock: MockClock) -> None:
    store = FakeStore(delay=math.inf)
    async with open_registry(FakeProvider(polls=[success()]), store=store) as h:
        flow_id = await start(h)
        await trio.sleep(6)
        await h.registry.dispose()

        assert trio.current_time() == 11
        view = h.registry.get(flow_id)
        assert (view.status, view.error_kind) == (FlowStatus.ERROR, ErrorKind.PERSIST_FAILED)
        assert len(terminal_envelopes(h)) == 1


async def test_dispose_bounds_a_write_that_outlived_its_flow(autojump_clock: MockClock) -> None:
    async with open_registry(FakeProvider(polls=[success()]), store=FakeStore(delay=38)) as h:
        await start(h)
        await trio.sleep(36)  # persist_failed at t=35, the write still running until t=43
        await h.registry.dispose()
        assert trio.current_time() == 41  # the 5 s grace counts from dispose()
        assert h.store.saved == []


async def test_a_write_given_up_on_does_not_land_even_within_the_shutdown_grace(autojump_clock: MockClock) -> None:
    # Issue 8: the flow reported persist_failed at t=35, so the file must not hold the tokens afterwards.
    async with open_registry(FakeProvider(polls=[success()]), store=FakeStore(delay=38)) as h:
        flow_id = await start(h)
        await trio.sleep(39)
        await h.registry.dispose()
        assert trio.current_time() == 43
        assert h.store.saved == []
        assert h.registry.get(flow_id).error_kind is ErrorKind.PERSIST_FAILED


async def test_dispose_fails_starts_in_flight_with_shutting_down(autojump_clock: MockClock) -> None:
    async with open_registry(FakeProvider(start_delay=10)) as h:
        async with trio.open_nursery() as nursery:

            async def post() -> None:
                with pytest.raises(ShuttingDown):
                    await h.registry.start("fake", None)

            nursery.start_soon(post)
            nursery.start_soon(post)
            await trio.sleep(1)
            await h.registry.dispose()
        assert trio.current_time() == 1
        assert h.bus.envelopes == [] and h.registry.pending() == []
