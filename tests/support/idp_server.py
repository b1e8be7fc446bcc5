"""Serve a `FakeIdP` over real HTTP on loopback, for integration and end-to-end tests.

The same scripted, request-validating IdP the unit tests use behind `httpx.MockTransport`, but reached
through a real hypercorn on 127.0.0.1:0, so the daemon's own httpx client, its timeouts and its TCP
connections are the ones a user has. A validation failure inside the IdP cannot raise through the
daemon: it is recorded in `errors` (and answered with a 500), and `serve_idp` fails the test on exit.
"""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

import httpx
import hypercorn.config
import hypercorn.trio
import trio
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from serve.http.asgi import lifespan_without_hooks
from serve.http.gates import Receive, Send
from support.fake_idp import FakeIdP


@dataclass
class ServedIdP:
    idp: FakeIdP
    url: str
    errors: list[str] = field(default_factory=list)
    # Seconds to wait before answering each token / device request (a slow IdP); 0 answers at once.
    token_delay_s: float = 0.0
    device_delay_s: float = 0.0
    # Set when a request reaches the IdP, before any delay: a signal to order a test's callers by.
    token_request_arrived: trio.Event = field(default_factory=trio.Event)
    device_request_arrived: trio.Event = field(default_factory=trio.Event)


def _asgi(served: ServedIdP) -> ASGIFramework:
    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            # hypercorn's TypedDicts are stricter than the project's ASGI aliases.
            await lifespan_without_hooks(cast(Receive, receive), cast(Send, send))
            return
        assert scope["type"] == "http", "the fake IdP speaks plain HTTP only"
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: answer what was read
                break
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = scope.get("query_string", b"").decode()
        url = served.idp.base_url + scope["path"] + (f"?{query}" if query else "")
        request = httpx.Request(
            scope["method"], url, headers=[(k.decode(), v.decode()) for k, v in scope["headers"]], content=body
        )
        if url == served.idp.token_url:
            served.token_request_arrived.set()
            await trio.sleep(served.token_delay_s)
        if url == served.idp.device_url:
            served.device_request_arrived.set()
            await trio.sleep(served.device_delay_s)
        try:
            response = served.idp(request)
            response.read()
        except AssertionError:
            served.errors.append(traceback.format_exc())
            response = httpx.Response(500, json={"error": "server_error"})
        headers = [(k.encode(), v.encode()) for k, v in response.headers.items() if k.lower() != "content-length"]
        content = response.content
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": content, "more_body": False})

    return app


@asynccontextmanager
async def serve_idp(idp: FakeIdP) -> AsyncIterator[ServedIdP]:
    """Run `idp` on http://127.0.0.1:PORT (its `base_url` is set to that) until the block ends."""
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 0.2
    config.accesslog = None
    config.errorlog = None
    stop = trio.Event()
    served = ServedIdP(idp=idp, url="")
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            lambda task_status: hypercorn.trio.serve(
                _asgi(served),
                config,
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        )
        served.url = urls[0]
        idp.base_url = urls[0]
        try:
            yield served
        finally:
            stop.set()
    assert not served.errors, "the fake IdP refused a request:\n" + "\n".join(served.errors)
