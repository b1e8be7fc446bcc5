"""A generic RFC 8628 provider from a configuration file logs in through the running daemon.

The IdP is a standards-following fake served over real HTTP on loopback: discovery at
`{issuer}/.well-known/openid-configuration`, a confidential client (`client_secret_basic`, the secret from
an environment variable), PKCE because the metadata lists S256, and an id token whose `nickname` becomes
the account alias. Proves the issue-4 promise end to end: config file → discovery → device code → polls →
`$QWEN_HOME/device-flow/<id>.json` (0600) → status `authenticated`.
"""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path
from typing import Any

import trio
from support.daemon import loopback_client
from support.fake_idp import FakeIdP, json_reply
from support.idp_server import serve_idp

from serve.config import load_config


def id_token(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


async def test_a_configured_generic_provider_logs_in_through_the_daemon(
    start_daemon: Any, auth: dict[str, str], qwen_home: Path, tmp_path: Path
) -> None:
    idp = FakeIdP(
        device_path="/realms/dev/device",
        token_path="/realms/dev/token",
        client_id="qwen-serve",
        client_auth="client_secret_basic",
        client_secret="s3cret-value",
        scope="openid profile",
        pkce=True,
    )
    with trio.fail_after(20):
        async with serve_idp(idp) as served:
            issuer = f"{served.url}/realms/dev"
            idp.documents[f"{issuer}/.well-known/openid-configuration"] = json_reply(200, idp.metadata(issuer=issuer))
            idp.device_replies.append(
                json_reply(
                    200,
                    {
                        "device_code": "device-code-1",
                        "user_code": "WDJB-MJHT",
                        "verification_uri": f"{served.url}/realms/dev/device",
                        "expires_in": "600",  # a number sent as a string, as some IdPs do
                        "interval": 0.1,
                    },
                )
            )
            idp.token_replies += [
                json_reply(400, {"error": "authorization_pending"}),
                json_reply(
                    200,
                    {
                        "access_token": "kc-access",
                        "refresh_token": "kc-refresh",
                        "token_type": "Bearer",
                        "expires_in": 300,
                        "id_token": id_token({"iss": issuer, "sub": "user-42", "nickname": "octo"}),
                    },
                ),
            ]
            conf = tmp_path / "serve.toml"
            conf.write_text(
                f"""
[server]
port = 0
graceful_timeout_s = 0.5

[device_flow]
min_interval_s = 0.05

[providers.qwen-oauth]
enabled = false

[providers.keycloak]
kind = "rfc8628"
issuer = "{issuer}"
client_id = "qwen-serve"
client_secret_env = "KEYCLOAK_SECRET"
scope = "openid profile"
"""
            )
            config = load_config([conf])
            async with (
                start_daemon(config, env={"KEYCLOAK_SECRET": "s3cret-value"}) as daemon,
                loopback_client(base_url=daemon.url, headers=auth) as client,
            ):
                status = (await client.get("/workspace/auth/status")).json()
                assert status["supportedDeviceFlowProviders"] == ["keycloak"]
                assert status["providers"][0]["authState"] == "unauthenticated"
                assert idp.requests == [], "discovery happens on first use, not at start-up"

                started = await client.post("/workspace/auth/device-flow", json={"providerId": "keycloak"})
                assert started.status_code == 201, started.text
                body = started.json()
                assert body["userCode"] == "WDJB-MJHT"
                assert "verificationUriComplete" not in body
                flow_id = body["deviceFlowId"]

                # A client polling GET, as the SDK's awaitCompletion does (bounded by the fail_after above).
                url = f"/workspace/auth/device-flow/{flow_id}"
                while (view := (await client.get(url)).json())["status"] == "pending":  # noqa: ASYNC110
                    await trio.sleep(0.05)
                assert view["status"] == "authorized", view

                status = (await client.get("/workspace/auth/status")).json()
                [cell] = status["providers"]
                assert cell["providerId"] == "keycloak"
                assert cell["authState"] == "authenticated" and cell["status"] == "ok"
                assert cell["accountAlias"] == "octo"

    path = qwen_home / "device-flow" / "keycloak.json"
    document = json.loads(path.read_text())
    assert document["access_token"] == "kc-access"
    assert document["issuer"] == issuer
    assert isinstance(document["expiry_date"], int) and isinstance(document["obtained_at"], int)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token_posts = [r for r in idp.requests if r.url.path == "/realms/dev/token"]
    assert len(token_posts) == 2
    assert all(r.headers["authorization"].startswith("Basic ") for r in token_posts)


async def test_a_missing_client_secret_is_named_at_start_up(start_daemon: Any, caplog: Any, tmp_path: Path) -> None:
    config = load_config(
        overrides={
            "server": {"port": 0, "graceful_timeout_s": 0.5},
            "providers": {
                "acme": {
                    "kind": "rfc8628",
                    "device_authorization_endpoint": "https://idp.example/device",
                    "token_endpoint": "https://idp.example/token",
                    "client_id": "c",
                    "client_secret_env": "ACME_SECRET",
                },
                "other": {
                    "kind": "rfc8628",
                    "device_authorization_endpoint": "https://idp.example/device",
                    "token_endpoint": "https://idp.example/token",
                    "client_id": "c",
                    "client_secret_file": str(tmp_path / "absent"),
                },
            },
        }
    )
    with caplog.at_level("WARNING", logger="serve.daemon"), trio.fail_after(10):
        async with start_daemon(config, env={}):
            pass
    messages = [r.getMessage() for r in caplog.records if r.name == "serve.daemon"]
    assert any("provider acme: $ACME_SECRET is not set" in m for m in messages), messages
    assert any("provider other: client_secret_file" in m and "does not exist" in m for m in messages), messages
