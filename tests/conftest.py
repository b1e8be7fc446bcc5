"""Shared fixtures: a test configuration, and a real daemon on 127.0.0.1:0 started through `run_daemon`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from support.daemon import StartDaemon

from serve.config import Config, load_config
from serve.daemon import RunningDaemon, run_daemon

TOKEN = "test-token-0123456789abcdef"


def _test_config(**server: Any) -> Config:
    return load_config(overrides={"server": {"port": 0, "graceful_timeout_s": 0.5, **server}})


@pytest.fixture(autouse=True)
def restore_cli_loggers() -> Iterator[None]:
    """`serve.cli.main` routes the `serve` and `hypercorn` loggers to the stderr of the moment (pytest's
    capture, closed once the test ends): undo that, or later daemons' log lines hit a closed stream."""
    saved = {}
    for name in ("serve", "hypercorn"):
        logger = logging.getLogger(name)
        saved[name] = (logger.level, logger.propagate, list(logger.handlers))
    yield
    for name, (level, propagate, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers


@pytest.fixture
def make_config() -> Callable[..., Config]:
    """`make_config(**server_keys)`: a validated config on 127.0.0.1:0 with a short graceful timeout."""
    return _test_config


@pytest.fixture
def token() -> str:
    return TOKEN


@pytest.fixture
def auth() -> dict[str, str]:
    """Headers carrying the test token."""
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


@pytest.fixture
def qwen_home(tmp_path: Path) -> Path:
    return tmp_path / "qwen-home"


@pytest.fixture
def start_daemon(workspace: Path, qwen_home: Path) -> StartDaemon:
    """`async with start_daemon(config=None, token=b"...", **run_daemon_kwargs) as daemon:` runs a real daemon.

    The default token is `TOKEN`; pass `token=None` for a token-less daemon. Leaving the block shuts the
    daemon down through its own shutdown sequence and waits until `run_daemon` has returned.
    """

    @asynccontextmanager
    async def start(
        config: Config | None = None, *, token: bytes | None = TOKEN.encode(), **kwargs: Any
    ) -> AsyncIterator[RunningDaemon]:
        async with trio.open_nursery() as nursery:
            daemon: RunningDaemon = await nursery.start(
                partial(
                    run_daemon,
                    config or _test_config(),
                    token=token,
                    workspace=workspace,
                    qwen_home=qwen_home,
                    **kwargs,
                )
            )
            try:
                yield daemon
            finally:
                daemon.shutdown()

    return start


@pytest.fixture
async def daemon(start_daemon: StartDaemon) -> AsyncIterator[RunningDaemon]:
    """A daemon with the default test config and `TOKEN`."""
    async with start_daemon() as running:
        yield running
