"""Running daemons in tests: the `start_daemon` fixture's type, ports, and an app served from memory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from quart.typing import TestClientProtocol
from quart_trio import QuartTrio

from serve.clock import WallClock
from serve.config import Config, load_config
from serve.daemon import RunningDaemon, compose
from serve.http.app import create_app
from serve.http.services import Services
from serve.store import FileCredentialStore

IN_MEMORY_HOST = "127.0.0.1:4170"
"""The Host an in-memory request names: the test client sends no server address, so the Host gate compares
the configured port (4170 by default)."""

StartDaemon = Callable[..., AbstractAsyncContextManager[RunningDaemon]]
"""`start_daemon(config=None, *, token=..., **run_daemon_kwargs)` (tests/conftest.py)."""


def port_of(daemon_or_url: RunningDaemon | str) -> int:
    url = daemon_or_url if isinstance(daemon_or_url, str) else daemon_or_url.url
    port = urlsplit(url).port
    assert port is not None
    return port


def _no_idp_here(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"an in-memory app tried to reach an IdP: {request.url}")


def services_for(config: Config | None = None, *, token: bytes | None, workspace: Path, qwen_home: Path) -> Services:
    """The daemon's real parts (bus, registry, store, providers), not running, with no IdP reachable."""
    config = config or load_config()
    # No IdP is reached from memory: the registry does not run, so a request here would be a test bug.
    unreachable = httpx.AsyncClient(transport=httpx.MockTransport(_no_idp_here))
    return compose(
        config,
        token=token,
        workspace=workspace,
        http=unreachable,
        store=FileCredentialStore(qwen_home),
        clock=WallClock(),
        env={},
    )


def app_for(config: Config | None = None, *, token: bytes | None, workspace: Path, qwen_home: Path) -> QuartTrio:
    """The daemon's real app over real parts (`services_for`), served from memory.

    For tests of gates, bodies and route shapes: Quart's test client calls the same ASGI app hypercorn
    would (gates, shield, routing, error handlers), without sockets. The registry is not running, so a
    login cannot start here; tests that log in use a real daemon.
    """
    return create_app(services_for(config, token=token, workspace=workspace, qwen_home=qwen_home))


@asynccontextmanager
async def in_memory(app: QuartTrio) -> AsyncIterator[TestClientProtocol]:
    """Quart's test client for `app`, inside the app's lifespan."""
    async with app.test_app() as running:
        yield running.test_client()


def loopback_client(**kwargs: Any) -> httpx.AsyncClient:
    """An httpx client for a daemon on 127.0.0.1: plain HTTP, so no TLS context (loading the CA bundle
    costs ~30 ms per client, a third of the suite's CPU when every test built one), and no proxy from the
    environment (none could reach this machine's loopback)."""
    kwargs.setdefault("trust_env", False)
    return httpx.AsyncClient(verify=False, **kwargs)
