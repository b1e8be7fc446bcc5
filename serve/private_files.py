"""Private files below a root directory: atomic 0600 writes, 0700 directories, no symlinked directories.

The credential store (`$QWEN_HOME/oauth_creds.json`, `$QWEN_HOME/device-flow/*.json`) and the token file
(`$QWEN_HOME/serve/token`) are written by `write_private`, so both get the same guarantees:

- The root (`$QWEN_HOME`) may be a symlink (users keep dotfiles that way); every directory *below* it is
  opened with `O_NOFOLLOW | O_DIRECTORY` relative to its parent's descriptor, and a symlink there is refused
  (`SymlinkedDirectory`, errno `ELOOP`). All later calls (`mkdir`, the temp file, the rename, the fsync)
  go through those descriptors, so no path is resolved twice and there is no check-then-use race.
- Missing directories are created 0700; the file's own directory is made 0700 even when it existed.
- A temp file `.<name>.<16 hex>.tmp` is created 0600 (`O_EXCL | O_NOFOLLOW | O_CLOEXEC`) beside the
  target, written in full, fsynced, closed, renamed over the target with `os.replace`, and the directory
  is fsynced. A crash leaves the old file or the new one, never a torn one; a failed write removes its
  temp file; a SIGKILL can leave one, which `sweep_temp_files` removes at the next start.

Everything here is synchronous and blocking: the store calls it on a worker thread, the token module at
start-up before the event loop serves anything. Stdlib only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

DIR_MODE = 0o700
FILE_MODE = 0o600
TEMP_HEX_DIGITS = 16

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _NOFOLLOW
# O_NONBLOCK: opening a FIFO planted where a file belongs must not hang start-up; fstat then rejects it.
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0)


class AtPath(str):
    """A path that also knows the open directory (`dir_fd`) and the entry `name` it stands for.

    It is the absolute path as a `str`, so a `FileSystem` override written for plain paths keeps working
    (it acts on the path, as before); the default `FileSystem` uses `name` relative to `dir_fd` instead,
    which is what makes the writer immune to a directory swapped for a symlink halfway through.
    """

    dir_fd: int
    name: str

    def __new__(cls, path: str, dir_fd: int, name: str) -> AtPath:
        self = super().__new__(cls, path)
        self.dir_fd = dir_fd
        self.name = name
        return self


def _at(path: str) -> tuple[str, int | None]:
    """The (name, dir_fd) an `os` call takes for `path`: relative to its directory for an `AtPath`."""
    return (path.name, path.dir_fd) if isinstance(path, AtPath) else (path, None)


class FileSystem:
    """The OS calls the writer makes, one method each, so a test can make any of them fail with an errno
    (CI runs as root, where `chmod` cannot make a write fail). Paths may be `AtPath`s."""

    def mkdir(self, path: str, mode: int) -> None:
        name, dir_fd = _at(path)
        os.mkdir(name, mode, dir_fd=dir_fd)

    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        name, dir_fd = _at(path)
        return os.open(name, flags, mode, dir_fd=dir_fd)

    def fchmod(self, fd: int, mode: int) -> None:
        os.fchmod(fd, mode)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, src: str, dst: str) -> None:
        src_name, src_dir_fd = _at(src)
        dst_name, dst_dir_fd = _at(dst)
        os.replace(src_name, dst_name, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    def unlink(self, path: str) -> None:
        name, dir_fd = _at(path)
        os.unlink(name, dir_fd=dir_fd)


class SymlinkedDirectory(OSError):
    """A directory below the root is a symlink: refused, so nothing is written (or chmodded) elsewhere."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.ELOOP, "symlinked directory", path)


class CommitAbandoned(Exception):
    """The writer's `commit` check said no just before the rename: the temp file was removed, nothing replaced."""


def temp_name(name: str) -> str:
    """A fresh temp file name for target `name`: `.<name>.<16 hex>.tmp`, in the target's directory."""
    return f".{name}.{secrets.token_hex(TEMP_HEX_DIGITS // 2)}.tmp"


