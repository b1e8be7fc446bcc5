"""Shutdown with flows pending and subscribers connected (SPEC §3): mark shutting down → `dispose()` (each
pending flow's `auth_device_flow_cancelled` goes out) → every stream closes 1001 → hypercorn drains.

In process through `RunningDaemon.shutdown()`, and as a real `python -m serve run` process sent SIGTERM.
Real sockets and the real clock; bounds are generous and nothing is timed as an assertion beyond them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio
import trio_websocket
from support.daemon import loopback_client
from support.idp_server import serve_idp
from support.login import (
    CLIENT_ID_HEADER,
    FLOWS_PATH,
    StartDaemon,
    bearer_headers,
    frames_until_close,
    generic_idp,
    generic_provider,
    login_config,
    next_frame,
    qwen_idp,
    script_devices,
    token_requests,
)

from serve.audit import Audit
from serve.daemon import RunningDaemon

LISTENING = re.compile(r"^qwen-serve listening on (http://127\.0\.0\.1:\d+) \(workspace=.+\)\n$")


def cancelled_text(flow_id: str, stamp: int, event_id: int) -> str:
    """The `cancelled` envelope of a flow ended by shutdown: no canceller, so no `originatorClientId`."""
    return (
        f'{{"id":{event_id},"v":1,"type":"auth_device_flow_cancelled","data":{{"deviceFlowId":"{flow_id}"}},'
        f'"_meta":{{"serverTimestamp":{stamp}}}}}'
    )


async def test_shutdown_cancels_pending_flows_then_closes_every_subscriber_1001(
    start_daemon: StartDaemon, auth: dict[str, str]
) -> None:
    qwen, acme = qwen_idp(), generic_idp()
    script_devices(qwen, interval=30)
    script_devices(acme, interval=30)
    lines: list[str] = []
    seen: list[tuple[list[str], int]] = []
    flow_ids: list[str] = []

    async def subscriber(daemon: RunningDaemon, *, task_status: trio.TaskStatus[None]) -> None:
        url = daemon.url.replace("http://", "ws://") + "/workspace/auth/events"
        async with trio_websocket.open_websocket_url(url, extra_headers=bearer_headers(auth)) as ws:
            assert (await next_frame(ws))["type"] == "hello"
            task_status.started()
            frames, reason = await frames_until_close(ws)
            seen.append((frames, reason.code))

    with trio.fail_after(15):
        async with serve_idp(qwen) as served_qwen, serve_idp(acme):
            config = login_config(served_qwen.url, providers={"acme": generic_provider(acme)})
            async with start_daemon(config, audit=Audit(lines.append)) as daemon:
                async with trio.open_nursery() as clients:
                    for _ in range(3):
                        await clients.start(subscriber, daemon)
                    async with loopback_client(base_url=daemon.url, headers=auth) as http:
                        for provider_id, headers in (("qwen-oauth", {CLIENT_ID_HEADER: "cli-A"}), ("acme", {})):
                            response = await http.post(FLOWS_PATH, json={"providerId": provider_id}, headers=headers)
                            assert response.status_code == 201
                            flow_ids.append(response.json()["deviceFlowId"])
                    daemon.shutdown()
                # Every subscriber has its close; the daemon's views still hold the flows' ends.
                registry = daemon.services.registry
                for flow_id in flow_ids:
                    view = registry.get(flow_id)
                    assert (view.status.value, view.hint) == ("cancelled", "daemon shutting down")

    assert len(seen) == 3
    for frames, code in seen:
        assert code == 1001
        decoded = [json.loads(frame) for frame in frames]
        assert [d["type"] for d in decoded] == ["auth_device_flow_started"] * 2 + ["auth_device_flow_cancelled"] * 2
        assert [d["data"]["deviceFlowId"] for d in decoded[2:]] == flow_ids
        for frame, d in zip(frames[2:], decoded[2:], strict=True):
            assert frame == cancelled_text(d["data"]["deviceFlowId"], d["_meta"]["serverTimestamp"], d["id"])
    assert seen[0][0] == seen[1][0] == seen[2][0], "every subscriber got the same frames"

    cancelled = [line for line in lines if "status=cancelled" in line]
    assert len(cancelled) == 2
    for line, flow_id in zip(cancelled, flow_ids, strict=True):
        assert f"deviceFlowId={flow_id[:8]}... clientId=- status=cancelled" in line
        assert line.endswith('hint="daemon shutting down"')
    assert token_requests(qwen) == token_requests(acme) == [], "nobody polled"


# --- the real process ---------------------------------------------------------------------------------------


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        line += chunk
    return line


async def read_all(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    while chunk := await stream.receive_some(65536):
        into += chunk


def process_env(qwen_home: Path, token: str) -> dict[str, str]:
    """The daemon's environment: a private QWEN_HOME, the token, no outside config, no proxy for loopback."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("QWEN_SERVE_CONFIG", "QWEN_OAUTH_BASE_URL") and not key.lower().endswith("_proxy")
    }
    env.update(QWEN_HOME=str(qwen_home), QWEN_SERVER_TOKEN=token, NO_PROXY="127.0.0.1,localhost")
    return env


