"""DeviceFlowRegistry.start (SPEC §3): the per-provider singleton, coalescing, the cap, the start bound,
the start rate, and the clamps applied to the IdP's numbers. Virtual time: t=0 is EPOCH_S."""

from __future__ import annotations

import math

import pytest
import trio
from support.registry_fakes import EPOCH_MS, FakeProvider, Harness, make_authorization, open_registry
from trio.testing import MockClock

from serve.errors import RateLimited, ShuttingDown, TooManyActiveFlows, UnsupportedProvider, UpstreamError
from serve.models import FlowStarted, FlowStatus, StartOutcome
from serve.registry import START_TIMEOUT_MESSAGE


def only_line(h: Harness) -> str:
    assert len(h.audit) == 1, h.audit
    return h.audit[0]


async def test_a_fresh_start_is_the_initiators_pending_flow(autojump_clock: MockClock) -> None:
    async with open_registry() as h:
        outcome = await h.registry.start("fake", "cli-A")

        view = outcome.view
        assert outcome.attached is False
        assert view.status is FlowStatus.PENDING
        assert view.provider_id == "fake"
        assert view.created_at_ms == EPOCH_MS
        assert view.expires_at_ms == EPOCH_MS + 600_000
        assert view.interval_ms == 5000
        assert view.initiator_client_id == "cli-A"
        assert (view.user_code, view.verification_uri) == ("USER-0001", "https://idp.example/device")
        assert view.verification_uri_complete == "https://idp.example/device?user_code=USER-0001"
        assert view.last_polled_at_ms is None
        assert h.registry.get(view.device_flow_id) == view
        assert h.registry.pending() == [view]
        assert h.providers["fake"].start_times == [0]

        [envelope] = h.bus.envelopes
        assert envelope.event == FlowStarted(view.device_flow_id, "fake", EPOCH_MS + 600_000)
        assert envelope.originator_client_id == "cli-A"
        assert only_line(h) == (
            f"[serve] auth.device-flow: provider=fake deviceFlowId={view.device_flow_id[:8]}... "
            "clientId=cli-A status=started expiresInMs=600000"
        )


async def test_take_over_attaches_to_the_pending_flow_without_an_idp_call(autojump_clock: MockClock) -> None:
    async with open_registry() as h:
        first = await h.registry.start("fake", None)
        await trio.sleep(7)
        again = await h.registry.start("fake", "other-client")

        assert again.attached is True
        assert again.view.device_flow_id == first.view.device_flow_id
        assert again.view.expires_at_ms == first.view.expires_at_ms  # fixed once, at start
        assert again.view.initiator_client_id is None
        assert h.providers["fake"].start_times == [0]
        assert len(h.bus.envelopes) == 1  # a take-over is no event
        assert h.audit[1] == (
            f"[serve] auth.device-flow: provider=fake deviceFlowId={first.view.device_flow_id[:8]}... "
            'clientId=other-client status=started hint="take-over (per-provider singleton; original initiator=(none))"'
        )


async def test_take_over_names_the_original_initiator_and_the_initiator_itself_is_not_audited(
    autojump_clock: MockClock,
) -> None:
    async with open_registry() as h:
        await h.registry.start("fake", "cli-A")
        assert (await h.registry.start("fake", "cli-A")).attached is True
        assert len(h.audit) == 1
        await h.registry.start("fake", None)
        assert h.audit[1].endswith(
            'clientId=- status=started hint="take-over (per-provider singleton; original initiator=cli-A)"'
        )


async def test_ten_concurrent_starts_make_exactly_one_idp_call(autojump_clock: MockClock) -> None:
    outcomes: dict[str, StartOutcome] = {}

    async def post(client_id: str) -> None:
        outcomes[client_id] = await h.registry.start("fake", client_id)

    async with open_registry(FakeProvider(start_delay=1)) as h:
        async with trio.open_nursery() as nursery:
            for n in range(10):
                nursery.start_soon(post, f"c{n}")

        assert h.providers["fake"].start_times == [0]
        assert len({o.view.device_flow_id for o in outcomes.values()}) == 1
        [initiator] = [client for client, o in outcomes.items() if not o.attached]
        assert all(o.view.initiator_client_id == initiator for o in outcomes.values())
        assert len(h.events_of(FlowStarted)) == 1
        assert len(h.audit_with("take-over")) == 9


