"""The daemon over TLS (`[server] certfile/keyfile`): REST and the event stream, whose frames are written
raw to the connection (serve.http.server's raw send), both through the TLS stream."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import trio
import trio_websocket
import trustme
from support.daemon import StartDaemon

from serve.config import load_config
from serve.models import FlowCancelled


async def test_rest_and_the_event_stream_over_tls(start_daemon: StartDaemon, token: str, tmp_path: Path) -> None:
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    config = load_config(
        overrides={"server": {"port": 0, "graceful_timeout_s": 0.5, "certfile": str(certfile), "keyfile": str(keyfile)}}
    )
    auth = {"Authorization": f"Bearer {token}"}
    with trio.fail_after(10):
        async with start_daemon(config) as daemon:
            assert daemon.url.startswith("https://")
            async with httpx.AsyncClient(base_url=daemon.url, verify=client_context, trust_env=False) as client:
                assert (await client.get("/workspace/auth/status", headers=auth)).status_code == 200
            url = daemon.url.replace("https://", "wss://") + "/workspace/auth/events"
            headers = [(b"authorization", f"Bearer {token}".encode())]
            async with trio_websocket.open_websocket_url(url, ssl_context=client_context, extra_headers=headers) as ws:
                assert json.loads(await ws.get_message())["type"] == "hello"
                for n in range(3):
                    daemon.services.bus.publish(FlowCancelled(f"df-{n}"))
                frames = [json.loads(await ws.get_message()) for _ in range(3)]
    assert [f["data"]["deviceFlowId"] for f in frames] == ["df-0", "df-1", "df-2"]
