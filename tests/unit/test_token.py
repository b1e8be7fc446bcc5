"""Token resolution (SPEC §1): precedence, the generated file and its modes, reuse, refusals."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.logs import captured, messages

from serve.errors import ConfigError
from serve.token import ResolvedToken, default_token_path, qwen_home, resolve_token


def resolve(home: Path, **kwargs: Any) -> ResolvedToken:
    args: dict[str, Any] = {
        "flag_token": None,
        "token_file": None,
        "no_token": False,
        "host": "127.0.0.1",
        "env": {},
        "home": home,
    }
    args.update(kwargs)
    return resolve_token(**args)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """What `serve.token` logs at INFO and above."""
    with captured("serve.token") as records:
        yield records


def root_only() -> None:
    if os.getuid() != 0:
        pytest.skip("files owned by another user (or by root) need root")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token.txt"
    path.write_text("from-file\n")
    path.chmod(0o600)
    return path


def test_flag_beats_env_beats_file_beats_the_default(qwen_home: Path, token_file: Path) -> None:
    env = {"QWEN_SERVER_TOKEN": "from-env"}
    assert resolve(qwen_home, flag_token="from-flag", env=env, token_file=str(token_file)).token == b"from-flag"
    assert resolve(qwen_home, env=env, token_file=str(token_file)).token == b"from-env"
    from_file = resolve(qwen_home, token_file=str(token_file))
    assert (from_file.token, from_file.source, from_file.path) == (b"from-file", "file", token_file)
    assert resolve(qwen_home).source == "generated"


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_env_token_counts_as_unset(qwen_home: Path, token_file: Path, value: str) -> None:
    resolved = resolve(qwen_home, env={"QWEN_SERVER_TOKEN": value}, token_file=str(token_file))
    assert resolved.token == b"from-file"


def test_surrounding_blanks_are_not_part_of_the_token(qwen_home: Path) -> None:
    assert resolve(qwen_home, flag_token="  t1 ").token == b"t1"
    assert resolve(qwen_home, env={"QWEN_SERVER_TOKEN": " t2\n"}).token == b"t2"


def test_an_empty_flag_token_is_refused(qwen_home: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(qwen_home, flag_token=" ")
    assert caught.value.key == "--token"


def test_no_token_is_token_less_and_beats_the_environment(qwen_home: Path) -> None:
    resolved = resolve(qwen_home, no_token=True, env={"QWEN_SERVER_TOKEN": "from-env"})
    assert (resolved.token, resolved.source) == (None, "none")
    assert not default_token_path(qwen_home).exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_no_token_on_a_non_loopback_bind_is_refused(qwen_home: Path, host: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(qwen_home, no_token=True, host=host)
    assert caught.value.key == "server.host"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_no_token_on_loopback_is_allowed(qwen_home: Path, host: str) -> None:
    assert resolve(qwen_home, no_token=True, host=host).token is None


def test_the_generated_token_is_private_and_reused_across_restarts(qwen_home: Path) -> None:
    first = resolve(qwen_home)
    path = default_token_path(qwen_home)
    assert first.source == "generated"
    assert first.path == path
    assert mode(path.parent) == 0o700
    assert mode(path) == 0o600
    assert first.token is not None
    assert len(first.token) >= 43  # secrets.token_urlsafe(32)
    assert path.read_bytes().strip() == first.token
    second = resolve(qwen_home)
    assert (second.source, second.token) == ("reused", first.token)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_a_loose_default_token_file_is_replaced(qwen_home: Path) -> None:
    first = resolve(qwen_home)
    path = default_token_path(qwen_home)
    path.chmod(0o644)
    second = resolve(qwen_home)
    assert second.source == "generated"
    assert second.token != first.token
    assert mode(path) == 0o600


def test_a_loose_directory_is_tightened(qwen_home: Path) -> None:
    (qwen_home / "serve").mkdir(parents=True, mode=0o755)
    (qwen_home / "serve").chmod(0o755)
    resolve(qwen_home)
    assert mode(qwen_home / "serve") == 0o700


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660, 0o602], ids=oct)
def test_a_token_file_others_can_use_is_refused(qwen_home: Path, token_file: Path, loose: int) -> None:
    token_file.chmod(loose)
    with pytest.raises(ConfigError) as caught:
        resolve(qwen_home, token_file=str(token_file))
    assert caught.value.key == "server.token_file"
    assert f"{loose:04o}" in caught.value.problem
    assert "from-file" not in str(caught.value)


def test_a_missing_or_empty_token_file_is_refused(qwen_home: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        resolve(qwen_home, token_file=str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError):
        resolve(qwen_home, token_file=str(empty))


def test_the_repr_never_shows_the_token(qwen_home: Path) -> None:
    resolved = resolve(qwen_home, flag_token="sekrit-value")
    assert "sekrit" not in repr(resolved)
    assert "sekrit" not in str(resolved)


def test_qwen_home_defaults_to_dot_qwen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert qwen_home({}) == tmp_path / ".qwen"
    assert qwen_home({"QWEN_HOME": ""}) == tmp_path / ".qwen"
    assert qwen_home({"QWEN_HOME": "/srv/q"}) == Path("/srv/q")


def test_every_directory_made_for_the_token_is_0700(tmp_path: Path) -> None:
    home = tmp_path / "fresh" / ".qwen"  # neither exists yet
    resolve(home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "serve").stat().st_mode) == 0o700


# --- the daemon's own token file: how it is written ------------------------------------------------


def test_the_generated_token_file_ends_with_a_newline(qwen_home: Path) -> None:
    resolved = resolve(qwen_home)
    assert resolved.token is not None
    assert default_token_path(qwen_home).read_bytes() == resolved.token + b"\n"


def test_the_generated_token_is_0600_whatever_the_umask_so_it_is_reused(qwen_home: Path) -> None:
    old = os.umask(0o277)
    try:
        first = resolve(qwen_home)
    finally:
        os.umask(old)
    assert mode(default_token_path(qwen_home)) == 0o600
    assert mode(qwen_home / "serve") == 0o700
    second = resolve(qwen_home)
    assert (second.source, second.token) == ("reused", first.token)


def test_the_token_write_is_exclusive_no_follow_close_on_exec_and_durable(
    qwen_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def recording_open(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            wanted = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            calls.append(f"open temp {oct(mode)}" + (" safe" if flags & wanted == wanted else " UNSAFE"))
        return real_open(path, flags, mode, **kwargs)

    def recording_fsync(fd: int) -> None:
        calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def recording_replace(*args: Any, **kwargs: Any) -> None:
        calls.append("replace")
        real_replace(*args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    resolve(qwen_home)
    assert calls == ["open temp 0o600 safe", "fsync file", "replace", "fsync dir"]


def test_a_symlink_at_the_token_file_is_replaced_not_written_through(qwen_home: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    victim.chmod(0o600)
    (qwen_home / "serve").mkdir(parents=True)
    default_token_path(qwen_home).symlink_to(victim)
    resolved = resolve(qwen_home)
    assert resolved.source == "generated"  # a link is not reused, even to a private file
    assert victim.read_text() == "keep me"
    assert not default_token_path(qwen_home).is_symlink()


@pytest.mark.parametrize("planted", [False, True])
def test_a_symlinked_serve_directory_is_refused(qwen_home: Path, tmp_path: Path, planted: bool) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    target.chmod(0o755)
    if planted:  # a private token there is not reused through the link either
        (target / "token").write_text("planted-token\n")
        (target / "token").chmod(0o600)
    qwen_home.mkdir()
    (qwen_home / "serve").symlink_to(target)
    with pytest.raises(ConfigError) as caught:
        resolve(qwen_home)
    assert caught.value.key == "server.token_file"
    assert str(default_token_path(qwen_home)) in caught.value.problem
    assert "symlinked directory" in caught.value.problem
    assert "planted-token" not in str(caught.value)
    assert sorted(os.listdir(target)) == (["token"] if planted else [])  # nothing written through the link
    assert mode(target) == 0o755  # and its target not chmodded
    if planted:
        assert (target / "token").read_text() == "planted-token\n"


def test_qwen_home_itself_may_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "qwen"
    real.mkdir(parents=True)
    home = tmp_path / ".qwen"
    home.symlink_to(real)
    first = resolve(home)
    assert first.source == "generated"
    assert first.token is not None and (real / "serve" / "token").read_bytes().strip() == first.token
    assert resolve(home).source == "reused"


def test_stale_token_temp_files_are_swept(qwen_home: Path, records: list[logging.LogRecord]) -> None:
    first = resolve(qwen_home)
    serve_dir = qwen_home / "serve"
    stale = [serve_dir / f".token.{'a' * 16}.tmp", serve_dir / ".token.0123456789abcdef.tmp"]
    kept = [serve_dir / f".token.{'b' * 8}.tmp", serve_dir / f".other.{'c' * 16}.tmp", serve_dir / "notes"]
    for path in (*stale, *kept):
        path.write_text("stale-secret\n")
    second = resolve(qwen_home)
    assert (second.source, second.token) == ("reused", first.token)
    assert [path for path in stale if path.exists()] == []
    assert [path for path in kept if not path.exists()] == []
    assert messages(records, logging.INFO) == [f"removed 2 stale token temp file(s) in {serve_dir}"]


def test_a_qwen_home_others_may_write_draws_a_warning(qwen_home: Path, records: list[logging.LogRecord]) -> None:
    qwen_home.mkdir()
    qwen_home.chmod(0o777)
    resolved = resolve(qwen_home)
    [warning] = messages(records, logging.WARNING)
    assert str(qwen_home) in warning and "mode 0777" in warning
    assert resolved.token is not None and resolved.token.decode() not in warning


def test_a_private_qwen_home_draws_no_warning(qwen_home: Path, records: list[logging.LogRecord]) -> None:
    resolve(qwen_home)  # created 0700
    resolve(qwen_home)
    assert records == []


def test_a_qwen_home_owned_by_another_user_draws_a_warning(qwen_home: Path, records: list[logging.LogRecord]) -> None:
    root_only()
    qwen_home.mkdir(mode=0o700)
    os.chown(qwen_home, 65534, -1)
    resolve(qwen_home)
    [warning] = messages(records, logging.WARNING)
    assert str(qwen_home) in warning and "owned by uid 65534" in warning


# --- the user's token file: StrictModes ---------------------------------------------------------------


def private_token(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "token"
    path.write_text("from-file\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("loose", [0o770, 0o777, 0o730, 0o703], ids=oct)
@pytest.mark.parametrize("depth", [0, 1])
def test_a_token_file_in_a_directory_others_may_write_is_refused(
    qwen_home: Path, tmp_path: Path, loose: int, depth: int
) -> None:
    path = private_token(tmp_path / "a" / "b")
    loose_dir = path.parents[depth]  # the parent, or the grandparent: every directory up to / counts
    loose_dir.chmod(loose)
    with pytest.raises(ConfigError) as caught:
        resolve(qwen_home, token_file=str(path))
    assert caught.value.key == "server.token_file"
    assert str(path) in caught.value.problem and str(loose_dir) in caught.value.problem
    assert f"mode {loose:04o}" in caught.value.problem
    assert "from-file" not in str(caught.value)


def test_a_token_file_reached_through_a_symlink_is_checked_where_it_really_is(qwen_home: Path, tmp_path: Path) -> None:
    real = private_token(tmp_path / "shared")
    real.parent.chmod(0o777)
    (tmp_path / "mine").mkdir(mode=0o700)
    (tmp_path / "mine" / "token").symlink_to(real)
    with pytest.raises(ConfigError) as caught:
        resolve(qwen_home, token_file=str(tmp_path / "mine" / "token"))
    assert str(real.parent) in caught.value.problem


def test_a_token_file_owned_by_another_user_is_refused(qwen_home: Path, tmp_path: Path) -> None:
    root_only()
    path = private_token(tmp_path / "a")
    os.chown(path, 65534, -1)
    with pytest.raises(ConfigError) as caught:
        resolve(qwen_home, token_file=str(path))
    assert f"{path} is owned by uid 65534" in caught.value.problem


def test_a_token_file_in_a_directory_another_user_owns_is_refused(qwen_home: Path, tmp_path: Path) -> None:
    root_only()
    path = private_token(tmp_path / "a" / "b")
    os.chown(tmp_path / "a", 65534, -1)
    with pytest.raises(ConfigError) as caught:
        resolve(qwen_home, token_file=str(path))
    assert f"{tmp_path / 'a'}, which is owned by uid 65534" in caught.value.problem


def test_a_token_file_in_a_root_owned_sticky_directory_is_accepted(qwen_home: Path, tmp_path: Path) -> None:
    root_only()  # /tmp-like: 1777 and root's; others may add entries but not replace ours
    path = private_token(tmp_path / "sticky")
    path.parent.chmod(0o1777)
    assert resolve(qwen_home, token_file=str(path)).token == b"from-file"
    path.parent.chmod(0o0777)  # without the sticky bit, others could rename ours away
    with pytest.raises(ConfigError):
        resolve(qwen_home, token_file=str(path))
