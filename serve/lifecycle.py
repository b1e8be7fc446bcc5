"""The daemon's one "shutting down" signal (SPEC §3).

Set once, as the first step of shutdown, and never cleared. The HTTP layer answers new logins and event
stream handshakes with 503, the registry refuses new starts and the event bus new subscribers: all of
them read this one object, so no two of them can disagree about whether the daemon is stopping.
"""

from __future__ import annotations

import trio


class Shutdown:
    """Whether the daemon has begun to stop. Owned by the composition root; shared by reference."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def begin(self) -> None:
        """Mark the daemon as stopping (idempotent)."""
        self._event.set()

    @property
    def begun(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()
