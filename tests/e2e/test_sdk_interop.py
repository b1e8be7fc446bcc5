"""Interop with the real official SDK: `@qwen-code/sdk` 0.1.14's `DaemonClient` (Node) against our daemon.

Each test serves a fake qwen-oauth IdP over real HTTP on loopback, runs the daemon in this Trio loop, then runs
`node sdk_interop.mjs <url> <scenario>` (tests/e2e, token in the environment) as a child process. The script
prints one JSON line per SDK call; the assertions live here, on those lines and on the daemon's side (the
credentials file). The SDK has no client for the daemon's event stream (its `subscribeEvents` is the per-session
SSE of qwen-code's own daemon), so the `stream` scenario is handed the frames this test read from
`WS /workspace/auth/events` and runs the SDK's validators and reducers over them, as an app built on the SDK
would. The SDK comes from tests/e2e/node_modules, installed from the committed lockfile by
`npm ci --prefix tests/e2e` (the nox `tests` session does it); without it these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import trio
import trio_websocket
from support.daemon import loopback_client
from support.fake_idp import json_reply
from support.idp_server import serve_idp
from support.login import (
    StartDaemon,
    bearer_headers,
    device_reply,
    login_config,
    next_frame,
    oauth_error,
    pending_replies,
    qwen_idp,
    qwen_tokens,
    token_requests,
    wait_until,
    ws_url,
)

from serve.config import load_config
from serve.daemon import RunningDaemon
from serve.private_files import write_private

E2E_DIR = Path(__file__).resolve().parent
SDK_PACKAGE = E2E_DIR / "node_modules" / "@qwen-code" / "sdk" / "package.json"
SDK_VERSION = "0.1.14"
TEST_TIMEOUT_S = 60
# The IdP's interval for the logins the SDK awaits: polls every 0.2 s (the daemon's `min_interval_s` is 0.05).
IDP_INTERVAL_S = 0.2
LOGOUT_PATH = "/workspace/auth/providers"


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


async def run_sdk(node: str, url: str, token: str, scenario: str, *, stdin: bytes = b"") -> Steps:
    env = {**os.environ, "QWEN_SERVER_TOKEN": token}
    result = await trio.run_process(
        [node, "sdk_interop.mjs", url, scenario],
        stdin=stdin,
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


# --- the credential events of issue 12 in the stream the SDK reads ---------------------------------------------

CORP_ID = "corp"  # a generic provider whose credentials the daemon refreshes and revokes
CORP_CLIENT_ID = "corp-client"
CORP_TOKEN_PATH = "/corp/token"
CORP_REVOCATION_PATH = "/corp/revoke"
CREDENTIAL_EVENTS = ("auth_credentials_refreshed", "auth_credentials_removed")


def form_of(request: httpx.Request) -> dict[str, str]:
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    pairs = parse_qsl(request.content.decode(), keep_blank_values=True, strict_parsing=True)
    assert len(dict(pairs)) == len(pairs), "a repeated form parameter"
    return dict(pairs)


@dataclass
class CorpEndpoints:
    """The token endpoint (refresh grant only) and the RFC 7009 revocation endpoint of `corp`'s IdP, checking
    each form it receives. A refresh answers `temporarily_unavailable` until `ready()`; each one rotates the
    refresh token."""

    ready: Callable[[], bool]
    refreshes: int = 0
    revoked: list[str] = field(default_factory=list)  # the `token_type_hint` of each revoked token, in order

    @property
    def access_token(self) -> str:
        return f"corp-access-{self.refreshes}"

    @property
    def refresh_token(self) -> str:
        return f"corp-refresh-{self.refreshes}"

    def token(self, request: httpx.Request) -> httpx.Response:
        form = form_of(request)
        assert form == {"grant_type": "refresh_token", "refresh_token": self.refresh_token, "client_id": CORP_CLIENT_ID}
        if not self.ready():
            return json_reply(503, {"error": "temporarily_unavailable"})
        self.refreshes += 1
        fields = {"access_token": self.access_token, "refresh_token": self.refresh_token, "token_type": "Bearer"}
        return json_reply(200, {**fields, "expires_in": 3600})

    def revoke(self, request: httpx.Request) -> httpx.Response:
        form = form_of(request)
        hint = form.get("token_type_hint", "")
        expected = {"refresh_token": self.refresh_token, "access_token": self.access_token}.get(hint)
        assert form == {"token": expected, "token_type_hint": hint, "client_id": CORP_CLIENT_ID}
        self.revoked.append(hint)
        return httpx.Response(200)


def seed_corp_credentials(qwen_home: Path) -> None:
    """`corp` credentials as a previous login left them, due for a refresh now (half their lifetime is left)."""
    now_ms = int(time.time() * 1000)
    document = {
        "access_token": "corp-access-0",
        "refresh_token": "corp-refresh-0",
        "token_type": "Bearer",
        "expires_in": 60,
        "expiry_date": now_ms + 30_000,
        "obtained_at": now_ms - 30_000,
    }
    qwen_home.mkdir(mode=0o700, exist_ok=True)
    write_private(qwen_home, f"device-flow/{CORP_ID}.json", json.dumps(document).encode())


async def record_frames(
    daemon: RunningDaemon,
    auth: dict[str, str],
    frames: list[dict[str, Any]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every frame of the daemon's event stream but heartbeats, into `frames`, from its `hello` on, until cancelled."""
    async with trio_websocket.open_websocket_url(ws_url(daemon), extra_headers=bearer_headers(auth)) as ws:
        frames.append(await next_frame(ws))
        task_status.started()
        while True:
            frame = await next_frame(ws)
            if frame["type"] != "heartbeat":
                frames.append(frame)


