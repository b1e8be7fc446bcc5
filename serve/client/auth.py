"""Logins through a daemon: start one, wait for its end, and a pure projection of the event stream.

`client.auth.start(provider_id)` returns a `LoginHandle`; `await_completion()` follows the event stream
(checking the flow over REST at every (re)connection, reset or lag, so an end it did not see is still
found) and falls back to `GET` polling at the daemon's interval when the stream is refused or unavailable.
`reduce_auth_event(state, event)` folds events into per-provider state, for dashboards and tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import trio

from serve.client.errors import DaemonHTTPError, DaemonUnreachable
from serve.models import DeviceFlowInfo, Frame, ReceivedEvent

if TYPE_CHECKING:
    from serve.client.daemon import DaemonClient, StreamLagged

PENDING = "pending"
NOT_FOUND_OR_EVICTED = "not_found_or_evicted"
"""The error kind of a flow the daemon no longer knows (evicted after its grace, or the daemon restarted)."""
_DEFAULT_INTERVAL_MS = 5000  # RFC 8628 §3.2's default, when the daemon names none
EXPIRY_GRACE_S = 3.0  # past the code's expiry, the daemon ends the flow at its next sweep or poll
RECHECK_S = 5.0  # then ask again this often while it still reads pending


def _deadline_after(epoch_ms: int | None, grace_s: float) -> float:
    """The trio clock's time `grace_s` after the wall-clock instant `epoch_ms` (never, without one)."""
    if epoch_ms is None:
        return math.inf
    return trio.current_time() + max(0.0, epoch_ms / 1000 - time.time()) + grace_s


@dataclass(frozen=True, slots=True)
class AuthResult:
    """How a login ended. `status`: authorized | expired | error | cancelled. Times are epoch ms."""

    device_flow_id: str
    provider_id: str
    status: str
    error_kind: str | None = None
    hint: str | None = None
    account_alias: str | None = None
    expires_at_ms: int | None = None  # the access token's expiry, for `authorized`

    @property
    def authorized(self) -> bool:
        return self.status == "authorized"


class AuthFlow:
    """`client.auth`: logins on one daemon."""

    def __init__(self, client: DaemonClient) -> None:
        self._client = client

    async def start(self, provider_id: str) -> LoginHandle:
        """Start (or attach to) the login of `provider_id`. Raises what `start_device_flow` raises."""
        return LoginHandle(self._client, await self._client.start_device_flow(provider_id))


