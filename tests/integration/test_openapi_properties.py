"""A property-based pass over every HTTP route of `/openapi.json` against a real daemon (issue 8).

Hypothesis draws requests from the document itself (operation, path parameters, bearer, client id,
content type, body) and sends them over a real socket; every answer must be documented for its
(path, method, status), match that response's schema, be JSON (or empty on 204), be no 5xx but the
documented 502/503, and never carry the daemon's token. The IdPs are closed loopback ports, so starts
fail fast with 502 and nothing leaves the machine. Derandomized and bounded, so a run is repeatable and
takes a few seconds; the WebSocket route is left to its own tests (it is a handshake, not a request).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any, Literal
from urllib.parse import quote

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.login import closed_port_url, login_config
from support.openapi_checker import HTTP_METHODS, Checker

from serve.daemon import RunningDaemon, run_daemon
from serve.http.openapi import openapi_document

TOKEN = "property-token-6f1d2c8e0b4a"
DOCUMENT = openapi_document()
OPERATIONS = sorted(
    (template, method)
    for template, operations in DOCUMENT["paths"].items()
    for method in operations
    if method in HTTP_METHODS and template != "/workspace/auth/events"
)


@pytest.fixture(scope="module")
def daemon_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real daemon in its own thread (Hypothesis drives a synchronous client): its URL."""
    root = tmp_path_factory.mktemp("properties")
    (root / "workspace").mkdir()
    idp = closed_port_url()
    config = login_config(idp, providers={"acme": {"kind": "rfc8628", "issuer": idp, "client_id": "c"}})
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            daemon: RunningDaemon = await nursery.start(
                partial(run_daemon, config, token=TOKEN.encode(), workspace=root / "workspace", qwen_home=root / "home")
            )
            box.update(daemon=daemon, trio_token=trio.lowlevel.current_trio_token())
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(20), "the daemon did not start"
    try:
        yield box["daemon"].url
    finally:
        box["trio_token"].run_sync_soon(box["daemon"].shutdown)
        thread.join(10)
        assert not thread.is_alive(), "the daemon did not stop"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
bodies = st.one_of(
    st.none(),
    st.builds(lambda p: json.dumps({"providerId": p}), st.sampled_from(["qwen-oauth", "acme", "", "nope"])),
    st.builds(lambda p: json.dumps({"providerId": p}), st.text(max_size=20) | st.integers() | st.none()),
    json_values.map(json.dumps),
    st.binary(max_size=40),
)
# Annotated: mypy infers a bare ("Cs",) as tuple[str], not the category literal `characters` takes.
SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
path_values = st.one_of(
    st.uuids().map(str),
    st.text(st.characters(codec="utf-8", exclude_categories=SURROGATES), min_size=1, max_size=30),
)
# Header values as a client can send them: Latin-1 without controls, no surrounding blanks (RFC 9110 §5.5).
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=140
).map(lambda value: value.strip(" \t"))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[bytes, bytes], bytes | None]:
    template, method = draw(st.sampled_from(OPERATIONS))
    path = template.replace("{deviceFlowId}", quote(draw(path_values), safe=""))
    headers: dict[str, str] = {}  # encoded as Latin-1 below, as a raw client may send them
    bearer = draw(st.sampled_from(["good", "good", "missing", "wrong", "odd"]))
    if bearer == "good":
        headers["Authorization"] = f"Bearer {TOKEN}"
    elif bearer == "wrong":
        headers["Authorization"] = f"Bearer {TOKEN[:-1]}x"
    elif bearer == "odd":
        headers["Authorization"] = draw(header_text)
    client_id = draw(st.none() | st.sampled_from(["cli-A", ""]) | header_text)
    if client_id is not None:
        headers["X-Qwen-Client-Id"] = client_id
    body = draw(bodies) if method in ("post", "delete") else None
    if body is not None:
        headers["Content-Type"] = draw(st.sampled_from(["application/json", "text/plain", "application/x+json"]))
    raw = body.encode() if isinstance(body, str) else body
    return method.upper(), path, {name.encode(): value.encode("latin-1") for name, value in headers.items()}, raw


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
def test_every_answer_is_documented_json_and_free_of_secrets(
    daemon_url: str, request: tuple[str, str, dict[bytes, bytes], bytes | None]
) -> None:
    method, path, headers, body = request
    with httpx.Client(base_url=daemon_url, timeout=10) as client:
        response = client.request(method, path, headers=headers, content=body)
    Checker(DOCUMENT).check(path, method, response.status_code, response.content, response.headers.get("content-type"))
    assert response.status_code < 500 or response.status_code in (502, 503), response.text
    if response.status_code != 204:
        assert response.headers["content-type"] == "application/json"
        json.loads(response.content)
    assert TOKEN.encode() not in response.content
    assert b"Traceback" not in response.content


def test_the_pass_covers_every_http_route_of_the_document() -> None:
    documented = {
        (template, method)
        for template, operations in DOCUMENT["paths"].items()
        for method in operations
        if method in HTTP_METHODS
    }
    assert documented - set(OPERATIONS) == {("/workspace/auth/events", "get")}
