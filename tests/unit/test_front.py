"""`serve.http.front`: the layers the daemon serves, over a Quart that is imported and built only once the
server listens (SPEC §2's bodies unchanged; issue 13's cold start)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from support.daemon import services_for
from support.logs import captured, messages

from serve.http.front import _build_quart, serving_app
from serve.http.gates import ASGIApp, Message
from serve.http.services import Services

QUART_FAMILY = ("quart", "quart_trio", "flask", "werkzeug", "jinja2")


def test_the_daemon_loads_no_quart_before_it_serves() -> None:
    script = (
        "import sys, serve.cli, serve.daemon; "
        f"print(','.join(name for name in {QUART_FAMILY!r} if name in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "", f"loaded before serving: {done.stdout.strip()}"


def http_scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:4170")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 4170),
        "state": {},
    }


async def call(app: ASGIApp, path: str) -> tuple[int, Any]:
    """One GET through `app`; its status and JSON body."""
    sent: list[Message] = []
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if requested:  # the client stays connected until it has its answer
            await trio.sleep_forever()
        requested = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(http_scope(path), receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


class Lifespan:
    """The server's side of `app`'s lifespan, as hypercorn drives it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.to_app, self._app_receives = trio.open_memory_channel[Message](1)
        self._app_sends, self.from_app = trio.open_memory_channel[Message](1)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.app, {"type": "lifespan"}, self._app_receives.receive, self._app_sends.send)
            await self.to_app.send({"type": "lifespan.startup"})
            assert (await self.from_app.receive())["type"] == "lifespan.startup.complete"
            task_status.started()

    async def shut_down(self) -> None:
        await self.to_app.send({"type": "lifespan.shutdown"})
        assert (await self.from_app.receive())["type"] == "lifespan.shutdown.complete"


@pytest.fixture
async def services(tmp_path: Path) -> Services:
    return services_for(token=None, workspace=tmp_path, qwen_home=tmp_path / "home")


def held(
    release: threading.Event, build: Callable[[Services], ASGIApp] = _build_quart
) -> Callable[[Services], ASGIApp]:
    def build_when_released(services: Services) -> ASGIApp:
        assert release.wait(10)
        return build(services)

    return build_when_released


async def test_startup_does_not_wait_for_quart_and_a_request_for_it_waits_until_it_is_built(
    services: Services,
) -> None:
    release = threading.Event()
    failures: list[str] = []
    app = serving_app(services, build_quart=held(release), on_failure=failures.append)
    lifespan = Lifespan(app)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(lifespan.run)  # startup completed while the build is held
            # The layers above Quart answer at once.
            assert (await call(app, "/health")) == (200, {"status": "ok"})
            answered: list[tuple[int, Any]] = []

            async def needs_quart() -> None:
                answered.append(await call(app, "/openapi.json"))

            nursery.start_soon(needs_quart)
            await trio.sleep(0.2)
            assert answered == []
            release.set()
            while not answered:  # noqa: ASYNC110 (the request task has no event of its own)
                await trio.sleep(0.01)
            status, document = answered[0]
            assert status == 200 and document["openapi"].startswith("3.")
            await lifespan.shut_down()
    assert failures == []


def broken_import(services: Services) -> ASGIApp:
    raise ImportError("no quart here")


def failing_startup(services: Services) -> ASGIApp:
    """The real Quart, with a start-up hook that fails (Quart answers `lifespan.startup.failed`)."""
    from serve.http.app import quart_app

    app = quart_app(services)

    @app.before_serving
    async def fail() -> None:
        raise RuntimeError("cannot start")

    return cast(ASGIApp, app.asgi_app)


def crashing_lifespan(services: Services) -> ASGIApp:
    """An ASGI app whose lifespan raises instead of answering."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise RuntimeError("lifespan crashed")

    return app


@pytest.mark.parametrize(
    ("build", "failure", "logged"),
    [
        (broken_import, "cannot load the HTTP routes: ImportError", "cannot load the HTTP routes"),
        (failing_startup, "the HTTP routes failed to start", "the HTTP routes failed to start: cannot start"),
        (crashing_lifespan, "the HTTP routes failed", "the HTTP routes failed"),
    ],
    ids=["import", "startup failed", "lifespan crashed"],
)
async def test_routes_that_cannot_be_loaded_are_reported_and_their_requests_get_a_json_500(
    services: Services, build: Callable[[Services], ASGIApp], failure: str, logged: str
) -> None:
    failures: list[str] = []
    app = serving_app(services, build_quart=build, on_failure=failures.append)
    lifespan = Lifespan(app)
    with trio.fail_after(10), captured("serve.http", logging.ERROR) as records:
        async with trio.open_nursery() as nursery:
            await nursery.start(lifespan.run)
            status, body = await call(app, "/openapi.json")
            assert status == 500 and body["code"] == "internal_error"
            assert (await call(app, "/health")) == (200, {"status": "ok"})
            await lifespan.shut_down()  # and the shutdown does not wait for the routes
    assert failures == [failure]
    assert messages(records, logging.ERROR) == [logged]


async def test_a_shutdown_during_the_build_does_not_wait_for_it(services: Services) -> None:
    release = threading.Event()
    failures: list[str] = []
    app = serving_app(services, build_quart=held(release), on_failure=failures.append)
    lifespan = Lifespan(app)
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(lifespan.run)
                await lifespan.shut_down()
                # Nothing waits for a Quart that will never come.
                status, _ = await call(app, "/openapi.json")
                assert status == 500
    finally:
        release.set()  # let the abandoned worker thread finish
    assert failures == []


def test_a_daemon_whose_routes_cannot_be_imported_stops_and_exits_1(tmp_path: Path) -> None:
    """The whole path in a real `qwen-serve run`: Quart unimportable → one line, exit 1, nothing hangs."""
    script = (
        "import sys; sys.modules['quart'] = None; "  # `import quart` now raises ImportError
        "from serve.cli import entry; sys.argv = ['qwen-serve', 'run', '--port', '0', '--workspace', sys.argv[1]]; "
        "entry()"
    )
    env = {**os.environ, "QWEN_HOME": str(tmp_path / "home"), "QWEN_SERVER_TOKEN": "t" * 32}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=30, env=env
    )
    assert done.returncode == 1
    assert done.stdout.startswith("qwen-serve listening on http://127.0.0.1:")
    lines = done.stderr.splitlines()
    assert "qwen-serve: cannot load the HTTP routes: ModuleNotFoundError; the daemon stopped" in lines
    assert "t" * 32 not in done.stderr
