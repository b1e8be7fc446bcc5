"""Logout (`DELETE /workspace/auth/providers/{id}`, `qwen-serve logout`) and `qwen-serve token`, against a
real daemon whose provider `dev` is the development IdP (`--dev-idp`): real sockets, real revocation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from support.daemon import StartDaemon, loopback_client
from support.dev_human import decide
from support.login import next_event, open_events

from serve.cli import main
from serve.daemon import RunningDaemon

WAIT_S = 20


def api(daemon: RunningDaemon, token: str) -> httpx.AsyncClient:
    return loopback_client(base_url=daemon.url, headers={"Authorization": f"Bearer {token}"})


async def log_in(client: httpx.AsyncClient) -> None:
    started = (await client.post("/workspace/auth/device-flow", json={"providerId": "dev"})).json()
    assert (await decide(started["verificationUriComplete"], started["userCode"])).status_code == 200
    with trio.fail_after(WAIT_S):
        while (await client.get(f"/workspace/auth/device-flow/{started['deviceFlowId']}")).json()[  # noqa: ASYNC110
            "status"
        ] == "pending":
            await trio.sleep(0.05)


def cell(status: dict[str, Any]) -> dict[str, Any]:
    found: list[dict[str, Any]] = [p for p in status["providers"] if p["providerId"] == "dev"]
    return found[0]


async def test_logout_revokes_at_the_idp_cancels_the_pending_login_and_deletes_the_file(
    start_daemon: StartDaemon, token: str, qwen_home: Path, auth: dict[str, str]
) -> None:
    async with start_daemon(dev_idp=True) as daemon, api(daemon, token) as client:
        await log_in(client)
        credentials = qwen_home / "device-flow" / "dev.json"
        access_token = json.loads(credentials.read_text())["access_token"]
        [issuer] = [p.issuer for p in daemon.services.config.providers if p.provider_id == "dev"]
        userinfo = {"Authorization": f"Bearer {access_token}"}
        async with httpx.AsyncClient(trust_env=False) as idp:
            assert (await idp.get(f"{issuer}/userinfo", headers=userinfo)).status_code == 200
        pending = (await client.post("/workspace/auth/device-flow", json={"providerId": "dev"})).json()
        async with open_events(daemon, auth) as ws:
            with trio.fail_after(WAIT_S):
                reply = await client.delete("/workspace/auth/providers/dev")
                assert (reply.status_code, reply.text) == (
                    200,
                    '{"providerId":"dev","removed":true,"revocation":"revoked"}',
                )
                types = [(await next_event(ws))["type"] for _ in range(2)]
        assert types == ["auth_device_flow_cancelled", "auth_credentials_removed"]
        assert (await client.get(f"/workspace/auth/device-flow/{pending['deviceFlowId']}")).json()[
            "status"
        ] == "cancelled"
        assert not credentials.exists()
        status = (await client.get("/workspace/auth/status")).json()
        assert (cell(status)["status"], cell(status)["authState"]) == ("not_started", "unauthenticated")
        async with httpx.AsyncClient(trust_env=False) as idp:
            assert (await idp.get(f"{issuer}/userinfo", headers=userinfo)).status_code == 401  # revoked there
        again = await client.delete("/workspace/auth/providers/dev")
        assert again.json() == {"providerId": "dev", "removed": False, "revocation": "none"}
        unknown = await client.delete("/workspace/auth/providers/nope")
        assert unknown.status_code == 400 and unknown.json()["code"] == "unsupported_provider"
        assert access_token not in reply.text + again.text


async def test_logout_is_strict_on_a_token_less_daemon(start_daemon: StartDaemon) -> None:
    async with start_daemon(token=None) as daemon, loopback_client(base_url=daemon.url) as client:
        reply = await client.delete("/workspace/auth/providers/qwen-oauth")
        assert reply.status_code == 401 and reply.json()["code"] == "token_required"


def write_credentials(home: Path, *, expires_in_s: float, token: str = "at-123") -> None:
    path = home / "device-flow" / "acme.json"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    document = {"access_token": token, "token_type": "Bearer", "expiry_date": int((time.time() + expires_in_s) * 1000)}
    path.write_text(json.dumps(document))
    path.chmod(0o600)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QWEN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_token_prints_a_fresh_token_and_nothing_else(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_credentials(home, expires_in_s=600)
    assert main(["token", "acme"]) == 0
    assert capsys.readouterr() == ("at-123\n", "")
    assert main(["token", "acme", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accessToken"] == "at-123" and out["tokenType"] == "Bearer" and out["providerId"] == "acme"


def test_token_on_expired_or_missing_credentials_is_one_line_and_exit_1(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "acme"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("qwen-serve: no credentials in ") and "qwen-serve login --provider acme" in err
    # qwen-oauth's file is oauth_creds.json: the hint still names the provider, not the file.
    assert main(["token", "qwen-oauth"]) == 1
    assert "qwen-serve login --provider qwen-oauth`" in capsys.readouterr().err
    write_credentials(home, expires_in_s=-5)
    assert main(["token", "acme"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "the access token expired at" in err and "at-123" not in err
    assert main(["token", "../etc"]) == 2
    assert main(["token", "acme", "--wait", "nan"]) == 2


def test_token_wait_returns_the_refreshed_token(home: Path) -> None:
    write_credentials(home, expires_in_s=-5)
    env = {**os.environ, "QWEN_HOME": str(home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "serve", "token", "acme", "--wait", "15"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        time.sleep(0.5)
        write_credentials(home, expires_in_s=600, token="at-fresh")  # the daemon's refresh lands
        out, _ = process.communicate(timeout=WAIT_S)
    finally:
        process.kill()
    assert (process.returncode, out) == (0, "at-fresh\n")


async def test_logout_command_against_the_daemon(start_daemon: StartDaemon, token: str, tmp_path: Path) -> None:
    async with start_daemon(dev_idp=True) as daemon, api(daemon, token) as client:
        await log_in(client)
        env = {**os.environ, "QWEN_SERVER_TOKEN": token, "QWEN_HOME": str(tmp_path / "client")}
        with trio.fail_after(WAIT_S):
            done = await trio.run_process(
                [sys.executable, "-m", "serve", "logout", "dev", "--daemon", daemon.url],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode() == (
            "Logged out of dev: credentials deleted; its tokens are revoked at the identity provider.\n"
        )
