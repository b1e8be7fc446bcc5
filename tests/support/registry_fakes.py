"""Thread-free fakes for registry tests: a scripted provider, a credential store and a recording bus.

No worker threads anywhere: under pytest-trio's autojump clock a thread lets virtual time jump while it
runs (STACK-NOTES), so a "slow" write is a `trio.sleep` here.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from serve.audit import Audit
from serve.clock import WallClock
from serve.config import DeviceFlowConfig
from serve.credentials import CommitGate, Credentials
from serve.errors import PersistError
from serve.events import EventBus
from serve.models import AuthEvent, CredentialSummary, Envelope
from serve.providers.base import DeviceAuthorization, PollPending, PollResult, PollSuccess
from serve.registry import DeviceFlowRegistry
from serve.secrets import Secret
from serve.wire import encode_envelope

DEVICE_CODE = "dc-SECRET-7f3a9c41e2b8d605"
VERIFIER = "pkce-VERIFIER-Qx8_vL2mN4pR6tY0wZ3bC5dF7gH9jK1"
ACCESS_TOKEN = "at-TOKEN-5e6f7a8b9c0d"
REFRESH_TOKEN = "rt-TOKEN-1a2b3c4d5e6f"


def make_authorization(
    *,
    interval: float | None = 5,
    expires_in: float | None = 600,
    user_code: str = "USER-0001",
    complete: str | None = "https://idp.example/device?user_code=USER-0001",
) -> DeviceAuthorization:
    """A device authorization carrying the well-known secret device code and verifier."""
    return DeviceAuthorization(
        device_code=Secret(DEVICE_CODE),
        user_code=user_code,
        verification_uri="https://idp.example/device",
        verification_uri_complete=complete,
        expires_in=expires_in,
        interval=interval,
        code_verifier=Secret(VERIFIER),
    )


def make_credentials(
    *, expires_at_ms: int | None = 1_700_003_600_000, alias: str | None = "uid:0a1b2c3d"
) -> Credentials:
    return Credentials(
        file_name="oauth_creds.json",
        document=Secret({"access_token": ACCESS_TOKEN, "refresh_token": REFRESH_TOKEN, "token_type": "Bearer"}),
        expires_at_ms=expires_at_ms,
        account_alias=alias,
    )


def success() -> PollSuccess:
    return PollSuccess(make_credentials())


@dataclass(frozen=True, slots=True)
class Delayed:
    """A poll step that takes `seconds` of (virtual) time before answering `result`."""

    seconds: float
    result: PollResult


@dataclass(frozen=True, slots=True)
class Gated:
    """A poll step that answers `result` once the test sets `gate`."""

    gate: trio.Event
    result: PollResult


@dataclass(frozen=True, slots=True)
class Hang:
    """A poll step that never answers (the registry's tick bound must end it)."""


@dataclass(frozen=True, slots=True)
class Raise:
    """A poll step that raises: a provider breaking its never-raise contract."""

    error: Exception


PollStep = PollResult | Delayed | Gated | Hang | Raise


class FakeProvider:
    """A `DeviceFlowProvider` that answers from a script and records when it was called.

    `start()` waits `start_delay` then returns `authorization` (or raises `start_error`; `start_hang`
    never returns). `poll()` plays `polls` in order, then answers `authorization_pending` forever.
    """

    def __init__(
        self,
        provider_id: str = "fake",
        *,
        polls: Iterable[PollStep] = (),
        authorization: DeviceAuthorization | None = None,
        start_delay: float = 0,
        start_error: Exception | None = None,
        start_hang: bool = False,
    ) -> None:
        self._provider_id = provider_id
        self.authorization = authorization if authorization is not None else make_authorization()
        self.script: list[PollStep] = list(polls)
        self.start_delay = start_delay
        self.start_error = start_error
        self.start_hang = start_hang
        self.start_times: list[float] = []
        self.poll_times: list[float] = []
        self.polled_codes: list[str] = []

    @property
    def provider_id(self) -> str:
        return self._provider_id

    @property
    def credentials_file(self) -> str:
        return f"device-flow/{self._provider_id}.json"

    async def start(self) -> DeviceAuthorization:
        self.start_times.append(trio.current_time())
        if self.start_hang:
            await trio.sleep_forever()
        await trio.sleep(self.start_delay)
        if self.start_error is not None:
            raise self.start_error
        return self.authorization

    async def poll(self, authorization: DeviceAuthorization) -> PollResult:
        self.poll_times.append(trio.current_time())
        self.polled_codes.append(authorization.device_code.reveal())
        step = self.script.pop(0) if self.script else PollPending()
        match step:
            case Delayed(seconds=seconds, result=result):
                await trio.sleep(seconds)
                return result
            case Gated(gate=gate, result=result):
                await gate.wait()
                return result
            case Hang():
                await trio.sleep_forever()
                raise AssertionError("unreachable")
            case Raise(error=error):
                raise error
        await trio.lowlevel.checkpoint()
        return step


class FakeStore:
    """A thread-free `CredentialStore`: each save waits `delay` (math.inf: forever), then fails with
    `error` if set, else keeps the credentials. Records when each save began and ended."""

    def __init__(self, *, delay: float = 0, error: PersistError | None = None) -> None:
        self.delay = delay
        self.error = error
        self.saved: list[Credentials] = []
        self.save_started: list[float] = []
        self.save_finished: list[float] = []

    async def save(self, credentials: Credentials, *, gate: CommitGate | None = None) -> None:
        self.save_started.append(trio.current_time())
        if math.isinf(self.delay):
            await trio.sleep_forever()
        await trio.sleep(self.delay)
        self.save_finished.append(trio.current_time())
        if self.error is not None:
            raise self.error
        # As the real store: the file is replaced only if the caller has not given up on the write.
        if gate is not None and not gate.begin_commit():
            raise PersistError("abandoned")
        self.saved.append(credentials)

    def summary(self, file_name: str) -> CredentialSummary | None:
        return None


class RecordingBus(EventBus):
    """The real bus, remembering every envelope and its one JSON encoding."""

    def __init__(self, *, clock: WallClock) -> None:
        super().__init__(clock=clock)
        self.envelopes: list[Envelope] = []
        self.encoded: list[str] = []

    def publish(self, event: AuthEvent, originator_client_id: str | None = None) -> Envelope:
        envelope = super().publish(event, originator_client_id)
        self.envelopes.append(envelope)
        self.encoded.append(encode_envelope(envelope))
        return envelope

    @property
    def events(self) -> list[AuthEvent]:
        return [envelope.event for envelope in self.envelopes]


E = TypeVar("E")

EPOCH_S = 1_700_000_000  # the wall time at Trio's virtual t=0: wire times are exact
EPOCH_MS = EPOCH_S * 1000


@dataclass(slots=True)
class Harness:
    """A running registry and everything it talks to."""

    registry: DeviceFlowRegistry
    bus: RecordingBus
    audit: list[str]
    store: FakeStore
    clock: WallClock
    providers: dict[str, FakeProvider]

    def events_of(self, kind: type[E]) -> list[E]:
        return [event for event in self.bus.events if isinstance(event, kind)]

    def audit_with(self, needle: str) -> list[str]:
        return [line for line in self.audit if needle in line]


@asynccontextmanager
async def open_registry(
    *providers: FakeProvider,
    store: FakeStore | None = None,
    limit_s: float = 7200,
    **device_flow: Any,
) -> AsyncIterator[Harness]:
    """Run a registry over fake providers (default: one `FakeProvider("fake")`) with `[device_flow]`
    overrides, bounded by `limit_s` of virtual time; leaving the block disposes it."""
    with trio.fail_after(limit_s):
        clock = WallClock(epoch_offset_s=EPOCH_S)
        fakes = {p.provider_id: p for p in providers or (FakeProvider(),)}
        bus = RecordingBus(clock=clock)
        lines: list[str] = []
        store = store or FakeStore()
        registry = DeviceFlowRegistry(
            providers=fakes,
            store=store,
            bus=bus,
            config=DeviceFlowConfig(**device_flow),
            clock=clock,
            audit=Audit(lines.append),
        )
        harness = Harness(registry, bus, lines, store, clock, fakes)
        async with trio.open_nursery() as nursery:
            await nursery.start(harness.registry.run)
            try:
                yield harness
            finally:
                await harness.registry.dispose()
