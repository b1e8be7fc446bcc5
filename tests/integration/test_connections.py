"""The quart-trio × hypercorn connection fix (the final body send runs shielded): one test per symptom.

Without the fix, hypercorn's follow-up work after the last body chunk is cancelled, so (1) a connection is
never closed after a route answers before reading the body, (2) `keep_alive_timeout` never fires, and (3)
shutdown waits the whole `graceful_timeout` whenever an idle connection exists; each of those tests fails with
the fix removed. The gates answer their own early 413/401 below Quart, so those close either way; their
tests, and the pooled-client ones, pin the behaviour a client sees.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
import trio
from support.daemon import StartDaemon, loopback_client

from serve.config import Config
from serve.daemon import RunningDaemon


async def connect(daemon: RunningDaemon) -> trio.SocketStream:
    port = urlsplit(daemon.url).port
    assert port is not None
    return await trio.open_tcp_stream("127.0.0.1", port)


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    while chunk := await stream.receive_some(65536):
        received += chunk
    return received


async def test_the_connection_closes_after_an_early_413(daemon: RunningDaemon, token: str) -> None:
    port = urlsplit(daemon.url).port
    request = (
        f"POST /workspace/auth/device-flow HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    ).encode()
    stream = await connect(daemon)
    async with stream:
        await stream.send_all(request)
        with trio.fail_after(3):
            received = await read_until_closed(stream)
    assert received.startswith(b"HTTP/1.1 413")


async def test_the_connection_closes_after_a_route_answers_before_the_body(daemon: RunningDaemon, token: str) -> None:
    # GET /capabilities never reads a body: it answers while the (unsent) body is still due.
    port = urlsplit(daemon.url).port
    request = (
        f"GET /capabilities HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n"
    ).encode()
    stream = await connect(daemon)
    async with stream:
        await stream.send_all(request)
        with trio.fail_after(3):
            received = await read_until_closed(stream)
    assert received.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    ("method", "path", "status"), [("POST", "/workspace/auth/device-flow", 401), ("GET", "/capabilities", 200)]
)
async def test_a_pooled_client_goes_on_after_an_early_answer(
    daemon: RunningDaemon, auth: dict[str, str], method: str, path: str, status: int
) -> None:
    async with loopback_client(base_url=daemon.url) as client:
        with trio.fail_after(5):
            headers = auth if status != 401 else {}
            rejected = await client.request(method, path, content=b'{"providerId":"x"}' * 3000, headers=headers)
            assert rejected.status_code == status
            for _ in range(3):
                assert (await client.get("/capabilities", headers=auth)).status_code == 200


async def test_keep_alive_timeout_closes_an_idle_connection(start_daemon: StartDaemon) -> None:
    async with start_daemon(keep_alive_timeout_s=0.3) as daemon:
        port = urlsplit(daemon.url).port
        stream = await connect(daemon)
        async with stream:
            await stream.send_all(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            started = trio.current_time()
            with trio.fail_after(3):
                received = await read_until_closed(stream)
            idle = trio.current_time() - started
    assert received.startswith(b"HTTP/1.1 200")
    assert received.endswith(b'{"status":"ok"}')
    assert 0.2 < idle < 2.5


async def test_the_keep_alive_timer_starts_again_after_each_response(start_daemon: StartDaemon) -> None:
    """Requests 0.3 s apart on one connection outlive a 1 s keep-alive (each response restarts the timer
    and cancels the last one); once they stop, the connection closes after about 1 s."""
    async with start_daemon(keep_alive_timeout_s=1.0) as daemon:
        port = urlsplit(daemon.url).port
        request = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        stream = await connect(daemon)
        async with stream:
            with trio.fail_after(5):
                for _ in range(5):
                    await stream.send_all(request)
                    answer = b""
                    while not answer.endswith(b'{"status":"ok"}'):
                        chunk = await stream.receive_some(65536)
                        assert chunk, "the connection closed while it was in use"
                        answer += chunk
                    await trio.sleep(0.3)
                started = trio.current_time()
                assert await read_until_closed(stream) == b""
            idle = trio.current_time() - started
    assert 0.5 < idle < 4


async def test_shutdown_does_not_wait_for_an_idle_keep_alive_connection(
    start_daemon: StartDaemon, make_config: Callable[..., Config], auth: dict[str, str]
) -> None:
    config = make_config(graceful_timeout_s=10)
    async with loopback_client() as client:
        with trio.fail_after(15):
            async with start_daemon(config) as daemon:
                assert (await client.get(f"{daemon.url}/capabilities", headers=auth)).status_code == 200
                # The connection stays open in the client's pool while the daemon shuts down.
                started = trio.current_time()
            took = trio.current_time() - started
    assert took < 3, f"shutdown took {took:.2f} s with graceful_timeout 10 s"
