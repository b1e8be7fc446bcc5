"""Helpers shared by the integration tests that run logins over real sockets: a fake qwen-oauth IdP (and
generic RFC 8628 ones), a short-interval configuration, scripted IdP replies, a credential store that waits
at a gate, WebSocket frames and a recorder of every HTTP response a client saw.

Facts copied from the project's SPEC and WIRE-EXAMPLES, so the tests read nothing outside the project.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from serve.config import Config, load_config
from serve.credentials import CommitGate, Credentials
from serve.daemon import RunningDaemon
from serve.store import FileCredentialStore, FileSystem
from support.daemon import StartDaemon as StartDaemon  # re-exported: many tests import it from here
from support.daemon import loopback_client
from support.fake_idp import FakeIdP, json_reply
from support.idp_server import ServedIdP, serve_idp

QWEN_CLIENT_ID = "f0304373b74a44d2b584a3fb70ca9e56"
QWEN_SCOPE = "openid profile email model.completion"
FLOWS_PATH = "/workspace/auth/device-flow"
STATUS_PATH = "/workspace/auth/status"
EVENTS_PATH = "/workspace/auth/events"
CLIENT_ID_HEADER = "X-Qwen-Client-Id"

QWEN_TOKENS = {
    "access_token": "fake-access-1",
    "refresh_token": "fake-refresh-1",
    "token_type": "Bearer",
    "resource_url": "portal.qwen.ai",
    "expires_in": 3600,
}


def qwen_idp(**kwargs: Any) -> FakeIdP:
    """A fake IdP speaking qwen-oauth's endpoints and checking its exact requests (WIRE-EXAMPLES)."""
    return FakeIdP(
        device_path="/api/v1/oauth2/device/code",
        token_path="/api/v1/oauth2/token",
        client_id=QWEN_CLIENT_ID,
        scope=QWEN_SCOPE,
        expect_request_id=True,
        **kwargs,
    )


def generic_idp(client_id: str = "client-1", **kwargs: Any) -> FakeIdP:
    """A fake standards-following IdP for a generic `rfc8628` provider (PKCE on, no scope)."""
    return FakeIdP(client_id=client_id, **kwargs)


def generic_provider(idp: FakeIdP) -> dict[str, Any]:
    """`[providers.<id>]` for `idp`, with explicit loopback endpoints (no discovery)."""
    return {
        "kind": "rfc8628",
        "device_authorization_endpoint": idp.device_url,
        "token_endpoint": idp.token_url,
        "client_id": idp.client_id,
        "pkce": "on",
    }


def login_config(base_url: str, *, providers: Mapping[str, Any] | None = None, **device_flow: Any) -> Config:
    """A daemon on 127.0.0.1:0 whose `qwen-oauth` talks to `base_url`, with short intervals."""
    return load_config(
        overrides={
            "server": {"port": 0, "graceful_timeout_s": 0.5},
            "device_flow": {"min_interval_s": 0.05, "slow_down_step_s": 0.2, **device_flow},
            "providers": {"qwen-oauth": {"base_url": base_url}, **(providers or {})},
        }
    )


def device_reply(
    base: str,
    interval: float = 0.1,
    *,
    device_code: str = "device-code-1",
    user_code: str = "USER-0001",
    expires_in: float = 600,
) -> httpx.Response:
    return json_reply(
        200,
        {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": f"{base}/authorize",
            "verification_uri_complete": f"{base}/authorize?user_code={user_code}&client=qwen-code",
            "expires_in": expires_in,
            "interval": interval,
        },
    )


def script_devices(idp: FakeIdP, *, interval: float, expires_in: float = 600, count: int = 1) -> None:
    """The next `count` device authorizations of `idp`: each names the code the IdP has just issued."""

    def reply(request: httpx.Request) -> httpx.Response:
        n = len(idp.issued)
        return device_reply(
            idp.base_url, interval, device_code=f"device-code-{n}", user_code=f"USER-{n:04d}", expires_in=expires_in
        )

    idp.device_replies.extend([reply] * count)


def oauth_error(code: str, status: int = 400) -> httpx.Response:
    return json_reply(status, {"error": code})