async def test_the_cap_counts_starts_in_flight(autojump_clock: MockClock) -> None:
    providers = [FakeProvider(f"p{n}", start_delay=1) for n in range(5)]
    results: dict[str, StartOutcome | Exception] = {}

    async def post(provider_id: str) -> None:
        try:
            results[provider_id] = await h.registry.start(provider_id, None)
        except TooManyActiveFlows as exc:
            results[provider_id] = exc

    async with open_registry(*providers, max_active=4) as h:
        async with trio.open_nursery() as nursery:
            for p in providers:
                nursery.start_soon(post, p.provider_id)

        rejected = [r for r in results.values() if isinstance(r, TooManyActiveFlows)]
        assert len(rejected) == 1
        assert rejected[0].retry_after_s == 30  # the earliest slot: a start's own 30 s bound
        assert sum(len(p.start_times) for p in providers) == 4
        assert len(h.registry.pending()) == 4


async def test_retry_after_is_the_time_to_the_earliest_active_deadline(autojump_clock: MockClock) -> None:
    async with open_registry(FakeProvider("a"), FakeProvider("b"), max_active=1) as h:
        await h.registry.start("a", None)
        await trio.sleep(100.25)
        with pytest.raises(TooManyActiveFlows) as caught:
            await h.registry.start("b", None)
        assert caught.value.retry_after_s == 500  # 499.75 s, rounded up
        assert h.providers["b"].start_times == []


async def test_a_hung_start_times_out_at_thirty_seconds_and_frees_its_slot(autojump_clock: MockClock) -> None:
    hung = FakeProvider("hung", start_hang=True)
    async with open_registry(hung, FakeProvider("other"), max_active=1) as h:
        errors: list[tuple[float, str]] = []

        async def post() -> None:
            with pytest.raises(UpstreamError) as caught:
                await h.registry.start("hung", None)
            errors.append((trio.current_time(), caught.value.message))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(post)
            nursery.start_soon(post)  # coalesced: the same IdP call, the same outcome
            await trio.sleep(10)
            with pytest.raises(TooManyActiveFlows) as full:
                await h.registry.start("other", None)
            assert full.value.retry_after_s == 20

        assert errors == [(30, START_TIMEOUT_MESSAGE)] * 2
        assert hung.start_times == [0]
        assert (await h.registry.start("other", None)).attached is False
        started = h.bus.envelopes[0].event
        assert isinstance(started, FlowStarted) and started.device_flow_id == h.registry.pending()[0].device_flow_id


async def test_an_idp_start_error_reaches_every_waiter_and_frees_the_slot(autojump_clock: MockClock) -> None:
    provider = FakeProvider(start_delay=1, start_error=UpstreamError("Qwen IdP device authorization request failed"))
    async with open_registry(provider, max_active=1) as h:
        messages: list[str] = []

        async def post() -> None:
            with pytest.raises(UpstreamError) as caught:
                await h.registry.start("fake", None)
            messages.append(caught.value.message)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(post)

        assert messages == ["Qwen IdP device authorization request failed"] * 3
        assert provider.start_times == [0]
        assert h.bus.envelopes == [] and h.audit == []
        provider.start_error = None
        assert (await h.registry.start("fake", None)).attached is False


async def test_a_provider_that_raises_anything_else_is_an_upstream_error(autojump_clock: MockClock) -> None:
    async with open_registry(FakeProvider(start_error=RuntimeError("provider bug"))) as h:
        with pytest.raises(UpstreamError) as caught:
            await h.registry.start("fake", None)
        assert caught.value.message == UpstreamError.default_message


