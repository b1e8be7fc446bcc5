"""`qwen-serve check` (issue 12): each provider's discovery, client and endpoints, checked without a daemon,
with a verdict per provider and the fix for each problem; `--start` makes one real device authorization.

Fake IdPs served over real loopback HTTP; the check runs with the daemon's own IdP client settings. Most
tests call `check_providers` in the test's Trio loop; the command line itself runs `main` in a worker
thread (it calls `trio.run`) or in a subprocess.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from support.fake_idp import json_reply, text_reply
from support.idp_server import serve_idp
from support.login import closed_port_url, login_config, oauth_error, qwen_idp
from support.picky_idp import PickyIdP

from serve.cli import main
from serve.cli_check import check_providers
from serve.config import Config
from serve.providers import oauth, rfc8628

CLIENT_SECRET = "s3cret-CLIENT-never-shown-9a8b7c"


def host_of(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


def acme_config(qwen_url: str | None = None, **table: Any) -> Config:
    """`acme` (client `client-1`) with `table`'s keys; qwen-oauth at `qwen_url`, or disabled."""
    acme = {"kind": "rfc8628", "client_id": "client-1", **table}
    qwen: dict[str, Any] = {"base_url": qwen_url} if qwen_url else {"enabled": False}
    return login_config(closed_port_url(), providers={"qwen-oauth": qwen, "acme": acme})


def served_metadata(idp: PickyIdP, **overrides: Any) -> None:
    idp.documents[f"{idp.base_url}/.well-known/openid-configuration"] = json_reply(200, idp.metadata(**overrides))


async def check(
    config: Config, *providers: str, start: bool = False, env: dict[str, str] | None = None
) -> tuple[int, str]:
    out = io.StringIO()
    with trio.fail_after(10):
        code = await check_providers(config, list(providers), start=start, env=env or {}, out=out)
    return code, out.getvalue()


def block(out: str, provider_id: str) -> list[str]:
    """The lines of one provider's verdict, from its headline to its `=>` line."""
    lines = out.splitlines()
    first = next(n for n, line in enumerate(lines) if line.startswith(f"{provider_id} ("))
    last = next(n for n in range(first, len(lines)) if lines[n].startswith("  => "))
    return lines[first : last + 1]


def discovered(url: str) -> str:
    return (
        f"  ok    discovery: the issuer's metadata is usable (device_authorization_endpoint {url}/device, "
        f"token_endpoint {url}/token, PKCE S256)"
    )


def client_accepted(url: str) -> str:
    return (
        "  ok    client: the token endpoint accepts client_id client-1 (it refused only a made-up device code: "
        f"HTTP 400 error=invalid_grant from {host_of(url)})"
    )


def failed(step: str, failure: str, detail: str, fix: str) -> list[str]:
    return [f"  FAIL  {step}: {failure} ({detail})", f"        fix: {fix}", "  => FAIL"]


async def test_a_good_configuration_passes_without_minting_a_device_code() -> None:
    acme, qwen = PickyIdP(), qwen_idp()
    async with serve_idp(acme) as served, serve_idp(qwen) as served_qwen:
        served_metadata(acme)
        code, out = await check(acme_config(served_qwen.url, issuer=served.url))
    url = served.url
    assert (code, out) == (
        0,
        f"qwen-oauth (qwen-oauth, base_url {served_qwen.url})\n"
        f"  ok    base_url: answers (HTTP 404 to a GET from {host_of(served_qwen.url)})\n"
        "  => ok\n"
        "\n"
        f"acme (rfc8628, issuer {url})\n"
        f"{discovered(url)}\n"
        f"{client_accepted(url)}\n"
        f"  ok    device_authorization_endpoint: answers (HTTP 404 to a GET from {host_of(url)})\n"
        "  => ok\n"
        "\n"
        "2 provider(s) checked: 2 ok, 0 failed\n",
    )
    assert acme.issued == {} and qwen.issued == {}, "no device code was minted"


