"""DeviceFlowRegistry (SPEC §3): every device flow the daemon brokers, from the IdP start to its end.

One nursery, opened by `run()`, owns the sweeper, the IdP starts in flight, one poller per flow and the
credential writes; `dispose()` ends them all. The states of one provider's login:

    start() ── a flow of that provider is pending: take it over (attached, no IdP call)
       │    ── a start of that provider is in flight: wait for it (coalesced, attached)
       ▼
    STARTING ── IdP error / start_timeout_s / dispose() ──► no flow (UpstreamError / ShuttingDown)
       │ device authorization: interval and expires_in clamped, deadline fixed
       ▼
    PENDING ◄── authorization_pending (wait one interval)
       │    ◄── slow_down (interval + 5 s, `throttled` event)
       │    ◄── transient fault (back-off interval × 2^n, no event)
       │
       ├── access_denied / invalid_grant / other error ───────────► ERROR (the provider's kind)
       ├── max_transient_failures transient faults in a row ──────► ERROR upstream_error
       ├── expired_token / the flow's deadline / the sweeper ─────► EXPIRED expired_token
       ├── cancel() / dispose() ──────────────────────────────────► CANCELLED
       │
       │   While a token request is in flight (shielded, ≤ poll_timeout_s) or the credentials are being
       │   written, the flow is busy: cancel(), dispose() and the flow's expiry wait for that step
       │   (deferred; the first canceller is kept), because the IdP has spent the device code by then.
       │
       └── success ──► PERSISTING  (reads `pending`; shielded, ≤ persist_timeout_s)
                          ├── write landed (even after a deferred cancel) ► AUTHORIZED
                          ├── write failed or gave up on, cancel deferred ► CANCELLED (first canceller)
                          └── write failed or gave up on ─────────────► ERROR persist_failed

A write given up on (its bound passed) can no longer land: its `CommitGate` is abandoned, so the outcome
the flow reports is what is on disk.

Every failed start and every failed poll also writes one WARNING line to the `serve.registry` logger
(stderr in the CLI), naming the provider, the flow (a failed start has none yet), the failure's class and
its safe detail, and the hint saying what to fix (see `serve.errors.Diagnosis`):

    device-flow start failed: provider=acme deviceFlowId=- (no flow yet) failure=client_rejected
        detail="HTTP 401 error=invalid_client from 127.0.0.1:41234" hint="the identity provider rejected ..."

    AUTHORIZED | EXPIRED | ERROR | CANCELLED ── terminal_grace_s ──► gone (lookups 404, the sweeper evicts)

Every arrow into a terminal state goes through `transition_terminal`, which is true once per flow and
publishes that flow's single terminal event and audit line; a terminal flow forgets its device code and
PKCE verifier at once. The only timing lives here: providers never sleep or retry (SPEC §5).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import trio

from serve.audit import Audit, quoted, sanitize
from serve.clock import WallClock
from serve.config import DeviceFlowConfig
from serve.credentials import CommitGate, Credentials, CredentialStore
from serve.errors import (
    DeviceFlowNotFound,
    Diagnosis,
    PersistError,
    RateLimited,
    ShuttingDown,
    TooManyActiveFlows,
    UnsupportedProvider,
    UpstreamError,
)
from serve.events import EventBus
from serve.lifecycle import Shutdown
from serve.models import (
    AuthEvent,
    ErrorKind,
    FlowAuthorized,
    FlowCancelled,
    FlowFailed,
    FlowStarted,
    FlowStatus,
    FlowThrottled,
    FlowView,
    StartOutcome,
)
from serve.providers.base import (
    DeviceAuthorization,
    DeviceFlowProvider,
    PollFailed,
    PollPending,
    PollResult,
    PollSlowDown,
    PollSuccess,
    PollTransient,
)
from serve.providers.oauth import DiagnosedFailure, DiagnosedTransient, timed_out

logger = logging.getLogger(__name__)

START_TIMEOUT_MESSAGE = "device-flow start timeout (upstream IdP unresponsive)"
EXPIRED_HINT = "device-flow expired without authorization"
PERSIST_FAILED_HINT = "credentials could not be written to the daemon filesystem — check disk space and permissions"
SHUTDOWN_HINT = "daemon shutting down"
TRANSIENT_HINT = "the identity provider kept failing; start a new login later"
POLLER_FAILED_HINT = "the device-flow poller failed unexpectedly"

# SPEC §3: at shutdown a token request or credential write in flight may finish, but within this bound.
SHUTDOWN_PERSIST_GRACE_S = 5.0
# (+) SPEC §3: fresh IdP starts are counted over a sliding minute.
START_RATE_WINDOW_S = 60.0


def clamp_interval(raw: float | None, config: DeviceFlowConfig) -> float:
    """The IdP's polling interval as the registry uses it (seconds)."""
    # SPEC §3: 0, negative, NaN or missing means the default (RFC 8628 §3.2's 5 s); then [min, max].
    value = raw if raw is not None and raw > 0 else config.default_interval_s
    return min(max(value, config.min_interval_s), config.max_interval_s)


