"""`DaemonClient`: the daemon's REST routes and its event stream, typed (SPEC §6).

One httpx client per `DaemonClient`, opened with it and closed with it; every method raises
`DaemonUnreachable` when there is no answer, `DaemonHTTPError` for a non-2xx answer and
`DaemonProtocolError` for an answer that is not the contract. The event stream is a trio-websocket
connection per subscription, reconnected and resumed by `events()`.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import httpx
import trio
import trio_websocket

from serve import wire
from serve.client.errors import DaemonHTTPError, DaemonProtocolError, DaemonUnreachable
from serve.models import (
    AuthStatusSnapshot,
    Capabilities,
    DeviceFlowInfo,
    LoggedOut,
    ReceivedEvent,
    StreamHeartbeat,
    StreamHello,
    StreamReset,
)
from serve.netloc import is_loopback_host

T = TypeVar("T")

DEFAULT_DAEMON_URL = "http://127.0.0.1:4170"
TOKEN_ENV = "QWEN_SERVER_TOKEN"
CLIENT_ID_HEADER = "X-Qwen-Client-Id"
FLOWS_PATH = "/workspace/auth/device-flow"
EVENTS_PATH = "/workspace/auth/events"
CLOSE_LAGGED = 4000
# Reconnecting the event stream: first wait, doubling up to the cap.
RECONNECT_FIRST_S = 0.1
RECONNECT_MAX_S = 5.0
# Handshake answers that no retry can change (a bad token, a refused origin, a bad query).
_FATAL_HANDSHAKE = {400, 401, 403, 404}


@dataclass(frozen=True, slots=True)
class StreamLagged:
    """The daemon closed the stream with 4000 `lagged` (this subscriber fell behind). The stream resumes
    from `last_event_id`: the daemon replays what its ring still holds, or sends a `StreamReset`."""

    last_event_id: int


StreamItem = StreamHello | StreamReset | StreamLagged | ReceivedEvent
"""What `events()` yields: a hello on each (re)connection, then events; resets and lags as values."""


class DaemonClient:
    """A client of one daemon, as an async context manager (`async with DaemonClient(url) as client`).

    `token` defaults to `$QWEN_SERVER_TOKEN` (empty counts as unset); `client_id` is sent as
    `X-Qwen-Client-Id` (attribution: it decides who sees a flow's user code). `transport` is httpx's seam.
    `timeout_s` exceeds the daemon's own 30 s bound on an IdP start, so a slow IdP is the daemon's 502, not
    a client timeout that leaves an orphaned flow behind. Proxy variables apply to remote daemons only:
    the bearer token never goes through a proxy to a loopback daemon (the event stream never uses one).
    Using it after `aclose()` raises `RuntimeError`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_DAEMON_URL,
        *,
        token: str | None = None,
        client_id: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = 40.0,
    ) -> None:
        from serve.client.auth import AuthFlow  # the login layer is built on this class

        self.base_url = base_url.rstrip("/")
        if token is None:
            token = os.environ.get(TOKEN_ENV, "").strip() or None
        self._token = token
        self.client_id = client_id
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if client_id:
            headers[CLIENT_ID_HEADER] = client_id
        self._headers = headers
        # A TLS context is built only for an https daemon: loading the CA bundle costs ~30 ms.
        verify: bool = urlsplit(self.base_url).scheme == "https"
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            transport=transport,
            timeout=timeout_s,
            follow_redirects=False,
            verify=verify,
            trust_env=not is_loopback_host(urlsplit(self.base_url).hostname or ""),
        )
        self._closed = False
        self.auth = AuthFlow(self)

    def __repr__(self) -> str:
        return f"DaemonClient({self.base_url!r}, client_id={self.client_id!r})"

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        await self._http.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this DaemonClient is closed")

    # --- REST ---------------------------------------------------------------------------------------------

    async def capabilities(self) -> Capabilities:
        return self._parse(wire.parse_capabilities, await self._request("GET", "/capabilities"))

    async def start_device_flow(self, provider_id: str) -> DeviceFlowInfo:
        """Start a login for `provider_id`, or attach to the one pending (`attached` says which)."""
        response = await self._request("POST", FLOWS_PATH, json={"providerId": provider_id})
        return self._parse(wire.parse_device_flow, response)

    async def get_device_flow(self, device_flow_id: str) -> DeviceFlowInfo:
        """A flow's current view. A flow the daemon no longer knows is a `DaemonHTTPError` with status 404."""
        return self._parse(wire.parse_device_flow, await self._request("GET", _flow_path(device_flow_id)))

    async def cancel_device_flow(self, device_flow_id: str) -> bool:
        """Cancel a flow. True when the daemon knew it (204), False when it did not (404): both succeed."""
        try:
            await self._request("DELETE", _flow_path(device_flow_id))
        except DaemonHTTPError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def logout(self, provider_id: str) -> LoggedOut:
        """Log the daemon out of a provider: its pending login cancelled, its tokens revoked at the IdP when it
        can, its credentials file deleted. Raises `DaemonHTTPError` (400 for an unknown provider)."""
        path = "/workspace/auth/providers/" + quote(provider_id, safe="")
        return self._parse(wire.parse_logout, await self._request("DELETE", path))

    async def get_auth_status(self) -> AuthStatusSnapshot:
        return self._parse(wire.parse_auth_status, await self._request("GET", "/workspace/auth/status"))

    async def _request(self, method: str, path: str, *, json: Any = None) -> httpx.Response:
        self._check_open()
        try:
            response = await self._http.request(method, path, json=json)
        except httpx.TimeoutException as exc:
            raise DaemonUnreachable(self.base_url, "no answer in time") from exc
        except httpx.TransportError as exc:
            raise DaemonUnreachable(self.base_url, _transport_reason(exc)) from exc
        if response.is_success:
            return response
        raise _http_error(self.base_url, response.status_code, response.content, response.headers)

    def _parse(self, parse: Callable[[object], T], response: httpx.Response) -> T:
        try:
            parsed = parse(response.json())
        except ValueError as exc:  # not JSON, or WireFormatError (a ValueError)
            raise DaemonProtocolError(f"{self.base_url} answered {response.request.url.path} oddly: {exc}") from exc
        return parsed

    # --- the event stream -----------------------------------------------------------------------------------

    @trio.as_safe_channel
    async def events(self, since: int | None = None) -> AsyncGenerator[StreamItem, None]:
        """Follow `WS /workspace/auth/events`: `async with client.events() as stream: async for item in stream`.

        Yields a `StreamHello` on each (re)connection, then every event once, in id order. When the
        stream drops it reconnects (back-off from 0.1 s doubling to 5 s) and resumes after the last id
        seen, in the epoch it was seen in: nothing is lost or repeated. When the daemon cannot resume
        (the ring moved on, or the daemon restarted) a `StreamReset` says so; a 4000 close is a
        `StreamLagged`. A first connection that fails raises (`DaemonUnreachable`, `DaemonHTTPError`);
        later ones are retried until the caller stops. A refused handshake (400/401/403/404) always raises.
        """
        last_id = since
        epoch: str | None = None
        connected_once = False
        backoff = RECONNECT_FIRST_S
        while True:
            self._check_open()
            url = self._events_url(last_id, epoch)
            try:
                async with trio_websocket.open_websocket_url(url, extra_headers=self._ws_headers()) as ws:
                    connected_once = True
                    backoff = RECONNECT_FIRST_S
                    while True:
                        try:
                            text = await ws.get_message()
                        except trio_websocket.ConnectionClosed as closed:
                            if closed.reason is not None and closed.reason.code == CLOSE_LAGGED:
                                yield StreamLagged(last_id or 0)
                            break
                        frame = self._parse_frame(text)
                        if isinstance(frame, StreamHello):
                            epoch = frame.epoch
                            if last_id is None:
                                last_id = frame.last_event_id
                            yield frame
                        elif isinstance(frame, StreamReset):
                            epoch, last_id = frame.epoch, frame.last_event_id
                            yield frame
                        elif isinstance(frame, ReceivedEvent):
                            if last_id is not None and frame.id <= last_id:
                                continue  # already seen (a replay overlapping what arrived live)
                            last_id = frame.id
                            yield frame
                        elif not isinstance(frame, StreamHeartbeat):
                            raise AssertionError(frame)
            except trio_websocket.ConnectionRejected as exc:
                error = _http_error(self.base_url, exc.status_code, exc.body or b"", dict(exc.headers or []))
                if exc.status_code in _FATAL_HANDSHAKE or not connected_once:
                    raise error from None
            except (OSError, trio_websocket.HandshakeError, trio.BrokenResourceError) as exc:
                if not connected_once:
                    raise DaemonUnreachable(self.base_url, _os_reason(exc)) from None
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    def _events_url(self, since: int | None, epoch: str | None) -> str:
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        query: dict[str, str] = {}
        if since is not None:
            query["since"] = str(since)
            if epoch is not None:
                query["epoch"] = epoch
        suffix = f"?{urlencode(query)}" if query else ""
        return f"{scheme}://{parts.netloc}{parts.path}{EVENTS_PATH}{suffix}"

    def _ws_headers(self) -> list[tuple[bytes, bytes]]:
        names = ("Authorization", CLIENT_ID_HEADER)
        return [(name.encode(), self._headers[name].encode()) for name in names if name in self._headers]

    def _parse_frame(self, text: object) -> StreamHello | StreamReset | StreamHeartbeat | ReceivedEvent:
        if not isinstance(text, str):
            raise DaemonProtocolError(f"{self.base_url} sent a binary frame on the event stream")
        try:
            return wire.parse_frame(text)
        except wire.WireFormatError as exc:
            raise DaemonProtocolError(f"{self.base_url}: {exc}") from exc


def _flow_path(device_flow_id: str) -> str:
    return f"{FLOWS_PATH}/{quote(device_flow_id, safe='')}"


def _http_error(base_url: str, status: int, content: bytes, headers: Any) -> DaemonHTTPError | DaemonProtocolError:
    """The daemon's JSON error as a `DaemonHTTPError`; anything else is not a qwen-serve daemon."""
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return DaemonProtocolError(f"{base_url} answered HTTP {status} without a qwen-serve error body")
    code = body.get("code") if isinstance(body.get("code"), str) else None
    return DaemonHTTPError(status, code, body["error"], body)


def _transport_reason(exc: httpx.TransportError) -> str:
    cause = exc.__cause__ or exc.__context__
    # httpcore wraps the OSError as its own exception's first argument.
    for candidate in (cause, *(getattr(cause, "args", None) or ())):
        if isinstance(candidate, OSError):
            return _os_reason(candidate)
    if isinstance(exc, httpx.ConnectError):
        return "connection failed"
    return type(exc).__name__


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.strerror:
            return exc.strerror.lower()
        inner = exc.__cause__ or exc.__context__
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror.lower()
    return "connection failed"
