"""No device code, PKCE verifier or token ever leaves the registry (SPEC §3 "Secrets").

Every way a flow can go is driven with the well-known secrets of `support.registry_fakes`; then every encoded event, every
audit line, every log record, every exception the registry raised and every view (as the wire renders it)
is searched for them.
"""

from __future__ import annotations

import logging

import pytest
import trio
from support.registry_fakes import (
    ACCESS_TOKEN,
    DEVICE_CODE,
    REFRESH_TOKEN,
    VERIFIER,
    FakeProvider,
    FakeStore,
    Harness,
    Raise,
    make_authorization,
    open_registry,
    success,
)
from trio.testing import MockClock

from serve import wire
from serve.errors import PersistError, ServeError, UpstreamError
from serve.models import ErrorKind, FlowStatus, FlowView
from serve.providers.base import PollFailed, PollPending, PollSlowDown, PollTransient

SECRETS = (DEVICE_CODE, VERIFIER, ACCESS_TOKEN, REFRESH_TOKEN)


def exposed_text(h: Harness, views: list[FlowView], errors: list[BaseException]) -> list[str]:
    """Everything a client, a subscriber or an operator can read."""
    texts = [*h.bus.encoded, *h.audit]
    for view in views:
        texts += [repr(view), wire.dumps(wire.flow_body(view, view.initiator_client_id))]
    for error in errors:
        texts += [str(error), repr(error), repr(error.args)]
        if isinstance(error, ServeError):
            texts.append(wire.dumps(wire.error_body(error)))
    return texts


async def test_no_flow_outcome_exposes_a_secret(autojump_clock: MockClock, caplog: pytest.LogCaptureFixture) -> None:
    providers = [
        FakeProvider("ok", polls=[PollPending(), PollSlowDown(), PollTransient("HTTP 503"), success()]),
        FakeProvider("denied", polls=[PollFailed(ErrorKind.ACCESS_DENIED, "Qwen IdP returned access_denied")]),
        FakeProvider("gone", authorization=make_authorization(expires_in=30)),
        FakeProvider("cancelled"),
        FakeProvider("flaky", polls=[PollTransient("HTTP 500")] * 3),
        FakeProvider("broken", polls=[Raise(RuntimeError(f"provider bug quoting {DEVICE_CODE}"))]),
        FakeProvider("unreachable", start_error=RuntimeError(f"start bug quoting {VERIFIER}")),
        FakeProvider("rejected", start_error=UpstreamError("Qwen IdP device authorization request failed")),
        FakeProvider("shutdown"),
    ]
    errors: list[BaseException] = []
    views: list[FlowView] = []
    texts: list[str] = []
    caplog.set_level(logging.DEBUG)

    async with open_registry(*providers, max_active=10) as h:
        ids = {}
        for provider in providers:
            try:
                outcome = await h.registry.start(provider.provider_id, "cli-A")
            except ServeError as exc:
                errors.append(exc)
                continue
            ids[provider.provider_id] = outcome.view.device_flow_id
            views.append(outcome.view)
        views.append((await h.registry.start("ok", "cli-B")).view)  # a take-over
        await trio.sleep(3)
        h.registry.cancel(ids["cancelled"], "cli-B")
        await trio.sleep(100)
        views += h.registry.pending()
        await h.registry.dispose()
        views += [h.registry.get(flow_id) for flow_id in ids.values()]

        statuses = {provider_id: h.registry.get(flow_id).status for provider_id, flow_id in ids.items()}
        assert statuses == {
            "ok": FlowStatus.AUTHORIZED,
            "denied": FlowStatus.ERROR,
            "gone": FlowStatus.EXPIRED,
            "cancelled": FlowStatus.CANCELLED,
            "flaky": FlowStatus.ERROR,
            "broken": FlowStatus.ERROR,
            "shutdown": FlowStatus.CANCELLED,
        }
        # The secrets were really in play: the IdP saw the device code, the store got the tokens.
        assert DEVICE_CODE in providers[0].polled_codes
        assert len(h.store.saved) == 1
        # Terminal flows dropped their secrets at once.
        for flow in h.registry._flows.values():
            assert flow.authorization is None and flow.persist is None
            texts.append(repr(flow))
        texts += exposed_text(h, views, errors)

    async with open_registry(FakeProvider(polls=[success()]), store=FakeStore(error=PersistError("EIO"))) as h:
        flow_id = (await h.registry.start("fake", None)).view.device_flow_id
        await trio.sleep(10)
        assert h.registry.get(flow_id).error_kind is ErrorKind.PERSIST_FAILED
        texts += exposed_text(h, [h.registry.get(flow_id)], [])

    texts += [record.getMessage() for record in caplog.records]
    texts.append(caplog.text)
    assert len(errors) == 2
    for secret in SECRETS:
        leaks = [text for text in texts if secret in text]
        assert leaks == [], f"{secret} leaked"
