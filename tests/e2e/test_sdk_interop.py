"""Interop with the real official SDK: `@qwen-code/sdk` 0.1.14's `DaemonClient` (Node) against our daemon.

Each test serves a fake qwen-oauth IdP over real HTTP on loopback, runs the daemon in this Trio loop, then runs
`node sdk_interop.mjs <url> <scenario>` (tests/e2e, token in the environment) as a child process. The script
prints one JSON line per SDK call; the assertions live here, on those lines and on the daemon's side (the
credentials file). The SDK comes from tests/e2e/node_modules, installed from the committed lockfile by
`npm ci --prefix tests/e2e` (the nox `tests` session does it); without it these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
from support.idp_server import serve_idp
from support.login import (
    StartDaemon,
    device_reply,
    login_config,
    oauth_error,
    pending_replies,
    qwen_idp,
    qwen_tokens,
    token_requests,
)

E2E_DIR = Path(__file__).resolve().parent
SDK_PACKAGE = E2E_DIR / "node_modules" / "@qwen-code" / "sdk" / "package.json"
SDK_VERSION = "0.1.14"
TEST_TIMEOUT_S = 60
# The IdP's interval for the logins the SDK awaits: polls every 0.2 s (the daemon's `min_interval_s` is 0.05).
IDP_INTERVAL_S = 0.2


# --- running the SDK -------------------------------------------------------------------------------------------


def node_binary() -> str:
    """Node and the pinned SDK, checked before anything starts so that a missing install fails plainly."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the SDK interop tests need Node.js (>= 20)", pytrace=False)
    if not SDK_PACKAGE.is_file():
        pytest.fail(
            f"{SDK_PACKAGE.parent} is missing: install the pinned SDK first with `npm ci --prefix tests/e2e` "
            "(the nox `tests` session does this)",
            pytrace=False,
        )
    installed = json.loads(SDK_PACKAGE.read_text())["version"]
    if installed != SDK_VERSION:
        pytest.fail(
            f"tests/e2e/node_modules holds @qwen-code/sdk {installed}, not {SDK_VERSION}: "
            "run `npm ci --prefix tests/e2e`",
            pytrace=False,
        )
    return node


class Steps:
    """The JSON lines one scenario printed, by step name."""

    def __init__(self, lines: list[dict[str, Any]]) -> None:
        self.names = [line["step"] for line in lines]
        self._by_name = {line["step"]: line for line in lines}
        assert len(self._by_name) == len(lines), f"a step printed twice: {self.names}"

    def value(self, name: str) -> Any:
        line = self._by_name[name]
        assert line["ok"], f"{name} failed: {line.get('error')}"
        return line["value"]

    def error(self, name: str) -> dict[str, Any]:
        line = self._by_name[name]
        assert not line["ok"], f"{name} should have been rejected, the SDK returned {line['value']!r}"
        error: dict[str, Any] = line["error"]
        assert error["isDaemonHttpError"] and error["name"] == "DaemonHttpError"
        return error