@pytest.mark.parametrize(
    "mistake",
    [
        "issuer-trailing-slash",
        "localhost-vs-127.0.0.1",
        "idp-down",
        "unknown-client-id",
        "secret-sent-for-a-public-client",
        "metadata-not-json",
        "no-device-endpoint",
        "client-secret-unset",
    ],
)
async def test_each_bad_configuration_fails_with_its_fix(mistake: str) -> None:
    idp = PickyIdP()
    env: dict[str, str] = {}
    async with serve_idp(idp) as served:
        url, host = served.url, host_of(served.url)
        served_metadata(idp)
        table: dict[str, Any] = {"issuer": url}
        match mistake:
            case "issuer-trailing-slash":
                table["issuer"] = f"{url}/"
                detail = f"issuer mismatch: configured <{url}/>, the document from {host} says <{url}>"
                expected = failed("discovery", "discovery_failed", detail, rfc8628.HINT_ISSUER_TRAILING_SLASH)
            case "localhost-vs-127.0.0.1":
                table["issuer"] = local = url.replace("127.0.0.1", "localhost")
                detail = f"issuer mismatch: configured <{local}>, the document from {host_of(local)} says <{url}>"
                expected = failed("discovery", "discovery_failed", detail, rfc8628.HINT_ISSUER_LOOPBACK_ALIAS)
            case "idp-down":
                table["issuer"] = down = closed_port_url()
                detail = f"ConnectError (ECONNREFUSED) to {host_of(down)}"
                expected = failed("discovery", "idp_unreachable", detail, oauth.HINT_UNREACHABLE)
            case "unknown-client-id":
                table["client_id"] = "no-such-client"
                detail = f"HTTP 401 error=invalid_client from {host}"
                expected = [discovered(url), *failed("client", "client_rejected", detail, oauth.HINT_CLIENT_PUBLIC)]
            case "secret-sent-for-a-public-client":
                table["client_secret_env"] = "ACME_SECRET"
                env["ACME_SECRET"] = CLIENT_SECRET
                detail = f"HTTP 401 error=invalid_client from {host}"
                fix = oauth.HINT_CLIENT_CONFIDENTIAL
                expected = [discovered(url), *failed("client", "client_rejected", detail, fix)]
            case "metadata-not-json":
                idp.documents[f"{url}/.well-known/openid-configuration"] = text_reply(200, "<html>Welcome</html>")
                detail = f"HTTP 200, not JSON, from {host}"
                expected = failed("discovery", "discovery_failed", detail, rfc8628.HINT_METADATA_NOT_JSON)
            case "no-device-endpoint":
                served_metadata(idp, device_authorization_endpoint=None)
                detail = f"the document from {host} has no device_authorization_endpoint"
                expected = failed("discovery", "discovery_failed", detail, rfc8628.HINT_NO_DEVICE_ENDPOINT)
            case _:
                table["client_secret_env"] = "ACME_SECRET"  # unset in the check's environment
                detail = "$ACME_SECRET is unset or empty"
                fix = rfc8628.HINT_SECRET_UNAVAILABLE
                expected = [discovered(url), *failed("client", "client_secret_unavailable", detail, fix)]
        code, out = await check(acme_config(**table), env=env)
    headline = f"acme (rfc8628, issuer {table['issuer']})"
    assert (code, block(out, "acme")) == (1, [headline, *expected])
    assert out.endswith("1 provider(s) checked: 0 ok, 1 failed\n")
    assert CLIENT_SECRET not in out
    assert "IDP-FREE-TEXT" not in out
    assert idp.issued == {}


async def test_start_makes_one_real_device_authorization_and_never_shows_the_device_code() -> None:
    acme, qwen = PickyIdP(), qwen_idp()
    async with serve_idp(acme) as served, serve_idp(qwen) as served_qwen:
        served_metadata(acme)
        code, out = await check(acme_config(served_qwen.url, issuer=served.url), start=True)
    issued = "device authorization: the IdP issued a device code"
    shown = "the device code is not shown and expires unused in 600 s"
    assert code == 0
    assert block(out, "qwen-oauth")[1:] == [
        f"  ok    {issued} (user code USER-0001 at {served_qwen.url}/authorize; {shown})",
        "  => ok",
    ]
    assert block(out, "acme")[1:] == [
        discovered(served.url),
        client_accepted(served.url),
        f"  ok    {issued} (user code USER-0001 at {served.url}/authorize; {shown})",
        "  => ok",
    ]
    assert (list(acme.issued), list(qwen.issued)) == (["device-code-1"], ["device-code-1"])
    assert "device-code" not in out


async def test_start_reports_a_device_endpoint_that_refuses_the_grant() -> None:
    idp = PickyIdP()
    async with serve_idp(idp) as served:
        served_metadata(idp)
        idp.device_replies.append(oauth_error("unauthorized_client"))
        code, out = await check(acme_config(issuer=served.url), start=True)
    detail = f"HTTP 400 error=unauthorized_client from {host_of(served.url)}"
    assert (code, block(out, "acme")[3:]) == (
        1,
        failed("device authorization", "client_rejected", detail, oauth.HINT_GRANT_NOT_ENABLED),
    )


async def test_a_token_endpoint_answer_that_tells_nothing_is_a_warning_not_a_failure() -> None:
    idp = PickyIdP()
    async with serve_idp(idp) as served:
        # Some IdPs answer an unknown device code with invalid_request: it says nothing about the client.
        explicit = {"device_authorization_endpoint": idp.device_url, "token_endpoint": f"{served.url}/strict-token"}
        idp.documents[f"{served.url}/strict-token"] = oauth_error("invalid_request")
        code, out = await check(acme_config(**explicit))
    host = host_of(served.url)
    assert (code, block(out, "acme")[1:]) == (
        0,
        [
            f"  ok    endpoints: configured, no discovery (device_authorization_endpoint {idp.device_url}, "
            f"token_endpoint {served.url}/strict-token)",
            "  warn  client: the token endpoint's answer does not tell whether it accepts the client "
            f"(HTTP 400 error=invalid_request from {host})",
            f"        fix: {oauth.HINT_INVALID_REQUEST}; `qwen-serve check --start` makes one real device "
            "authorization request",
            f"  ok    device_authorization_endpoint: answers (HTTP 404 to a GET from {host})",
            "  => ok",
        ],
    )


