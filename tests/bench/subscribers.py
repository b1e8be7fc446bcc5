"""This daemon with N WebSocket subscribers of `WS /workspace/auth/events`, in one daemon per repetition:

1. the POST that starts a login, with no subscriber (its latency, `idle_posts` times, each then cancelled);
   these POSTs and DELETEs, and those of step 3, are sent from a process of their own (bench/poster.py says
   why);
2. N subscribers connect; the daemon's RSS before and after, over N, is the memory per idle subscriber;
3. `busy_posts` times: a POST, then the time until the last subscriber got its `auth_device_flow_started`
   (from just before the POST was sent), and the POST's own latency; then a DELETE, awaited at every
   subscriber the same way;
4. `grants` times: a login whose IdP grants at the first poll (0.1 s after the start); the time from the
   IdP's token reply to the last subscriber's `auth_device_flow_authorized`;
5. 4 pending logins (the daemon's `max_active`; one per provider), then SIGTERM: the time until the process exited, and
   whether every subscriber got a `cancelled` event for each of the 4 and then a 1001 close.

The subscribers live in this process (tests/bench/lean_websocket.py, which says why not trio-websocket),
beside the fake IdPs: with 2 cores the clients and the daemon share the machine.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from support.login import oauth_error, qwen_tokens, script_devices

from bench import lean_websocket, servers
from bench.flows import PROVIDERS, QWEN, Driven, driven_daemon
from bench.poster import Poster

EVENTS_PATH = "/workspace/auth/events"
STARTED = "auth_device_flow_started"
AUTHORIZED = "auth_device_flow_authorized"
CANCELLED = "auth_device_flow_cancelled"
HANDSHAKES_AT_ONCE = 32
CLOSE_GOING_AWAY = 1001
SCENARIO_TIMEOUT_S = 180


@dataclass(frozen=True, slots=True)
class Plan:
    subscribers: int
    idle_posts: int
    busy_posts: int
    grants: int


@dataclass
class Tally:
    """When each (event type, flow id) reached each subscriber; wakes a waiter once all `expected` have it."""

    expected: int
    arrivals: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    _complete: dict[tuple[str, str], trio.Event] = field(default_factory=dict)

    def _event(self, key: tuple[str, str]) -> trio.Event:
        return self._complete.setdefault(key, trio.Event())

    def record(self, key: tuple[str, str], at: float) -> None:
        times = self.arrivals.setdefault(key, [])
        times.append(at)
        if len(times) == self.expected:
            self._event(key).set()

    async def last_arrival(self, key: tuple[str, str]) -> float:
        """Wait until every subscriber got `key`; the time the last one did (perf_counter)."""
        await self._event(key).wait()
        return max(self.arrivals[key])


@dataclass
class Subscriber:
    cancelled: set[str] = field(default_factory=set)
    close_code: int | None = None
    closed_at: float | None = None  # perf_counter when the stream ended (close frame or lost connection)


async def subscribe(
    port: int, tally: Tally, record: Subscriber, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    ws = await lean_websocket.connect("127.0.0.1", port, EVENTS_PATH, {"Authorization": f"Bearer {servers.TOKEN}"})
    messages = ws.messages()
    async with contextlib.aclosing(messages):
        async for _hello in messages:
            break
        task_status.started()
        async for message in messages:
            at = time.perf_counter()
            frame = json.loads(message)
            flow_id = frame.get("data", {}).get("deviceFlowId")
            if flow_id is not None:
                tally.record((frame["type"], flow_id), at)
                if frame["type"] == CANCELLED:
                    record.cancelled.add(flow_id)
    record.closed_at = time.perf_counter()
    record.close_code = ws.close_code


async def _connect_all(nursery: trio.Nursery, port: int, tally: Tally, records: list[Subscriber]) -> None:
    """Open every subscriber (at most HANDSHAKES_AT_ONCE handshakes at a time) into `nursery`."""
    limiter = trio.CapacityLimiter(HANDSHAKES_AT_ONCE)

    async def one(record: Subscriber) -> None:
        async with limiter:
            await nursery.start(subscribe, port, tally, record)

    async with trio.open_nursery() as connecting:
        for record in records:
            connecting.start_soon(one, record)


def _granting(grant_at: list[float]) -> Callable[[httpx.Request], httpx.Response]:
    def reply(request: httpx.Request) -> httpx.Response:
        grant_at.append(time.perf_counter())
        return qwen_tokens()

    return reply


async def _measure(d: Driven, plan: Plan) -> dict[str, Any]:
    async with Poster(d.server.url, servers.TOKEN) as poster:
        return await _measure_with(d, poster, plan)


async def _measure_with(d: Driven, poster: Poster, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {"subscribers": plan.subscribers}
    idle_latency = []
    for _ in range(plan.idle_posts):
        flow_id, _, latency = await poster.start_flow(QWEN)
        idle_latency.append(latency)
        await poster.cancel_flow(flow_id)
    out["post_latency_idle_s"] = idle_latency

    await trio.sleep(0.5)
    rss_before = d.server.rss_bytes()
    tally = Tally(plan.subscribers)
    records = [Subscriber() for _ in range(plan.subscribers)]
    async with trio.open_nursery() as subscribers:
        t0 = time.perf_counter()
        await _connect_all(subscribers, d.server.port, tally, records)
        out["connect_all_s"] = time.perf_counter() - t0
        await trio.sleep(1.0)
        out["rss_per_subscriber_bytes"] = (d.server.rss_bytes() - rss_before) / plan.subscribers

        fanout, busy_latency, cancel_fanout = [], [], []
        for _ in range(plan.busy_posts):
            flow_id, sent, latency = await poster.start_flow(QWEN)
            busy_latency.append(latency)
            fanout.append(await tally.last_arrival((STARTED, flow_id)) - sent)
            sent = await poster.cancel_flow(flow_id)
            cancel_fanout.append(await tally.last_arrival((CANCELLED, flow_id)) - sent)
        out["fanout_started_s"] = fanout
        out["fanout_cancelled_s"] = cancel_fanout
        out["post_latency_busy_s"] = busy_latency

        grant_to_last = []
        for _ in range(plan.grants):
            grant_at: list[float] = []
            script_devices(d.idp.idp, interval=0.1)
            d.idp.idp.token_replies.append(_granting(grant_at))
            flow_id, _ = await d.start_flow()
            last = await tally.last_arrival((AUTHORIZED, flow_id))
            grant_to_last.append(last - grant_at[0])
        out["grant_to_last_s"] = grant_to_last

        # Pending logins, one per provider, that never poll before the stop (the IdPs' interval is 5 s);
        # were one to poll, it would hear `authorization_pending`.
        for served in (d.idp, d.generic_idp):
            served.idp.token_replies[:] = [oauth_error("authorization_pending") for _ in range(100)]
        pending = []
        for provider_id in PROVIDERS:
            flow_id, _ = await d.start_flow(provider_id)
            await tally.last_arrival((STARTED, flow_id))
            pending.append(flow_id)
        signalled = time.perf_counter()  # stop() sends SIGTERM first thing
        client_cpu = time.process_time()
        stopped = await trio.to_thread.run_sync(d.server.stop)
        out["sigterm_busy_exit_s"] = stopped.exit_s
        out["sigterm_busy_returncode"] = stopped.returncode
        # Each subscriber ends at its close frame; one still open 15 s after the exit is cut off (and counted).
        subscribers.cancel_scope.deadline = trio.current_time() + 15
    # This process's CPU (all the subscribers' work) from the SIGTERM until every subscriber ended: beside
    # the wall time, it tells whether the clients, sharing the machine with the daemon, kept up.
    out["bench_cpu_while_stopping_s"] = time.process_time() - client_cpu
    out["sigterm_to_all_ended_s"] = time.perf_counter() - signalled
    wanted = set(pending)
    # Where the time of a slow stop went: when the `cancelled` events and the closes reached the subscribers.
    cancelled_at = [t for flow_id in pending for t in tally.arrivals.get((CANCELLED, flow_id), [])]
    closed_at = [r.closed_at for r in records if r.closed_at is not None]
    out["sigterm_to_last_cancelled_s"] = max(cancelled_at) - signalled if cancelled_at else None
    out["sigterm_to_first_close_s"] = min(closed_at) - signalled if closed_at else None
    out["sigterm_to_last_close_s"] = max(closed_at) - signalled if closed_at else None
    out["subscribers_all_cancelled"] = sum(1 for r in records if wanted <= r.cancelled)
    out["subscribers_closed_1001"] = sum(1 for r in records if r.close_code == CLOSE_GOING_AWAY)
    out["subscribers_cancelled_and_1001"] = sum(
        1 for r in records if wanted <= r.cancelled and r.close_code == CLOSE_GOING_AWAY
    )
    out["close_codes"] = dict(Counter(str(r.close_code) for r in records))
    return out


async def run(plan: Plan) -> dict[str, Any]:
    with trio.fail_after(SCENARIO_TIMEOUT_S):
        async with driven_daemon() as d:
            return await _measure(d, plan)
