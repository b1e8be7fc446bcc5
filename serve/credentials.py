"""What a successful login produces, and the interface of the store that keeps it.

The provider decides the file and its format (qwen-code's `oauth_creds.json`, or our generic one); the
store only writes documents atomically and summarises them for the status snapshot.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from serve.config import QWEN_OAUTH_ID
from serve.models import CredentialSummary
from serve.secrets import Secret

# Where each provider's credentials live, relative to `$QWEN_HOME`: the providers write there, the store
# watches there, `qwen-serve token` reads there.
QWEN_CREDENTIALS_FILE = "oauth_creds.json"  # qwen-code's own file


def credentials_file(provider_id: str) -> str:
    """`oauth_creds.json` for qwen-oauth, else `device-flow/<id>.json` (the id is validated by the config)."""
    return QWEN_CREDENTIALS_FILE if provider_id == QWEN_OAUTH_ID else f"device-flow/{provider_id}.json"


def epoch_ms(value: object) -> int | None:
    """A credentials document's time (`expiry_date`, `obtained_at`): a finite number, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return int(value)
    return None


@dataclass(frozen=True, slots=True)
class Credentials:
    """A document to write under `$QWEN_HOME`, plus the non-secret facts the events need.

    `document` is the JSON object to write, in key order, inside a `Secret` (it holds tokens).
    Every document has `expiry_date` (epoch ms) when the IdP said when the access token expires.
    """

    file_name: str  # relative to $QWEN_HOME, e.g. "oauth_creds.json" or "device-flow/<id>.json"
    document: Secret[Mapping[str, object]]
    expires_at_ms: int | None = None
    account_alias: str | None = None


class CommitGate:
    """Decides, once, whether a credential write may still land: the writer's rename or the caller's give-up.

    A write runs on a worker thread that a timeout cannot stop. Without this, a caller that gave up on a
    slow write (and reported it failed) could see the file land afterwards, so the outcome it reported
    would not be what is on disk. The writer calls `begin_commit()` just before its atomic rename and
    renames only if that returns True; the caller calls `abandon()` when it stops waiting, and learns
    whether the rename had already begun (then the write is as good as landed: the data is fsynced and
    a rename is atomic). Thread-safe; the lock is held only to flip the state, never across I/O.
    """

    __slots__ = ("_lock", "_state")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "open"  # open → committing | abandoned

    def begin_commit(self) -> bool:
        """The writer, before its rename: True to go ahead; False when the caller already gave up."""
        with self._lock:
            if self._state == "open":
                self._state = "committing"
            return self._state == "committing"

    def abandon(self) -> bool:
        """The caller, giving up: True when the write can no longer land; False when it already began."""
        with self._lock:
            if self._state == "open":
                self._state = "abandoned"
            return self._state == "abandoned"


class CredentialStore(Protocol):
    """Where credentials land. The real one writes on a worker thread; registry tests use a fake."""

    async def save(self, credentials: Credentials, *, gate: CommitGate | None = None) -> None:
        """Write atomically (0600 file, 0700 directory), then update the in-process cache.

        With a `gate`, the file is replaced only if `gate.begin_commit()` allows it at that moment.
        Raises `PersistError` when the write fails or the gate was abandoned; the old file, if any, is
        left intact.
        """

    def summary(self, file_name: str) -> CredentialSummary | None:
        """The cached summary of one credentials file, or None when there is none. Never blocks."""
