"""serve.private_files: the one atomic private-file writer, its refusal of symlinked directories, the temp
file sweep, and the ownership and mode checks. Real files under tmp_path; errnos through the `FileSystem`
seam (CI runs as root, where permissions cannot make a call fail)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from serve.private_files import (
    AtPath,
    CommitAbandoned,
    FileSystem,
    SymlinkedDirectory,
    home_problem,
    is_temp_name,
    read_private,
    sweep_temp_files,
    temp_name,
    unsafe_path_problem,
    write_private,
)

HEX16 = "0123456789abcdef"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def give_away(path: Path, uid: int = 65534) -> None:
    """Make `path` belong to another user (only root can)."""
    if os.getuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(path, uid, -1, follow_symlinks=False)


def elsewhere(tmp_path: Path) -> Path:
    """A directory a symlink points to; it must get nothing and keep its mode."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    target.chmod(0o755)
    return target


# --- temp names -------------------------------------------------------------------------------------


def test_temp_names_are_dot_name_16_hex_tmp_and_recognised_exactly() -> None:
    name = temp_name("oauth_creds.json")
    assert name.startswith(".oauth_creds.json.") and name.endswith(".tmp")
    assert len(name) == len(".oauth_creds.json.") + 16 + len(".tmp")
    assert is_temp_name(name, "oauth_creds.json")
    assert temp_name("x") != temp_name("x")
    for other in (
        f".oauth_creds.json.{HEX16[:8]}.tmp",  # 8 hex
        f".oauth_creds.json.{HEX16.upper()}.tmp",
        f"oauth_creds.json.{HEX16}.tmp",
        f".oauth_creds.json.{HEX16}.tmp.bak",
        f".oauth_credsXjson.{HEX16}.tmp",  # the dot in the name is literal
        f".token.{HEX16}.tmp",
        "oauth_creds.json",
    ):
        assert not is_temp_name(other, "oauth_creds.json"), other


# --- writing ----------------------------------------------------------------------------------------


def test_write_private_creates_0700_directories_and_a_0600_file(tmp_path: Path) -> None:
    root = tmp_path / "fresh" / "root"
    info = write_private(root, "a/b/file", b"data")
    path = root / "a" / "b" / "file"
    assert path.read_bytes() == b"data"
    assert mode(path) == 0o600
    for directory in (tmp_path / "fresh", root, root / "a", root / "a" / "b"):
        assert mode(directory) == 0o700, directory
    assert (info.st_ino, info.st_size, info.st_mtime_ns) == (
        os.stat(path).st_ino,
        4,
        os.stat(path).st_mtime_ns,
    )
    assert os.listdir(root / "a" / "b") == ["file"]


def test_directories_made_under_a_tight_umask_are_still_0700(tmp_path: Path) -> None:
    old = os.umask(0o077 | 0o200)  # owner write masked off: mkdir alone would give 0500
    try:
        write_private(tmp_path / "root", "sub/file", b"x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "root") == 0o700
    assert mode(tmp_path / "root" / "sub") == 0o700
    assert mode(tmp_path / "root" / "sub" / "file") == 0o600


@pytest.mark.parametrize("relative", ["../escape", "/etc/passwd", "a/../../b", ""])
def test_a_path_leaving_the_root_is_refused(tmp_path: Path, relative: str) -> None:
    with pytest.raises(ValueError):
        write_private(tmp_path / "root", relative, b"x")
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "root").exists()


def test_the_temp_file_is_exclusive_no_follow_close_on_exec_and_the_calls_use_directory_fds(tmp_path: Path) -> None:
    opened: list[tuple[str, int, int | None]] = []
    replaced: list[tuple[str, str]] = []

    class Recording(FileSystem):
        def open(self, path: str, flags: int, mode: int = 0o777) -> int:
            opened.append((str(path), flags, path.dir_fd if isinstance(path, AtPath) else None))
            return super().open(path, flags, mode)

        def replace(self, src: str, dst: str) -> None:
            assert isinstance(src, AtPath) and isinstance(dst, AtPath)
            assert src.dir_fd == dst.dir_fd  # one directory: the rename is atomic
            assert stat.S_ISDIR(os.fstat(src.dir_fd).st_mode)
            replaced.append((src.name, dst.name))
            super().replace(src, dst)

    (tmp_path / "sub").mkdir()
    write_private(tmp_path, "sub/file", b"x", fs=Recording())
    (root_path, root_flags, root_dir_fd), (sub_path, sub_flags, sub_dir_fd), (temp, temp_flags, temp_dir_fd) = opened
    assert root_path == str(tmp_path) and root_dir_fd is None and root_flags & os.O_DIRECTORY
    assert root_flags & os.O_NOFOLLOW == 0  # the root itself may be a symlink
    assert sub_path == str(tmp_path / "sub") and sub_dir_fd is not None
    assert sub_flags & os.O_DIRECTORY and sub_flags & os.O_NOFOLLOW and sub_flags & os.O_CLOEXEC
    assert temp_dir_fd is not None and is_temp_name(Path(temp).name, "file")
    for flag in (os.O_WRONLY, os.O_CREAT, os.O_EXCL, os.O_CLOEXEC, os.O_NOFOLLOW):
        assert temp_flags & flag == flag
    assert replaced == [(Path(temp).name, "file")]


