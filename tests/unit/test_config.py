"""Configuration (SPEC §7): defaults equal conf/serve.toml, layering order, and errors that name the key."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from serve.cli import build_parser, load_run_config
from serve.config import Config, defaults_as_toml_mapping, load_config
from serve.errors import ConfigError
from serve.netloc import is_loopback_host, split_host, url_problem
from serve.token import resolve_token

CONF = Path(__file__).resolve().parents[2] / "conf" / "serve.toml"


def run_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


def test_conf_serve_toml_holds_exactly_the_code_defaults() -> None:
    with CONF.open("rb") as f:
        assert tomllib.load(f) == defaults_as_toml_mapping()


def test_loading_conf_serve_toml_changes_nothing() -> None:
    assert load_config([CONF]) == Config()


def test_tables_merge_key_by_key(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("[server]\nport = 8080\n")
    config = load_config([path])
    assert config.server.port == 8080
    assert config.server.host == "127.0.0.1"
    assert config.server.max_body_bytes == 65536


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(
        '[server]\nport = 5000\nhost = "localhost"\n[providers.qwen-oauth]\nbase_url = "https://file.example"\n'
    )
    env = {"QWEN_OAUTH_BASE_URL": "https://env.example"}
    config = load_config([path], env=env, overrides={"server": {"port": 6000}})
    assert config.server.port == 6000  # flag over file
    assert config.server.host == "localhost"  # file over default
    assert config.qwen_oauth.base_url == "https://env.example"  # env over file
    assert load_config([path], env={}).qwen_oauth.base_url == "https://file.example"


def test_run_flags_override_the_file_named_by_qwen_serve_config(tmp_path: Path, workspace: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('[server]\nport = 5000\nhost = "localhost"\nmax_body_bytes = 100\n')
    env = {"QWEN_SERVE_CONFIG": str(path)}
    config = load_run_config(run_args("--port", "0", "--workspace", str(workspace)), env)
    assert (config.server.port, config.server.host, config.server.max_body_bytes) == (0, "localhost", 100)
    assert config.server.workspace == str(workspace)


def test_config_flag_beats_qwen_serve_config(tmp_path: Path) -> None:
    by_env = tmp_path / "env.toml"
    by_env.write_text("[server]\nport = 5000\n")
    by_flag = tmp_path / "flag.toml"
    by_flag.write_text("[server]\nport = 5001\n")
    config = load_run_config(run_args("--config", str(by_flag)), {"QWEN_SERVE_CONFIG": str(by_env)})
    assert config.server.port == 5001


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[server]\nnope = 1\n", "server.nope"),
        ("[nope]\na = 1\n", "nope"),
        ('[server]\nport = "80"\n', "server.port"),
        ("[server]\nport = 70000\n", "server.port"),
        ("[server]\nmax_body_bytes = true\n", "server.max_body_bytes"),
        ('[server]\nextra_hosts = "a"\n', "server.extra_hosts"),
        ("[events]\nheartbeat_s = -1\n", "events.heartbeat_s"),
        ("[device_flow]\nmax_active = 1.5\n", "device_flow.max_active"),
        ('[server]\ncertfile = "c.pem"\n', "server.certfile"),  # no such file
    ],
)
def test_a_bad_key_is_named(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_config([path])
    assert caught.value.key == key


def test_a_missing_or_broken_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config([tmp_path / "missing.toml"])
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    with pytest.raises(ConfigError):
        load_config([broken])


# Review findings: values that used to pass validation and then failed later (exit 1, "cannot listen") or
# were accepted and silently never matched.
@pytest.mark.parametrize(
    ("server", "key"),
    [
        ({"host": "http://127.0.0.1"}, "server.host"),
        ({"host": "bad host"}, "server.host"),
        ({"extra_hosts": ["*.example.com"]}, "server.extra_hosts"),
        ({"extra_hosts": ["example.com:http"]}, "server.extra_hosts"),
        ({"allow_origins": ["https://app.example.com/path"]}, "server.allow_origins"),
        ({"allow_origins": ["app.example.com"]}, "server.allow_origins"),
        ({"certfile": "/nonexistent/cert.pem", "keyfile": "/nonexistent/key.pem"}, "server.certfile"),
    ],
)
def test_server_values_are_checked_at_load(server: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"server": server})
    assert info.value.key == key


def test_hosts_and_origins_are_normalised_as_the_gates_compare_them() -> None:
    config = load_config(
        overrides={
            "server": {
                "host": "::1",
                "extra_hosts": ["fe80::1", "Build.Example.com:8080", "[::1]:99", "10.0.0.7"],
                "allow_origins": ["https://App.example.com/"],
            }
        }
    )
    assert config.server.host == "::1"
    assert config.server.extra_hosts == ("[fe80::1]", "build.example.com:8080", "[::1]:99", "10.0.0.7")
    assert config.server.allow_origins == ("https://app.example.com",)


def test_a_certfile_needs_a_keyfile(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here: hypercorn loads it")
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"server": {"certfile": str(cert)}})
    assert info.value.key == "server.keyfile"


# --- loopback and URLs (attack-run findings) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LocalHost", True),
        ("127.0.0.1", True),
        ("127.4.5.6", True),
        ("::1", True),
        ("[::1]", True),
        # RFC 6761 §6.3 only asks resolvers to map these to loopback; many forward them to DNS.
        ("evil.localhost", False),
        ("a.b.localhost", False),
        ("localhost.", False),
        ("localhost.example.com", False),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("example.com", False),
    ],
)
def test_only_localhost_itself_and_loopback_literals_are_loopback(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.localhost:8080",
        "http://localhost.:8080",
        "https://chat.qwen.ai@evil.example/",
        "https://user:pass@idp.example/",
        "https://@idp.example/",
        "http://user@127.0.0.1:8080/",
        "https://evil.example\\@chat.qwen.ai/",
        "https://idp.example:99999/",
        "https://idp.example:abc/",
        "https://idp.example:0/",
        "https://idp.exam ple/",
        "https://idp.example/\u202etxt.exe",
        "https://bücher.example/",
    ],
)
@pytest.mark.parametrize("key", ["qwen-oauth.base_url", "acme.issuer", "acme.token_endpoint"])
def test_a_bad_url_is_refused_and_named(url: str, key: str) -> None:
    provider_id, name = key.split(".")
    table: dict[str, object] = {"kind": "rfc8628", "client_id": "c", "issuer": "https://idp.example"}
    if provider_id == "acme" and name == "token_endpoint":
        table["device_authorization_endpoint"] = "https://idp.example/device"
    table = {name: url} if provider_id == "qwen-oauth" else {**table, name: url}
    with pytest.raises(ConfigError) as caught:
        load_config(overrides={"providers": {provider_id: table}})
    assert caught.value.key == f"providers.{key}"


def test_a_url_with_userinfo_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(overrides={"providers": {"qwen-oauth": {"base_url": "https://user:hunter2@chat.qwen.ai/"}}})
    assert "userinfo" in str(caught.value)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["https://chat.qwen.ai", "http://localhost:8765/", "http://127.0.0.1:8765", "http://[::1]:9/x?a=b@c"]
)
def test_good_urls_are_kept_as_given(url: str) -> None:
    assert load_config(overrides={"providers": {"qwen-oauth": {"base_url": url}}}).qwen_oauth.base_url == url


def test_url_problem_is_static() -> None:
    assert url_problem("https://idp.example/device") is None
    for url in ("https://u:SECRET@idp.example/", "http://SECRET.localhost/", "ftp://SECRET/"):
        problem = url_problem(url)
        assert problem is not None and "SECRET" not in problem


@pytest.mark.parametrize("host", ["foo.localhost", "localhost.", "10.0.0.1"])
def test_no_token_needs_a_loopback_bind_and_a_localhost_subdomain_is_not_one(host: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_token(flag_token=None, token_file=None, no_token=True, host=host, env={}, home=tmp_path)
    assert caught.value.key == "server.host"
    for loopback in ("localhost", "127.0.0.1", "::1"):
        token = resolve_token(flag_token=None, token_file=None, no_token=True, host=loopback, env={}, home=tmp_path)
        assert token.token is None


@pytest.mark.parametrize(
    ("value", "parts"),
    [
        ("127.0.0.1:4170", ("127.0.0.1", "4170")),
        ("localhost", ("localhost", None)),
        ("[::1]:80", ("[::1]", "80")),
        ("[::1]", ("[::1]", None)),
        ("[::1]x", ("[::1]", "x")),
        ("::1", ("::1", None)),
        ("host:abc", ("host", "abc")),
    ],
)
def test_split_host_is_the_one_host_port_parser(value: str, parts: tuple[str, str | None]) -> None:
    assert split_host(value) == parts