async def test_a_caller_that_goes_away_does_not_cancel_the_start_for_the_others(autojump_clock: MockClock) -> None:
    async with open_registry(FakeProvider(start_delay=5)) as h:
        joined: list[StartOutcome] = []

        async def impatient() -> None:
            with trio.move_on_after(1):
                await h.registry.start("fake", "impatient")

        async def patient() -> None:
            await trio.sleep(0.5)
            joined.append(await h.registry.start("fake", "patient"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(impatient)
            nursery.start_soon(patient)

        [outcome] = joined
        assert trio.current_time() == 5
        assert outcome.attached is True
        assert outcome.view.initiator_client_id == "impatient"  # the first caller initiated it
        assert h.providers["fake"].start_times == [0]


async def test_fresh_starts_are_rate_limited_per_sliding_minute(autojump_clock: MockClock) -> None:
    async with open_registry(max_starts_per_minute=3) as h:
        for _ in range(3):
            view = (await h.registry.start("fake", None)).view
            h.registry.cancel(view.device_flow_id, None)
            await trio.sleep(1)
        with pytest.raises(RateLimited) as caught:
            await h.registry.start("fake", None)
        assert caught.value.retry_after_s == 57  # the t=0 start leaves the window at t=60
        assert len(h.providers["fake"].start_times) == 3

        await trio.sleep_until(60)
        pending = await h.registry.start("fake", "a")
        # A take-over is no fresh IdP start: never rate limited.
        assert (await h.registry.start("fake", "b")).view == pending.view


async def test_an_unknown_provider_is_unsupported_listing_the_configured_ones_in_order(
    autojump_clock: MockClock,
) -> None:
    async with open_registry(FakeProvider("zeta"), FakeProvider("alpha")) as h:
        assert h.registry.supported_providers == ["zeta", "alpha"]
        with pytest.raises(UnsupportedProvider) as caught:
            await h.registry.start("github", None)
        assert caught.value.supported == ["zeta", "alpha"]


async def test_starts_after_dispose_are_refused(autojump_clock: MockClock) -> None:
    async with open_registry() as h:
        assert h.registry.shutting_down is False
        await h.registry.dispose()
        assert h.registry.shutting_down is True
        with pytest.raises(ShuttingDown):
            await h.registry.start("fake", None)


@pytest.mark.parametrize(
    ("idp_interval", "interval_ms"),
    [
        (None, 5000),
        (0, 5000),
        (-3, 5000),
        (math.nan, 5000),
        (0.2, 1000),
        (7, 7000),
        (1e9, 60_000),
        (math.inf, 60_000),
    ],
)
async def test_the_idp_interval_is_defaulted_and_clamped(
    autojump_clock: MockClock, idp_interval: float | None, interval_ms: int
) -> None:
    provider = FakeProvider(authorization=make_authorization(interval=idp_interval))
    async with open_registry(provider) as h:
        view = (await h.registry.start("fake", None)).view
        assert view.interval_ms == interval_ms
        await trio.sleep(interval_ms / 1000 + 0.5)
        assert provider.poll_times == [interval_ms / 1000]  # the first poll comes one interval after start


@pytest.mark.parametrize(
    ("expires_in", "lifetime_ms"),
    [
        (None, 600_000),
        (math.nan, 600_000),
        (math.inf, 600_000),
        (0, 600_000),
        (-5, 600_000),
        (0.5, 30_000),
        (120, 120_000),
        (1e12, 3_600_000),
    ],
)
async def test_expires_in_is_defaulted_and_clamped(
    autojump_clock: MockClock, expires_in: float | None, lifetime_ms: int
) -> None:
    provider = FakeProvider(authorization=make_authorization(expires_in=expires_in))
    async with open_registry(provider) as h:
        view = (await h.registry.start("fake", None)).view
        assert view.expires_at_ms == EPOCH_MS + lifetime_ms
        assert h.audit[0].endswith(f"status=started expiresInMs={lifetime_ms}")
        await trio.sleep(lifetime_ms / 1000 - 0.5)
        assert h.registry.get(view.device_flow_id).status is FlowStatus.PENDING
        await trio.sleep(1)
        assert h.registry.get(view.device_flow_id).status is FlowStatus.EXPIRED
