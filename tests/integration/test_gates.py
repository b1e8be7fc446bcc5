"""Gates 1–5 (SPEC §1) and the JSON-only error surface, through a real hypercorn on 127.0.0.1:0."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
from quart import Quart, Response
from quart_trio import QuartTrio
from support.daemon import IN_MEMORY_HOST, StartDaemon, app_for, in_memory, loopback_client, port_of
from support.login import bearer_headers

from serve import __version__
from serve.config import Config
from serve.daemon import RunningDaemon
from serve.http.responses import json_response, read_json_body
from serve.http.stream import EVENTS_PATH

# SPEC §1 bodies, copied here so the tests read nothing outside the project.
INVALID_HOST = {"error": "Invalid Host header"}
ORIGIN_DENIED = {"error": "Request denied by CORS policy"}
UNAUTHORIZED = {"error": "Unauthorized"}
TOKEN_REQUIRED = {
    "error": "This route requires the daemon to be configured with a bearer token. "
    "Set QWEN_SERVER_TOKEN or pass --token to enable bearer auth.",
    "code": "token_required",
}
TOO_LARGE = {"error": "Request body too large", "code": "payload_too_large"}
INVALID_JSON = {"error": "Invalid JSON in request body", "code": "invalid_json"}
NOT_FOUND = {"error": "Not found", "code": "not_found"}
INTERNAL = {"error": "Internal error", "code": "internal_error"}

STRICT = "/workspace/auth/device-flow"


@pytest.fixture
async def client(daemon: RunningDaemon) -> AsyncIterator[httpx.AsyncClient]:
    async with loopback_client(base_url=daemon.url) as c:
        yield c


def assert_json(response: httpx.Response, status: int, body: object) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == body


# --- gate 1: Host -------------------------------------------------------------------------------------


async def test_foreign_host_is_refused_before_auth(daemon: RunningDaemon, client: httpx.AsyncClient) -> None:
    with trio.fail_after(5):
        for path in ("/health", "/capabilities", STRICT):
            response = await client.get(path, headers={"Host": f"evil.example:{port_of(daemon)}"})
            assert_json(response, 403, INVALID_HOST)


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", "LOCALHOST", "[::1]"])
async def test_loopback_host_names_with_the_bound_port_pass(
    daemon: RunningDaemon, client: httpx.AsyncClient, auth: dict[str, str], name: str
) -> None:
    with trio.fail_after(5):
        response = await client.get("/capabilities", headers={**auth, "Host": f"{name}:{port_of(daemon)}"})
    assert response.status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1:1", "127.0.0.1", "localhost.evil.example:{port}", "[::1]x:{port}"])
async def test_a_loopback_name_on_another_port_is_refused(
    daemon: RunningDaemon, client: httpx.AsyncClient, host: str
) -> None:
    with trio.fail_after(5):
        response = await client.get("/health", headers={"Host": host.format(port=port_of(daemon))})
    assert_json(response, 403, INVALID_HOST)


async def test_extra_hosts_are_accepted(
    start_daemon: StartDaemon, make_config: Callable[..., Config], auth: dict[str, str]
) -> None:
    config = make_config(extra_hosts=["box.example", "other.example:8443"])
    with trio.fail_after(10):
        async with start_daemon(config) as daemon, loopback_client(base_url=daemon.url) as c:
            for host, status in [
                ("box.example:1234", 200),
                ("other.example:8443", 200),
                ("other.example:8444", 403),
                ("evil.example", 403),
            ]:
                response = await c.get("/health", headers={"Host": host})
                assert response.status_code == status, host


# --- gate 2: Origin -----------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:1"])
async def test_foreign_origin_is_refused_with_vary(
    client: httpx.AsyncClient, auth: dict[str, str], origin: str
) -> None:
    with trio.fail_after(5):
        response = await client.get("/capabilities", headers={**auth, "Origin": origin})
    assert_json(response, 403, ORIGIN_DENIED)
    assert response.headers["vary"] == "Origin"


async def test_own_origin_passes(daemon: RunningDaemon, client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    with trio.fail_after(5):
        response = await client.get("/capabilities", headers={**auth, "Origin": daemon.url})
    assert response.status_code == 200


async def test_allow_origins_pass(
    start_daemon: StartDaemon, make_config: Callable[..., Config], auth: dict[str, str]
) -> None:
    config = make_config(allow_origins=["https://app.example"])
    with trio.fail_after(10):
        async with start_daemon(config) as daemon, loopback_client(base_url=daemon.url) as c:
            assert (await c.get("/capabilities", headers={**auth, "Origin": "https://app.example"})).status_code == 200
            assert (await c.get("/capabilities", headers={**auth, "Origin": "https://app2.example"})).status_code == 403


# --- gate 3: bearer -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong",
        "Bearer",
        "Basic dGVzdDp0ZXN0",
        "bearer wrong",
        "Bearer test-token-0123456789abcdef-and-more",
        "Bearertest-token-0123456789abcdef",
        "Bearer tést".encode("latin-1"),
        "Bearer tökén-☃".encode(),
        b"Bearer \xff\xfe\x80",
    ],
)
async def test_a_missing_or_wrong_bearer_is_401_never_500(
    client: httpx.AsyncClient, authorization: str | bytes | None
) -> None:
    # As bytes: httpx takes a mapping of str or of bytes, not both (the str values here are all ASCII, which is
    # how httpx would have encoded them).
    value = authorization.encode("ascii") if isinstance(authorization, str) else authorization
    headers: dict[bytes, bytes] = {} if value is None else {b"Authorization": value}
    with trio.fail_after(5):
        for path in ("/capabilities", "/no/such/route", STRICT):
            response = await client.get(path, headers=headers)
            assert_json(response, 401, UNAUTHORIZED)
            assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer test-token-0123456789abcdef",
        "bearer test-token-0123456789abcdef",
        "BEARER test-token-0123456789abcdef",
        "Bearer   test-token-0123456789abcdef",
        "Bearer\ttest-token-0123456789abcdef",
    ],
)
async def test_the_scheme_is_case_insensitive_and_blanks_are_ignored(
    client: httpx.AsyncClient, authorization: str
) -> None:
    with trio.fail_after(5):
        response = await client.get("/capabilities", headers={"Authorization": authorization})
    assert response.status_code == 200


async def test_a_non_ascii_token_is_compared_as_bytes(
    start_daemon: StartDaemon,
) -> None:
    secret = "tökén-☃-0123456789".encode()
    with trio.fail_after(10):
        async with start_daemon(token=secret) as daemon, loopback_client(base_url=daemon.url) as c:
            assert (await c.get("/capabilities", headers={b"Authorization": b"Bearer " + secret})).status_code == 200
            wrong = "Bearer tökén-☃-0123456789x".encode()
            assert_json(await c.get("/capabilities", headers={b"Authorization": wrong}), 401, UNAUTHORIZED)


async def test_health_is_open_and_everything_else_needs_the_bearer(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    with trio.fail_after(5):
        assert_json(await client.get("/health"), 200, {"status": "ok"})
        assert_json(await client.get("/health", headers={"Authorization": "Bearer wrong"}), 200, {"status": "ok"})
        assert_json(await client.post("/health"), 401, UNAUTHORIZED)
        assert_json(await client.get("/nope"), 401, UNAUTHORIZED)
        assert_json(await client.get("/nope", headers=auth), 404, NOT_FOUND)
        assert_json(
            await client.get(f"{STRICT}/some-id", headers=auth),
            404,
            {"error": "Device-flow some-id not found", "code": "device_flow_not_found"},
        )


# --- gate 4: strict -----------------------------------------------------------------------------------


@pytest.fixture
async def tokenless(start_daemon: StartDaemon) -> AsyncIterator[RunningDaemon]:
    async with start_daemon(token=None) as running:
        yield running


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", STRICT),
        ("POST", STRICT + "/"),
        ("DELETE", STRICT + "/abc"),
        ("DELETE", STRICT + "/abc/def"),
        ("DELETE", STRICT),
    ],
)
async def test_strict_routes_need_a_configured_token_even_before_they_exist(
    tokenless: RunningDaemon, method: str, path: str
) -> None:
    async with loopback_client(base_url=tokenless.url) as c:
        with trio.fail_after(5):
            response = await c.request(method, path, json={"providerId": "qwen-oauth"})
    assert_json(response, 401, TOKEN_REQUIRED)


async def test_the_strict_gate_is_not_fooled_by_doubled_slashes(tokenless: RunningDaemon) -> None:
    request = (
        f"POST //workspace//auth/device-flow HTTP/1.1\r\nHost: 127.0.0.1:{port_of(tokenless)}\r\n"
        "Connection: close\r\n\r\n"
    )
    with trio.fail_after(5):
        raw, _ = await raw_exchange(tokenless, request.encode())
    status, _, body = parse_response(raw)
    assert (status, json.loads(body)) == (401, TOKEN_REQUIRED)


async def test_tokenless_reads_are_not_strict(tokenless: RunningDaemon) -> None:
    async with loopback_client(base_url=tokenless.url) as c:
        with trio.fail_after(5):
            assert_json(
                await c.get(f"{STRICT}/abc"),
                404,
                {"error": "Device-flow abc not found", "code": "device_flow_not_found"},
            )
            assert_json(await c.post("/workspace/auth/device-flowX"), 404, NOT_FOUND)
            assert (await c.get("/capabilities")).status_code == 200


# --- gate 5: body -------------------------------------------------------------------------------------


async def raw_exchange(daemon: RunningDaemon, request: bytes) -> tuple[bytes, bool]:
    """Send `request` bytes on a fresh socket; return everything read and whether the server closed it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(daemon))
    async with stream:
        await stream.send_all(request)
        received = b""
        with trio.move_on_after(3):
            while chunk := await stream.receive_some(65536):
                received += chunk
            return received, True
        return received, False


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def test_a_large_declared_body_is_413_without_being_sent(daemon: RunningDaemon, token: str) -> None:
    request = (
        f"POST {STRICT} HTTP/1.1\r\nHost: 127.0.0.1:{port_of(daemon)}\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    ).encode()
    with trio.fail_after(5):
        raw, _ = await raw_exchange(daemon, request)
    status, headers, body = parse_response(raw)
    assert status == 413
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == TOO_LARGE


async def test_auth_is_checked_before_the_body_size(daemon: RunningDaemon, tokenless: RunningDaemon) -> None:
    for running, expected in ((daemon, UNAUTHORIZED), (tokenless, TOKEN_REQUIRED)):
        request = (
            f"POST {STRICT} HTTP/1.1\r\nHost: 127.0.0.1:{port_of(running)}\r\n"
            "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
        ).encode()
        with trio.fail_after(5):
            raw, _ = await raw_exchange(running, request)
        status, _, body = parse_response(raw)
        assert (status, json.loads(body)) == (401, expected)


def echo_routes(app: Quart) -> None:
    """Test-only routes, added to the daemon's real app (after its error handlers, behind its gates)."""

    @app.post("/test/echo")
    async def echo() -> Response:
        return json_response({"received": await read_json_body()})

    @app.get("/test/boom")
    async def boom() -> Response:
        raise RuntimeError("secret detail 42")


@pytest.fixture
async def echo_app(workspace: Path, qwen_home: Path, token: str) -> QuartTrio:
    app = app_for(token=token.encode(), workspace=workspace, qwen_home=qwen_home)
    echo_routes(app)
    return app


@pytest.mark.parametrize(
    ("content_type", "content", "status", "body"),
    [
        ("application/json", b'{"providerId":"x"}', 200, {"received": {"providerId": "x"}}),
        ("application/json; charset=utf-8", b"[1,2]", 200, {"received": [1, 2]}),
        ("application/vnd.api+json", b"{}", 200, {"received": {}}),
        ("application/json", b"", 200, {"received": {}}),
        ("application/json", b"  \n", 200, {"received": {}}),
        ("text/plain", b"{not json", 200, {"received": {}}),
        (None, b"{not json", 200, {"received": {}}),
        ("application/json", b"{not json", 400, INVALID_JSON),
        ("application/json", b'{"a":NaN}', 400, INVALID_JSON),
        ("application/json", b"\xff\xfe", 400, INVALID_JSON),
    ],
)
async def test_json_bodies(
    echo_app: QuartTrio,
    auth: dict[str, str],
    content_type: str | None,
    content: bytes,
    status: int,
    body: object,
) -> None:
    headers = dict(auth) if content_type is None else {**auth, "Content-Type": content_type}
    async with in_memory(echo_app) as client:
        response = await client.post("/test/echo", data=content, headers={"Host": IN_MEMORY_HOST, **headers})
    assert response.status_code == status
    assert response.content_type == "application/json"
    assert json.loads(await response.get_data()) == body


async def test_a_chunked_body_over_the_limit_is_413(
    start_daemon: StartDaemon, make_config: Callable[..., Config], token: str, auth: dict[str, str]
) -> None:
    config = make_config(max_body_bytes=4096)
    with trio.fail_after(10):
        async with start_daemon(config) as daemon:
            head = (
                f"POST {STRICT} HTTP/1.1\r\nHost: 127.0.0.1:{port_of(daemon)}\r\nAuthorization: Bearer {token}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            ).encode()
            chunks = b"".join(b"400\r\n" + b" " * 1024 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
            raw, _ = await raw_exchange(daemon, head + chunks)
            status, _, body = parse_response(raw)
            assert (status, json.loads(body)) == (413, TOO_LARGE)
            async with loopback_client(base_url=daemon.url) as c:
                small = await c.post(STRICT, json={"providerId": 1}, headers=auth)
                assert small.status_code == 400  # read and parsed: invalid_request


# --- routing errors, never HTML ------------------------------------------------------------------------


async def test_wrong_method_is_json_405_with_allow(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    with trio.fail_after(5):
        response = await client.delete("/capabilities", headers=auth)
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/json"
    assert response.json()["code"] == "method_not_allowed"
    assert "GET" in response.headers["allow"]


async def test_no_html_for_trailing_slashes_options_or_head(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    with trio.fail_after(5):
        assert_json(await client.get("/health/", headers=auth), 200, {"status": "ok"})
        assert (await client.get("/capabilities/", headers=auth)).status_code == 200
        assert_json(await client.get("//health", headers=auth), 404, NOT_FOUND)
        options = await client.options("/capabilities", headers=auth)
        assert options.status_code == 204
        assert "GET" in options.headers["allow"]
        assert "text/html" not in options.headers.get("content-type", "")
        assert options.content == b""
        head = await client.head("/health")
        assert head.status_code == 200
        assert head.headers["content-type"] == "application/json"


async def test_an_unexpected_error_is_a_generic_500_and_the_traceback_is_logged(
    echo_app: QuartTrio, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="serve.http")
    async with in_memory(echo_app) as client:
        response = await client.get("/test/boom", headers={"Host": IN_MEMORY_HOST, **auth})
    assert response.status_code == 500
    body = await response.get_data()
    assert json.loads(body) == INTERNAL
    assert b"secret detail" not in body
    assert "secret detail 42" in caplog.text
    assert "Traceback" in caplog.text


# --- /health and /capabilities -------------------------------------------------------------------------


async def test_capabilities_lists_what_this_build_serves(
    daemon: RunningDaemon, client: httpx.AsyncClient, auth: dict[str, str], workspace: object
) -> None:
    with trio.fail_after(5):
        response = await client.get("/capabilities", headers=auth)
    assert response.status_code == 200
    assert response.text == (
        '{"v":1,"protocolVersions":{"current":"v1","supported":["v1"]},'
        f'"serverVersion":"{__version__}","mode":"native","features":["health","capabilities",'
        '"auth_device_flow","auth_status_providers","workspace_auth_events","auth_token_refresh","auth_logout"],'
        f'"modelServices":[],"transports":["rest","ws-events"],"workspaceCwd":{json.dumps(str(workspace))}}}'
    )


# --- the WebSocket handshake goes through the same gates ----------------------------------------------


async def test_websocket_handshakes_are_gated(daemon: RunningDaemon, token: str) -> None:
    url = daemon.url.replace("http://", "ws://") + EVENTS_PATH
    with trio.fail_after(5):
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with trio_websocket.open_websocket_url(url):
                pass
        assert rejected.value.status_code == 401
        assert json.loads(rejected.value.body or b"") == UNAUTHORIZED

        bearer = bearer_headers({"Authorization": f"Bearer {token}"})
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with trio_websocket.open_websocket_url(url, extra_headers=[*bearer, (b"Origin", b"https://evil")]):
                pass
        assert rejected.value.status_code == 403
        assert json.loads(rejected.value.body or b"") == ORIGIN_DENIED

        async with trio_websocket.open_websocket_url(url, extra_headers=bearer) as ws:
            assert json.loads(await ws.get_message())["type"] == "hello"
