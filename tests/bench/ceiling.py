"""The stack's ceiling: a bare app on hypercorn's trio worker that answers every GET with fixed bytes.

    python tests/bench/ceiling.py hypercorn|quart --port PORT --body-file FILE

`hypercorn` is a raw ASGI callable, `quart` a bare `QuartTrio` app with one route; both run under stock
`hypercorn.trio.serve` with hypercorn's default settings, and answer with the bytes of FILE (the daemon's
`GET /workspace/auth/status` body) as `application/json`. No gate, no token check, no routing beyond
Quart's own: what the stack costs before any of this project's code runs. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import hypercorn.config
import hypercorn.trio
import trio
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

if TYPE_CHECKING:
    from quart_trio import QuartTrio

STATUS_PATH = "/workspace/auth/status"


def raw_app(body: bytes) -> ASGIFramework:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return app


def quart_app(body: bytes) -> QuartTrio:
    # Imported here: the raw app's process does not load Quart.
    from quart import Response
    from quart_trio import QuartTrio

    app = QuartTrio(__name__)

    @app.get(STATUS_PATH)
    async def status() -> Response:
        return Response(body, content_type="application/json")

    return app


async def serve(app: ASGIFramework, port: int) -> None:
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.graceful_timeout = 1.0
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def stop() -> None:
            async for _ in signals:
                return

        await hypercorn.trio.serve(app, config, shutdown_trigger=stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["hypercorn", "quart"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-file", type=Path, required=True)
    args = parser.parse_args()
    body = args.body_file.read_bytes()
    app = raw_app(body) if args.kind == "hypercorn" else quart_app(body)
    trio.run(serve, app, args.port)


if __name__ == "__main__":
    main()