def test_a_path_only_file_system_override_still_works(tmp_path: Path) -> None:
    """An override written for plain paths (as before `AtPath`) acts on the absolute path and still lands."""

    class PathOnly(FileSystem):
        def replace(self, src: str, dst: str) -> None:
            os.replace(str(src), str(dst))

    write_private(tmp_path, "sub/file", b"x", fs=PathOnly())
    assert (tmp_path / "sub" / "file").read_bytes() == b"x"


@pytest.mark.parametrize("relative", ["link/file", "real/link/file", "link/deeper/file"])
def test_a_symlinked_directory_below_the_root_is_refused(tmp_path: Path, relative: str) -> None:
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    target = elsewhere(tmp_path)
    link = root / Path(relative).parent.parts[0] if relative.startswith("link") else root / "real" / "link"
    link.symlink_to(target)
    with pytest.raises(SymlinkedDirectory) as caught:
        write_private(root, relative, b"secret")
    assert caught.value.errno == errno.ELOOP
    assert caught.value.filename == str(link)
    assert os.listdir(target) == []  # nothing written through the link
    assert mode(target) == 0o755  # and its target not chmodded


def test_a_dangling_symlinked_directory_is_refused_and_its_target_not_created(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "sub").symlink_to(tmp_path / "nowhere")
    with pytest.raises(SymlinkedDirectory):
        write_private(tmp_path / "root", "sub/file", b"x")
    assert not (tmp_path / "nowhere").exists()


def test_a_symlink_that_appears_between_the_check_and_the_mkdir_is_refused(tmp_path: Path) -> None:
    target = elsewhere(tmp_path)

    class Racer(FileSystem):
        """Another process wins the race to create the directory, with a symlink."""

        def mkdir(self, path: str, mode: int) -> None:
            if isinstance(path, AtPath):
                os.symlink(target, path.name, dir_fd=path.dir_fd)
            super().mkdir(path, mode)

    (tmp_path / "root").mkdir()
    with pytest.raises(SymlinkedDirectory):
        write_private(tmp_path / "root", "sub/file", b"x", fs=Racer())
    assert os.listdir(target) == []
    assert mode(target) == 0o755


def test_the_root_itself_may_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "qwen"
    real.mkdir(parents=True)
    (tmp_path / "root").symlink_to(real)
    write_private(tmp_path / "root", "sub/file", b"x")
    assert (real / "sub" / "file").read_bytes() == b"x"
    assert os.path.islink(tmp_path / "root")  # the link is used, not replaced


def test_a_symlink_at_the_file_itself_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "file").symlink_to(victim)
    write_private(tmp_path / "root", "file", b"new")
    assert victim.read_bytes() == b"untouched"
    assert not os.path.islink(tmp_path / "root" / "file")
    assert (tmp_path / "root" / "file").read_bytes() == b"new"


def test_a_commit_check_that_says_no_removes_the_temp_and_keeps_the_old_file(tmp_path: Path) -> None:
    write_private(tmp_path, "file", b"old")
    with pytest.raises(CommitAbandoned):
        write_private(tmp_path, "file", b"new", commit=lambda: False)
    assert (tmp_path / "file").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file"]


def test_the_commit_check_runs_after_the_fsync_and_just_before_the_rename(tmp_path: Path) -> None:
    calls: list[str] = []

    class Recording(FileSystem):
        def fsync(self, fd: int) -> None:
            calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
            super().fsync(fd)

        def replace(self, src: str, dst: str) -> None:
            calls.append("replace")
            super().replace(src, dst)

    def commit() -> bool:
        calls.append("commit")
        return True

    write_private(tmp_path, "file", b"x", fs=Recording(), commit=commit)
    assert calls == ["fsync file", "commit", "replace", "fsync dir"]


def test_a_failed_write_leaves_no_temp_and_no_open_descriptors(tmp_path: Path) -> None:
    class Full(FileSystem):
        def write(self, fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(5):
        with pytest.raises(OSError) as caught:
            write_private(tmp_path, "sub/file", b"x", fs=Full())
        assert caught.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path / "sub") == []
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before


# --- reading ----------------------------------------------------------------------------------------


def test_read_private_reads_a_regular_file_and_skips_what_is_not_one(tmp_path: Path) -> None:
    write_private(tmp_path, "sub/file", b"abc")
    found = read_private(tmp_path, "sub/file")
    assert found is not None and found[1] == b"abc" and stat.S_ISREG(found[0].st_mode)
    assert read_private(tmp_path, "sub/missing") is None
    assert read_private(tmp_path, "nodir/file") is None
    assert read_private(tmp_path, "sub/file", limit=2) is None
    (tmp_path / "sub" / "link").symlink_to(tmp_path / "sub" / "file")
    assert read_private(tmp_path, "sub/link") is None
    os.mkfifo(tmp_path / "sub" / "fifo")
    assert read_private(tmp_path, "sub/fifo") is None  # returns at once: opened non-blocking


