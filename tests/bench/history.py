"""`GET /workspace/auth/status` with no finished flow retained, then with `flows` of them (each login
started and cancelled, and kept for an hour by `flows.DEVICE_FLOW_CONFIG`): the same wrk run on the same
daemon, before and after. A status whose cost grows with the retained history shows as a ratio below 1."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import trio

from bench import wrk
from bench.flows import PROVIDERS, Driven, driven_daemon
from bench.servers import STATUS_PATH

SCENARIO_TIMEOUT_S = 300


async def _fill(d: Driven, flows: int) -> list[float]:
    """`flows` logins started and cancelled, one provider per filler (so 4 at a time, the daemon's
    `max_active`); returns when each one ended (perf_counter), in order."""
    left = flows
    ended: list[float] = []

    async def filler(provider_id: str) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            flow_id, _ = await d.start_flow(provider_id)
            await d.cancel_flow(flow_id)
            ended.append(time.perf_counter())

    async with trio.open_nursery() as nursery:
        for provider_id in PROVIDERS:
            nursery.start_soon(filler, provider_id)
    return ended


def _seconds_per_flow(t0: float, ended: list[float], first: bool) -> float | None:
    """Wall seconds per login over the first or the last tenth of the fill (does starting one slow down as
    the history grows?)."""
    tenth = len(ended) // 10
    if tenth < 2:
        return None
    if first:
        return (ended[tenth - 1] - t0) / tenth
    return (ended[-1] - ended[-tenth - 1]) / tenth


async def run(flows: int, *, threads: int, connections: int, duration_s: int) -> dict[str, Any]:
    load = partial(wrk.load, path=STATUS_PATH, threads=threads, connections=connections, duration_s=duration_s)
    with trio.fail_after(SCENARIO_TIMEOUT_S):
        async with driven_daemon() as d:
            empty = await trio.to_thread.run_sync(load, d.server)
            t0 = time.perf_counter()
            ended = await _fill(d, flows)
            fill_s = time.perf_counter() - t0
            await trio.sleep(1.0)
            retained = await trio.to_thread.run_sync(load, d.server)
    return {
        "flows": flows,
        "fill_s": fill_s,
        "fill_s_per_flow_first_tenth": _seconds_per_flow(t0, ended, first=True),
        "fill_s_per_flow_last_tenth": _seconds_per_flow(t0, ended, first=False),
        "status_empty": empty,
        "status_retained": retained,
    }
