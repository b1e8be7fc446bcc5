"""Logins driven against this daemon from the bench: the fake IdPs of the integration tests served on
loopback (tests/support/idp_server.py), a daemon whose `qwen-oauth` points at one (QWEN_OAUTH_BASE_URL) and
whose three generic RFC 8628 providers point at the other, and the REST calls that start and cancel
device flows.

A POST for a provider that already has a pending login attaches to it (200, as the original does), so
the bench keeps at most one login per provider open: four providers give the daemon's `max_active` (4)
pending logins at once.

The original cannot be driven this way: its qwen-oauth endpoints are fixed at https://chat.qwen.ai
(`QWEN_OAUTH_BASE_URL` is a constant in its bundle, with no setting or variable to move it), which this
closed machine cannot reach, so a device flow never starts there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import trio
from support.idp_server import ServedIdP, serve_idp
from support.login import FLOWS_PATH, generic_idp, generic_provider, qwen_idp

from bench import servers
from bench.processes import RunningServer, start

# Only what lets the bench run many logins quickly: no start-rate limit, short polls for the grants, and
# every finished flow kept (the sweeper would evict them after 300 s).
DEVICE_FLOW_CONFIG = {"max_starts_per_minute": 100_000, "min_interval_s": 0.05, "terminal_grace_s": 3600}
QWEN = "qwen-oauth"
GENERIC = ("bench-2", "bench-3", "bench-4")
PROVIDERS = (QWEN, *GENERIC)


@dataclass
class Driven:
    idp: ServedIdP  # qwen-oauth's
    generic_idp: ServedIdP  # the generic providers'
    server: RunningServer
    client: httpx.AsyncClient

    async def start_flow(self, provider_id: str = QWEN) -> tuple[str, float]:
        """POST a login: (its deviceFlowId, the POST's own latency in seconds)."""
        t0 = time.perf_counter()
        response = await self.client.post(FLOWS_PATH, json={"providerId": provider_id})
        latency = time.perf_counter() - t0
        if response.status_code != 201:
            raise RuntimeError(f"POST {FLOWS_PATH} answered {response.status_code}: {response.text[:300]}")
        flow_id: str = response.json()["deviceFlowId"]
        return flow_id, latency

    async def cancel_flow(self, flow_id: str) -> None:
        response = await self.client.delete(f"{FLOWS_PATH}/{flow_id}")
        if response.status_code != 204:
            raise RuntimeError(f"DELETE {FLOWS_PATH}/… answered {response.status_code}: {response.text[:300]}")


@contextlib.asynccontextmanager
async def driven_daemon() -> AsyncIterator[Driven]:
    """This daemon against the fake IdPs, and an httpx client with the bearer token."""
    async with serve_idp(qwen_idp()) as served, serve_idp(generic_idp()) as generic:
        config = {
            "device_flow": DEVICE_FLOW_CONFIG,
            "providers": {provider_id: generic_provider(generic.idp) for provider_id in GENERIC},
        }
        spec = servers.ours(env={"QWEN_OAUTH_BASE_URL": served.url}, config=config)
        stack = contextlib.ExitStack()
        # Blocking (it polls the port): in a thread, so the IdP in this loop keeps answering meanwhile.
        server = await trio.to_thread.run_sync(stack.enter_context, start(spec))
        try:
            headers = {"Authorization": f"Bearer {servers.TOKEN}"}
            async with httpx.AsyncClient(base_url=server.url, headers=headers, trust_env=False, timeout=30) as client:
                yield Driven(served, generic, server, client)
        finally:
            await trio.to_thread.run_sync(stack.close)