def clamp_expires_in(raw: float | None, config: DeviceFlowConfig) -> float:
    """The device code's lifetime as the registry uses it (seconds)."""
    # SPEC §3: missing, non-positive or non-finite means the fallback; then [min, max].
    value = raw if raw is not None and math.isfinite(raw) and raw > 0 else config.fallback_expires_in_s
    return min(max(value, config.min_expires_in_s), config.max_expires_in_s)


def slowed_interval(current: float, idp_interval: float | None, config: DeviceFlowConfig) -> float:
    """The interval after a `slow_down`."""
    # RFC 8628 §3.5: slow_down adds 5 s to this and all later polls; an IdP that names its new interval
    # (GitHub does) gets that one when it is larger.
    bumped = current + config.slow_down_step_s
    if idp_interval is not None and idp_interval > bumped:
        bumped = idp_interval
    return min(max(bumped, config.min_interval_s), config.max_interval_s)


def transient_backoff(interval: float, failures: int, config: DeviceFlowConfig) -> float:
    """The wait before the next poll after `failures` transient faults in a row: interval × 2^failures."""
    # (+) SPEC §3: a doubling back-off capped at max_interval_s (60 s). It is computed from the RFC
    # interval, which stays unchanged, so the first OAuth reply puts polling back on its normal pace.
    return float(min(interval * 2**failures, config.max_interval_s))


def _diagnosis(result: PollResult) -> Diagnosis | None:
    return result.diagnosis if isinstance(result, DiagnosedFailure | DiagnosedTransient) else None


def _log_failure(
    step: str,
    provider_id: str,
    device_flow_id: str | None,
    diagnosis: Diagnosis | None,
    outcome: str | None = None,
    *,
    detail: str | None = None,
    hint: str | None = None,
) -> None:
    """One WARNING line for a failed start or poll: never a secret (a diagnosis holds none) nor IdP text.

    `detail` and `hint` (a poll result's static reason and hint) stand in when there is no diagnosis.
    """
    flow = f"{device_flow_id[:8]}..." if device_flow_id is not None else "- (no flow yet)"
    parts = [f"device-flow {step} failed:", f"provider={sanitize(provider_id)}", f"deviceFlowId={flow}"]
    if diagnosis is not None:
        parts.append(f"failure={diagnosis.failure.value}")
        detail, hint = diagnosis.detail, diagnosis.hint
    if detail is not None:
        parts.append(f"detail={quoted(detail)}")
    if outcome is not None:
        parts.append(f"outcome={quoted(outcome)}")
    if hint is not None:
        parts.append(f"hint={quoted(hint)}")
    logger.warning("%s", " ".join(parts))


@dataclass(eq=False, slots=True)
class _StartAttempt:
    """One IdP start in flight; callers for the same provider wait on it (SPEC §3: coalesced)."""

    provider_id: str
    initiator_client_id: str | None
    scope: trio.CancelScope  # deadline: start_timeout_s; dispose() cancels it
    done: trio.Event = field(default_factory=trio.Event)
    flow: _Flow | None = None
    error: UpstreamError | ShuttingDown | None = None


