"""serve.http.server's accept loop and limits, in memory (the sockets side is in test_attacks.py)."""

from __future__ import annotations

import errno
import logging
import re
import resource
from typing import Any

import pytest
import trio
from hypercorn.config import Config
from trio.testing import MockClock

from serve.http.server import FILE_HEADROOM, _Server, connection_budget, raise_file_limit


class FailingListener(trio.abc.Listener[Any]):
    """A listener whose accept fails with `errno_` every time, as accept(2) does out of descriptors."""

    def __init__(self, errno_: int) -> None:
        self.errno = errno_
        self.attempts = 0

    async def accept(self) -> Any:
        self.attempts += 1
        await trio.lowlevel.checkpoint()
        raise OSError(self.errno, "Too many open files")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_accept_failures_are_logged_once_per_interval_without_a_traceback(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 8: trio's own loop logged a traceback every 0.1 s while descriptors ran out.
    listener = FailingListener(errno.EMFILE)
    server = _Server(app=None, config=Config(), lifespan_state={}, max_connections=8)
    with caplog.at_level(logging.ERROR, logger="serve.http.server"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.accept_loop, listener, nursery)
            await trio.sleep(25)
            nursery.cancel_scope.cancel()
    records = [r for r in caplog.records if r.name == "serve.http.server"]
    assert listener.attempts >= 200  # retried every 0.1 s all along
    assert len(records) == 3  # at 0 s, 10 s and 20 s
    assert all(r.exc_info is None for r in records)
    assert "EMFILE" in records[0].getMessage()
    assert "1 failure(s)" in records[0].getMessage()
    # The second line stands for the ~100 failures of its interval (0.1 s apart), none of them logged alone.
    [count] = re.findall(r"; (\d+) failure\(s\)", records[1].getMessage())
    assert 99 <= int(count) <= 101


async def test_a_failed_accept_gives_its_connection_slot_back(autojump_clock: MockClock) -> None:
    listener = FailingListener(errno.ENFILE)
    server = _Server(app=None, config=Config(), lifespan_state={}, max_connections=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.accept_loop, listener, nursery)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert listener.attempts >= 10  # with one slot, a leaked slot would have stopped it after one


async def test_an_unexpected_accept_error_is_raised() -> None:
    listener = FailingListener(errno.EBADF)
    server = _Server(app=None, config=Config(), lifespan_state={}, max_connections=4)
    with pytest.RaisesGroup(pytest.RaisesExc(OSError, check=lambda e: e.errno == errno.EBADF)):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.accept_loop, listener, nursery)


@pytest.mark.parametrize(("limit", "budget"), [(1024, 1024 - FILE_HEADROOM), (20, 8), (10**7, 16_384)])
def test_the_connection_budget_keeps_headroom_for_files(limit: int, budget: int) -> None:
    assert connection_budget(limit) == budget


def test_the_soft_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        expected = hard if hard != resource.RLIM_INFINITY else 65_536
        assert raise_file_limit() == expected
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == expected
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
