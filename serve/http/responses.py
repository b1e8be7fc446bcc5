"""JSON responses: the one rendering of every error, the fallbacks that keep HTML out, and gate 5's body parse.

Everything the daemon answers over HTTP is JSON; nothing here renders HTML.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

from quart import Response, request

from serve import wire
from serve.errors import InvalidJson, ServeError


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A compact JSON response, encoded as the original encodes (`serve.wire.dumps`)."""
    return Response(wire.dumps(body), status=status, headers=headers, content_type="application/json")


def error_response(error: ServeError) -> Response:
    """The one rendering of every wire error: its status, its body, its headers."""
    return json_response(wire.error_body(error), error.status, error.headers())


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_json_body() -> Any:
    """Gate 5's parse of the current request's body.

    An empty body or a non-JSON content type counts as `{}`; malformed JSON (including NaN and Infinity,
    which `JSON.parse` rejects too) raises `InvalidJson`. A chunked body over `max_body_bytes` raises
    werkzeug's 413, rendered as `payload_too_large`.
    """
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        return {}
    raw = await request.get_data(as_text=False)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: `[[[[…` nested deeper than the parser goes
        raise InvalidJson from exc


def status_response(status: int) -> Response:
    """A JSON error for a status no `ServeError` names: the reason phrase and its snake_case code."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    code = re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")
    return json_response({"error": phrase, "code": code}, status)


def never_html(response: Response) -> Response:
    """Quart's automatic OPTIONS reply and redirects are `text/html`: make them empty or JSON."""
    if response.mimetype != "text/html":
        return response
    if response.status_code < 300:
        # The automatic OPTIONS reply: empty, with `Allow`.
        response.status_code = 204
        response.set_data(b"")
        del response.headers["Content-Type"]
        del response.headers["Content-Length"]
        return response
    replacement = status_response(response.status_code if response.status_code >= 400 else 500)
    if "Allow" in response.headers:
        replacement.headers["Allow"] = response.headers["Allow"]
    return replacement
