"""A whole login over real sockets: the daemon on 127.0.0.1:0, `qwen-oauth` pointed at a fake IdP served
over real HTTP on loopback, a real httpx client for REST and a real trio-websocket subscriber.

POST → `started`, `throttled`, `authorized` on the WebSocket in order → the credentials file → status
`authenticated`. Short IdP intervals keep it quick; the real clock throughout (never autojump with sockets).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import trio
import trio_websocket
from support.daemon import loopback_client
from support.fake_idp import json_reply
from support.idp_server import serve_idp
from support.login import bearer_headers, device_reply, login_config, qwen_idp


async def test_whole_login_events_credentials_and_status(
    start_daemon: Any, auth: dict[str, str], qwen_home: Path, workspace: Path
) -> None:
    idp = qwen_idp(
        token_replies=[
            json_reply(400, {"error": "authorization_pending"}),
            json_reply(400, {"error": "slow_down"}),
            json_reply(
                200,
                {
                    "access_token": "fake-access-1",
                    "refresh_token": "fake-refresh-1",
                    "token_type": "Bearer",
                    "resource_url": "portal.qwen.ai",
                    "expires_in": 3600,
                },
            ),
        ]
    )
    with trio.fail_after(20):
        async with serve_idp(idp) as served:
            idp.device_replies.append(device_reply(served.url))
            async with start_daemon(login_config(served.url)) as daemon:
                ws_url = daemon.url.replace("http://", "ws://") + "/workspace/auth/events"
                async with (
                    loopback_client(base_url=daemon.url, headers=auth) as client,
                    trio_websocket.open_websocket_url(ws_url, extra_headers=bearer_headers(auth)) as ws,
                ):
                    hello = json.loads(await ws.get_message())
                    assert hello["type"] == "hello" and hello["data"]["lastEventId"] == 0

                    started = await client.post("/workspace/auth/device-flow", json={"providerId": "qwen-oauth"})
                    assert started.status_code == 201
                    body = started.json()
                    flow_id = body["deviceFlowId"]
                    assert body["userCode"] == "USER-0001"
                    assert body["verificationUri"] == f"{served.url}/authorize"
                    assert body["attached"] is False and body["intervalMs"] == 100

                    frames = [json.loads(await ws.get_message()) for _ in range(3)]
                    assert [f["type"] for f in frames] == [
                        "auth_device_flow_started",
                        "auth_device_flow_throttled",
                        "auth_device_flow_authorized",
                    ]
                    assert [f["id"] for f in frames] == [1, 2, 3]
                    assert frames[0]["data"] == {
                        "deviceFlowId": flow_id,
                        "providerId": "qwen-oauth",
                        "expiresAt": body["expiresAt"],
                    }
                    assert frames[1]["data"] == {"deviceFlowId": flow_id, "intervalMs": 300}
                    assert frames[2]["data"]["deviceFlowId"] == flow_id

                    view = (await client.get(f"/workspace/auth/device-flow/{flow_id}")).json()
                    assert view["status"] == "authorized"

                    creds_path = qwen_home / "oauth_creds.json"
                    creds = json.loads(creds_path.read_text())
                    assert list(creds) == ["access_token", "refresh_token", "token_type", "resource_url", "expiry_date"]
                    assert creds["access_token"] == "fake-access-1"
                    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
                    assert stat.S_IMODE(qwen_home.stat().st_mode) == 0o700
                    assert frames[2]["data"]["expiresAt"] == creds["expiry_date"]

                    status = (await client.get("/workspace/auth/status")).json()
                    assert status["pendingDeviceFlows"] == []
                    [cell] = status["providers"]
                    assert cell["providerId"] == "qwen-oauth"
                    assert cell["status"] == "ok" and cell["authState"] == "authenticated"
                    assert cell["expiresAt"] == creds["expiry_date"]
    token_requests = [r for r in idp.requests if r.url.path.endswith("/token")]
    assert len(token_requests) == 3, "exactly one poll per tick and none after success"
