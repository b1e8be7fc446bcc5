"""What a successful login produces, and the interface of the store that keeps it.

The provider decides the file and its format (qwen-code's `oauth_creds.json`, or our generic one); the
store only writes documents atomically and summarises them for the status snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from serve.models import CredentialSummary
from serve.secrets import Secret


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


class CredentialStore(Protocol):
    """Where credentials land. The real one writes on a worker thread; registry tests use a fake."""

    async def save(self, credentials: Credentials) -> None:
        """Write atomically (0600 file, 0700 directory), then update the in-process cache.

        Raises `PersistError` when the write fails; the old file, if any, is left intact.
        """

    def summary(self, file_name: str) -> CredentialSummary | None:
        """The cached summary of one credentials file, or None when there is none. Never blocks."""
