"""The credentials after a login: kept fresh (RFC 6749 §6 refresh) and removed on logout (RFC 7009).

One `keep_fresh` task per provider with `refresh = "auto"` runs in the daemon's nursery. It sleeps until the
access token is `skew` from expiring (at most half its lifetime before), then refreshes:

1. under the provider's `trio.Lock` (one refresh or logout at a time in this process) and an exclusive
   `flock` on `<credentials>.lock` (one at a time across processes sharing `$QWEN_HOME`);
2. re-reads the file, since another process may have refreshed it meanwhile (then there is nothing to do);
3. sends the refresh grant; the new document is written atomically (temp file, fsync, rename) before the
   old refresh token is forgotten, and keeps the old refresh token when the IdP sends none;
4. a transient failure is retried with doubling back-off; a refusal (`invalid_grant`) marks the credentials
   invalid until the file changes (a new login), which the status cell shows as `error`.

Every outcome is one event (`auth_credentials_refreshed` / `_invalid` / `_removed`) and one log line that
names the provider and never a token.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import trio

from serve.clock import WallClock
from serve.config import RefreshConfig
from serve.errors import PersistError
from serve.events import EventBus
from serve.models import CredentialsInvalid, CredentialsRefreshed, CredentialsRemoved, CredentialSummary, ErrorKind
from serve.private_files import open_lock_file
from serve.providers.base import (
    DeviceFlowProvider,
    Refreshable,
    RefreshRejected,
    RefreshSucceeded,
    Revocable,
    Revocation,
)
from serve.store import FileCredentialStore

log = logging.getLogger("serve.keeper")

# How often a provider without a refreshable credential looks again (a login may land at any time).
IDLE_RECHECK_S = 30.0
# How often a lock held by another process is tried again.
LOCK_RETRY_S = 0.1

RefreshOutcome = Literal["refreshed", "fresh", "missing", "invalid", "transient", "locked"]


@dataclass(frozen=True, slots=True)
class LogoutResult:
    """What a logout did: whether a file was removed, and what the IdP said to the revocation."""

    provider_id: str
    removed: bool
    revocation: Revocation


class CredentialKeeper:
    """Refreshes and removes the credentials of the daemon's providers."""

    def __init__(
        self,
        *,
        providers: Mapping[str, DeviceFlowProvider],
        store: FileCredentialStore,
        bus: EventBus,
        clock: WallClock,
        config: RefreshConfig,
    ) -> None:
        self._providers = providers
        self._store = store
        self._bus = bus
        self._clock = clock
        self._config = config
        self._locks = {provider_id: trio.Lock() for provider_id in providers}
        # Provider id → the `updated_at_ms` of the file the IdP refused; cleared when the file changes.
        self._invalid: dict[str, int | None] = {}

    @property
    def refreshing(self) -> list[str]:
        """The providers whose credentials this daemon keeps fresh."""
        return [p.provider_id for p in self._providers.values() if isinstance(p, Refreshable) and p.refresh_enabled]

    def is_invalid(self, provider_id: str, summary: CredentialSummary | None) -> bool:
        """Whether these credentials are the ones the IdP refused (a newer file is not)."""
        return (
            summary is not None and provider_id in self._invalid and self._invalid[provider_id] == summary.updated_at_ms
        )

    # --- the refresh loop ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """One `keep_fresh` task per refreshing provider, until cancelled."""
        async with trio.open_nursery() as nursery:
            for provider_id in self.refreshing:
                nursery.start_soon(self.keep_fresh, provider_id)
            task_status.started()

    async def keep_fresh(self, provider_id: str) -> None:
        """Refresh `provider_id`'s credentials at each due time, forever."""
        backoff = self._config.retry_min_s
        while True:
            delay = self._seconds_until_due(provider_id)
            if delay > 0:
                # Until due, or until the file changes (a login lands: its token may be short-lived).
                with trio.move_on_after(min(delay, IDLE_RECHECK_S)):
                    await self._store.wait_changed()
                continue
            outcome = await self.refresh(provider_id)
            # "missing" too: the cache can still say due while the file is unreadable (being rewritten, or
            # broken; the store keeps the last good summary), and trying again at once would spin.
            if outcome in ("transient", "locked", "missing"):
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self._config.retry_max_s)
            else:
                backoff = self._config.retry_min_s

    def _seconds_until_due(self, provider_id: str) -> float:
        """Seconds until the cached credentials are due for a refresh; inf when there is nothing to refresh."""
        summary = self._store.summary(self._providers[provider_id].credentials_file)
        if summary is None or summary.expires_at_ms is None or self.is_invalid(provider_id, summary):
            return float("inf")
        return (self._due_ms(summary.expires_at_ms, summary.obtained_at_ms) - self._clock.now_ms()) / 1000

    def _due_ms(self, expires_at_ms: int, obtained_at_ms: int | None) -> int:
        skew_ms = self._config.skew_s * 1000
        if obtained_at_ms is not None and expires_at_ms > obtained_at_ms:
            skew_ms = min(skew_ms, (expires_at_ms - obtained_at_ms) / 2)
        return int(expires_at_ms - skew_ms)

    # --- one refresh ----------------------------------------------------------------------------------

    async def refresh(self, provider_id: str) -> RefreshOutcome:
        """Refresh now if the credentials on disk are due; single-flight per provider and per `$QWEN_HOME`."""
        provider = self._providers[provider_id]
        if not isinstance(provider, Refreshable):
            return "missing"
        async with self._locks[provider_id]:
            try:
                lock_fd = await self._lock_file(provider.credentials_file)
            except OSError as exc:  # a symlinked `device-flow/`, say: refused, as the store refuses it
                name = errno.errorcode.get(exc.errno or 0, "OSError")
                log.warning("provider %s: cannot open its credentials' lock file (%s); retrying", provider_id, name)
                return "transient"
            if lock_fd is None:
                log.info("provider %s: another process is refreshing its credentials; trying again later", provider_id)
                return "locked"
            try:
                return await self._refresh_locked(provider_id, provider)
            finally:
                os.close(lock_fd)  # releases the flock

    async def _refresh_locked(self, provider_id: str, provider: Refreshable) -> RefreshOutcome:
        file_name = provider.credentials_file
        # The file, not the cache: another process may have refreshed (or removed) it a moment ago.
        found = await self._store.read_current(file_name)
        if found is None:
            return "missing"
        summary, document = found
        if self.is_invalid(provider_id, summary):
            return "invalid"
        if (
            summary.expires_at_ms is not None
            and self._due_ms(summary.expires_at_ms, summary.obtained_at_ms) > self._clock.now_ms()
        ):
            return "fresh"
        refresh_token = document.reveal().get("refresh_token")
        if not isinstance(refresh_token, str) or not refresh_token:
            log.warning(
                "provider %s: the access token expires and the credentials hold no refresh token; log in again",
                provider_id,
            )
            self._invalid[provider_id] = summary.updated_at_ms
            self._bus.publish(CredentialsInvalid(provider_id, ErrorKind.INVALID_GRANT))
            return "invalid"
        result = await provider.refresh(document)
        match result:
            case RefreshSucceeded(credentials=credentials):
                try:
                    await self._store.save(credentials)
                except PersistError as exc:
                    log.warning(
                        "provider %s: refreshed, but the credentials could not be written (%s)", provider_id, exc.detail
                    )
                    return "transient"
                self._invalid.pop(provider_id, None)
                log.info("provider %s: access token refreshed", provider_id)
                self._bus.publish(CredentialsRefreshed(provider_id, credentials.expires_at_ms))
                return "refreshed"
            case RefreshRejected(kind=kind, hint=hint):
                log.warning("provider %s: refresh refused (%s): %s; log in again", provider_id, kind.value, hint)
                self._invalid[provider_id] = summary.updated_at_ms
                self._bus.publish(CredentialsInvalid(provider_id, kind))
                return "invalid"
            case _:
                log.warning("provider %s: refresh failed for now (%s); retrying", provider_id, result.reason)
                return "transient"

    async def _lock_file(self, file_name: str) -> int | None:
        """The flocked descriptor of the credential's lock file, or None after `lock_wait_s` of trying.
        Raises `OSError` when the lock file cannot be opened."""
        fd = await trio.to_thread.run_sync(open_lock_file, self._store.qwen_home, file_name)
        locked = False
        try:
            with trio.move_on_after(self._config.lock_wait_s):
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        locked = True
                        return fd
                    except BlockingIOError:
                        await trio.sleep(LOCK_RETRY_S)
            return None
        finally:
            if not locked:  # timed out, or cancelled while waiting (a shutdown): the descriptor is ours to close
                os.close(fd)

    # --- logout -----------------------------------------------------------------------------------------

    async def logout(self, provider_id: str) -> LogoutResult:
        """Revoke at the IdP when it can (RFC 7009; a failure is reported, not fatal), then delete the file.

        Raises `PersistError` when the file exists but cannot be deleted.
        """
        provider = self._providers[provider_id]
        file_name = provider.credentials_file
        async with self._locks[provider_id]:
            found = await self._store.read_current(file_name)
            revocation: Revocation = "none"
            if found is not None:
                revocation = await provider.revoke(found[1]) if isinstance(provider, Revocable) else "unsupported"
            removed = await self._store.remove(file_name)
            self._invalid.pop(provider_id, None)
        if revocation == "failed":
            log.warning(
                "provider %s: the IdP did not confirm the revocation; the local credentials are removed", provider_id
            )
        log.info(
            "provider %s: logged out (credentials %s, revocation: %s)",
            provider_id,
            "removed" if removed else "absent",
            revocation,
        )
        if removed:
            self._bus.publish(CredentialsRemoved(provider_id))
        return LogoutResult(provider_id, removed, revocation)
