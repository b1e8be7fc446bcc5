"""FileCredentialStore (SPEC §5 writes, §2 cache): atomic 0600/0700 writes, errno → PersistError, the
summary cache and its mtime refresh. Real files under tmp_path and the real clock (the writes run on
worker threads, which the autojump clock would race)."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import trio
from support.logs import captured, messages

from serve.credentials import CommitGate, Credentials
from serve.errors import PersistError
from serve.models import CredentialSummary
from serve.secrets import Secret
from serve.store import FileCredentialStore, FileSystem

SECRET_TOKEN = "at-SECRET-0001"


def creds(file_name: str = "oauth_creds.json", **document: object) -> Credentials:
    doc: dict[str, object] = {"access_token": SECRET_TOKEN, "token_type": "Bearer", **document}
    expiry = doc.get("expiry_date")
    return Credentials(file_name, Secret(doc), expires_at_ms=expiry if isinstance(expiry, int) else None)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def failing(method: str, code: int) -> FileSystem:
    """A file system whose `method` fails with `code` (CI runs as root: permissions cannot make a write fail)."""
    fs = FileSystem()

    def fail(*args: object) -> None:
        raise OSError(code, os.strerror(code), str(args[0]))

    setattr(fs, method, fail)
    return fs


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """What `serve.store` logs at INFO and above."""
    with captured("serve.store") as records:
        yield records


# --- writes -----------------------------------------------------------------------------------------


async def test_save_writes_pretty_json_0600_in_a_0700_directory(tmp_path: Path) -> None:
    home = tmp_path / "a" / "b" / ".qwen"
    store = FileCredentialStore(home)
    await store.save(creds(expiry_date=1795833903695, note="naïve ✓"))
    path = home / "oauth_creds.json"
    expected = '{\n  "access_token": "at-SECRET-0001",\n  "token_type": "Bearer",\n  "expiry_date": 1795833903695,\n  "note": "naïve ✓"\n}'
    assert path.read_bytes() == expected.encode("utf-8")  # two spaces, non-ASCII kept, no trailing newline
    assert mode(path) == 0o600
    for directory in (home, home.parent, home.parent.parent):
        assert mode(directory) == 0o700  # parents it created too
    assert leftovers(home) == []


async def test_save_creates_the_device_flow_subdirectory(tmp_path: Path) -> None:
    store = FileCredentialStore(tmp_path)
    await store.save(creds("device-flow/acme.json"))
    assert mode(tmp_path / "device-flow") == 0o700
    assert mode(tmp_path / "device-flow" / "acme.json") == 0o600


async def test_save_tightens_an_existing_directory_and_replaces_an_existing_file(tmp_path: Path) -> None:
    home = tmp_path / ".qwen"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    (home / "oauth_creds.json").write_text("old")
    os.chmod(home / "oauth_creds.json", 0o644)
    await FileCredentialStore(home).save(creds())
    assert mode(home) == 0o700
    assert mode(home / "oauth_creds.json") == 0o600
    assert json.loads((home / "oauth_creds.json").read_text())["access_token"] == SECRET_TOKEN


async def test_save_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        await FileCredentialStore(tmp_path).save(creds())
    finally:
        os.umask(old)
    assert mode(tmp_path / "oauth_creds.json") == 0o600


async def test_short_writes_are_completed(tmp_path: Path) -> None:
    class OneByteAtATime(FileSystem):
        def write(self, fd: int, data: bytes) -> int:
            return os.write(fd, data[:1])

    await FileCredentialStore(tmp_path, fs=OneByteAtATime()).save(creds(expiry_date=5))
    assert json.loads((tmp_path / "oauth_creds.json").read_text())["expiry_date"] == 5


async def test_a_directory_that_cannot_be_fsynced_is_tolerated(tmp_path: Path) -> None:
    class NoDirFsync(FileSystem):
        def fsync(self, fd: int) -> None:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "Invalid argument")
            os.fsync(fd)

    await FileCredentialStore(tmp_path, fs=NoDirFsync()).save(creds())
    assert (tmp_path / "oauth_creds.json").exists()


async def test_the_write_order_is_temp_fsync_replace_dir_fsync(tmp_path: Path) -> None:
    calls: list[str] = []

    class Recording(FileSystem):
        def open(self, path: str, flags: int, mode: int = 0o777) -> int:
            kind = "dir" if flags & os.O_CREAT == 0 else "temp"
            calls.append(f"open {kind} {oct(mode) if kind == 'temp' else ''}".strip())
            assert kind == "dir" or (flags & os.O_EXCL and flags & os.O_NOFOLLOW and flags & os.O_CLOEXEC)
            return super().open(path, flags, mode)

        def fsync(self, fd: int) -> None:
            calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
            super().fsync(fd)

        def replace(self, src: str, dst: str) -> None:
            assert Path(src).parent == Path(dst).parent  # same directory: the rename is atomic
            calls.append("replace")
            super().replace(src, dst)

    await FileCredentialStore(tmp_path, fs=Recording()).save(creds())
    # The directory is opened first and its descriptor serves the temp file, the rename and the fsync.
    assert calls == ["open dir", "open temp 0o600", "fsync file", "replace", "fsync dir"]


# --- failures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "code", "name"),
    [
        ("mkdir", errno.EACCES, "EACCES"),
        ("mkdir", errno.EROFS, "EROFS"),
        ("fchmod", errno.EPERM, "EPERM"),
        ("open", errno.EACCES, "EACCES"),
        ("open", errno.EROFS, "EROFS"),
        ("open", errno.EDQUOT, "EDQUOT"),
        ("write", errno.ENOSPC, "ENOSPC"),
        ("fsync", errno.EIO, "EIO"),
        ("replace", errno.EROFS, "EROFS"),
        ("replace", errno.ENOSPC, "ENOSPC"),
    ],
)
async def test_each_errno_becomes_persist_error_and_the_old_file_survives(
    tmp_path: Path, method: str, code: int, name: str
) -> None:
    home = tmp_path / ("fresh" if method == "mkdir" else "home")
    if method != "mkdir":
        await FileCredentialStore(home).save(creds(expiry_date=1))
    before = (home / "oauth_creds.json").read_bytes() if method != "mkdir" else None
    store = FileCredentialStore(home, fs=failing(method, code))
    await store.load(["oauth_creds.json"])
    with pytest.raises(PersistError) as caught:
        await store.save(creds(expiry_date=2))
    assert caught.value.detail == name
    assert str(caught.value) == name  # no path, no token
    assert SECRET_TOKEN not in repr(caught.value)
    if before is not None:
        assert (home / "oauth_creds.json").read_bytes() == before
        assert json.loads(before)["expiry_date"] == 1
        assert leftovers(home) == []
        summary = store.summary("oauth_creds.json")
        assert summary is not None and summary.expires_at_ms == 1  # the cache still shows the old file
    else:
        assert store.summary("oauth_creds.json") is None


async def test_a_crash_between_temp_file_and_replace_leaves_the_old_file_intact(tmp_path: Path) -> None:
    class PowerCut(Exception):
        pass

    class CrashBeforeRename(FileSystem):
        def replace(self, src: str, dst: str) -> None:
            raise PowerCut

        def unlink(self, path: str) -> None:
            pass  # the process died: nobody cleans up

    await FileCredentialStore(tmp_path).save(creds(expiry_date=1))
    with pytest.raises(PowerCut):
        await FileCredentialStore(tmp_path, fs=CrashBeforeRename()).save(creds(expiry_date=2))
    assert json.loads((tmp_path / "oauth_creds.json").read_text())["expiry_date"] == 1
    (temp,) = leftovers(tmp_path)
    assert temp.startswith(".oauth_creds.json.")
    assert mode(tmp_path / temp) == 0o600
    assert json.loads((tmp_path / temp).read_text())["expiry_date"] == 2  # complete: only the rename was lost
    # A later store does not mistake the leftover for the credentials, and removes it: it holds a token.
    store = FileCredentialStore(tmp_path)
    await store.load(["oauth_creds.json"])
    summary = store.summary("oauth_creds.json")
    assert summary is not None and summary.expires_at_ms == 1
    assert leftovers(tmp_path) == []


async def test_an_unserializable_document_is_persist_error_without_touching_disk(tmp_path: Path) -> None:
    with pytest.raises(PersistError, match=r"^unserializable document$"):
        await FileCredentialStore(tmp_path / "h").save(creds(bad=object()))
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("name", ["../escape.json", "/etc/passwd", "a/../../b.json", ""])
async def test_a_file_name_outside_qwen_home_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        await FileCredentialStore(tmp_path / "home").save(creds(name))
    assert not (tmp_path / "escape.json").exists()


# --- the summary cache ------------------------------------------------------------------------------


async def test_save_updates_the_cache(tmp_path: Path) -> None:
    store = FileCredentialStore(tmp_path)
    assert store.summary("device-flow/acme.json") is None
    await store.save(creds("device-flow/acme.json", expiry_date=1795833903695, account_alias="Mika"))
    mtime_ms = os.stat(tmp_path / "device-flow" / "acme.json").st_mtime_ns // 1_000_000
    assert store.summary("device-flow/acme.json") == CredentialSummary(1795833903695, mtime_ms, "Mika")


async def test_load_reads_existing_files_and_knows_missing_ones(tmp_path: Path) -> None:
    (tmp_path / "oauth_creds.json").write_text(json.dumps({"access_token": "x", "expiry_date": 42}))
    store = FileCredentialStore(tmp_path)
    await store.load(["oauth_creds.json", "device-flow/acme.json"])
    summary = store.summary("oauth_creds.json")
    assert summary is not None and summary.expires_at_ms == 42 and summary.account_alias is None
    assert store.summary("device-flow/acme.json") is None


@pytest.mark.parametrize(
    ("document", "expires_at_ms"),
    [
        ({"expiry_date": 1.5e12}, 1_500_000_000_000),
        ({"expiry_date": "soon"}, None),
        ({"expiry_date": True}, None),
        ({}, None),
    ],
)
async def test_expiry_date_is_read_tolerantly(
    tmp_path: Path, document: Mapping[str, object], expires_at_ms: int | None
) -> None:
    (tmp_path / "oauth_creds.json").write_text(json.dumps(document))
    store = FileCredentialStore(tmp_path)
    await store.load(["oauth_creds.json"])
    summary = store.summary("oauth_creds.json")
    assert summary is not None and summary.expires_at_ms == expires_at_ms


async def test_summary_never_touches_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileCredentialStore(tmp_path)
    await store.save(creds(expiry_date=7))

    def no_disk(*args: object, **kwargs: object) -> None:
        raise AssertionError("the status hot path touched the disk")

    monkeypatch.setattr(os, "stat", no_disk)
    monkeypatch.setattr(Path, "open", no_disk)
    for _ in range(1000):
        summary = store.summary("oauth_creds.json")
    assert summary is not None and summary.expires_at_ms == 7


async def test_refresh_picks_up_an_external_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "oauth_creds.json"
    store = FileCredentialStore(tmp_path)
    await store.save(creds(expiry_date=1000))
    # qwen-code refreshes its token and rewrites the file itself (same size, new mtime).
    path.write_text(path.read_text().replace("1000", "2000"))
    later = os.stat(path).st_mtime_ns + 2_000_000_000
    os.utime(path, ns=(later, later))
    summary = store.summary("oauth_creds.json")
    assert summary is not None and summary.expires_at_ms == 1000  # not yet: the hot path does not stat
    await store.refresh()
    assert store.summary("oauth_creds.json") == CredentialSummary(2000, later // 1_000_000, None)


async def test_refresh_sees_a_deleted_and_a_created_file(tmp_path: Path) -> None:
    store = FileCredentialStore(tmp_path)
    await store.load(["oauth_creds.json"])
    assert store.summary("oauth_creds.json") is None
    (tmp_path / "oauth_creds.json").write_text('{"access_token": "x", "expiry_date": 5}')
    await store.refresh()
    summary = store.summary("oauth_creds.json")
    assert summary is not None and summary.expires_at_ms == 5
    (tmp_path / "oauth_creds.json").unlink()
    await store.refresh()
    assert store.summary("oauth_creds.json") is None


async def test_a_half_written_file_keeps_the_last_summary_until_it_parses(tmp_path: Path) -> None:
    path = tmp_path / "oauth_creds.json"
    store = FileCredentialStore(tmp_path)
    await store.save(creds(expiry_date=1000))
    path.write_text('{"access_token": "x", "expi')  # another program caught mid-write
    await store.refresh()
    summary = store.summary("oauth_creds.json")
    assert summary is not None and summary.expires_at_ms == 1000
    path.write_text('{"access_token": "x", "expiry_date": 3000}')
    await store.refresh()
    summary = store.summary("oauth_creds.json")
    assert summary is not None and summary.expires_at_ms == 3000


async def test_run_loads_then_refreshes_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "oauth_creds.json"
    path.write_text('{"access_token": "x", "expiry_date": 1}')
    store = FileCredentialStore(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: store.run(["oauth_creds.json"], refresh_interval_s=0.02, task_status=task_status)
            )
            summary = store.summary("oauth_creds.json")
            assert summary is not None and summary.expires_at_ms == 1  # loaded before started()
            path.write_text('{"access_token": "x", "expiry_date": 22}')
            later = os.stat(path).st_mtime_ns + 1_000_000_000
            os.utime(path, ns=(later, later))
            for _ in range(500):  # the refresh runs every 20 ms: poll for its effect
                summary = store.summary("oauth_creds.json")
                if summary is not None and summary.expires_at_ms == 22:
                    break
                await trio.sleep(0.01)
            else:
                pytest.fail("the background refresh never picked up the rewrite")
            nursery.cancel_scope.cancel()


async def test_the_store_never_shows_a_token(tmp_path: Path) -> None:
    store = FileCredentialStore(tmp_path)
    await store.save(creds(expiry_date=1))
    assert SECRET_TOKEN not in repr(store)
    assert SECRET_TOKEN not in repr(store.summary("oauth_creds.json"))


async def test_a_cancelled_save_abandons_the_wait_not_the_write(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()

    class SlowDisk(FileSystem):
        def fsync(self, fd: int) -> None:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                started.set()
                release.wait(10)
            os.fsync(fd)

    store = FileCredentialStore(tmp_path, fs=SlowDisk())
    await store.load(["oauth_creds.json"])
    with trio.fail_after(5):
        with trio.move_on_after(0.05) as scope:
            await store.save(creds(expiry_date=9))
        assert scope.cancelled_caught  # a hung disk cannot hold the caller
        assert started.is_set()
        release.set()
        for _ in range(500):
            await store.refresh()
            summary = store.summary("oauth_creds.json")
            if summary is not None:
                break
            await trio.sleep(0.01)
    assert summary is not None and summary.expires_at_ms == 9  # the write still landed, whole
    assert json.loads((tmp_path / "oauth_creds.json").read_text())["expiry_date"] == 9


# --- symlinked directories --------------------------------------------------------------------------


async def test_a_symlinked_device_flow_directory_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    target.chmod(0o755)
    (home / "device-flow").symlink_to(target)
    store = FileCredentialStore(home)
    await store.load(["device-flow/acme.json"])
    with pytest.raises(PersistError) as caught:
        await store.save(creds("device-flow/acme.json", expiry_date=1))
    assert caught.value.detail == "ELOOP"
    assert SECRET_TOKEN not in repr(caught.value)
    assert os.listdir(target) == []  # no credentials, no temp file written through the link
    assert mode(target) == 0o755  # and the link's target not chmodded 0700
    assert os.path.islink(home / "device-flow")
    assert store.summary("device-flow/acme.json") is None


async def test_qwen_home_itself_may_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "qwen"
    real.mkdir(parents=True)
    home = tmp_path / ".qwen"
    home.symlink_to(real)
    store = FileCredentialStore(home)
    await store.save(creds(expiry_date=4))
    await store.save(creds("device-flow/acme.json", expiry_date=3))
    assert json.loads((real / "oauth_creds.json").read_text())["expiry_date"] == 4
    assert json.loads((real / "device-flow" / "acme.json").read_text())["expiry_date"] == 3
    assert mode(real) == 0o700 and mode(real / "device-flow") == 0o700
    assert os.path.islink(home)


# --- the commit gate --------------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [True, False])
async def test_a_gate_abandoned_before_the_write_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, existing: bool
) -> None:
    store = FileCredentialStore(tmp_path)
    await store.load(["oauth_creds.json"])
    if existing:
        await store.save(creds(expiry_date=1))
    before = (tmp_path / "oauth_creds.json").read_bytes() if existing else None
    gate = CommitGate()
    assert gate.abandon()
    with pytest.raises(PersistError) as caught:
        await store.save(creds(expiry_date=2), gate=gate)
    assert caught.value.detail == "abandoned"
    assert leftovers(tmp_path) == []
    summary = store.summary("oauth_creds.json")
    if before is not None:
        assert (tmp_path / "oauth_creds.json").read_bytes() == before
        assert summary is not None and summary.expires_at_ms == 1
    else:
        assert not (tmp_path / "oauth_creds.json").exists()
        assert summary is None


async def test_a_gate_left_open_lets_the_write_land_and_can_no_longer_be_abandoned(tmp_path: Path) -> None:
    store = FileCredentialStore(tmp_path)
    await store.save(creds(expiry_date=1))
    gate = CommitGate()
    await store.save(creds(expiry_date=2), gate=gate)
    assert json.loads((tmp_path / "oauth_creds.json").read_text())["expiry_date"] == 2
    assert not gate.abandon()  # the writer began its commit: the caller learns the write landed
    summary = store.summary("oauth_creds.json")
    assert summary is not None and summary.expires_at_ms == 2


async def test_a_gate_abandoned_while_the_data_is_being_synced_stops_the_rename(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()

    class SlowDisk(FileSystem):
        def fsync(self, fd: int) -> None:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                started.set()
                release.wait(10)
            os.fsync(fd)

    await FileCredentialStore(tmp_path).save(creds(expiry_date=1))
    store = FileCredentialStore(tmp_path, fs=SlowDisk())
    gate = CommitGate()
    outcome: list[PersistError] = []

    async def save() -> None:
        with pytest.raises(PersistError) as caught:
            await store.save(creds(expiry_date=2), gate=gate)
        outcome.append(caught.value)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(save)
            assert await trio.to_thread.run_sync(started.wait, 10)  # the data is being synced
            assert gate.abandon()  # the caller gives up first: the write may no longer land
            release.set()
    assert [error.detail for error in outcome] == ["abandoned"]
    assert json.loads((tmp_path / "oauth_creds.json").read_text())["expiry_date"] == 1
    assert leftovers(tmp_path) == []


# --- start-up: stale temp files and a loose QWEN_HOME -----------------------------------------------


async def test_load_sweeps_the_temp_files_a_killed_writer_left(
    tmp_path: Path, records: list[logging.LogRecord]
) -> None:
    (tmp_path / "device-flow").mkdir()
    stale = [
        tmp_path / f".oauth_creds.json.{'a' * 16}.tmp",
        tmp_path / ".oauth_creds.json.0123456789abcdef.tmp",
        tmp_path / "device-flow" / f".acme.json.{'b' * 16}.tmp",
    ]
    kept = [
        tmp_path / f".oauth_creds.json.{'c' * 8}.tmp",  # not our pattern
        tmp_path / f".other.json.{'d' * 16}.tmp",  # not a watched file
        tmp_path / "device-flow" / f".oauth_creds.json.{'e' * 16}.tmp",  # not that file's directory
        tmp_path / "notes.txt",
    ]
    for path in (*stale, *kept):
        path.write_text(json.dumps({"access_token": SECRET_TOKEN}))
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    link = tmp_path / f".oauth_creds.json.{'f' * 16}.tmp"
    link.symlink_to(victim)
    store = FileCredentialStore(tmp_path)
    await store.load(["oauth_creds.json", "device-flow/acme.json"])
    assert [path for path in stale if path.exists()] == []
    assert [path for path in kept if not path.exists()] == []
    assert os.path.islink(link) and victim.read_text() == "keep me"  # a symlink is never followed nor removed
    assert messages(records, logging.INFO) == [f"removed 3 stale credential temp file(s) under {tmp_path}"]
    assert store.summary("oauth_creds.json") is None  # a temp file is never taken for the credentials


async def test_load_logs_nothing_when_there_is_nothing_to_sweep(
    tmp_path: Path, records: list[logging.LogRecord]
) -> None:
    await FileCredentialStore(tmp_path / "missing").load(["oauth_creds.json", "device-flow/acme.json"])
    tmp_path.chmod(0o700)
    await FileCredentialStore(tmp_path).load(["oauth_creds.json"])
    assert records == []


@pytest.mark.parametrize("loose", [0o770, 0o777, 0o720, 0o702], ids=oct)
async def test_load_warns_about_a_qwen_home_others_may_write(
    tmp_path: Path, records: list[logging.LogRecord], loose: int
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(loose)
    await FileCredentialStore(home).load(["oauth_creds.json"])
    [warning] = messages(records, logging.WARNING)
    assert str(home) in warning and f"mode {loose:04o}" in warning
    assert "\n" not in warning


async def test_load_warns_about_a_qwen_home_owned_by_another_user(
    tmp_path: Path, records: list[logging.LogRecord]
) -> None:
    if os.getuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chown(home, 65534, -1)
    await FileCredentialStore(home).load(["oauth_creds.json"])
    [warning] = messages(records, logging.WARNING)
    assert str(home) in warning and "owned by uid 65534" in warning
