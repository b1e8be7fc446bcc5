"""Time: Trio's monotonic clock inside, epoch milliseconds at the edge (SPEC §2)."""

from __future__ import annotations

import time

import trio


class WallClock:
    """Maps `trio.current_time()` to epoch milliseconds.

    Create it inside `trio.run`; the offset is fixed then, so a wire time derived from a monotonic
    instant never moves (an `expiresAt` is identical in every body and event). Tests pass `epoch_offset_s`
    to get exact wire times under the autojump clock.
    """

    __slots__ = ("_offset",)

    def __init__(self, epoch_offset_s: float | None = None) -> None:
        self._offset = time.time() - trio.current_time() if epoch_offset_s is None else epoch_offset_s

    def now(self) -> float:
        """The monotonic now, in seconds (Trio's clock)."""
        return trio.current_time()

    def to_epoch_ms(self, instant: float) -> int:
        """An instant of `now()`'s clock as integer epoch milliseconds."""
        return int((instant + self._offset) * 1000)

    def now_ms(self) -> int:
        return self.to_epoch_ms(self.now())
