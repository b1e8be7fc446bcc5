"""Credential files under `$QWEN_HOME`: atomic 0600 writes on a worker thread, and a cache of summaries.

A write (SPEC §5) is `serve.private_files.write_private`: the directory is made 0700, a temp file is
created 0600 (`O_EXCL | O_NOFOLLOW`) beside the target, written, fsynced, renamed over the target with
`os.replace`, and the directory is fsynced. A crash leaves the old file or the new one, never a torn one; a
failed write removes its temp file, and `load()` sweeps the ones a killed daemon left. A symlinked directory
below `$QWEN_HOME` (`device-flow/`) is refused, never written through; `$QWEN_HOME` itself may be a symlink.

The status snapshot reads summaries from memory only. The cache is filled by `load()` at start and kept
fresh by `run()`, which stats the watched files on a worker thread once per `refresh_interval_s` (1 s) and
re-reads a file whose mtime, size or inode changed: qwen-code rewrites `oauth_creds.json` itself when it
refreshes its token.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import trio

from serve.credentials import CommitGate, Credentials, epoch_ms
from serve.errors import PersistError
from serve.models import CredentialSummary
from serve.private_files import (
    CommitAbandoned,
    SymlinkedDirectory,
    home_problem,
    read_private,
    remove_private,
    sweep_temp_files,
    write_private,
)
from serve.private_files import FileSystem as FileSystem  # re-exported: tests build stores on a failing one
from serve.secrets import Secret

log = logging.getLogger("serve.store")
_MAX_READ_BYTES = 1 << 20
_Signature = tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino)
_MISSING: _Signature = (-1, -1, -1)


@dataclass(frozen=True, slots=True)
class _Entry:
    """What the cache knows of one file. `signature` None: re-read at the next refresh."""

    signature: _Signature | None
    summary: CredentialSummary | None


class _Unreadable:
    """A scan found the file but could not parse it (perhaps mid-write by another program)."""


_UNREADABLE = _Unreadable()


class FileCredentialStore:
    """The `CredentialStore` of the daemon: files under `qwen_home`, summaries cached in memory.

    Owned by the daemon, which awaits `load()` (or starts `run()`) before serving. `save()` may be called
    from any task; the disk work runs on a worker thread. Cancelling `save()` abandons the wait, never the
    write: the thread still finishes (or fails) its atomic write, and the cache learns of the new file at
    the next refresh. So a caller bounds its wait with a cancel scope (and shields it to let the write land)
    while a hung disk can never hold up shutdown.
    """

    def __init__(self, qwen_home: Path, *, fs: FileSystem | None = None) -> None:
        self._home = Path(qwen_home)
        self._fs = fs or FileSystem()
        self._entries: dict[str, _Entry] = {}
        self._lock = trio.Lock()  # one scan or write at a time, so a slow scan never undoes a save
        self._changed = trio.Event()  # set (and replaced) whenever a cached summary changes

    def __repr__(self) -> str:
        return f"FileCredentialStore({str(self._home)!r})"

    @property
    def qwen_home(self) -> Path:
        return self._home

    def path_of(self, file_name: str) -> Path:
        """The absolute path of a credentials file. Raises `ValueError` for a name that leaves `qwen_home`."""
        parts = PurePosixPath(file_name).parts
        if not parts or PurePosixPath(file_name).is_absolute() or ".." in parts:
            raise ValueError("a credentials file name is a relative path inside QWEN_HOME")
        return self._home.joinpath(*parts)

    # --- writing ------------------------------------------------------------------------------------

    async def save(self, credentials: Credentials, *, gate: CommitGate | None = None) -> None:
        """Write the document atomically (0600 file, 0700 directory), then update the cache.

        With a `gate`, the writer thread calls `gate.begin_commit()` just before the rename and replaces the
        file only if it returns True. Raises `PersistError` whose `detail` is the errno name (`ENOSPC`,
        `EACCES`, `ELOOP` for a symlinked directory, ...) or `abandoned` (the gate said no); the old file,
        if any, is left intact and no temp file remains.
        """
        self.path_of(credentials.file_name)  # a name outside QWEN_HOME is a bug: ValueError, not PersistError
        try:
            data = json.dumps(credentials.document.reveal(), indent=2, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise PersistError("unserializable document") from exc
        async with self._lock:
            try:
                info = await trio.to_thread.run_sync(
                    self._write, credentials.file_name, data, gate, abandon_on_cancel=True
                )
            except CommitAbandoned as exc:
                raise PersistError("abandoned") from exc
            except OSError as exc:
                raise PersistError(errno.errorcode.get(exc.errno or 0, "OSError")) from exc
            summary = _summarize(credentials.document.reveal(), info.st_mtime_ns)
            self._set_entry(credentials.file_name, _Entry(_signature(info), summary))

    def _write(self, file_name: str, data: bytes, gate: CommitGate | None) -> os.stat_result:
        """On a worker thread: the atomic write. Returns the new file's stat."""
        commit = gate.begin_commit if gate is not None else None
        return write_private(self._home, file_name, data, fs=self._fs, commit=commit)

    async def remove(self, file_name: str) -> bool:
        """Delete a credentials file (logout); False when there was none. Raises `PersistError`."""
        self.path_of(file_name)
        async with self._lock:
            try:
                removed = await trio.to_thread.run_sync(remove_private, self._home, file_name)
            except SymlinkedDirectory as exc:
                raise PersistError("ELOOP") from exc
            except OSError as exc:
                raise PersistError(errno.errorcode.get(exc.errno or 0, "OSError")) from exc
            if file_name in self._entries:
                self._set_entry(file_name, _Entry(_MISSING, None))
            return removed

    # --- reading ------------------------------------------------------------------------------------

    async def read_current(self, file_name: str) -> tuple[CredentialSummary, Secret[Mapping[str, object]]] | None:
        """The file as it is on disk now (another process may have just rewritten it): its summary, which
        also refreshes the cache, and its whole document. None when it is missing or not a JSON object.
        For the refresher and logout, which need its tokens; never for a status."""
        async with self._lock:  # not beside a scan or a save, which could put an older summary back
            try:
                found = await trio.to_thread.run_sync(read_private, self._home, file_name)
            except OSError:
                return None
            if found is None:
                if file_name in self._entries:
                    self._set_entry(file_name, _Entry(_MISSING, None))
                return None
            info, raw = found
            try:
                document = json.loads(raw)
            except (ValueError, RecursionError):
                return None
            if not isinstance(document, dict):
                return None
            summary = _summarize(document, info.st_mtime_ns)
            if file_name in self._entries:
                self._set_entry(file_name, _Entry(_signature(info), summary))
            found_document: Mapping[str, object] = document
            return summary, Secret(found_document)

    def _set_entry(self, file_name: str, entry: _Entry) -> None:
        self._entries[file_name] = entry
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Return at the next change of any cached summary (a login landed, a file was rewritten or removed)."""
        await self._changed.wait()

    def summary(self, file_name: str) -> CredentialSummary | None:
        """The cached summary of one credentials file, or None when it does not exist. Never blocks."""
        entry = self._entries.get(file_name)
        return entry.summary if entry is not None else None

    async def load(self, file_names: Iterable[str]) -> None:
        """Watch these files and read them now (on a worker thread); call once at start.

        Also, on that thread: warns when `$QWEN_HOME` is writable by others or not the user's, and removes
        the temp files a killed writer left beside the watched files (they hold whole tokens).
        """
        names = list(file_names)
        for name in names:
            self.path_of(name)  # reject a bad name here, not at every refresh
            self._entries.setdefault(name, _Entry(None, None))
        await trio.to_thread.run_sync(self._prepare, names)
        await self.refresh()

    def _prepare(self, file_names: list[str]) -> None:
        """On a worker thread: the start-up checks of `load()`. Logs paths and counts, never contents."""
        problem = home_problem(self._home)
        if problem is not None:
            log.warning("credentials directory QWEN_HOME %s; other users could replace credential files", problem)
        removed = sweep_temp_files(self._home, file_names)
        if removed:
            log.info("removed %d stale credential temp file(s) under %s", removed, self._home)

    async def refresh(self) -> None:
        """Stat every watched file on a worker thread; re-read those whose mtime, size or inode changed."""
        async with self._lock:
            known = {name: entry.signature for name, entry in self._entries.items()}
            changes = await trio.to_thread.run_sync(self._scan, known)
            for name, (signature, found) in changes.items():
                if isinstance(found, _Unreadable):
                    # Keep what we knew and look again next time: the writer may not be done.
                    self._entries[name] = _Entry(None, self._entries[name].summary)
                else:
                    self._set_entry(name, _Entry(signature, found))

    async def run(
        self,
        file_names: Iterable[str],
        *,
        refresh_interval_s: float = 1.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """`load()`, report started, then `refresh()` every `refresh_interval_s` until cancelled."""
        await self.load(file_names)
        task_status.started()
        while True:
            await trio.sleep(refresh_interval_s)
            await self.refresh()

    def _scan(
        self, known: Mapping[str, _Signature | None]
    ) -> dict[str, tuple[_Signature | None, CredentialSummary | _Unreadable | None]]:
        """On a worker thread: the files whose signature differs from `known`, with their new summaries."""
        changes: dict[str, tuple[_Signature | None, CredentialSummary | _Unreadable | None]] = {}
        for name, old in known.items():
            path = self.path_of(name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                if old != _MISSING:
                    changes[name] = (_MISSING, None)
                continue
            except OSError:
                changes[name] = (None, _UNREADABLE)
                continue
            signature = _signature(st)
            if signature == old:
                continue
            changes[name] = (signature, _read_summary(path, st))
        return changes


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read_summary(path: Path, st: os.stat_result) -> CredentialSummary | _Unreadable:
    if not stat.S_ISREG(st.st_mode):
        return _UNREADABLE
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_READ_BYTES + 1)
        document = json.loads(raw) if len(raw) <= _MAX_READ_BYTES else None
    except (OSError, ValueError, RecursionError):
        return _UNREADABLE
    if not isinstance(document, dict):
        return _UNREADABLE
    return _summarize(document, st.st_mtime_ns)


def _summarize(document: Mapping[str, object], mtime_ns: int) -> CredentialSummary:
    """Expiry (`expiry_date`, epoch ms) and alias (`account_alias`) from a document; never a token."""
    alias = document.get("account_alias")
    return CredentialSummary(
        expires_at_ms=epoch_ms(document.get("expiry_date")),
        updated_at_ms=mtime_ns // 1_000_000,
        account_alias=alias if isinstance(alias, str) and alias else None,
        obtained_at_ms=epoch_ms(document.get("obtained_at")),
    )