def is_temp_name(entry: str, name: str) -> bool:
    """Whether `entry` is exactly what `temp_name(name)` produces (and so ours to sweep)."""
    return re.fullmatch(rf"\.{re.escape(name)}\.[0-9a-f]{{{TEMP_HEX_DIGITS}}}\.tmp", entry) is not None


# --- writing ----------------------------------------------------------------------------------------


def write_private(
    root: Path,
    relative: str,
    data: bytes,
    *,
    fs: FileSystem | None = None,
    commit: Callable[[], bool] | None = None,
) -> os.stat_result:
    """Write `data` atomically to `root/relative`, mode 0600, in 0700 directories; returns the file's stat.

    `commit`, when given, is called just before the rename; False removes the temp file and raises
    `CommitAbandoned` with the target untouched. Raises `SymlinkedDirectory` (an `OSError`, `ELOOP`) for a
    symlink among the directories below `root`, `ValueError` for a `relative` that leaves `root`, and any
    other `OSError` of the calls; on every failure the old file, if any, is intact and no temp file remains.
    """
    fs = fs or FileSystem()
    parts = _parts(relative)
    dir_fd, directory = _open_directories(fs, Path(root), parts[:-1], create=True)
    try:
        fs.fchmod(dir_fd, DIR_MODE)  # even when it existed: the file's directory is ours alone
        return _write_in(fs, dir_fd, directory, parts[-1], data, commit)
    finally:
        _close_quietly(fs, dir_fd)


def _write_in(
    fs: FileSystem, dir_fd: int, directory: Path, name: str, data: bytes, commit: Callable[[], bool] | None
) -> os.stat_result:
    """The atomic write itself, in the open directory `dir_fd`."""
    temp = temp_name(name)
    temp_path = AtPath(str(directory / temp), dir_fd, temp)
    fd = fs.open(temp_path, _TEMP_FLAGS, FILE_MODE)
    replaced = False
    try:
        try:
            fs.fchmod(fd, FILE_MODE)  # the umask may have narrowed the mode; make it exactly 0600
            view = memoryview(data)
            while view:
                view = view[fs.write(fd, bytes(view)) :]
            fs.fsync(fd)
            info = os.fstat(fd)  # a rename keeps mtime, size and inode: this is the stat of the landed file
        finally:
            fs.close(fd)
        if commit is not None and not commit():
            raise CommitAbandoned
        fs.replace(temp_path, AtPath(str(directory / name), dir_fd, name))
        replaced = True
    finally:
        if not replaced:
            with contextlib.suppress(OSError):
                fs.unlink(temp_path)
    _fsync_directory(fs, dir_fd)
    return info


def _fsync_directory(fs: FileSystem, dir_fd: int) -> None:
    """Make the rename durable. Filesystems that cannot fsync a directory (EINVAL) are tolerated."""
    try:
        fs.fsync(dir_fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise


# --- reading and sweeping ---------------------------------------------------------------------------


def read_private(root: Path, relative: str, *, limit: int = 1 << 20) -> tuple[os.stat_result, bytes] | None:
    """The stat and contents of `root/relative`, reached as `write_private` reaches it (no symlink below root).

    None when it or a directory on the way is missing, when it is a symlink or not a regular file, or when
    it holds more than `limit` bytes. Raises `SymlinkedDirectory` for a symlinked directory, else `OSError`.
    """
    opened = _open_parent(root, relative)
    if opened is None:
        return None
    dir_fd, name = opened
    try:
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP):  # ELOOP: the file itself is a symlink
                return None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None
            chunks: list[bytes] = []
            size = 0
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    return None
            return info, b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


def _open_parent(root: Path, relative: str) -> tuple[int, str] | None:
    """The descriptor of `relative`'s directory (opened as `write_private` opens it) and the file's name;
    None when a directory on the way is missing. The caller closes the descriptor."""
    parts = _parts(relative)
    try:
        dir_fd, _ = _open_directories(FileSystem(), Path(root), parts[:-1], create=False)
    except FileNotFoundError:
        return None
    return dir_fd, parts[-1]