async def run_sdk(node: str, url: str, token: str, scenario: str) -> Steps:
    env = {**os.environ, "QWEN_SERVER_TOKEN": token}
    result = await trio.run_process(
        [node, "sdk_interop.mjs", url, scenario],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=E2E_DIR,
        env=env,
    )
    stdout = result.stdout.decode()
    stderr = result.stderr.decode()
    assert result.returncode == 0, (
        f"sdk_interop.mjs {scenario} exited {result.returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    )
    return Steps([json.loads(line) for line in stdout.splitlines() if line.strip()])


# --- the scenarios ---------------------------------------------------------------------------------------------


async def test_capabilities_through_the_sdk(start_daemon: StartDaemon, token: str, workspace: Path) -> None:
    node = node_binary()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with serve_idp(qwen_idp()) as served, start_daemon(login_config(served.url)) as daemon:
            steps = await run_sdk(node, daemon.url, token, "capabilities")

    assert steps.value("health") == {"status": "ok"}
    caps = steps.value("capabilities")
    assert caps["v"] == 1
    assert caps["mode"] in ("http-bridge", "native")  # DaemonMode
    assert isinstance(caps["modelServices"], list)
    assert isinstance(caps["features"], list) and all(isinstance(f, str) for f in caps["features"])
    assert {"health", "capabilities", "auth_device_flow"} <= set(caps["features"])
    assert caps["protocolVersions"] == {"current": "v1", "supported": ["v1"]}
    assert steps.value("requireWorkspaceCwd") == caps["workspaceCwd"]
    assert Path(caps["workspaceCwd"]) == workspace.resolve()

    status = steps.value("getAuthStatus")
    assert status["v"] == 1 and status["workspaceCwd"] == caps["workspaceCwd"]
    assert status["pendingDeviceFlows"] == []
    assert status["supportedDeviceFlowProviders"] == ["qwen-oauth"]
    [cell] = status["providers"]
    assert cell["kind"] == "auth_provider" and cell["providerId"] == "qwen-oauth"
    assert cell["status"] == "not_started"


async def test_login_awaits_authorized_and_writes_credentials(
    start_daemon: StartDaemon, token: str, qwen_home: Path
) -> None:
    node = node_binary()
    idp = qwen_idp(token_replies=[*pending_replies(2), qwen_tokens()])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with serve_idp(idp) as served:
            idp.device_replies.append(device_reply(served.url, IDP_INTERVAL_S))
            async with start_daemon(login_config(served.url)) as daemon:
                steps = await run_sdk(node, daemon.url, token, "login")

    handle = steps.value("auth.start")
    assert handle["providerId"] == "qwen-oauth"
    assert handle["userCode"] == "USER-0001"
    assert handle["verificationUri"] == f"{served.url}/authorize"
    assert handle["verificationUriComplete"] == f"{served.url}/authorize?user_code=USER-0001&client=qwen-code"
    assert handle["attached"] is False and handle["intervalMs"] == 200
    flow_id = handle["deviceFlowId"]

    final = steps.value("awaitCompletion")
    assert final["deviceFlowId"] == flow_id
    assert final["status"] == "authorized"
    assert "errorKind" not in final and "userCode" not in final
    assert steps.value("getDeviceFlow")["status"] == "authorized"
    # Not asserted: the SDK starts polling at max(1000 ms, intervalMs) and reports any different `intervalMs` it
    # then reads through `onThrottled`, so with this test's 200 ms interval it calls onThrottled(200) without a
    # slow_down. Real intervals are at least 1 s (`min_interval_s`), where this does not happen.

    creds_path = qwen_home / "oauth_creds.json"
    creds = json.loads(creds_path.read_text())
    assert creds["access_token"] == "fake-access-1" and creds["refresh_token"] == "fake-refresh-1"
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600

    status = steps.value("getAuthStatus")
    assert status["pendingDeviceFlows"] == []
    [cell] = status["providers"]
    assert cell["kind"] == "auth_provider" and cell["providerId"] == "qwen-oauth"
    assert cell["status"] == "ok"
    assert cell["expiresAt"] == creds["expiry_date"]
    assert len(token_requests(idp)) == 3, "two pending polls, then tokens, then no more polls"


async def test_cancel_by_another_client(start_daemon: StartDaemon, token: str, qwen_home: Path) -> None:
    node = node_binary()
    idp = qwen_idp()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with serve_idp(idp) as served:
            # A 5 s IdP interval: the daemon never polls before the cancel.
            idp.device_replies.append(device_reply(served.url, interval=5))
            async with start_daemon(login_config(served.url)) as daemon:
                steps = await run_sdk(node, daemon.url, token, "cancel")

    started = steps.value("auth.start as cli-A")
    flow_id = started["deviceFlowId"]
    assert started["userCode"] == "USER-0001" and started["attached"] is False

    takeover = steps.value("startDeviceFlow as cli-B (take-over)")
    assert takeover["deviceFlowId"] == flow_id and takeover["attached"] is True
    assert "userCode" not in takeover and "verificationUri" not in takeover
    assert "initiatorClientId" not in takeover

    as_b = steps.value("getDeviceFlow as cli-B")
    assert as_b["status"] == "pending"
    assert "userCode" not in as_b and "initiatorClientId" not in as_b
    as_a = steps.value("getDeviceFlow as cli-A")
    assert as_a["status"] == "pending" and as_a["userCode"] == "USER-0001"
    assert as_a["initiatorClientId"] == "cli-A"

    assert steps.value("cancelDeviceFlow as cli-B") is None
    cancelled = steps.value("getDeviceFlow as cli-A after cancel")
    assert cancelled["deviceFlowId"] == flow_id
    assert cancelled["status"] == "cancelled"
    assert cancelled["initiatorClientId"] == "cli-A"
    assert "userCode" not in cancelled and "expiresAt" not in cancelled
    assert steps.value("awaitCompletion as cli-A after cancel")["status"] == "cancelled"
    assert steps.value("handle.cancel again (idempotent)") is None
    assert steps.value("getAuthStatus")["pendingDeviceFlows"] == []

    assert token_requests(idp) == []
    assert not (qwen_home / "oauth_creds.json").exists()


async def test_errors_surface_as_daemon_http_errors(start_daemon: StartDaemon, token: str) -> None:
    node = node_binary()
    idp = qwen_idp()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with serve_idp(idp) as served, start_daemon(login_config(served.url)) as daemon:
            steps = await run_sdk(node, daemon.url, token, "errors")

    for name in ("startDeviceFlow github", "auth.start github"):
        error = steps.error(name)
        assert error["status"] == 400
        assert error["body"] == {
            "error": "Unsupported device-flow provider: github",
            "code": "unsupported_provider",
            "supportedProviders": ["qwen-oauth"],
        }
        assert error["message"] == "POST /workspace/auth/device-flow: Unsupported device-flow provider: github"

    bad_id = steps.error("startDeviceFlow bad client id")
    assert bad_id["status"] == 400 and bad_id["body"]["code"] == "invalid_client_id"

    unknown = steps.error("getDeviceFlow unknown")
    assert unknown["status"] == 404
    assert unknown["body"] == {"error": "Device-flow unknown not found", "code": "device_flow_not_found"}
    assert steps.value("cancelDeviceFlow unknown") is None

    assert steps.value("health with wrong token") == {"status": "ok"}
    for name in ("capabilities with wrong token", "getAuthStatus with wrong token", "startDeviceFlow with wrong token"):
        error = steps.error(name)
        assert error["status"] == 401 and error["body"] == {"error": "Unauthorized"}

    assert steps.value("getAuthStatus")["pendingDeviceFlows"] == []
    assert idp.requests == [], "no rejected request reached the IdP"


async def test_denied_login_resolves_with_access_denied(start_daemon: StartDaemon, token: str, qwen_home: Path) -> None:
    node = node_binary()
    idp = qwen_idp(token_replies=[oauth_error("access_denied")])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with serve_idp(idp) as served:
            idp.device_replies.append(device_reply(served.url, IDP_INTERVAL_S))
            async with start_daemon(login_config(served.url)) as daemon:
                steps = await run_sdk(node, daemon.url, token, "deny")

    flow_id = steps.value("auth.start")["deviceFlowId"]
    final = steps.value("awaitCompletion")
    assert final["deviceFlowId"] == flow_id
    assert final["status"] == "error"
    assert final["errorKind"] == "access_denied"
    assert final["hint"] == "Qwen IdP returned access_denied"
    assert "expiresAt" not in final and "userCode" not in final

    status = steps.value("getAuthStatus")
    assert status["pendingDeviceFlows"] == []
    [cell] = status["providers"]
    assert cell["providerId"] == "qwen-oauth" and cell["status"] == "not_started"
    assert len(token_requests(idp)) == 1
    assert not (qwen_home / "oauth_creds.json").exists()