async def test_the_sdk_reads_a_stream_with_credential_events_among_the_device_flow_events(
    start_daemon: StartDaemon, token: str, auth: dict[str, str], qwen_home: Path
) -> None:
    """Issue 12: the SDK's validators and reducers over a real stream holding `auth_credentials_*` events.

    The order is made certain: `corp`'s refresh waits for the qwen-oauth login to start, and the login is
    approved once the refresh is in the stream. Then both providers log out.
    """
    node = node_binary()
    frames: list[dict[str, Any]] = []

    def seen(event_type: str) -> bool:
        return any(frame["type"] == event_type for frame in frames)

    corp = CorpEndpoints(ready=lambda: seen("auth_device_flow_started"))
    qwen = qwen_idp(
        token_replies=[
            lambda _: qwen_tokens() if seen("auth_credentials_refreshed") else oauth_error("authorization_pending")
        ]
        * 500
    )
    seed_corp_credentials(qwen_home)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with serve_idp(qwen) as served:
            qwen.device_replies.append(device_reply(served.url, IDP_INTERVAL_S))
            qwen.documents[served.url + CORP_TOKEN_PATH] = corp.token
            qwen.documents[served.url + CORP_REVOCATION_PATH] = corp.revoke
            corp_provider = {
                "kind": "rfc8628",
                "device_authorization_endpoint": served.url + "/corp/device",  # never used: no login here
                "token_endpoint": served.url + CORP_TOKEN_PATH,
                "revocation_endpoint": served.url + CORP_REVOCATION_PATH,
                "client_id": CORP_CLIENT_ID,
            }
            config = load_config(
                overrides={
                    "server": {"port": 0, "graceful_timeout_s": 0.5},
                    "device_flow": {"min_interval_s": 0.05},
                    "refresh": {"retry_min_s": 0.05, "retry_max_s": 0.1},
                    "providers": {"qwen-oauth": {"base_url": served.url}, CORP_ID: corp_provider},
                }
            )
            async with start_daemon(config) as daemon, loopback_client(base_url=daemon.url, headers=auth) as client:
                async with trio.open_nursery() as nursery:
                    await nursery.start(record_frames, daemon, auth, frames)
                    login = await run_sdk(node, daemon.url, token, "login")
                    creds = json.loads((qwen_home / "oauth_creds.json").read_text())
                    corp_expiry = json.loads((qwen_home / "device-flow" / f"{CORP_ID}.json").read_text())["expiry_date"]
                    logouts = [await client.delete(f"{LOGOUT_PATH}/{p}") for p in ("qwen-oauth", CORP_ID)]
                    await wait_until(lambda: [f["type"] for f in frames].count("auth_credentials_removed") == 2)
                    nursery.cancel_scope.cancel()
                steps = await run_sdk(node, daemon.url, token, "stream", stdin=json.dumps(frames).encode())

    # The stream, as a client of the daemon read it.
    flow_id = login.value("auth.start")["deviceFlowId"]
    assert login.value("awaitCompletion")["status"] == "authorized"
    assert [frame["type"] for frame in frames] == [
        "hello",
        "auth_device_flow_started",
        "auth_credentials_refreshed",
        "auth_device_flow_authorized",
        "auth_credentials_removed",
        "auth_credentials_removed",
    ]
    events = frames[1:]
    assert [event["id"] for event in events] == [1, 2, 3, 4, 5]
    _, refreshed, authorized, *removed = events
    assert refreshed["data"] == {"providerId": CORP_ID, "expiresAt": corp_expiry}
    assert authorized["data"] == {
        "deviceFlowId": flow_id,
        "providerId": "qwen-oauth",
        "expiresAt": creds["expiry_date"],
    }
    assert [event["data"] for event in removed] == [{"providerId": "qwen-oauth"}, {"providerId": CORP_ID}]
    assert [reply.status_code for reply in logouts] == [200, 200]
    qwen_logout, corp_logout = (reply.json() for reply in logouts)
    assert corp_logout == {"providerId": CORP_ID, "removed": True, "revocation": "revoked"}
    # qwen-oauth has no revocation endpoint: the credentials file is gone, the tokens stay valid until they expire.
    assert qwen_logout["providerId"] == "qwen-oauth" and qwen_logout["removed"] is True
    assert qwen_logout["revocation"] == "unsupported"
    assert not (qwen_home / "oauth_creds.json").exists()
    assert (corp.refreshes, corp.revoked) == (1, ["refresh_token", "access_token"])

    # The SDK's validators know the device-flow events only; the others are not `KnownDaemonEvent`s.
    known = {"auth_device_flow_started", "auth_device_flow_authorized"}
    assert steps.value("validators") == [
        {
            "type": frame["type"],
            "isKnownDaemonEvent": frame["type"] in known,
            "asKnownDaemonEvent": frame["type"] in known,
            "isDaemonEventType": frame["type"] in known,
        }
        for frame in frames
    ]
    # Its auth reducer passes the unknown frames through untouched (the same state object) ...
    assert steps.value("reduceDaemonAuthEvent") == [
        {"type": frame["type"], "changed": frame["type"] in known} for frame in frames
    ]
    # ... so its state is the one the device-flow events alone give. It knows no logout: after
    # `auth_credentials_removed` it still says `authorized` (a client has to re-read the status for that).
    auth_state = {
        "flows": {
            "qwen-oauth": {
                "deviceFlowId": flow_id,
                "status": "authorized",
                "lastSeenEventId": authorized["id"],
                "authorizedExpiresAt": creds["expiry_date"],
            }
        }
    }
    assert steps.value("reduceDaemonAuthEvents") == auth_state
    assert steps.value("reduceDaemonAuthEvents, device-flow events only") == auth_state
    # The session reducer counts them as neither known nor "known but malformed"; it only advances its cursor.
    session = steps.value("reduceDaemonSessionEvents")
    assert (session["alive"], session["lastEventId"], session["unrecognizedKnownEventCount"]) == (True, 5, 0)
    # The UI normalizer turns each unknown frame into one `debug` event that quotes its data (never a token: the
    # daemon's events carry none), and the transcript keeps those as "unrecognized" diagnostics.
    unknown = [frame for frame in frames if frame["type"] not in known]
    debug_texts = [
        f"{frame['type']} (unrecognized daemon event): {json.dumps(frame['data'], indent=2)}" for frame in unknown
    ]
    normalized = steps.value("normalizeDaemonEvent")
    assert [[ui["type"] for ui in ui_events] for ui_events in normalized] == [
        ["debug"],
        ["auth.device_flow.started"],
        ["debug"],
        ["auth.device_flow.authorized"],
        ["debug"],
        ["debug"],
    ]
    for frame, [ui] in zip(frames, normalized, strict=True):
        if frame["type"] in CREDENTIAL_EVENTS:
            assert ui == {
                "eventId": frame["id"],
                "serverTimestamp": frame["_meta"]["serverTimestamp"],
                "type": "debug",
                "debugReason": "unrecognized_event",
                "text": f"{frame['type']} (unrecognized daemon event): {json.dumps(frame['data'], indent=2)}",
            }
    diagnostics = steps.value("selectUnrecognizedDiagnostics")
    assert [(d["debugReason"], d["text"]) for d in diagnostics] == [("unrecognized_event", t) for t in debug_texts]

    # And over REST, after the logouts.
    assert {"auth_token_refresh", "auth_logout"} <= set(steps.value("capabilities")["features"])
    cells = steps.value("getAuthStatus")["providers"]
    assert [(c["providerId"], c["status"], c["authState"]) for c in cells] == [
        ("qwen-oauth", "not_started", "unauthenticated"),
        (CORP_ID, "not_started", "unauthenticated"),
    ]