def remove_private(root: Path, relative: str) -> bool:
    """Unlink `root/relative`, reached as `write_private` reaches it; False when it was not there.

    Raises `SymlinkedDirectory` for a symlinked directory on the way, else `OSError`.
    """
    opened = _open_parent(root, relative)
    if opened is None:
        return False
    dir_fd, name = opened
    try:
        os.unlink(name, dir_fd=dir_fd)
        _fsync_directory(FileSystem(), dir_fd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(dir_fd)


def open_lock_file(root: Path, relative: str) -> int:
    """A descriptor of the lock file `root/relative + ".lock"` (made 0600, directories 0700, no symlink
    followed), for `fcntl.flock`. The caller closes it; the file itself stays (deleting a lock file
    another process holds open would let a third one lock a new file)."""
    fs = FileSystem()
    parts = _parts(relative)
    dir_fd, _ = _open_directories(fs, Path(root), parts[:-1], create=True)
    try:
        flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC
        return os.open(parts[-1] + ".lock", flags, FILE_MODE, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def sweep_temp_files(root: Path, relatives: Iterable[str]) -> int:
    """Remove the temp files a killed writer left beside these targets; returns how many it removed.

    Only regular files (by lstat) named exactly `.<target>.<16 hex>.tmp` in a target's own directory go;
    a directory that is missing or a symlink is skipped, and an entry that cannot be removed is left.
    """
    targets: dict[tuple[str, ...], set[str]] = {}
    for relative in relatives:
        parts = _parts(relative)
        targets.setdefault(parts[:-1], set()).add(parts[-1])
    fs = FileSystem()
    removed = 0
    for directory_parts, names in targets.items():
        try:
            dir_fd, _ = _open_directories(fs, Path(root), directory_parts, create=False)
        except OSError:
            continue  # missing: nothing to sweep; symlinked: not ours to touch (a write there is refused)
        try:
            removed += _sweep_directory(dir_fd, names)
        finally:
            os.close(dir_fd)
    return removed


def _sweep_directory(dir_fd: int, names: set[str]) -> int:
    removed = 0
    try:
        entries = os.listdir(dir_fd)
    except OSError:
        return 0
    for entry in entries:
        if not any(is_temp_name(entry, name) for name in names):
            continue
        try:
            if stat.S_ISREG(os.stat(entry, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                os.unlink(entry, dir_fd=dir_fd)
                removed += 1
        except OSError:
            continue  # gone already, or not ours to remove: leave it
    return removed


# --- directories ------------------------------------------------------------------------------------


def _parts(relative: str) -> tuple[str, ...]:
    """The components of a relative path that stays inside its root. Raises `ValueError` otherwise."""
    path = PurePosixPath(relative)
    parts = path.parts
    if not parts or path.is_absolute() or ".." in parts:
        raise ValueError("a private file is named by a relative path inside its root")
    return parts


def _open_directories(fs: FileSystem, root: Path, parts: Iterable[str], *, create: bool) -> tuple[int, Path]:
    """Open `root` (following a symlink there), then each of `parts` below it without following one.

    Returns the last directory's descriptor (the caller closes it) and its path. With `create`, missing
    directories are made 0700, `root`'s missing ancestors included.
    """
    created = create and _make_root(fs, root)
    fd = fs.open(str(root), _DIR_FLAGS)
    path = root
    try:
        if created:
            fs.fchmod(fd, DIR_MODE)  # mkdir's mode went through the umask
        for part in parts:
            child = _open_child(fs, fd, path, part, create=create)
            _close_quietly(fs, fd)
            fd, path = child, path / part
    except BaseException:
        _close_quietly(fs, fd)
        raise
    return fd, path


def _make_root(fs: FileSystem, root: Path) -> bool:
    """Create `root` and its missing ancestors 0700 (`os.makedirs` ignores `mode` for parents). Above and
    at the root, paths are the user's: symlinks are followed there. Returns whether `root` was created."""
    missing: list[Path] = []
    for candidate in (root, *root.parents):
        if candidate.is_dir():
            break
        missing.append(candidate)
    for candidate in reversed(missing):
        with contextlib.suppress(FileExistsError):
            fs.mkdir(str(candidate), DIR_MODE)
    return bool(missing)


def _open_child(fs: FileSystem, parent_fd: int, parent: Path, name: str, *, create: bool) -> int:
    """Open directory `name` in `parent_fd` without following a symlink, creating it 0700 if allowed."""
    path = AtPath(str(parent / name), parent_fd, name)
    created = False
    try:
        try:
            return fs.open(path, _DIR_FLAGS | _NOFOLLOW)
        except FileNotFoundError:
            if not create:
                raise
        try:
            fs.mkdir(path, DIR_MODE)
            created = True
        except FileExistsError:
            pass  # a racing creator: the open below still refuses a symlink
        fd = fs.open(path, _DIR_FLAGS | _NOFOLLOW)
    except OSError as exc:
        # Linux says ENOTDIR for O_NOFOLLOW | O_DIRECTORY on a symlink, others ELOOP; lstat tells which.
        if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_symlink(parent_fd, name):
            raise SymlinkedDirectory(str(parent / name)) from exc
        raise
    if created:
        try:
            fs.fchmod(fd, DIR_MODE)  # mkdir's mode went through the umask
        except BaseException:
            _close_quietly(fs, fd)
            raise
    return fd


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _close_quietly(fs: FileSystem, fd: int) -> None:
    """Close a directory descriptor opened read-only: its close has nothing to report."""
    with contextlib.suppress(OSError):
        fs.close(fd)


# --- checks -----------------------------------------------------------------------------------------


def _acceptable_owner(uid: int) -> bool:
    return uid in (0, os.getuid())


def home_problem(home: Path) -> str | None:
    """Why `$QWEN_HOME` is unsafe for secrets (group- or world-writable, or owned by another user), or None.

    Followed if it is a symlink (that is the directory files land in). None too when it does not exist yet:
    it will be created 0700.
    """
    try:
        info = os.stat(home)
    except OSError:
        return None
    problems: list[str] = []
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        problems.append(f"is writable by group or others (mode {mode:04o})")
    if not _acceptable_owner(info.st_uid):
        problems.append(f"is owned by uid {info.st_uid}")
    return f"{home} " + " and ".join(problems) if problems else None


def unsafe_path_problem(path: Path) -> str | None:
    """Why the user's file `path` could be replaced by someone else, as OpenSSH's StrictModes sees it, or None.

    The file and every directory above it up to `/`, both along `path` as given and along its real path (a
    symlink on the way is followed), must be owned by the user or root and not writable by group or
    others. One exception to OpenSSH: a directory with the sticky bit that root owns (`/tmp`, mode 1777) is
    accepted, because there others may add entries but not rename or remove ours, and token files under
    `/tmp` are common. Raises `OSError` when a directory cannot be stat'ed.
    """
    info = os.stat(path)
    if not _acceptable_owner(info.st_uid):
        return f"{path} is owned by uid {info.st_uid}"
    absolute = Path(os.path.abspath(path))
    directories = dict.fromkeys([*absolute.parents, *Path(os.path.realpath(path)).parents])
    for directory in directories:
        info = os.stat(directory)
        mode = stat.S_IMODE(info.st_mode)
        if not _acceptable_owner(info.st_uid):
            return f"{path} is in {directory}, which is owned by uid {info.st_uid}"
        sticky_root = bool(mode & stat.S_ISVTX) and info.st_uid == 0
        if mode & 0o022 and not sticky_root:
            return f"{path} is in {directory}, which is writable by group or others (mode {mode:04o})"
    return None