class LoginHandle:
    """One login in progress. The user code and URIs are set when this client started it (SPEC §2)."""

    def __init__(self, client: DaemonClient, info: DeviceFlowInfo) -> None:
        self._client = client
        self.info = info
        self.device_flow_id = info.device_flow_id
        self.provider_id = info.provider_id
        self.user_code = info.user_code
        self.verification_uri = info.verification_uri
        self.verification_uri_complete = info.verification_uri_complete
        self.expires_at_ms = info.expires_at_ms
        self.interval_ms = info.interval_ms
        self.attached = bool(info.attached)

    def __repr__(self) -> str:
        return f"LoginHandle({self.provider_id!r}, {self.device_flow_id!r}, attached={self.attached})"

    async def cancel(self) -> None:
        """Cancel the flow on the daemon (a no-op if it already ended or is gone)."""
        await self._client.cancel_device_flow(self.device_flow_id)

    async def await_completion(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the SDK's documented signature, as the official one)
        on_throttled: Callable[[int], None] | None = None,
    ) -> AuthResult:
        """Wait for the flow to end and say how. `on_throttled(interval_ms)` is called on each slow_down.

        Raises `TimeoutError` after `timeout` seconds (the flow stays pending on the daemon: `cancel()` it
        if it should not), and `DaemonUnreachable` / `DaemonHTTPError` when REST fails.
        """
        with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
            try:
                return await self._follow_events(on_throttled)
            except _StreamUnavailable:
                return await self._poll(on_throttled)
        assert scope.cancelled_caught
        raise TimeoutError(f"the login of {self.provider_id} did not end within {timeout} s")

    async def _follow_events(self, on_throttled: Callable[[int], None] | None) -> AuthResult:
        interval_seen = self.interval_ms
        # If no end has come a little after the code's expiry, ask over REST: a daemon that vanished
        # (the stream only retries) or an end the stream never delivered is noticed then.
        next_check = _deadline_after(self.expires_at_ms, EXPIRY_GRACE_S)
        try:
            async with self._client.events() as stream:
                while True:
                    with trio.move_on_at(next_check):
                        try:
                            item = await stream.receive()
                        except trio.EndOfChannel:
                            break
                        if isinstance(item, ReceivedEvent):
                            if item.data.get("deviceFlowId") != self.device_flow_id:
                                continue
                            if item.type == "auth_device_flow_throttled":
                                interval = item.data.get("intervalMs")
                                if isinstance(interval, int):
                                    interval_seen = interval
                                    if on_throttled is not None:
                                        on_throttled(interval)
                                continue
                            result = self._result_of_event(item)
                            if result is not None:
                                return result
                            continue
                    # Connected, reconnected, reset, lagged, or the expiry passed: the end may have come
                    # unseen, and a slow_down may have come before the stream was open; ask.
                    view = await self._view()
                    if not isinstance(view, DeviceFlowInfo):
                        return view
                    if view.status != PENDING:
                        return await self._result_of_view(view)
                    slower = (
                        view.interval_ms is not None and interval_seen is not None and view.interval_ms > interval_seen
                    )
                    if slower and on_throttled is not None and view.interval_ms is not None:
                        on_throttled(view.interval_ms)
                    interval_seen = view.interval_ms or interval_seen
                    if trio.current_time() >= next_check:
                        next_check = trio.current_time() + RECHECK_S
        except (DaemonUnreachable, DaemonHTTPError) as exc:
            if isinstance(exc, DaemonHTTPError) and exc.status == 401:
                raise  # the token is wrong: polling would be refused too
            raise _StreamUnavailable from exc
        raise _StreamUnavailable  # the stream ended (it does not, unless closed): poll

    async def _poll(self, on_throttled: Callable[[int], None] | None) -> AuthResult:
        interval_ms = self.interval_ms or _DEFAULT_INTERVAL_MS
        while True:
            view = await self._view()
            if not isinstance(view, DeviceFlowInfo):
                return view
            if view.status != PENDING:
                return await self._result_of_view(view)
            if view.interval_ms is not None:
                if view.interval_ms > interval_ms and on_throttled is not None:
                    on_throttled(view.interval_ms)
                interval_ms = view.interval_ms
            await trio.sleep(interval_ms / 1000)

    async def _view(self) -> DeviceFlowInfo | AuthResult:
        try:
            return await self._client.get_device_flow(self.device_flow_id)
        except DaemonHTTPError as exc:
            if exc.status != 404:
                raise
            return AuthResult(
                self.device_flow_id,
                self.provider_id,
                "error",
                error_kind=NOT_FOUND_OR_EVICTED,
                hint="the daemon no longer knows this login (it ended long ago, or the daemon restarted)",
            )

    def _result_of_event(self, event: ReceivedEvent) -> AuthResult | None:
        data = event.data
        if event.type == "auth_device_flow_authorized":
            return AuthResult(
                self.device_flow_id,
                self.provider_id,
                "authorized",
                account_alias=_str(data.get("accountAlias")),
                expires_at_ms=_int(data.get("expiresAt")),
            )
        if event.type == "auth_device_flow_failed":
            kind = _str(data.get("errorKind"))
            status = _str(data.get("status")) or ("expired" if kind == "expired_token" else "error")
            return AuthResult(
                self.device_flow_id, self.provider_id, status, error_kind=kind, hint=_str(data.get("hint"))
            )
        if event.type == "auth_device_flow_cancelled":
            return AuthResult(self.device_flow_id, self.provider_id, "cancelled")
        return None

    async def _result_of_view(self, view: DeviceFlowInfo) -> AuthResult:
        alias = expires = None
        if view.status == "authorized":
            # The view carries no account facts; the status snapshot has the provider's.
            snapshot = await self._client.get_auth_status()
            for cell in snapshot.providers:
                if cell.provider_id == self.provider_id:
                    alias, expires = cell.account_alias, cell.expires_at_ms
        return AuthResult(
            self.device_flow_id,
            self.provider_id,
            view.status,
            error_kind=view.error_kind,
            hint=view.hint,
            account_alias=alias,
            expires_at_ms=expires,
        )


