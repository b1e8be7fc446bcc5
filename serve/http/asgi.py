"""The ASGI-level fix of STACK-NOTES item 1 (quart-trio × hypercorn): the final body send, shielded.

quart-trio cancels its request nursery as soon as hypercorn reports the disconnect that follows the last
body chunk, which cancelled hypercorn's own follow-up work inside that send (closing the socket, re-arming
keep-alive): connections were never closed after an early answer, keep-alive never fired, and shutdown
waited its whole graceful timeout. The connection-level fixes live in `serve.http.server`.
"""

from __future__ import annotations

import logging

import trio

from serve.audit import sanitize
from serve.http.gates import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("serve.http")

# A final body send that cannot finish in this long (a peer that stopped reading) is abandoned.
FINAL_SEND_BOUND_S = 10.0


def shield_final_send(app: ASGIApp) -> ASGIApp:
    """Run the final `http.response.body` send inside a shielded, bounded cancel scope.

    quart-trio cancels its request nursery as soon as hypercorn reports the disconnect that follows the
    last body chunk, which cancels hypercorn's own follow-up work inside that send (closing the socket,
    re-arming keep-alive). Shielded, it completes; the bound keeps a peer that stopped reading from pinning
    the task.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_final_shielded(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True, deadline=trio.current_time() + FINAL_SEND_BOUND_S):
                    try:
                        await send(message)
                    except (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError):
                        # The peer hung up while its body was still arriving (an early 401/413 is the usual
                        # case) and hypercorn's reader is already closing the socket without taking the
                        # send lock. Nothing is left to deliver; without this, each such request logged an
                        # "Error in ASGI Framework" traceback, a log flood anyone could trigger.
                        log.debug(
                            "peer closed before the final body was sent: %s %s",
                            scope["method"],
                            sanitize(scope["path"]),
                        )
            else:
                await send(message)

        await app(scope, receive, send_final_shielded)

    return wrapped


async def lifespan_without_hooks(receive: Receive, send: Send) -> None:
    """Answer an ASGI lifespan for an app with nothing to start or stop: each step completes at once."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": "lifespan.shutdown.complete"})
            return