async def test_qwen_oauth_down_fails_with_the_unreachable_fix() -> None:
    down = closed_port_url()
    code, out = await check(login_config(down), "qwen-oauth")
    detail = f"ConnectError (ECONNREFUSED) to {host_of(down)}"
    assert (code, block(out, "qwen-oauth")[1:]) == (
        1,
        failed("base_url", "idp_unreachable", detail, oauth.HINT_UNREACHABLE),
    )


# --- the command line ------------------------------------------------------------------------------------------


@pytest.fixture
def check_env(monkeypatch: pytest.MonkeyPatch, qwen_home: Path) -> None:
    monkeypatch.setenv("QWEN_HOME", str(qwen_home))
    for name in ("QWEN_SERVE_CONFIG", "QWEN_OAUTH_BASE_URL", "ACME_SECRET"):
        monkeypatch.delenv(name, raising=False)


def write_config(path: Path, issuer: str, *, qwen: bool = False) -> Path:
    qwen_table = "" if qwen else "[providers.qwen-oauth]\nenabled = false\n\n"
    path.write_text(f'{qwen_table}[providers.acme]\nkind = "rfc8628"\nissuer = "{issuer}"\nclient_id = "client-1"\n')
    return path


@pytest.mark.usefixtures("check_env")
async def test_the_command_checks_the_named_providers_from_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    idp = PickyIdP()
    async with serve_idp(idp) as served:
        served_metadata(idp)
        config = write_config(tmp_path / "serve.toml", served.url, qwen=True)
        with trio.fail_after(10):
            code = await trio.to_thread.run_sync(main, ["check", "--config", str(config), "acme"])
    captured = capsys.readouterr()
    assert (code, captured.err) == (0, "")
    assert "qwen-oauth" not in captured.out  # only the provider named
    assert captured.out.endswith("=> ok\n\n1 provider(s) checked: 1 ok, 0 failed\n")


@pytest.mark.usefixtures("check_env")
def test_an_unknown_provider_is_exit_2_listing_the_configured_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "serve.toml", "https://idp.example", qwen=True)
    assert main(["check", "--config", str(config), "acme", "keycloak"]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (
        "",
        "qwen-serve: unknown provider keycloak; configured providers: qwen-oauth, acme\n",
    )


@pytest.mark.usefixtures("check_env")
def test_a_bad_configuration_is_exit_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('[providers.acme]\nkind = "rfc8628"\nclient_id = "c"\nissuer = "ftp://idp.example"\n')
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen-serve: config error: providers.acme.issuer: ")


def test_the_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: qwen-serve check [-h] [--config PATH] [--start] [PROVIDER ...]" in out
    assert "0  every provider checked passed" in out
    assert "1  at least one provider failed" in out
    assert "2  a bad flag, an unknown PROVIDER" in out


async def test_qwen_serve_check_as_a_process_exits_1_on_a_bad_issuer(tmp_path: Path, qwen_home: Path) -> None:
    idp = PickyIdP()
    env = {k: v for k, v in os.environ.items() if k not in ("QWEN_SERVE_CONFIG", "QWEN_OAUTH_BASE_URL")}
    env["QWEN_HOME"] = str(qwen_home)
    async with serve_idp(idp) as served:
        served_metadata(idp)
        config = write_config(tmp_path / "serve.toml", f"{served.url}/")
        with trio.fail_after(20):
            done = await trio.run_process(
                [sys.executable, "-m", "serve", "check", "--config", str(config)],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert done.returncode == 1, done.stderr
    out = done.stdout.decode()
    assert f"  FAIL  discovery: discovery_failed (issuer mismatch: configured <{served.url}/>" in out
    assert f"        fix: {rfc8628.HINT_ISSUER_TRAILING_SLASH}\n" in out
    assert out.endswith("1 provider(s) checked: 0 ok, 1 failed\n")
    assert done.stderr == b""


async def test_every_step_is_bounded_by_start_timeout_s() -> None:
    # Accepts connections (the kernel does) and never reads or answers.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    hung = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    providers = {
        "discovered": {"kind": "rfc8628", "client_id": "c", "issuer": hung},
        "explicit": {
            "kind": "rfc8628",
            "client_id": "c",
            "device_authorization_endpoint": f"{hung}/device",
            "token_endpoint": f"{hung}/token",
        },
    }
    config = login_config(hung, start_timeout_s=0.2, providers=providers)
    try:
        _, out = await check(config)
        code, started = await check(config, "qwen-oauth", start=True)
    finally:
        for listener in listeners:
            await listener.aclose()
    timed_out = ("idp_timeout", "no answer within start_timeout_s (0.2 s)", oauth.HINT_TIMEOUT)
    assert block(out, "qwen-oauth")[1:] == failed("base_url", *timed_out)
    assert block(out, "discovered")[1:] == failed("discovery", *timed_out)
    assert block(out, "explicit")[2:] == failed("client", *timed_out)
    assert (code, block(started, "qwen-oauth")[1:]) == (1, failed("device authorization", *timed_out))
