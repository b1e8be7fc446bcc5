"""A lean WebSocket client (RFC 6455), only what a subscriber of `WS /workspace/auth/events` needs: the opening
handshake, unmasked text frames from the server, pings, and the closing handshake.

Why not trio-websocket, which the tests use: with it, 1,000 subscribers in this process spent 0.63 s of CPU
on the 4,000 `cancelled` events and 1,000 closes of a SIGTERM (≈ 0.1 ms a frame: wsproto, a memory channel
and a reader task per connection), a whole core of a 2-core machine while the daemon was closing, so the
bench's clients, not the daemon, decided how long a fan-out took and whether a close handshake finished
within the daemon's graceful timeout. This reader parses frames straight off the socket in the subscriber's
own task: 0.27 s for the same work.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections.abc import AsyncGenerator

import trio

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NO_STATUS = 1005  # RFC 6455 §7.4.1: a close frame without a code
CLOSE_ABNORMAL = 1006  # the connection ended without a close frame
_RECEIVE_BYTES = 65536


class HandshakeFailed(Exception):
    pass


class LeanWebSocket:
    def __init__(self, stream: trio.SocketStream, buffered: bytes) -> None:
        self._stream = stream
        self._buffer = bytearray(buffered)
        self.close_code: int | None = None  # set when `messages()` ends

    async def _fill(self, size: int) -> bool:
        """Read until at least `size` bytes are buffered; False at EOF or a reset."""
        while len(self._buffer) < size:
            try:
                chunk = await self._stream.receive_some(_RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return False
            if not chunk:
                return False
            self._buffer += chunk
        return True

    async def _send_frame(self, opcode: int, payload: bytes) -> None:
        """A masked frame (RFC 6455 §5.3: every client frame is masked), payload under 126 bytes."""
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        # A peer that is gone has nothing left to be told.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._stream.send_all(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    async def messages(self) -> AsyncGenerator[str, None]:
        """Each text message until the stream ends; then `close_code` holds the server's close code (1006 if
        the connection ended without a close frame). A close frame is answered, then the socket closed."""
        fragments: list[bytes] = []
        try:
            while True:
                if not await self._fill(2):
                    self.close_code = CLOSE_ABNORMAL
                    return
                first, second = self._buffer[0], self._buffer[1]
                length, offset = second & 0x7F, 2
                if length == 126:
                    if not await self._fill(4):
                        self.close_code = CLOSE_ABNORMAL
                        return
                    length, offset = int.from_bytes(self._buffer[2:4], "big"), 4
                elif length == 127:
                    if not await self._fill(10):
                        self.close_code = CLOSE_ABNORMAL
                        return
                    length, offset = int.from_bytes(self._buffer[2:10], "big"), 10
                if second & 0x80:
                    raise HandshakeFailed("the server masked a frame (RFC 6455 §5.1 forbids it)")
                if not await self._fill(offset + length):
                    self.close_code = CLOSE_ABNORMAL
                    return
                payload = bytes(self._buffer[offset : offset + length])
                del self._buffer[: offset + length]
                opcode = first & 0x0F
                if opcode == OP_CLOSE:
                    self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else CLOSE_NO_STATUS
                    await self._send_frame(OP_CLOSE, payload[:2])
                    return
                if opcode == OP_PING:
                    await self._send_frame(OP_PONG, payload)
                elif opcode in (OP_TEXT, OP_CONTINUATION):
                    fragments.append(payload)
                    if first & 0x80:  # FIN
                        yield b"".join(fragments).decode()
                        fragments.clear()
        finally:
            await self._stream.aclose()


async def connect(host: str, port: int, path: str, headers: dict[str, str]) -> LeanWebSocket:
    """Open a WebSocket to ws://host:port/path; raises `HandshakeFailed` unless the server answers 101."""
    stream = await trio.open_tcp_stream(host, port)
    connected = False
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = bytearray()
        while b"\r\n\r\n" not in received:
            chunk = await stream.receive_some(_RECEIVE_BYTES)
            if not chunk:
                raise HandshakeFailed("the connection closed during the handshake")
            received += chunk
        head, _, rest = bytes(received).partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        if status_line.split(" ", 2)[1:2] != ["101"]:
            raise HandshakeFailed(f"the server answered {status_line!r}")
        answer = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
        expected = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        if answer.get("sec-websocket-accept") != expected:
            raise HandshakeFailed("wrong Sec-WebSocket-Accept")
        connected = True
        return LeanWebSocket(stream, rest)
    finally:
        if not connected:
            await trio.aclose_forcefully(stream)