@dataclass(eq=False, slots=True)
class _Persist:
    """One credential write. It runs in its own task so that the flow's wait for it can be bounded."""

    credentials: Credentials
    # The write's own shield, so a cancelled nursery never tears a file; dispose() lifts it after its grace.
    write_scope: trio.CancelScope = field(default_factory=lambda: trio.CancelScope(shield=True))
    gate: CommitGate = field(default_factory=CommitGate)
    done: trio.Event = field(default_factory=trio.Event)  # the write returned (or raised)
    ok: bool = False
    detail: str = ""  # why the write failed: for the audit line only

    def landed(self) -> bool:
        """Whether the credentials are (or are certain to be) on disk; gives up on a write still running.

        Called once the flow stops waiting. A write not yet committing is abandoned and can no longer land;
        one whose rename has begun counts as landed (its data is fsynced and a rename is atomic).
        """
        if self.done.is_set():
            return self.ok
        if self.gate.abandon():
            self.detail = "the write did not finish in time"
            return False
        return True


@dataclass(frozen=True, slots=True)
class _DeferredCancel:
    """A cancel that arrived while the flow was busy: applied when the busy step ends without success."""

    canceller: str | None  # the first canceller's client id (None: anonymous, or dispose())
    hint: str | None


@dataclass(eq=False, slots=True)
class _Flow:
    """The registry's record of one device flow. Mutated only by the registry, on the Trio thread."""

    device_flow_id: str
    provider_id: str
    provider: DeviceFlowProvider
    initiator_client_id: str | None
    created_at: float  # monotonic, like every instant here
    deadline: float
    expires_at_ms: int  # fixed once at start (SPEC §2)
    interval_s: float
    scope: trio.CancelScope  # the poller's scope; deadline: the flow's expiry
    authorization: DeviceAuthorization | None  # device code + verifier; None once no longer needed
    user_code: str | None
    verification_uri: str | None
    verification_uri_complete: str | None
    status: FlowStatus = FlowStatus.PENDING
    error_kind: ErrorKind | None = None
    hint: str | None = None
    last_polled_at: float | None = None
    ended_at: float | None = None
    # Busy: the shielded scope of the token request in flight, or of the wait for the credential write.
    busy: trio.CancelScope | None = None
    persist: _Persist | None = None
    deferred_cancel: _DeferredCancel | None = None
    ended: trio.Event = field(default_factory=trio.Event)

    def defer_cancel(self, canceller: str | None, hint: str | None) -> None:
        if self.deferred_cancel is None:  # SPEC §3: the first canceller is the one recorded
            self.deferred_cancel = _DeferredCancel(canceller, hint)