async def test_sigterm_cancels_the_pending_flow_closes_1001_and_exits_0(
    tmp_path: Path, workspace: Path, qwen_home: Path, token: str, auth: dict[str, str]
) -> None:
    idp = qwen_idp()
    script_devices(idp, interval=30)
    async with serve_idp(idp) as served:
        config_file = tmp_path / "serve.toml"
        config_file.write_text(
            "[server]\ngraceful_timeout_s = 0.5\n\n"
            "[device_flow]\nmin_interval_s = 0.05\n\n"
            f'[providers.qwen-oauth]\nbase_url = "{served.url}"\n'
        )
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "serve", "run", "--port", "0", "--config", str(config_file)],
            cwd=workspace,
            env=process_env(qwen_home, token),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdout is not None and process.stderr is not None
        stderr = bytearray()
        stdout_rest = bytearray()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all, process.stderr, stderr)  # never let the pipe fill
                with trio.fail_after(20):
                    line = (await read_line(process.stdout)).decode()
                match = LISTENING.match(line)
                assert match, (line, bytes(stderr).decode(errors="replace"))
                url = match.group(1)

                with trio.fail_after(10):
                    ws_url = url.replace("http://", "ws://") + "/workspace/auth/events"
                    async with (
                        trio_websocket.open_websocket_url(ws_url, extra_headers=bearer_headers(auth)) as ws,
                        loopback_client(base_url=url, headers=auth) as http,
                    ):
                        assert (await next_frame(ws))["type"] == "hello"
                        response = await http.post(FLOWS_PATH, json={"providerId": "qwen-oauth"})
                        assert response.status_code == 201, response.text
                        flow_id = response.json()["deviceFlowId"]
                        started = await next_frame(ws)
                        assert (started["type"], started["data"]["deviceFlowId"]) == (
                            "auth_device_flow_started",
                            flow_id,
                        )

                        process.send_signal(signal.SIGTERM)
                        frames, reason = await frames_until_close(ws)
                assert reason.code == 1001
                [frame] = frames
                decoded = json.loads(frame)
                assert frame == cancelled_text(flow_id, decoded["_meta"]["serverTimestamp"], 2)

                with trio.fail_after(5):
                    await read_all(process.stdout, stdout_rest)
                    returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    text = bytes(stderr).decode()
    assert returncode == 0, text
    assert stdout_rest == b"", "exactly one line on stdout"
    [cancelled_line] = [line for line in text.splitlines() if "status=cancelled" in line]
    assert cancelled_line == (
        f"[serve] auth.device-flow: provider=qwen-oauth deviceFlowId={flow_id[:8]}... clientId=- status=cancelled "
        'hint="daemon shutting down"'
    )
    assert token not in text
    assert "device-code-1" not in text
    assert token_requests(idp) == []
