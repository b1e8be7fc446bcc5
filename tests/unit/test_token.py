"""Token resolution (SPEC §1): precedence, the generated file and its modes, reuse, refusals."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

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


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660, 0o602])
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
