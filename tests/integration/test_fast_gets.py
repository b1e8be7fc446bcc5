"""`serve.http.fast`: the hot GETs answered before Quart send exactly what Quart's routes send, behind the
same gates. Quart still serves the same paths with a trailing slash or HEAD, which is what we compare with."""

from __future__ import annotations

import httpx
import pytest
from support.daemon import StartDaemon, loopback_client

from serve.daemon import RunningDaemon

HOT = ("/health", "/capabilities", "/workspace/auth/status")


def shape(response: httpx.Response) -> tuple[int, str | None, str | None, bytes]:
    return (
        response.status_code,
        response.headers.get("content-type"),
        response.headers.get("content-length"),
        response.content,
    )


@pytest.mark.parametrize("path", HOT)
async def test_the_fast_answer_is_quarts_answer_byte_for_byte(
    daemon: RunningDaemon, auth: dict[str, str], path: str
) -> None:
    async with loopback_client(base_url=daemon.url, headers=auth) as client:
        fast = await client.get(path)
        via_quart = await client.get(path + "/")  # strict_slashes is off: the same route, through Quart
        head = await client.head(path)
    assert fast.status_code == 200
    assert shape(fast) == shape(via_quart)
    assert head.headers["content-length"] == fast.headers["content-length"]


@pytest.mark.parametrize("path", HOT[1:])
async def test_the_gates_still_run_first(start_daemon: StartDaemon, path: str) -> None:
    async with start_daemon() as daemon, loopback_client(base_url=daemon.url) as client:
        assert (await client.get(path)).status_code == 401
        assert (await client.get(path, headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await client.get(path, headers={"Host": "evil.example"})).status_code == 403


async def test_a_response_is_one_write(
    start_daemon: StartDaemon, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Head, body and end of a small response go to the socket in one `send_all` (one syscall, one packet)."""
    from hypercorn.events import RawData

    from serve.http import server

    writes: list[bytes] = []
    original = server._Connection.protocol_send

    async def recording(self: server._Connection, event: object) -> None:
        if isinstance(event, RawData):
            writes.append(event.data)
        await original(self, event)  # type: ignore[arg-type]

    monkeypatch.setattr(server._Connection, "protocol_send", recording)
    async with start_daemon() as daemon, loopback_client(base_url=daemon.url, headers=auth) as client:
        for path in ("/health", "/workspace/auth/status", "/nope"):
            writes.clear()
            response = await client.get(path)
            assert len(writes) == 1, (path, writes)
            assert writes[0].startswith(b"HTTP/1.1 ") and writes[0].endswith(response.content)