class DeviceFlowRegistry:
    """The device flows of one daemon.

    `run()` must be running for `start()` to work; `get`, `cancel` and `pending` never block. Errors raised
    to callers are `serve.errors` wire errors with static messages: never a device code or IdP text.
    """

    def __init__(
        self,
        *,
        providers: Mapping[str, DeviceFlowProvider],
        store: CredentialStore,
        bus: EventBus,
        config: DeviceFlowConfig,
        clock: WallClock,
        audit: Audit,
        shutdown: Shutdown | None = None,
    ) -> None:
        self._providers = dict(providers)
        self._store = store
        self._bus = bus
        self._config = config
        self._clock = clock
        self._audit = audit
        self._flows: dict[str, _Flow] = {}  # every flow not yet evicted, in start order
        self._pending: dict[str, _Flow] = {}  # provider id → its pending flow (the singleton)
        self._starting: dict[str, _StartAttempt] = {}  # provider id → its IdP start in flight
        self._start_times: deque[float] = deque()  # fresh IdP starts within the rate window
        self._writes: set[_Persist] = set()  # credential writes still running
        self._nursery: trio.Nursery | None = None
        self._shutdown = shutdown or Shutdown()
        self._dispose_deadline = math.inf  # busy steps end by then once dispose() has begun
        self._stopped = trio.Event()

    # --- lifetime -------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the registry's nursery until `dispose()`. `task_status.started()` once starts are accepted."""
        if self._nursery is not None or self._shutdown.begun:
            raise RuntimeError("DeviceFlowRegistry.run() runs once, before dispose()")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._sweep_periodically)
                task_status.started()
        finally:
            self._nursery = None
            self._shutdown.begin()
            self._stopped.set()

    async def dispose(self) -> None:
        """Shut down (SPEC §3): mark, cancel, wait. New starts get `ShuttingDown`; pending flows end
        `cancelled` (their events published), except that a token request or credential write in flight
        finishes first, within 5 s; then the nursery is cancelled.

        Returns once `run()` has returned. Safe to call more than once.
        """
        self._shutdown.begin()
        deadline = min(self._dispose_deadline, self._clock.now() + SHUTDOWN_PERSIST_GRACE_S)
        self._dispose_deadline = deadline
        for attempt in list(self._starting.values()):
            attempt.scope.cancel()
        busy: list[_Flow] = []
        for flow in list(self._pending.values()):
            if flow.busy is not None:
                # An approval may be arriving (the device code is spent): let the step end, within the grace.
                # A poll that ends without success then ends cancelled; a write decides by itself.
                if flow.persist is None:
                    flow.defer_cancel(None, SHUTDOWN_HINT)
                flow.busy.deadline = min(flow.busy.deadline, deadline)
                busy.append(flow)
            else:
                self.transition_terminal(flow, FlowStatus.CANCELLED, hint=SHUTDOWN_HINT)
        # A torn or lost credential file is worse than a slower exit: let writes finish, within the grace.
        with trio.move_on_at(deadline):
            for flow in busy:
                await flow.ended.wait()
            for persist in list(self._writes):
                await persist.done.wait()
        for persist in self._writes:
            persist.write_scope.shield = False
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
            await self._stopped.wait()

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.begun

    @property
    def supported_providers(self) -> list[str]:
        """The configured provider ids, in configuration order."""
        return list(self._providers)

    # --- the HTTP layer's calls -----------------------------------------------------------------------

    async def start(self, provider_id: str, client_id: str | None) -> StartOutcome:
        """Start a login for `provider_id`, or attach to the one already pending or starting.

        Raises `UnsupportedProvider`, `TooManyActiveFlows`, `RateLimited`, `UpstreamError` (the IdP failed
        or did not answer within start_timeout_s) or `ShuttingDown`. The IdP call runs in the registry's
        nursery, so a caller that goes away does not cancel it for the others waiting on it.
        """
        if self._shutdown.begun:
            raise ShuttingDown
        provider = self._providers.get(provider_id)
        if provider is None:
            raise UnsupportedProvider(provider_id, self.supported_providers)
        pending = self._pending.get(provider_id)
        if pending is not None:
            # SPEC §3: one pending flow per provider; a second login attaches to it without an IdP call.
            self._audit_take_over(pending, client_id)
            return StartOutcome(self._view(pending), attached=True)
        attempt = self._starting.get(provider_id)
        attached = attempt is not None
        if attempt is None:
            attempt = self._begin_start(provider_id, provider, client_id)
        await attempt.done.wait()
        if attempt.error is not None:
            raise attempt.error.copy()  # a fresh one per waiter
        assert attempt.flow is not None
        if attached:
            self._audit_take_over(attempt.flow, client_id)
        return StartOutcome(self._view(attempt.flow), attached=attached)

    def get(self, device_flow_id: str) -> FlowView:
        """The flow's current view. Raises `DeviceFlowNotFound` for an unknown id or a terminal flow past
        its grace, even before the sweeper has evicted it."""
        return self._view(self._lookup(device_flow_id))

    def cancel(self, device_flow_id: str, client_id: str | None) -> None:
        """Cancel a pending flow; a no-op on a terminal one. Raises `DeviceFlowNotFound`.

        During a token request or a credential write the cancel is deferred: that step decides (SPEC §3).
        """
        flow = self._lookup(device_flow_id)
        if flow.status is not FlowStatus.PENDING:
            return
        if flow.busy is not None:
            # SPEC §3: the IdP may be granting right now, and the device code is then spent, so an
            # approval wins; otherwise the flow ends cancelled, credited to the first canceller.
            flow.defer_cancel(client_id, None)
            return
        self.transition_terminal(flow, FlowStatus.CANCELLED, canceller=client_id)

    def pending(self) -> list[FlowView]:
        """The pending flows (persisting ones included), in start order: the status snapshot's list.

        Read from the per-provider index, not the retained history: a status costs the same with thousands
        of finished flows kept for their grace period."""
        return [self._view(flow) for flow in self._pending.values()]

    # --- the one door to a terminal state -------------------------------------------------------------

    def transition_terminal(
        self,
        flow: _Flow,
        status: FlowStatus,
        *,
        error_kind: ErrorKind | None = None,
        hint: str | None = None,
        canceller: str | None = None,
        credentials: Credentials | None = None,
        audit_hint: str | None = None,
    ) -> bool:
        """End `flow` with `status`. True exactly once per flow; False (and nothing done) afterwards.

        Publishes the flow's one terminal event and audit line, drops its secrets and stops its poller.
        `canceller` is the originator of a `cancelled` event; `credentials` carry an `authorized` event's
        facts; `audit_hint` replaces `hint` on the audit line (it may add detail the wire never shows).
        """
        if flow.status is not FlowStatus.PENDING:
            return False
        if status is FlowStatus.EXPIRED:
            error_kind = ErrorKind.EXPIRED_TOKEN
        flow.status = status
        flow.error_kind = error_kind
        flow.hint = hint
        flow.ended_at = self._clock.now()
        # SPEC §3: terminal flows drop their secrets at once; what only a pending flow shows goes too.
        flow.authorization = None
        flow.persist = None
        flow.user_code = flow.verification_uri = flow.verification_uri_complete = None
        if self._pending.get(flow.provider_id) is flow:
            del self._pending[flow.provider_id]
        flow.scope.cancel()
        flow.ended.set()

        event: AuthEvent
        originator = flow.initiator_client_id
        if status is FlowStatus.AUTHORIZED:
            assert credentials is not None
            event = FlowAuthorized(
                flow.device_flow_id, flow.provider_id, credentials.expires_at_ms, credentials.account_alias
            )
            audit_status = "authorized"
        elif status is FlowStatus.CANCELLED:
            event = FlowCancelled(flow.device_flow_id)
            originator = canceller
            audit_status = "cancelled"
        else:
            assert error_kind is not None
            event = FlowFailed(flow.device_flow_id, error_kind, status, hint)
            audit_status = "expired" if status is FlowStatus.EXPIRED else "failed"
        self._bus.publish(event, originator)
        self._audit.record(
            provider_id=flow.provider_id,
            device_flow_id=flow.device_flow_id,
            client_id=originator,
            status=audit_status,
            error_kind=error_kind.value if error_kind is not None else None,
            hint=audit_hint if audit_hint is not None else hint,
        )
        return True

    # --- starting -------------------------------------------------------------------------------------

    def _begin_start(self, provider_id: str, provider: DeviceFlowProvider, client_id: str | None) -> _StartAttempt:
        """Admit a fresh IdP start (cap, then rate) and launch it in the nursery."""
        nursery = self._require_nursery()
        now = self._clock.now()
        # SPEC §3: the cap counts pending flows and starts in flight alike.
        if len(self._pending) + len(self._starting) >= self._config.max_active:
            raise TooManyActiveFlows(self._earliest_active_deadline() - now)
        while self._start_times and self._start_times[0] <= now - START_RATE_WINDOW_S:
            self._start_times.popleft()
        # (+) SPEC §3: a looping client must not mint device codes at the IdP's expense.
        if len(self._start_times) >= self._config.max_starts_per_minute:
            raise RateLimited(self._start_times[0] + START_RATE_WINDOW_S - now)
        self._start_times.append(now)
        attempt = _StartAttempt(provider_id, client_id, trio.CancelScope(deadline=now + self._config.start_timeout_s))
        self._starting[provider_id] = attempt
        nursery.start_soon(self._run_start, provider, attempt)
        return attempt

    def _earliest_active_deadline(self) -> float:
        """When the earliest active slot frees at the latest: a flow's expiry or a start's timeout."""
        deadlines = [flow.deadline for flow in self._pending.values()]
        deadlines += [attempt.scope.deadline for attempt in self._starting.values()]
        return min(deadlines)

    async def _run_start(self, provider: DeviceFlowProvider, attempt: _StartAttempt) -> None:
        """The one IdP start of a coalesced group; wakes every waiter with a flow or an error."""
        authorization: DeviceAuthorization | None = None
        try:
            with attempt.scope:
                try:
                    authorization = await provider.start()
                except UpstreamError as exc:
                    attempt.error = exc.copy()
                    _log_failure("start", attempt.provider_id, None, exc.diagnosis)
                except Exception as exc:
                    # Per-flow boundary: a provider breaking its contract fails this start, not the daemon.
                    logger.error("device-flow start for %s failed: %s", attempt.provider_id, type(exc).__name__)
                    attempt.error = UpstreamError()
            if attempt.error is None:
                if self._shutdown.begun:
                    # dispose() ran meanwhile: no new flow; an unused device code simply expires at the IdP.
                    attempt.error = ShuttingDown()
                elif authorization is None:
                    attempt.error = UpstreamError(
                        START_TIMEOUT_MESSAGE,
                        timed_out("device authorization", "start_timeout_s", self._config.start_timeout_s),
                    )
                    _log_failure("start", attempt.provider_id, None, attempt.error.diagnosis)
                else:
                    attempt.flow = self._open_flow(provider, attempt, authorization)
        finally:
            # The slot moves from "starting" to "pending" (or frees) in one step, with no checkpoint between.
            del self._starting[attempt.provider_id]
            if attempt.flow is None and attempt.error is None:
                attempt.error = ShuttingDown()  # cancelled from outside: the daemon is going down
            attempt.done.set()

    def _open_flow(
        self, provider: DeviceFlowProvider, attempt: _StartAttempt, authorization: DeviceAuthorization
    ) -> _Flow:
        """Record a fresh flow, announce it, and start its poller."""
        now = self._clock.now()
        lifetime = clamp_expires_in(authorization.expires_in, self._config)
        deadline = now + lifetime
        flow = _Flow(
            device_flow_id=str(uuid.uuid4()),
            provider_id=attempt.provider_id,
            provider=provider,
            initiator_client_id=attempt.initiator_client_id,
            created_at=now,
            deadline=deadline,
            expires_at_ms=self._clock.to_epoch_ms(deadline),
            interval_s=clamp_interval(authorization.interval, self._config),
            # SPEC §3: the poller lives in a scope whose deadline is the flow's expiry.
            scope=trio.CancelScope(deadline=deadline),
            authorization=authorization,
            user_code=authorization.user_code,
            verification_uri=authorization.verification_uri,
            verification_uri_complete=authorization.verification_uri_complete,
        )
        self._flows[flow.device_flow_id] = flow
        self._pending[flow.provider_id] = flow
        self._bus.publish(
            FlowStarted(flow.device_flow_id, flow.provider_id, flow.expires_at_ms), flow.initiator_client_id
        )
        self._audit.record(
            provider_id=flow.provider_id,
            device_flow_id=flow.device_flow_id,
            client_id=flow.initiator_client_id,
            status="started",
            expires_in_ms=round(lifetime * 1000),
        )
        self._require_nursery().start_soon(self._run_flow, flow)
        return flow

    def _audit_take_over(self, flow: _Flow, client_id: str | None) -> None:
        # SPEC §3: a take-over by another client is audited, but is no event (nothing changed state).
        if client_id != flow.initiator_client_id:
            original = flow.initiator_client_id if flow.initiator_client_id is not None else "(none)"
            self._audit.record(
                provider_id=flow.provider_id,
                device_flow_id=flow.device_flow_id,
                client_id=client_id,
                status="started",
                hint=f"take-over (per-provider singleton; original initiator={original})",
            )

    # --- polling --------------------------------------------------------------------------------------

    async def _run_flow(self, flow: _Flow) -> None:
        """The flow's one poller, inside the flow's cancel scope (deadline: its expiry).

        Finalises its own flow: a flow still pending when the task ends is ended here, `expired` once its
        deadline passed (RFC 8628 §3.2: the device code is dead), else `cancelled` (the registry's nursery
        was cancelled: the daemon is stopping). Every other ending went through `transition_terminal`
        already, which makes this a no-op.
        """
        try:
            with flow.scope:
                await self._poll_until_done(flow)
        except Exception as exc:
            # Per-flow boundary (STYLE): one misbehaving IdP or store ends its flow, never the daemon.
            # Only the type is logged: an exception's text may quote a request that carried a secret.
            name = type(exc).__name__
            logger.error("device flow %s... poller failed: %s", flow.device_flow_id[:8], name)
            self.transition_terminal(
                flow,
                FlowStatus.ERROR,
                error_kind=ErrorKind.UPSTREAM_ERROR,
                hint=POLLER_FAILED_HINT,
                audit_hint=f"{POLLER_FAILED_HINT} ({name})",
            )
        finally:
            if self._clock.now() >= flow.deadline:
                self.transition_terminal(flow, FlowStatus.EXPIRED, hint=EXPIRED_HINT)
            else:
                self.transition_terminal(flow, FlowStatus.CANCELLED, hint=SHUTDOWN_HINT)

    async def _poll_until_done(self, flow: _Flow) -> None:
        config = self._config
        failures = 0  # transient faults in a row
        # RFC 8628 §3.4: the client waits at least one interval before its first poll.
        wait_s = flow.interval_s
        while True:
            await trio.sleep(wait_s)
            authorization = flow.authorization
            if authorization is None:
                return
            flow.last_polled_at = self._clock.now()
            result = await self._poll_once(flow, authorization)
            if flow.status is not FlowStatus.PENDING:
                # Ended while the reply was on its way (a provider that ignored its bound); the reply is moot.
                if isinstance(result, PollSuccess):
                    self._audit_lost_success(flow, "lost_success", "tokens issued after the flow ended were discarded")
                return
            deferred = flow.deferred_cancel
            if deferred is not None and not isinstance(result, PollSuccess):
                self.transition_terminal(flow, FlowStatus.CANCELLED, canceller=deferred.canceller, hint=deferred.hint)
                return
            match result:
                case PollPending():
                    failures = 0
                    wait_s = flow.interval_s
                case PollSlowDown(interval=idp_interval):
                    failures = 0
                    flow.interval_s = slowed_interval(flow.interval_s, idp_interval, config)
                    wait_s = flow.interval_s
                    interval_ms = round(flow.interval_s * 1000)
                    self._bus.publish(FlowThrottled(flow.device_flow_id, interval_ms), flow.initiator_client_id)
                case PollTransient(reason=reason):
                    failures += 1
                    if failures >= config.max_transient_failures:
                        outcome = f"the flow ends error (upstream_error): {failures} transient faults in a row"
                        _log_failure(
                            "poll", flow.provider_id, flow.device_flow_id, _diagnosis(result), outcome, detail=reason
                        )
                        self.transition_terminal(
                            flow,
                            FlowStatus.ERROR,
                            error_kind=ErrorKind.UPSTREAM_ERROR,
                            hint=TRANSIENT_HINT,
                            audit_hint=f"{TRANSIENT_HINT} ({failures} in a row; last: {reason})",
                        )
                        return
                    wait_s = transient_backoff(flow.interval_s, failures, config)
                    outcome = f"next poll in {wait_s:g} s ({failures} of {config.max_transient_failures} faults)"
                    _log_failure(
                        "poll", flow.provider_id, flow.device_flow_id, _diagnosis(result), outcome, detail=reason
                    )
                case PollFailed(kind=kind, hint=hint):
                    # SPEC §3: expired_token ends `expired`, whoever noticed it.
                    status = FlowStatus.EXPIRED if kind is ErrorKind.EXPIRED_TOKEN else FlowStatus.ERROR
                    outcome = f"the flow ends {status.value} ({kind.value})"
                    _log_failure("poll", flow.provider_id, flow.device_flow_id, _diagnosis(result), outcome, hint=hint)
                    self.transition_terminal(flow, status, error_kind=kind, hint=hint)
                    return
                case PollSuccess(credentials=credentials):
                    # SPEC §3: stop at the first success; re-polling a used device code makes real IdPs
                    # revoke the whole grant.
                    await self._persist(flow, credentials)
                    return

    def _busy_scope(self, timeout_s: float) -> trio.CancelScope:
        """The shield of a step that must not be cut short (an approval may be arriving), with its bound.

        Neither the flow's expiry, a DELETE nor a cancelled nursery interrupts it; only its own deadline
        does (a shielded scope still catches its own deadline), so every flow settles.
        """
        return trio.CancelScope(shield=True, deadline=min(self._clock.now() + timeout_s, self._dispose_deadline))

    async def _poll_once(self, flow: _Flow, authorization: DeviceAuthorization) -> PollResult:
        """One token request, shielded and bounded by poll_timeout_s (SPEC §3 (+): treated like persist)."""
        # SPEC §3: a poll tick that hits its bound is a transient fault, like a connection error.
        result: PollResult = DiagnosedTransient(
            "poll tick timed out", timed_out("token reply", "poll_timeout_s", self._config.poll_timeout_s)
        )
        flow.busy = self._busy_scope(self._config.poll_timeout_s)
        try:
            with flow.busy:
                result = await flow.provider.poll(authorization)
        finally:
            flow.busy = None
        return result

    # --- persisting -----------------------------------------------------------------------------------

    async def _persist(self, flow: _Flow, credentials: Credentials) -> None:
        """Write the credentials, then end the flow by what is on disk (SPEC §3: disk first)."""
        # The device code is single-use and now spent: forget it and the verifier before waiting on disk.
        flow.authorization = None
        persist = _Persist(credentials)
        flow.persist = persist
        self._writes.add(persist)
        self._require_nursery().start_soon(self._write, persist)
        flow.busy = self._busy_scope(self._config.persist_timeout_s)
        try:
            with flow.busy:
                await persist.done.wait()
        finally:
            flow.busy = None
        self._settle(flow, persist)

    async def _write(self, persist: _Persist) -> None:
        """The store call, in its own task, so that the flow's wait for it can be bounded."""
        with persist.write_scope:
            try:
                await self._store.save(persist.credentials, gate=persist.gate)
                persist.ok = True
            except PersistError as exc:
                persist.detail = exc.detail
            except Exception as exc:
                # Per-flow boundary: a store breaking its contract fails this write only.
                persist.detail = type(exc).__name__
            finally:
                self._writes.discard(persist)
        persist.done.set()

    def _settle(self, flow: _Flow, persist: _Persist) -> None:
        """End a persisting flow by what is on disk once the wait is over."""
        if persist.landed():
            # SPEC §3: authorized wins over a deferred cancel.
            self.transition_terminal(flow, FlowStatus.AUTHORIZED, credentials=persist.credentials)
            return
        detail = persist.detail
        deferred = flow.deferred_cancel
        if deferred is not None:
            self.transition_terminal(
                flow,
                FlowStatus.CANCELLED,
                canceller=deferred.canceller,
                hint=deferred.hint,
                audit_hint=f"cancelled during persist; credentials not written ({detail})",
            )
        else:
            self.transition_terminal(
                flow,
                FlowStatus.ERROR,
                error_kind=ErrorKind.PERSIST_FAILED,
                hint=PERSIST_FAILED_HINT,
                audit_hint=f"{PERSIST_FAILED_HINT} ({detail})",
            )

    def _audit_lost_success(self, flow: _Flow, status: str, hint: str) -> None:
        """Tokens the IdP issued that the flow's outcome does not reflect: the audit keeps the truth."""
        self._audit.record(
            provider_id=flow.provider_id,
            device_flow_id=flow.device_flow_id,
            client_id=flow.initiator_client_id,
            status=status,
            hint=hint,
        )

    # --- sweeping and lookups -------------------------------------------------------------------------

    async def _sweep_periodically(self) -> None:
        while True:
            await trio.sleep(self._config.sweep_interval_s)
            self._sweep()

    def _sweep(self) -> None:
        """Expire pending flows past their deadline; evict terminal flows past their grace."""
        now = self._clock.now()
        for flow in list(self._flows.values()):
            if flow.status is FlowStatus.PENDING:
                # A backstop to the poller's own deadline; a busy flow settles by itself.
                if flow.busy is None and now >= flow.deadline:
                    self.transition_terminal(flow, FlowStatus.EXPIRED, hint=EXPIRED_HINT)
            elif self._past_grace(flow, now):
                del self._flows[flow.device_flow_id]

    def _past_grace(self, flow: _Flow, now: float) -> bool:
        return flow.ended_at is not None and now >= flow.ended_at + self._config.terminal_grace_s

    def _lookup(self, device_flow_id: str) -> _Flow:
        flow = self._flows.get(device_flow_id)
        if flow is None or self._past_grace(flow, self._clock.now()):
            raise DeviceFlowNotFound(device_flow_id)
        return flow

    def _require_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("DeviceFlowRegistry.run() is not running")
        return self._nursery

    def _view(self, flow: _Flow) -> FlowView:
        to_ms = self._clock.to_epoch_ms
        return FlowView(
            device_flow_id=flow.device_flow_id,
            provider_id=flow.provider_id,
            status=flow.status,
            created_at_ms=to_ms(flow.created_at),
            expires_at_ms=flow.expires_at_ms,
            interval_ms=round(flow.interval_s * 1000),
            initiator_client_id=flow.initiator_client_id,
            last_polled_at_ms=to_ms(flow.last_polled_at) if flow.last_polled_at is not None else None,
            error_kind=flow.error_kind,
            hint=flow.hint,
            user_code=flow.user_code,
            verification_uri=flow.verification_uri,
            verification_uri_complete=flow.verification_uri_complete,
        )
