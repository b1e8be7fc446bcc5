"""The HTTP application: the routes and the event stream behind the gates, with one JSON error surface.

Layers, outermost first, as `serve.http.server` calls them:

    shield_final_send   the final body send runs shielded (serve.http.asgi; STACK-NOTES 1)
    Gates               Host, Origin, bearer, strict, body size, request target (serve.http.gates)
    fast_gets           an exact GET of `/health`, `/capabilities` or the status (serve.http.fast)
    event_stream        `WS /workspace/auth/events` (serve.http.stream)
    QuartTrio           routing and the JSON error handlers; `/health`, `/capabilities` and the device-flow
                        routes (serve.http.routes)

Everything the app answers is JSON; nothing renders HTML.
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
from serve.http.asgi import shield_final_send
from serve.http.fast import HEALTH_BYTES, capabilities_bytes, fast_gets
from serve.http.gates import ASGIApp, Gates
from serve.http.responses import error_response, never_html, status_response
from serve.http.services import Services

log = logging.getLogger("serve.http")

# What `/capabilities` lists: only what works in this build (SPEC §2).


def create_app(services: Services) -> QuartTrio:
    """The ASGI app the server runs: gates, then Quart with every route of SPEC §2 and the event stream."""
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

    # Quart's documented middleware seam is replacing `asgi_app`; its hypercorn TypedDicts are looser here.
    quart_asgi = cast(ASGIApp, app.asgi_app)
    gated = Gates(
        fast_gets(stream.event_stream(quart_asgi, services), services), services.config.server, services.token
    )
    app.asgi_app = cast(Any, shield_final_send(gated))  # type: ignore[method-assign]
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
