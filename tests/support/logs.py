"""Capturing what a logger of the daemon says, attached to the logger itself (the CLI may stop propagation)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def captured(name: str, level: int = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    """The records logger `name` emits at `level` and above while the block runs."""
    logger, handler = logging.getLogger(name), Capture()
    old_level = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def messages(records: list[logging.LogRecord], level: int) -> list[str]:
    return [record.getMessage() for record in records if record.levelno == level]
