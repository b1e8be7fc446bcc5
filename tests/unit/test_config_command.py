"""`qwen-serve config`: the effective configuration as TOML, where each value came from, secrets elided."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from serve.cli import main
from serve.config import DEFAULTS_FILE, defaults_as_toml_mapping


def run_config(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["config", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_with_nothing_set_it_prints_the_defaults_as_toml(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QWEN_SERVE_CONFIG", raising=False)
    monkeypatch.delenv("QWEN_OAUTH_BASE_URL", raising=False)
    code, out, _ = run_config(capsys)
    assert code == 0
    assert tomllib.loads(out) == defaults_as_toml_mapping()
    assert "port = 4170  # default\n" in out


def test_each_value_names_its_layer_and_secret_values_are_elided(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "mine.toml"
    config.write_text(
        '[server]\nport = 8080\n\n[providers.acme]\nkind = "rfc8628"\n'
        'device_authorization_endpoint = "https://idp.example/device"\ntoken_endpoint = "https://idp.example/token"\n'
        'client_id = "c1"\nclient_secret_env = "ACME_SECRET"\n'
        'extra_params = { audience = "api", client_secret = "hunter2-do-not-print" }\n'
    )
    monkeypatch.setenv("QWEN_SERVE_CONFIG", str(config))
    monkeypatch.setenv("QWEN_OAUTH_BASE_URL", "http://127.0.0.1:9999")
    code, out, _ = run_config(capsys, "--host", "::1")
    assert code == 0
    assert f"port = 8080  # {config}\n" in out
    assert 'host = "::1"  # flag\n' in out
    assert 'base_url = "http://127.0.0.1:9999"  # $QWEN_OAUTH_BASE_URL\n' in out
    assert 'client_secret_env = "ACME_SECRET"' in out  # the variable's name, not a secret
    assert 'token_endpoint = "https://idp.example/token"' in out  # a URL, not a token
    assert "hunter2" not in out
    parsed = tomllib.loads(out)
    assert parsed["providers"]["acme"]["extra_params"] == {"audience": "api", "client_secret": "(elided)"}


def test_a_bad_key_exits_2_with_one_line_as_run_would(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nprot = 1\n")
    monkeypatch.setenv("QWEN_SERVE_CONFIG", str(config))
    code, out, err = run_config(capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and "server.prot" in err


def test_defaults_prints_the_shipped_commented_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_config(capsys, "--defaults")
    assert code == 0
    assert out == DEFAULTS_FILE.read_text(encoding="utf-8")
    assert tomllib.loads(out) == defaults_as_toml_mapping()
    assert DEFAULTS_FILE.parent.name == "serve"  # inside the package: an installed wheel has it
