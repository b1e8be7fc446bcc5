"""Serving an ASGI app on hypercorn's trio worker, with the connection handling a daemon needs.

`hypercorn.trio.serve` almost fits; `serve()` here replaces its outer loop and its connection class and keeps
everything else of hypercorn (the HTTP/1.1 protocol, the ASGI streams, the lifespan, TLS):

- **A dead connection ends.** When a write fails (the peer is gone) the connection's reader stops as well.
  hypercorn parks its reader on `h11.PAUSED` while a pipelined request waits, until the current response
  recycles the connection; quart-trio cancels the request task on disconnect before that response ends,
  so the recycle never came and the socket leaked for good (STACK-NOTES 9). After the reader ends, the
  keep-alive timer stops too: nothing more can arrive, so the socket closes now instead of 5 s later.
- **HTTP/1.1 only.** No HTTP/2 by ALPN, no h2c upgrade (ignored, as RFC 9110 §7.8 allows), no prior-knowledge
  `PRI *` switch: every client speaks HTTP/1.1, and an HTTP/2 peer advertising a zero window could pin a
  shielded send.
- **Bounded connections.** At most `max_connections` at once: the accept loop waits for a free slot (the
  kernel's backlog holds the rest), so descriptors stay free for credential writes and IdP requests.
  `raise_file_limit()` lifts the soft descriptor limit first. Accept failures (EMFILE) are logged once per
  interval, without a traceback, instead of a traceback every 0.1 s.
- **Shutdown is bounded.** When the trigger returns: stop listening, close idle keep-alive connections, let
  the others drain for `graceful_timeout`, then abort what is left. hypercorn writes inside a shielded scope,
  so cancelling cannot free a task writing to a peer that stops reading; closing its socket can, and does.
- **A cheaper keep-alive timer.** hypercorn restarts it after every response through a lock and
  `nursery.start`; `_IdleTask` does the same with one `start_soon` (about a fifth more requests a second).
- **`Expect: 100-continue`** is answered when the app says so (`CONTINUE_STATE_KEY`, which the gates call
  once a request passed them), not before the app runs: an over-limit or unauthorised upload gets its 413 or
  401 without the client being told to send the body first.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, cast

import h11
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr, repr_socket_addr
from wsproto.connection import ConnectionState as WebSocketState

log = logging.getLogger("serve.http.server")

CONTINUE_STATE_KEY = "serve.http.send_continue"
"""In an HTTP scope's `state`: an async callable that sends `100 Continue` if the client waits for one."""

# Descriptors kept out of the connection budget: credential writes, the IdP client's pool, worker threads'
# files, the log, the listening sockets.
FILE_HEADROOM = 64
# A descriptor limit past this gains nothing here and would let one peer hold that many sockets.
MAX_CONNECTIONS_CEILING = 16_384
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY_S = 0.1
_ACCEPT_LOG_EVERY_S = 10.0


def raise_file_limit() -> int:
    """Lift the soft descriptor limit to the hard one where allowed; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65_536)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return int(soft) if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return int(soft)
    return int(target)


def connection_budget(file_limit: int) -> int:
    """How many connections may be open at once under `file_limit` descriptors (at least 8)."""
    return max(8, min(file_limit - FILE_HEADROOM, MAX_CONNECTIONS_CEILING))


async def serve(
    app: ASGIFramework,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    max_connections: int,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until `shutdown_trigger` returns; `task_status.started()` gets the bound URLs.

    Returns after the graceful drain (at most `config.graceful_timeout`) and the abort of every connection
    still open. Cancelling it aborts every connection at once.
    """
    wrapped = ASGIWrapper(app)
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    server = _Server(wrapped, config, lifespan_state, max_connections)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        listeners, binds = _listeners(config)
        async with trio.open_nursery() as connections:
            try:
                async with trio.open_nursery() as accepting:
                    for listener in listeners:
                        accepting.start_soon(server.accept_loop, listener, connections)
                    task_status.started(binds)
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()  # each loop closes its listener as it ends
                await server.drain(config.graceful_timeout)
            finally:
                # Before the nursery waits for its connections, and on cancellation too: a connection
                # blocked in a shielded write would otherwise hold it for as long as its peer likes.
                server.abort_all()
                connections.cancel_scope.cancel()
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


def _listeners(config: Config) -> tuple[list[trio.abc.Listener[Any]], list[str]]:
    sockets = config.create_sockets()
    ssl_context = config.create_ssl_context()
    listeners: list[trio.abc.Listener[Any]] = []
    binds: list[str] = []
    for sock in sockets.secure_sockets:
        sock.listen(config.backlog)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        assert ssl_context is not None
        listeners.append(trio.SSLListener(listener, ssl_context, https_compatible=True))
        binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
    return listeners, binds