class _StreamUnavailable(Exception):
    """The event stream cannot be followed: poll instead."""


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- the reducer -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderLoginState:
    """The latest login of one provider, as the events tell it."""

    provider_id: str
    device_flow_id: str
    status: str
    expires_at_ms: int | None = None  # the flow's expiry while pending; the token's once authorized
    interval_ms: int | None = None
    error_kind: str | None = None
    hint: str | None = None
    account_alias: str | None = None
    event_id: int = 0


@dataclass(frozen=True, slots=True)
class AuthEventState:
    """Per-provider login state, and the newest event id folded in (the monotonic gate)."""

    last_event_id: int = 0
    providers: Mapping[str, ProviderLoginState] = field(default_factory=dict)
    flow_providers: Mapping[str, str] = field(default_factory=dict)  # device flow id → provider id


def reduce_auth_event(state: AuthEventState, event: Frame | StreamLagged) -> AuthEventState:
    """Fold one event into `state`; pure. Stale or repeated ids are ignored, and so are unknown types (their
    id still counts), frames that are not events, and events about a provider's older flow."""
    if not isinstance(event, ReceivedEvent) or event.id <= state.last_event_id:
        return state
    advanced = replace(state, last_event_id=event.id)
    data = event.data
    flow_id = _str(data.get("deviceFlowId"))
    if flow_id is None:
        return advanced
    if event.type == "auth_device_flow_started":
        provider_id = _str(data.get("providerId"))
        if provider_id is None:
            return advanced
        login = ProviderLoginState(
            provider_id, flow_id, PENDING, expires_at_ms=_int(data.get("expiresAt")), event_id=event.id
        )
        return replace(
            advanced,
            providers={**state.providers, provider_id: login},
            flow_providers={**state.flow_providers, flow_id: provider_id},
        )
    provider_id = _str(data.get("providerId")) or state.flow_providers.get(flow_id)
    current = state.providers.get(provider_id) if provider_id is not None else None
    if provider_id is None or (current is not None and current.device_flow_id != flow_id):
        return advanced  # a flow we never saw start, or an older flow of that provider
    login = current or ProviderLoginState(provider_id, flow_id, PENDING)
    if event.type == "auth_device_flow_throttled":
        login = replace(login, interval_ms=_int(data.get("intervalMs")))
    elif event.type == "auth_device_flow_authorized":
        login = replace(
            login,
            status="authorized",
            expires_at_ms=_int(data.get("expiresAt")),
            account_alias=_str(data.get("accountAlias")),
        )
    elif event.type == "auth_device_flow_failed":
        kind = _str(data.get("errorKind"))
        status = _str(data.get("status")) or ("expired" if kind == "expired_token" else "error")
        login = replace(login, status=status, error_kind=kind, hint=_str(data.get("hint")))
    elif event.type == "auth_device_flow_cancelled":
        login = replace(login, status="cancelled")
    else:
        return advanced
    return replace(
        advanced,
        providers={**state.providers, provider_id: replace(login, event_id=event.id)},
        flow_providers={**state.flow_providers, flow_id: provider_id},
    )
