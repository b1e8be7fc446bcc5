"""The Quart app: routing, `/health`, `/capabilities`, the device-flow routes and one JSON error surface.

It is the bottom layer of `serve.http.front` (the gates, the hot GETs and the event stream sit above it),
and the only module of the daemon that imports Quart, Flask or werkzeug: the daemon loads it in a worker
thread after it starts listening. Everything the app answers is JSON; nothing renders HTML.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from quart import Quart, Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from serve.audit import sanitize
from serve.errors import MethodNotAllowed, PayloadTooLarge, RouteNotFound, ServeError
from serve.http import routes, stream
from serve.http.fast import HEALTH_BYTES, capabilities_bytes
from serve.http.front import front
from serve.http.gates import ASGIApp
from serve.http.responses import error_response, never_html, status_response
from serve.http.services import Services

log = logging.getLogger("serve.http")


def create_app(services: Services) -> QuartTrio:
    """Quart with every layer of `serve.http.front` in front of it: what the daemon serves, as one Quart app
    (for Quart's test client, and for tests that want it built at once)."""
    app = quart_app(services)
    # Quart's documented middleware seam is replacing `asgi_app`; its hypercorn TypedDicts are looser here.
    app.asgi_app = cast(Any, front(services, cast(ASGIApp, app.asgi_app)))  # type: ignore[method-assign]
    return app


def quart_app(services: Services) -> QuartTrio:
    """Quart with the routes of SPEC §2 and the error handlers, without the layers above it."""
    app = QuartTrio("serve", static_folder=None)  # no default `/static` route: every route is documented
    app.config["MAX_CONTENT_LENGTH"] = services.config.server.max_body_bytes
    # Before any route exists (STACK-NOTES 7): a redirect would answer with an HTML body.
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False
    _install_error_handlers(app)

    # Also served by `serve.http.fast` (before Quart) for an exact GET; these serve HEAD and the rest.
    capabilities_body = capabilities_bytes(services)

    @app.get("/health")
    async def health() -> Response:
        return Response(HEALTH_BYTES, content_type="application/json")

    @app.get("/capabilities")
    async def capabilities() -> Response:
        return Response(capabilities_body, content_type="application/json")

    routes.install(app, services)

    # The stream is served in front of Quart; this rule only keeps Quart's answers to a plain HTTP request
    # on its path (400 to GET and HEAD, 405 to other methods). No WebSocket scope reaches it.
    @app.websocket(stream.EVENTS_PATH)
    async def auth_events() -> Response:
        return error_response(ServeError())

    return app


def _install_error_handlers(app: Quart) -> None:
    @app.errorhandler(ServeError)
    async def on_serve_error(error: ServeError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def on_http_exception(exc: HTTPException) -> Response:
        code = exc.code or 500
        if code == 404:
            return error_response(RouteNotFound())
        if code == 405:
            return error_response(MethodNotAllowed(list(getattr(exc, "valid_methods", None) or [])))
        if code == 413:
            return error_response(PayloadTooLarge())
        return status_response(code)

    @app.errorhandler(Exception)
    async def on_unexpected(exc: Exception) -> Response:
        # The traceback goes to the log (stderr); the client learns nothing about it.
        log.error("unhandled error in %s %s", request.method, sanitize(request.path), exc_info=exc)
        return error_response(ServeError())

    @app.after_request
    async def no_html(response: Response) -> Response:
        return never_html(response)