def pending_replies(count: int = 200) -> list[httpx.Response]:
    """`authorization_pending`, `count` times (the fake IdP issues tokens once its script runs out)."""
    return [oauth_error("authorization_pending") for _ in range(count)]


def qwen_tokens() -> httpx.Response:
    return json_reply(200, QWEN_TOKENS)


def closed_port_url() -> str:
    """A loopback URL nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def json_text(value: Any) -> str:
    """A value as the daemon writes it inside a body (compact JSON, non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False)


# --- a credential store that waits -------------------------------------------------------------------


class NoSpaceFileSystem(FileSystem):
    """The disk is full at the rename: the real writer's failure path, with a real errno."""

    def replace(self, src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


class GatedStore(FileCredentialStore):
    """The daemon's real `FileCredentialStore`, whose `save` waits at a gate the test opens.

    `entered` is set when a write reaches the gate; `release` lets it through to the real atomic write (which
    may fail for real when the store is built on `NoSpaceFileSystem`).
    """

    def __init__(self, qwen_home: Path, *, fs: FileSystem | None = None) -> None:
        super().__init__(qwen_home, fs=fs)
        self.entered = trio.Event()
        self.release = trio.Event()

    async def save(self, credentials: Credentials, *, gate: CommitGate | None = None) -> None:
        self.entered.set()
        await self.release.wait()
        await super().save(credentials, gate=gate)


# --- clients --------------------------------------------------------------------------------------------


class Recorder:
    """Every HTTP response a client got, its body read: `recorder.client(daemon, headers)`."""

    def __init__(self) -> None:
        self.responses: list[httpx.Response] = []

    async def _hook(self, response: httpx.Response) -> None:
        await response.aread()
        self.responses.append(response)

    def client(self, daemon: RunningDaemon, headers: Mapping[str, str]) -> httpx.AsyncClient:
        return loopback_client(base_url=daemon.url, headers=dict(headers), event_hooks={"response": [self._hook]})


def bearer_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """`headers` as trio-websocket's handshake takes them."""
    return [(name.encode(), value.encode()) for name, value in headers.items()]


def ws_url(daemon: RunningDaemon) -> str:
    return daemon.url.replace("http://", "ws://") + EVENTS_PATH


@asynccontextmanager
async def open_events(daemon: RunningDaemon, auth: Mapping[str, str]) -> AsyncIterator[WebSocketConnection]:
    """A subscriber of the daemon's event stream, past its `hello` frame."""
    async with trio_websocket.open_websocket_url(ws_url(daemon), extra_headers=bearer_headers(auth)) as ws:
        hello = await next_frame(ws)
        assert hello["type"] == "hello", hello
        yield ws


async def next_frame(ws: WebSocketConnection) -> dict[str, Any]:
    message = await ws.get_message()
    assert isinstance(message, str)
    decoded: dict[str, Any] = json.loads(message)
    return decoded


async def next_event(ws: WebSocketConnection) -> dict[str, Any]:
    """The next event envelope, skipping heartbeats."""
    while True:
        frame = await next_frame(ws)
        if frame["type"] != "heartbeat":
            return frame


async def frames_until_close(ws: WebSocketConnection) -> tuple[list[str], CloseReason]:
    """Every text frame until the server closes, and the close reason."""
    frames: list[str] = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            message = await ws.get_message()
            assert isinstance(message, str)
            frames.append(message)
    reason = closed.value.reason
    assert reason is not None
    return frames, reason


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll state that offers no event to wait on (callers bound it with `fail_after`)."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.01)


def token_requests(idp: FakeIdP) -> list[httpx.Request]:
    return [r for r in idp.requests if r.method == "POST" and str(r.url) == idp.token_url]


@asynccontextmanager
async def qwen_daemon(
    start_daemon: StartDaemon,
    idp: FakeIdP,
    *,
    providers: Mapping[str, Any] | None = None,
    daemon_kwargs: dict[str, Any] | None = None,
    **device_flow: Any,
) -> AsyncIterator[tuple[ServedIdP, RunningDaemon]]:
    """The fake qwen-oauth IdP served on loopback, and a daemon whose `qwen-oauth` talks to it."""
    async with (
        serve_idp(idp) as served,
        start_daemon(login_config(served.url, providers=providers, **device_flow), **(daemon_kwargs or {})) as daemon,
    ):
        yield served, daemon