class _Server:
    """The connections of one `serve()` call: the accept loops' slots, the open connections, the abort."""

    def __init__(self, app: Any, config: Config, lifespan_state: LifespanState, max_connections: int) -> None:
        self._app = app
        self._config = config
        self._lifespan_state = lifespan_state
        self._context = WorkerContext(None)
        self._slots = trio.Semaphore(max_connections)
        self._open: set[_Connection] = set()
        self._drained = trio.Event()
        self._draining = False
        self._accept_errors = 0
        self._accept_logged_at: float | None = None

    async def accept_loop(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                # A slot first: at the cap, connections wait in the kernel's backlog, not in our descriptors.
                await self._slots.acquire()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    self._slots.release()
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    self._log_accept_failure(exc)
                    await trio.sleep(_ACCEPT_RETRY_S)
                    continue
                except BaseException:
                    self._slots.release()
                    raise
                nursery.start_soon(self._serve_connection, stream)

    def _log_accept_failure(self, exc: OSError) -> None:
        """One line per interval, with how many failures it stands for (trio logs a traceback each time)."""
        self._accept_errors += 1
        now = trio.current_time()
        if self._accept_logged_at is not None and now - self._accept_logged_at < _ACCEPT_LOG_EVERY_S:
            return
        name = errno.errorcode.get(exc.errno or 0, "OSError")
        log.error(
            "cannot accept connections: %s (%s); %d failure(s) in the last %.0f s; retrying",
            name,
            os.strerror(exc.errno or 0),
            self._accept_errors,
            _ACCEPT_LOG_EVERY_S,
        )
        self._accept_logged_at = now
        self._accept_errors = 0

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        connection = _Connection(
            self._app, self._config, self._context, ConnectionState(dict(self._lifespan_state)), stream
        )
        self._open.add(connection)
        try:
            await connection.run()
        except Exception as exc:
            # Per-connection boundary: a protocol error on one connection must not stop the server.
            log.error("connection handler failed: %s", type(exc).__name__)
        finally:
            self._open.discard(connection)
            self._slots.release()
            await trio.aclose_forcefully(stream)
            if self._draining and not self._open:
                self._drained.set()

    async def drain(self, graceful_s: float) -> None:
        """Close idle keep-alive connections now; wait at most `graceful_s` for the rest to finish."""
        self._draining = True
        await self._context.terminated.set()  # hypercorn's idle timers close their connections on this
        if not self._open:
            return
        with trio.move_on_after(graceful_s):
            await self._drained.wait()

    def abort_all(self) -> None:
        for connection in list(self._open):
            connection.abort()


# The ASGI scope extension through which a WebSocket handler may write whole frames it encoded itself,
# straight to its connection, in order with the connection's other writes (`_Connection._raw_send`): the
# event stream's fan-out writes one pre-encoded frame to a thousand sockets without a thousand trips
# through hypercorn and wsproto, and, when the socket takes it at once, without a trip through the scheduler.
RAW_SEND_EXTENSION = "qwen-serve.raw_send"


class _RawSendApp:
    """The ASGI app of one connection: WebSocket scopes also get `RAW_SEND_EXTENSION`."""

    def __init__(self, app: Any, raw_send: Callable[[bytes], Awaitable[None]]) -> None:
        self._app = app
        self._raw_send = raw_send

    async def __call__(self, scope: Any, receive: Any, send: Any, sync_spawn: Any, call_soon: Any) -> None:
        if scope.get("type") == "websocket":
            scope.setdefault("extensions", {})[RAW_SEND_EXTENSION] = self._raw_send
        await self._app(scope, receive, send, sync_spawn, call_soon)


class _IdleTask:
    """hypercorn's `TrioSingleTask` for the keep-alive timer, restarted after every response, without the
    lock and the `nursery.start` round trip: each restart starts the new timer with `start_soon` in a
    cancel scope made beforehand, so `stop()` (or the next restart) cancels it even before it runs."""

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None

    async def restart(self, task_group: TaskGroup, action: Callable[[], Awaitable[None]]) -> None:
        await self.stop()
        self._scope = scope = trio.CancelScope()
        nursery = task_group._nursery
        assert nursery is not None  # set while the connection runs
        nursery.start_soon(self._run, scope, action)

    async def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    @staticmethod
    async def _run(scope: trio.CancelScope, action: Callable[[], Awaitable[None]]) -> None:
        with scope:
            await action()


class _Connection(TCPServer):
    """hypercorn's connection, HTTP/1.1 only, that ends when its peer is gone and can be aborted."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.idle_task = cast(Any, _IdleTask())
        self._reader = trio.CancelScope()
        self._reading = True
        self.app = _RawSendApp(self.app, self._raw_send)
        # For `_raw_send`'s direct writes: the socket, unless TLS must encrypt what is sent.
        self._plain_socket = None if isinstance(self.stream, trio.SSLStream) else self.stream.socket
        self._websocket: Any = None  # hypercorn's WebSocket stream's wsproto connection, once there is one

    async def _raw_send(self, data: bytes) -> None:
        """Write `data` (whole WebSocket frames) to the peer, in order with every other write.

        On a plain socket with no write in progress, the bytes go to the kernel at once (`os.write` on the
        non-blocking descriptor): no lock round trip, no shielded scope. Whatever the socket buffer does
        not take then goes the usual way, shielded from the start, so a frame is never left half written.
        """
        if not self._websocket_open():
            return  # a close frame has gone out: RFC 6455 §5.5.1 allows no data frame after it
        # The descriptor is read now, not kept: once the socket is closed it is -1, never a number the
        # process may since have given to another file.
        fd = self._plain_socket.fileno() if self._plain_socket is not None else -1
        if fd >= 0 and not self.send_lock.locked():
            try:
                written = os.write(fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                written = 0  # the peer is gone: the usual path below notices and ends the connection
            if written == len(data):
                return
            data = data[written:]
        with trio.CancelScope(shield=True):
            await self.protocol_send(RawData(data=data))

    def _websocket_open(self) -> bool:
        """Whether this connection's WebSocket may still carry data frames: hypercorn's WebSocket stream
        (its wsproto connection) has neither sent nor received a close frame. Through hypercorn, wsproto
        drops such frames itself; written raw, they would follow hypercorn's own close (its reply to the
        peer's, or its 1009 for an oversized message, after which the app hears nothing until the peer
        answers)."""
        connection = self._websocket
        if connection is None:  # found once: a connection's WebSocket stream does not change
            connection = self._websocket = getattr(getattr(self.protocol, "stream", None), "connection", None)
            if connection is None:
                return True
        return connection.state is WebSocketState.OPEN

    async def run(self) -> None:
        # hypercorn's TCPServer.run, without the HTTP/2 branches and with the reader in a cancel scope.
        try:
            if isinstance(self.stream, trio.SSLStream):
                try:
                    with trio.fail_after(self.config.ssl_handshake_timeout):
                        await self.stream.do_handshake()
                except (trio.BrokenResourceError, trio.TooSlowError):
                    return
                sock = self.stream.transport_stream.socket
                ssl = True
            else:
                sock = self.stream.socket
                ssl = False
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
            async with TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = cast(
                    Any,
                    _HTTP11Protocol(
                        self.app,
                        self.config,
                        self.context,
                        task_group,
                        self.state,
                        ssl,
                        client,
                        server,
                        self.protocol_send,
                    ),
                )
                await self.idle_task.restart(task_group, self._idle_timeout)
                with self._reader:
                    await self._read_data()
                # Nothing more can arrive: once the last response is out, close rather than wait for the
                # keep-alive timer.
                self._reading = False
                await self.idle_task.stop()
        except OSError:
            pass
        finally:
            await self._close()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            async with self.send_lock:
                try:
                    with trio.CancelScope(shield=True):
                        await self.stream.send_all(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # The peer is gone. The reader may be parked waiting for a recycle that will not
                    # come (a pipelined request): stop it, so the connection ends.
                    self._reader.cancel()
                    await self.protocol.handle(Closed())
        elif isinstance(event, Updated) and event.idle and not self._reading:
            await self.protocol_send(Closed())
        else:
            await super().protocol_send(event)

    def abort(self) -> None:
        """Drop the connection now: reset the socket, which frees a write blocked on a peer that does not read."""
        self._reader.cancel()
        sock = self.stream.transport_stream.socket if isinstance(self.stream, trio.SSLStream) else self.stream.socket
        with contextlib.suppress(OSError):
            # SO_LINGER 0: close with a reset, discarding unsent data, instead of lingering on it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # wakes any task waiting on it with ClosedResourceError


class _H11Connection(h11.Connection):
    """h11's connection, reporting a client's wait for `100 Continue` only once the app allowed it."""

    continue_allowed = False

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        return self.continue_allowed and super().they_are_waiting_for_100_continue


class _HTTP11Protocol(H11Protocol):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._held_head = b""  # a final response's head, written with the first bytes of its body
        self.connection = _H11Connection(h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size)
        # The connection's own copy of the state (each request's scope copies it again).
        self.connection_state[CONTINUE_STATE_KEY] = self._send_continue

    async def _send_h11_event(self, event: Any) -> None:
        """hypercorn's, writing a response's head, body and end in one `send` rather than one each: a
        small JSON answer is one write (one syscall, one packet) instead of two or three."""
        if isinstance(event, h11.Response | h11.Data | h11.EndOfMessage):
            try:
                data = self.connection.send(event)
            except h11.LocalProtocolError:
                if self.connection.their_state != h11.ERROR:
                    raise
                return
            if isinstance(event, h11.Response):
                self._held_head = data or b""
                return
            data, self._held_head = self._held_head + (data or b""), b""
            if data:
                await self.send(RawData(data=data))
            return
        if self._held_head:
            head, self._held_head = self._held_head, b""
            await self.send(RawData(data=head))
        await super()._send_h11_event(event)

    async def _check_protocol(self, event: h11.Request) -> None:
        # Overrides the switch to HTTP/2 (h2c upgrade, `PRI *`): HTTP/1.1 only. Each request starts
        # without permission to be told `100 Continue`.
        if isinstance(self.connection, _H11Connection):
            self.connection.continue_allowed = False

    async def _send_continue(self) -> None:
        connection = self.connection
        if isinstance(connection, _H11Connection) and not connection.continue_allowed:
            connection.continue_allowed = True
            if connection.they_are_waiting_for_100_continue:
                await self._send_h11_event(
                    h11.InformationalResponse(status_code=100, headers=self.config.response_headers("h11"))
                )
