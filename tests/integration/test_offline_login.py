"""`qwen-serve run --dev-idp`: the offline demo login, end to end over real sockets, and its defences."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from support.daemon import StartDaemon, loopback_client
from support.dev_human import decide

from serve import dev_idp
from serve.cli import main
from serve.daemon import RunningDaemon

WAIT_S = 20
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def api(daemon: RunningDaemon, token: str) -> httpx.AsyncClient:
    return loopback_client(base_url=daemon.url, headers={"Authorization": f"Bearer {token}"})


def issuer_of(daemon: RunningDaemon) -> str:
    [dev] = [p for p in daemon.services.config.providers if p.provider_id == dev_idp.PROVIDER_ID]
    assert dev.issuer is not None
    return dev.issuer


async def flow_until_done(client: httpx.AsyncClient, flow_id: str) -> dict[str, Any]:
    with trio.fail_after(WAIT_S):
        while True:
            flow: dict[str, Any] = (await client.get(f"/workspace/auth/device-flow/{flow_id}")).json()
            if flow["status"] != "pending":
                return flow
            await trio.sleep(0.05)


async def test_a_login_through_the_dev_idp_page_ends_authorized_even_behind_a_proxy_setting(
    start_daemon: StartDaemon, token: str, qwen_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy that answers nothing: the daemon must reach its loopback IdP directly all the same.
    for name in PROXY_VARS:
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with start_daemon(dev_idp=True) as daemon, api(daemon, token) as client:
        started = (await client.post("/workspace/auth/device-flow", json={"providerId": "dev"})).json()
        assert started["status"] == "pending", started
        assert started["verificationUri"] == issuer_of(daemon) + "/device"
        approved = await decide(started["verificationUriComplete"], started["userCode"])
        assert approved.status_code == 200 and "Approved" in approved.text
        flow = await flow_until_done(client, started["deviceFlowId"])
        assert flow["status"] == "authorized", flow
        status = (await client.get("/workspace/auth/status")).json()
        [cell] = [p for p in status["providers"] if p["providerId"] == "dev"]
        assert cell["status"] == "ok" and cell["accountAlias"] == dev_idp.NICKNAME, cell
    credentials = qwen_home / "device-flow" / "dev.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    document = json.loads(credentials.read_text())
    assert document["refresh_token"].startswith("dev-rt-") and document["issuer"] == issuer_of(daemon)


async def test_deny_ends_the_flow_access_denied_and_a_wrong_code_leaves_it_pending(
    start_daemon: StartDaemon, token: str
) -> None:
    async with start_daemon(dev_idp=True) as daemon, api(daemon, token) as client:
        started = (await client.post("/workspace/auth/device-flow", json={"providerId": "dev"})).json()
        wrong = await decide(issuer_of(daemon) + "/device", "BBBB-BBBB")
        assert wrong.status_code == 400 and "not valid" in wrong.text
        assert (await client.get(f"/workspace/auth/device-flow/{started['deviceFlowId']}")).json()[
            "status"
        ] == "pending"
        # Typed by hand: lower case, no dash.
        denied = await decide(issuer_of(daemon) + "/device", started["userCode"].replace("-", "").lower(), "deny")
        assert denied.status_code == 200
        flow = await flow_until_done(client, started["deviceFlowId"])
        assert (flow["status"], flow["errorKind"]) == ("error", "access_denied"), flow


async def raw_request(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        reply = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                reply += chunk
    return reply


async def test_the_dev_idp_refuses_other_hosts_origins_targets_and_large_bodies_and_stops_with_the_daemon(
    start_daemon: StartDaemon,
) -> None:
    async with start_daemon(dev_idp=True) as daemon:
        issuer = issuer_of(daemon)
        port = int(issuer.rsplit(":", 1)[1])
        async with httpx.AsyncClient(base_url=issuer, trust_env=False) as client:
            discovery = await client.get("/.well-known/openid-configuration")
            assert discovery.json()["issuer"] == issuer
            localhost = await client.get("/.well-known/openid-configuration", headers={"Host": f"localhost:{port}"})
            assert localhost.status_code == 200
            rebound = await client.get("/.well-known/openid-configuration", headers={"Host": f"evil.example:{port}"})
            assert rebound.status_code == 421
            page = await client.get("/device")
            cross = await client.post(
                "/device", data={"user_code": "X", "action": "approve"}, headers={"Origin": "http://evil.example"}
            )
            assert page.status_code == 200 and cross.status_code == 403
            large = await client.post(
                "/token", content=b"a=" + b"b" * 20_000, headers={"Content-Type": "application/x-www-form-urlencoded"}
            )
            assert large.status_code == 413
            assert (await client.get("/nothing")).status_code == 404
        absolute = await raw_request(
            port,
            f"GET {issuer}/.well-known/openid-configuration HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode(),
        )
        assert absolute.startswith(b"HTTP/1.1 421"), absolute[:40]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_dev_idp_needs_a_loopback_host_and_writes_nothing_when_refused(
    qwen_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QWEN_HOME", str(qwen_home))
    monkeypatch.delenv("QWEN_SERVER_TOKEN", raising=False)
    assert main(["run", "--dev-idp", "--host", "0.0.0.0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err
        == "qwen-serve: --dev-idp is a local demo: it needs a loopback --host (127.0.0.1, ::1, localhost), not 0.0.0.0\n"
    )
    assert not qwen_home.exists()


def test_dev_idp_with_a_provider_named_dev_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QWEN_HOME", str(tmp_path / "home"))
    config = tmp_path / "serve.toml"
    config.write_text('[providers.dev]\nkind = "rfc8628"\nclient_id = "c"\nissuer = "https://sso.example.com"\n')
    assert main(["run", "--dev-idp", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("qwen-serve: config error: providers.dev: --dev-idp registers")


def test_help_labels_it_a_development_idp(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--dev-idp also run a DEVELOPMENT identity provider" in help_text
    assert "never real accounts" in help_text


class Lines:
    def __init__(self, stream: trio.abc.ReceiveStream | None) -> None:
        assert stream is not None
        self.stream, self.buffer = stream, b""

    async def until(self, needle: str) -> str:
        while needle.encode() not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(self.buffer.decode(errors="replace"))
            self.buffer += chunk
        return self.buffer.decode()


async def test_the_readme_flow_run_dev_idp_then_login_exits_0(tmp_path: Path) -> None:
    """README "Quick start": `qwen-serve run --dev-idp`, then `qwen-serve login --provider dev`, approve."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in {*PROXY_VARS, "NO_PROXY"}}
    env.pop("QWEN_SERVER_TOKEN", None)
    env["QWEN_HOME"] = str(tmp_path / "home")
    serve = [sys.executable, "-m", "serve"]
    daemon = await trio.lowlevel.open_process(
        [*serve, "run", "--dev-idp", "--port", "0"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    login = None
    try:
        with trio.fail_after(WAIT_S):
            listening = await Lines(daemon.stdout).until("\n")
            url = listening.split()[3]
            login = await trio.lowlevel.open_process(
                [*serve, "login", "--provider", "dev", "--daemon", url],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            shown = await Lines(login.stdout).until("user_code=")
            page_url = next(word for word in shown.split() if "/device?user_code=" in word)
            code = page_url.rsplit("=", 1)[1]
            assert (await decide(page_url, code)).status_code == 200
            out = await Lines(login.stdout).until("Logged in: the daemon holds dev credentials (account Dev User")
            assert await login.wait() == 0
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0
        assert daemon.stderr is not None
        err = (await daemon.stderr.receive_some(65536)).decode()
        assert "WARNING serve.dev_idp: development IdP (for local demos only" in err
        document = json.loads((tmp_path / "home" / "device-flow" / "dev.json").read_text())
        for secret in (document["access_token"], document["refresh_token"]):
            assert secret not in out + err
    finally:
        for process in (login, daemon):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
