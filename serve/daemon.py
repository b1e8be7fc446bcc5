"""The composition root: builds the daemon's parts, owns the top nursery, serves until told to stop.

`run_daemon` is the one way a daemon runs, for the CLI and the tests alike:

    run_daemon
    └── httpx.AsyncClient (the IdPs)
        └── nursery
            ├── store.run              (loads the credential cache, then follows the files' mtimes)
            ├── registry.run           (its own nursery: the sweeper and one task per flow)
            └── serve.http.server.serve(app, …, shutdown_trigger=shutdown)   (binds, answers, drains, aborts)

Shutdown (SPEC §3): the trigger fires (a signal in the CLI, `RunningDaemon.shutdown()` in tests) →
the daemon's one `Shutdown` signal is set (new POSTs and handshakes get 503) → `registry.dispose()` (pending flows
end `cancelled`, their events are published; a credential write in flight finishes, ≤ 5 s) → the event bus
closes (every stream drains, then closes 1001) → the trigger returns → hypercorn stops listening and drains
requests for at most `graceful_timeout_s`, then aborts the connections still open → the store's refresher
is cancelled.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import hypercorn.config
import trio
from hypercorn.typing import ASGIFramework

from serve.audit import Audit
from serve.clock import WallClock
from serve.config import QWEN_OAUTH_ID, Config
from serve.credentials import CredentialStore
from serve.events import EventBus
from serve.http import server
from serve.http.front import serving_app
from serve.http.services import Services
from serve.keeper import CredentialKeeper
from serve.lifecycle import Shutdown
from serve.providers import build_providers
from serve.registry import DeviceFlowRegistry
from serve.store import FileCredentialStore

log = logging.getLogger("serve.daemon")

ShutdownTrigger = Callable[[], Awaitable[None]]

# Outbound IdP requests: each is also bounded by the registry's cancel scopes (start/poll timeouts).
IDP_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
# URL patterns (httpx mounts) of this machine's loopback hosts.
LOOPBACK_ORIGINS = ("all://127.0.0.1", "all://localhost", "all://[::1]")
# The event stream reads nothing from its peers: an inbound message larger than this is a 1009 close, so a
# peer cannot park megabytes of unfinished messages in the server (hypercorn's default is 16 MiB).
WEBSOCKET_MAX_MESSAGE_BYTES = 4096


class RoutesUnavailable(Exception):
    """The HTTP routes (Quart, loaded after the daemon listens) could not be loaded or started: the daemon
    stopped, and the CLI exits 1."""


class ListenError(Exception):
    """The daemon could not bind its address (in use, not permitted, not local); the CLI exits 1."""

    def __init__(self, bind: str, cause: OSError) -> None:
        self.bind = bind
        self.cause = cause
        reason = cause.strerror or str(cause)
        super().__init__(f"cannot listen on {bind}: {reason}")


@dataclass(slots=True)
class RunningDaemon:
    """What `run_daemon` hands back once it is bound: where it listens, its services, a way to stop it."""

    url: str
    urls: list[str]
    services: Services
    _stop: trio.Event = field(default_factory=trio.Event, repr=False)

    def shutdown(self) -> None:
        """Start the shutdown sequence; `run_daemon` returns once hypercorn has drained."""
        self._stop.set()


class _HypercornConfig(hypercorn.config.Config):
    """Hypercorn's config, plus TCP_USER_TIMEOUT on the listening sockets (accepted sockets inherit it).

    Hypercorn writes to a socket inside a shielded scope, so no cancellation can free a task writing to a
    peer that stopped reading (a zero TCP window): such a peer would hold its handler, and shutdown, for as
    long as it lives. With TCP_USER_TIMEOUT the kernel drops a connection whose sent data goes unacknowledged
    for that long, the write fails, and the handler ends. Linux only; elsewhere the option is skipped.
    """

    user_timeout_ms: int | None = None

    def create_sockets(self) -> hypercorn.config.Sockets:
        sockets = super().create_sockets()
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        if option is not None and self.user_timeout_ms:
            for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, option, self.user_timeout_ms)
        return sockets


def idp_ssl_context() -> ssl.SSLContext:
    """The CA-verifying TLS context of every IdP client in this process, built as httpx builds it
    (`SSL_CERT_FILE`, else `SSL_CERT_DIR`, else certifi's bundle; SPEC §5).

    Cached per those two variables: loading a CA bundle costs about 30 ms, once per daemon start otherwise.
    """
    return _ssl_context(os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None)


@functools.lru_cache(maxsize=4)
def _ssl_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    if cafile is not None:
        return ssl.create_default_context(cafile=cafile)
    if capath is not None:
        return ssl.create_default_context(capath=capath)
    return httpx.create_ssl_context(trust_env=False)


def idp_client(transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The client every request to an identity provider goes through (the daemon's, and `qwen-serve check`'s).

    trust_env: HTTPS_PROXY, NO_PROXY and SSL_CERT_FILE apply (SPEC §5), except to a loopback IdP (the dev IdP,
    a local Keycloak), which no proxy could reach: it is always reached directly. Redirects are never followed
    (a redirected token request is an upstream error, not a hop). `transport` is a seam for tests.
    """
    return httpx.AsyncClient(
        transport=transport,
        timeout=IDP_TIMEOUT,
        follow_redirects=False,
        trust_env=transport is None,
        verify=idp_ssl_context() if transport is None else True,
        mounts=dict.fromkeys(LOOPBACK_ORIGINS),  # None: the client's own transport, with no proxy
    )


def stalled_peer_timeout_s(config: Config) -> float:
    """How long a peer may accept no data before the kernel drops it: twice the heartbeat, at least 5 s.

    The event stream already releases a stalled subscriber after one heartbeat period (SPEC §4); this is the
    socket-level backstop that frees the handler itself, and so bounds how long shutdown can wait on one.
    """
    return max(2 * config.events.heartbeat_s, 5.0)


def hypercorn_config(config: Config, *, keep_alive_timeout_s: float | None = None) -> hypercorn.config.Config:
    """Hypercorn's settings from ours: the bind, TLS passthrough, graceful timeout, no access log."""
    server = config.server
    host = server.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    hc = _HypercornConfig()
    hc.user_timeout_ms = int(stalled_peer_timeout_s(config) * 1000)
    hc.bind = [f"{host}:{server.port}"]
    hc.graceful_timeout = server.graceful_timeout_s
    hc.certfile = server.certfile
    hc.keyfile = server.keyfile
    hc.accesslog = None
    hc.alpn_protocols = ["http/1.1"]  # HTTP/1.1 only, over TLS too (serve.http.server)
    # Connections waiting to be accepted (the kernel caps it at net.core.somaxconn). hypercorn's 100 drops
    # the SYNs of a burst of clients, which then retry only after a second.
    hc.backlog = 1024
    hc.websocket_max_message_size = WEBSOCKET_MAX_MESSAGE_BYTES
    # Our logger, so hypercorn installs no handler of its own; the CLI routes it to stderr.
    hc.errorlog = logging.getLogger("hypercorn.error")
    if keep_alive_timeout_s is not None:
        hc.keep_alive_timeout = keep_alive_timeout_s
    return hc


def compose(
    config: Config,
    *,
    token: bytes | None,
    workspace: Path,
    http: httpx.AsyncClient,
    store: CredentialStore,
    clock: WallClock,
    audit: Audit | None = None,
    env: Mapping[str, str] | None = None,
) -> Services:
    """The daemon's parts, wired together and not yet running: one `Shutdown` signal shared by the event bus,
    the registry and the routes; the providers on `http`; the registry on `store`."""
    shutdown_signal = Shutdown()
    bus = EventBus(
        clock=clock,
        ring_size=config.events.ring_size,
        subscriber_queue=config.events.subscriber_queue,
        shutdown=shutdown_signal,
    )
    providers = build_providers(config, http, env=os.environ if env is None else env, now_ms=clock.now_ms)
    registry = DeviceFlowRegistry(
        providers=providers,
        store=store,
        bus=bus,
        config=config.device_flow,
        clock=clock,
        audit=audit or Audit(),
        shutdown=shutdown_signal,
    )
    keeper = (
        CredentialKeeper(providers=providers, store=store, bus=bus, clock=clock, config=config.refresh)
        if isinstance(store, FileCredentialStore)
        else None
    )
    return Services(
        config=config,
        token=token,
        workspace=workspace,
        clock=clock,
        bus=bus,
        registry=registry,
        store=store,
        providers=providers,
        shutdown=shutdown_signal,
        keeper=keeper,
    )


async def run_daemon(
    config: Config,
    *,
    token: bytes | None,
    workspace: Path,
    qwen_home: Path,
    shutdown_trigger: ShutdownTrigger | None = None,
    http_transport: httpx.AsyncBaseTransport | None = None,
    credential_store: CredentialStore | None = None,
    clock: WallClock | None = None,
    audit: Audit | None = None,
    env: Mapping[str, str] | None = None,
    keep_alive_timeout_s: float | None = None,
    max_connections: int | None = None,
    dev_idp: bool = False,
    task_status: trio.TaskStatus[RunningDaemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `config` until `shutdown_trigger` returns or `RunningDaemon.shutdown()` is called.

    `task_status.started()` gets the `RunningDaemon` once the socket is bound (its `url` is the one hypercorn
    bound, with the real port when `port = 0`). `qwen_home` is where credentials live; `http_transport` (for
    the IdPs), `credential_store`, `audit` and `env` (for client secrets; default `os.environ`) are seams for
    tests: real components are injected, not mocked. `max_connections` defaults to what the descriptor limit
    allows (raised to its hard limit first). `dev_idp` also serves `serve.dev_idp` in this nursery and adds
    its provider `dev` (raises `ConfigError` if the configuration has one). Raises `ListenError` if the
    address cannot be bound, and `RoutesUnavailable` (after a normal shutdown) if the HTTP routes could not
    be loaded once it listened.
    Cancelling it stops at once, without the graceful drain.
    """
    clock = clock or WallClock()
    env = os.environ if env is None else env
    hc = hypercorn_config(config, keep_alive_timeout_s=keep_alive_timeout_s)
    if max_connections is None:
        max_connections = server.connection_budget(server.raise_file_limit())
    if dev_idp:
        from serve import dev_idp as dev  # only when asked: the daemon itself never needs it

        dev.check_config(config)
    stop = trio.Event()
    bound = False
    routes_failure: list[str] = []

    def routes_failed(reason: str) -> None:
        routes_failure.append(reason)
        stop.set()

    http = idp_client(http_transport)
    try:
        async with http, trio.open_nursery() as nursery:
            if dev_idp:
                config = dev.with_dev_provider(config, await nursery.start(dev.serve_dev_idp))
            _warn_about_missing_client_secrets(config, env)
            log.info("providers: %s", ", ".join(describe_providers(config)) or "none (every login is refused)")
            store = credential_store or FileCredentialStore(qwen_home)
            services = compose(
                config, token=token, workspace=workspace, http=http, store=store, clock=clock, audit=audit, env=env
            )
            if isinstance(store, FileCredentialStore):
                await nursery.start(store.run, [p.credentials_file for p in services.providers.values()])
            registry, bus, shutdown_signal = services.registry, services.bus, services.shutdown
            await nursery.start(registry.run)
            await nursery.start(bus.run)
            if services.keeper is not None:
                await nursery.start(services.keeper.run)
            # hypercorn's TypedDicts are stricter than our ASGI aliases.
            app = cast(ASGIFramework, serving_app(services, on_failure=routes_failed))

            async def shutdown() -> None:
                await _first_of(stop.wait, *([shutdown_trigger] if shutdown_trigger is not None else []))
                # SPEC §3 order: refuse new work, end the flows (their events go out), end the streams, then
                # let hypercorn stop listening and drain.
                shutdown_signal.begin()
                await registry.dispose()
                bus.close()

            async def serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
                await server.serve(
                    app, hc, shutdown_trigger=shutdown, max_connections=max_connections, task_status=task_status
                )
                nursery.cancel_scope.cancel()  # hypercorn has drained: stop the store's refresher too

            urls: list[str] = await nursery.start(serve)
            bound = True
            task_status.started(RunningDaemon(url=urls[0], urls=urls, services=services, _stop=stop))
    except BaseExceptionGroup as group:
        cause = None if bound else _bind_error(group)
        if cause is None:
            raise
        raise ListenError(hc.bind[0], cause) from None
    if routes_failure:
        raise RoutesUnavailable(routes_failure[0])


def describe_providers(config: Config) -> list[str]:
    """`id (kind, where it is)` per configured provider, in order: for the start-up line and `qwen-serve check`."""
    described = []
    if config.qwen_oauth.enabled:
        described.append(f"{QWEN_OAUTH_ID} (qwen-oauth, base_url {config.qwen_oauth.base_url})")
    for provider in config.providers:
        endpoint = provider.device_authorization_endpoint
        where = f"issuer {provider.issuer}" if endpoint is None else f"device_authorization_endpoint {endpoint}"
        described.append(f"{provider.provider_id} ({provider.kind}, {where})")
    return described


def _warn_about_missing_client_secrets(config: Config, env: Mapping[str, str]) -> None:
    """Say at start-up what would otherwise surface only as a 502 on the first login of that provider.

    Not an error: the secret is read at each request, so it may appear later (a mounted file, a rotation).
    """
    for provider in config.providers:
        if provider.client_secret_env and not env.get(provider.client_secret_env):
            log.warning(
                "provider %s: $%s is not set; its logins fail until it is",
                provider.provider_id,
                provider.client_secret_env,
            )
        if provider.client_secret_file and not os.path.isfile(provider.client_secret_file):
            log.warning(
                "provider %s: client_secret_file %s does not exist; its logins fail until it does",
                provider.provider_id,
                provider.client_secret_file,
            )


async def _first_of(*waits: Callable[[], Awaitable[Any]]) -> None:
    """Return as soon as any of `waits` returns; the others are cancelled."""
    async with trio.open_nursery() as nursery:

        async def run(wait: Callable[[], Awaitable[Any]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(run, wait)


def _bind_error(group: BaseExceptionGroup[BaseException]) -> OSError | None:
    """The socket error that stopped hypercorn from binding, when that is all the group holds."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 and isinstance(leaves[0], OSError) else None
