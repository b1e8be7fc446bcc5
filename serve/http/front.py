"""The ASGI app the server runs: the layers every request passes through, with Quart at the bottom.

Layers, outermost first, as `serve.http.server` calls them:

    shield_final_send   the final body send runs shielded (serve.http.asgi; STACK-NOTES 1)
    Gates               Host, Origin, bearer, strict, body size, request target (serve.http.gates)
    fast_gets           an exact GET of `/health`, `/capabilities` or the status (serve.http.fast)
    event_stream        `WS /workspace/auth/events` (serve.http.stream)
    Quart               routing, the device-flow routes and the JSON error handlers (serve.http.app)

This module imports no Quart. The daemon serves `serving_app`, whose Quart is imported and built in a worker
thread once the server listens: Quart, Flask, Jinja2 and werkzeug are about 0.1 s of imports, a third of
the daemon's start, and the hot GETs and the event stream do not need them. A request that reaches Quart
before it is ready waits for it (a few tenths of a second at most, once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import trio

from serve.audit import sanitize
from serve.errors import ServeError
from serve.http.asgi import shield_final_send
from serve.http.fast import fast_gets
from serve.http.gates import ASGIApp, Gates, Message, Receive, Scope, Send, send_error
from serve.http.services import Services
from serve.http.stream import event_stream

log = logging.getLogger("serve.http")


def front(services: Services, quart: ASGIApp) -> ASGIApp:
    """Every layer above Quart, in front of `quart` (Quart's own ASGI callable)."""
    layers = fast_gets(event_stream(quart, services), services)
    return shield_final_send(Gates(layers, services.config.server, services.token))


def serving_app(
    services: Services,
    *,
    on_failure: Callable[[str], None],
    build_quart: Callable[[Services], ASGIApp] | None = None,
) -> ASGIApp:
    """The daemon's app: `front`, over a Quart that is loaded once the server listens (by `build_quart`, run
    in a worker thread; a seam for tests). If Quart cannot be built or started, `on_failure` gets one line
    saying why (the daemon then stops: without its routes it cannot log anyone in)."""
    return front(services, _QuartLoadedLater(services, build_quart or _build_quart, on_failure))


def _build_quart(services: Services) -> ASGIApp:
    """Import Quart and build the routes (in a worker thread: nothing here touches Trio)."""
    from serve.http.app import quart_app

    # Quart's hypercorn TypedDicts are stricter than our ASGI aliases.
    return cast(ASGIApp, quart_app(services).asgi_app)


class _QuartLoadedLater:
    """Quart's ASGI app, imported and built during the server's lifespan startup, without holding it up.

    The server's lifespan task owns Quart's: when Quart is built it gets its own `lifespan.startup`, and at
    the server's `lifespan.shutdown` its `lifespan.shutdown` (or the load is abandoned if it never ended).
    Requests for Quart wait until it is ready; whatever happens to the load, they stop waiting (a Quart
    that never came answers them with the JSON 500).
    """

    def __init__(
        self, services: Services, build: Callable[[Services], ASGIApp], on_failure: Callable[[str], None]
    ) -> None:
        self._services = services
        self._build = build
        self._on_failure = on_failure
        self._quart: ASGIApp | None = None
        self._ready = trio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if not self._ready.is_set():  # once ready, no wait (`Event.wait` would still yield a turn)
            await self._ready.wait()
        if self._quart is None:
            await send_error(scope, send, ServeError())
            return
        await self._quart(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        to_quart, quart_receives = trio.open_memory_channel[Message](1)
        quart_sends, from_quart = trio.open_memory_channel[Message](1)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._load, to_quart, from_quart, quart_sends, quart_receives)
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
                if self._quart is None:
                    nursery.cancel_scope.cancel()  # still loading: abandon it
                else:
                    await to_quart.send({"type": "lifespan.shutdown"})
                    stopped = await from_quart.receive()
                    if stopped["type"] != "lifespan.shutdown.complete":
                        log.error("the HTTP routes failed to stop: %s", sanitize(str(stopped.get("message", ""))))
        finally:
            self._ready.set()  # nothing waits for a Quart that will never come
        await send({"type": "lifespan.shutdown.complete"})

    async def _load(
        self,
        to_quart: trio.MemorySendChannel[Message],
        from_quart: trio.MemoryReceiveChannel[Message],
        quart_sends: trio.MemorySendChannel[Message],
        quart_receives: trio.MemoryReceiveChannel[Message],
    ) -> None:
        try:
            try:
                quart = await trio.to_thread.run_sync(self._build, self._services, abandon_on_cancel=True)
            except Exception as exc:
                log.exception("cannot load the HTTP routes")
                self._on_failure(f"cannot load the HTTP routes: {type(exc).__name__}")
                return
            try:
                # Quart's lifespan task lives here until the server's shutdown.
                async with trio.open_nursery() as nursery:
                    scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
                    nursery.start_soon(quart, scope, quart_receives.receive, quart_sends.send)
                    await to_quart.send({"type": "lifespan.startup"})
                    started = await from_quart.receive()
                    if started["type"] != "lifespan.startup.complete":
                        reason = sanitize(str(started.get("message", "")))
                        log.error("the HTTP routes failed to start: %s", reason)
                        self._on_failure("the HTTP routes failed to start")
                        nursery.cancel_scope.cancel()
                        return
                    self._quart = quart
                    self._ready.set()
            except Exception:
                self._quart = None  # its lifespan is gone: nothing would answer a shutdown
                log.exception("the HTTP routes failed")
                self._on_failure("the HTTP routes failed")
        finally:
            self._ready.set()  # also when the load failed or was abandoned: no request waits for ever