def test_read_private_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    target = elsewhere(tmp_path)
    (target / "file").write_bytes(b"planted")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "sub").symlink_to(target)
    with pytest.raises(SymlinkedDirectory):
        read_private(tmp_path / "root", "sub/file")


# --- the sweep --------------------------------------------------------------------------------------


def test_the_sweep_removes_only_regular_temp_files_of_the_targets(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    stale = [root / f".a.json.{HEX16}.tmp", root / "sub" / f".b.json.{'f' * 16}.tmp"]
    kept = [
        root / "a.json",
        root / f".a.json.{HEX16[:8]}.tmp",
        root / f".c.json.{HEX16}.tmp",  # not a target
        root / f".b.json.{HEX16}.tmp",  # b.json's directory is sub/, not the root
        root / "sub" / f".a.json.{HEX16}.tmp",  # a.json's directory is the root
    ]
    for path in (*stale, *kept):
        path.write_bytes(b"secret")
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = root / f".a.json.{'1' * 16}.tmp"
    link.symlink_to(victim)
    directory = root / f".a.json.{'2' * 16}.tmp"
    directory.mkdir()
    assert sweep_temp_files(root, ["a.json", "sub/b.json"]) == 2
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    assert os.path.islink(link) and victim.read_bytes() == b"keep"
    assert directory.is_dir()


def test_the_sweep_skips_missing_and_symlinked_directories(tmp_path: Path) -> None:
    target = elsewhere(tmp_path)
    planted = target / f".b.json.{HEX16}.tmp"
    planted.write_bytes(b"not ours")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "sub").symlink_to(target)
    assert sweep_temp_files(tmp_path / "root", ["sub/b.json", "missing/c.json"]) == 0
    assert sweep_temp_files(tmp_path / "no-root", ["a.json"]) == 0
    assert planted.exists()


# --- checks -----------------------------------------------------------------------------------------


def test_home_problem_names_loose_modes_and_foreign_owners(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert home_problem(home) is None  # not there yet: it will be made 0700
    home.mkdir()
    home.chmod(0o700)
    assert home_problem(home) is None
    home.chmod(0o750)
    assert home_problem(home) is None  # readable by the group is the user's choice; writable is not
    home.chmod(0o770)
    assert home_problem(home) == f"{home} is writable by group or others (mode 0770)"
    home.chmod(0o1777)  # the sticky-bit exception is for a token file's parents, not for QWEN_HOME
    assert home_problem(home) == f"{home} is writable by group or others (mode 1777)"
    home.chmod(0o700)
    give_away(home)
    assert home_problem(home) == f"{home} is owned by uid 65534"


def test_unsafe_path_problem_accepts_private_paths_under_tmp(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"t")
    assert unsafe_path_problem(path) is None  # tmp_path is under /tmp (1777, root) in CI


@pytest.mark.parametrize("loose", [0o770, 0o707, 0o777, 0o720, 0o702], ids=oct)
def test_unsafe_path_problem_refuses_a_parent_others_may_write(tmp_path: Path, loose: int) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    path = tmp_path / "a" / "b" / "token"
    path.write_bytes(b"t")
    (tmp_path / "a").chmod(loose)  # the grandparent: every directory up to / counts
    problem = unsafe_path_problem(path)
    assert problem == f"{path} is in {tmp_path / 'a'}, which is writable by group or others (mode {loose:04o})"


def test_unsafe_path_problem_refuses_a_foreign_owner_of_the_file_or_a_parent(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    path = tmp_path / "d" / "token"
    path.write_bytes(b"t")
    give_away(path)
    assert unsafe_path_problem(path) == f"{path} is owned by uid 65534"
    os.chown(path, os.getuid(), -1)
    give_away(tmp_path / "d")
    assert unsafe_path_problem(path) == f"{path} is in {tmp_path / 'd'}, which is owned by uid 65534"


def test_a_sticky_world_writable_parent_is_accepted_only_when_root_owns_it(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    path = shared / "token"
    path.write_bytes(b"t")
    if os.getuid() != 0:
        pytest.skip("a root-owned directory needs root")
    assert unsafe_path_problem(path) is None
    give_away(shared, os.getuid() + 1000)
    assert unsafe_path_problem(path) == f"{path} is in {shared}, which is owned by uid {os.getuid() + 1000}"


def test_unsafe_path_problem_follows_a_symlink_to_the_real_parents(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "token").write_bytes(b"t")
    loose.chmod(0o777)
    private = tmp_path / "private"
    private.mkdir()
    (private / "token").symlink_to(loose / "token")
    problem = unsafe_path_problem(private / "token")
    assert problem is not None and f"in {loose}, which is writable" in problem
