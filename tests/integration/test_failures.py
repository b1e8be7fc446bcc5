"""Failures a person can act on (issue 12): every failed start or poll answers with its class and a static
hint, and writes one warning line on stderr saying what failed and what to fix; no secret in either.

A real daemon on 127.0.0.1:0 and fake IdPs served over real loopback HTTP. `PickyIdP` answers a wrong
client as real IdPs do (`invalid_client`). Before issue 12, each of these starts was the same bare
`{"error":…,"code":"upstream_error"}` with nothing on stderr, even at `--log-level debug`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from support.daemon import loopback_client
from support.fake_idp import json_reply, text_reply
from support.idp_server import serve_idp
from support.login import (
    FLOWS_PATH,
    StartDaemon,
    closed_port_url,
    json_text,
    login_config,
    oauth_error,
    script_devices,
)
from support.logs import captured, messages
from support.picky_idp import INVALID_CLIENT_TEXT, PickyIdP

from serve.config import Config
from serve.providers import oauth, rfc8628
from serve.registry import START_TIMEOUT_MESSAGE

CLIENT_SECRET = "s3cret-CLIENT-never-shown-9a8b7c"
DISCOVERY_FAILED = "acme IdP discovery failed"
START_FAILED = "acme IdP device authorization request failed"
NO_FLOW = "- (no flow yet)"


def acme_config(device_flow: dict[str, Any] | None = None, **table: Any) -> Config:
    """A daemon whose only provider is the generic `acme` (client `client-1`), with `table`'s keys."""
    acme = {"kind": "rfc8628", "client_id": "client-1", **table}
    providers = {"qwen-oauth": {"enabled": False}, "acme": acme}
    return login_config(closed_port_url(), providers=providers, **(device_flow or {}))


def host_of(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


def start_line(failure: str, detail: str, hint: str) -> str:
    return (
        f"device-flow start failed: provider=acme deviceFlowId={NO_FLOW} failure={failure} "
        f"detail={json_text(detail)} hint={json_text(hint)}"
    )


async def failed_start(
    start_daemon: StartDaemon, config: Config, auth: dict[str, str], env: dict[str, str] | None = None
) -> tuple[httpx.Response, list[str]]:
    """POST a start of `acme` to a fresh daemon: the answer, and the daemon's warning lines."""
    with captured("serve.registry", logging.WARNING) as records:
        async with (
            start_daemon(config, env=env or {}) as daemon,
            loopback_client(base_url=daemon.url, headers=auth) as http,
        ):
            response = await http.post(FLOWS_PATH, json={"providerId": "acme"})
    return response, messages(records, logging.WARNING)


def served_metadata(idp: PickyIdP, **overrides: Any) -> None:
    """Serve `idp`'s own metadata document at its issuer's OpenID Connect discovery URL."""
    idp.documents[f"{idp.base_url}/.well-known/openid-configuration"] = json_reply(200, idp.metadata(**overrides))


# --- the five mistakes of the issue ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mistake", ["issuer-trailing-slash", "localhost-vs-127.0.0.1", "idp-down", "unknown-client-id", "secret-sent"]
)
async def test_each_of_the_five_mistakes_says_what_to_fix_in_the_502_and_on_stderr(
    start_daemon: StartDaemon, auth: dict[str, str], mistake: str
) -> None:
    idp = PickyIdP()
    env: dict[str, str] = {}
    with trio.fail_after(10):
        async with serve_idp(idp) as served:
            url, host = served.url, host_of(served.url)
            served_metadata(idp)
            table: dict[str, Any] = {"issuer": url}
            match mistake:
                case "issuer-trailing-slash":
                    table["issuer"] = f"{url}/"
                    message, failure, hint = DISCOVERY_FAILED, "discovery_failed", rfc8628.HINT_ISSUER_TRAILING_SLASH
                    detail = f"issuer mismatch: configured <{url}/>, the document from {host} says <{url}>"
                case "localhost-vs-127.0.0.1":
                    local = url.replace("127.0.0.1", "localhost")
                    table["issuer"] = local
                    message, failure, hint = DISCOVERY_FAILED, "discovery_failed", rfc8628.HINT_ISSUER_LOOPBACK_ALIAS
                    detail = f"issuer mismatch: configured <{local}>, the document from {host_of(local)} says <{url}>"
                case "idp-down":
                    down = closed_port_url()
                    table["issuer"] = down
                    message, failure, hint = DISCOVERY_FAILED, "idp_unreachable", oauth.HINT_UNREACHABLE
                    detail = f"ConnectError (ECONNREFUSED) to {host_of(down)}"
                case "unknown-client-id":
                    table["client_id"] = "no-such-client"
                    message, failure, hint = START_FAILED, "client_rejected", oauth.HINT_CLIENT_PUBLIC
                    detail = f"HTTP 401 error=invalid_client from {host}"
                case _:  # a secret sent for a client the IdP registered as public
                    table["client_secret_env"] = "ACME_SECRET"
                    env["ACME_SECRET"] = CLIENT_SECRET
                    message, failure, hint = START_FAILED, "client_rejected", oauth.HINT_CLIENT_CONFIDENTIAL
                    detail = f"HTTP 401 error=invalid_client from {host}"
            response, lines = await failed_start(start_daemon, acme_config(**table), auth, env)

    assert response.status_code == 502
    # The original's two members first, byte for byte; then the class and the static hint.
    assert response.text == (
        f'{{"error":"{message}","code":"upstream_error","failure":"{failure}","hint":{json_text(hint)}}}'
    )
    assert lines == [start_line(failure, detail, hint)]
    seen = response.text + "\n".join(lines)
    assert CLIENT_SECRET not in seen
    assert "IDP-FREE-TEXT" not in seen


def test_the_five_mistakes_have_five_different_hints() -> None:
    hints = {
        rfc8628.HINT_ISSUER_TRAILING_SLASH,
        rfc8628.HINT_ISSUER_LOOPBACK_ALIAS,
        oauth.HINT_UNREACHABLE,
        oauth.HINT_CLIENT_PUBLIC,
        oauth.HINT_CLIENT_CONFIDENTIAL,
    }
    assert len(hints) == 5


# --- every other class, and each reason discovery gives -----------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "metadata-not-json",
        "metadata-without-device-endpoint",
        "no-metadata",
        "metadata-with-cleartext-endpoint",
        "unauthorized-client",
        "invalid-scope",
        "client-secret-unset",
        "device-endpoint-serves-a-page",
        "device-endpoint-404",
        "device-endpoint-5xx",
    ],
)
async def test_every_failure_class_has_its_hint_and_its_line(
    start_daemon: StartDaemon, auth: dict[str, str], case: str
) -> None:
    idp = PickyIdP()
    with trio.fail_after(10):
        async with serve_idp(idp) as served:
            url, host = served.url, host_of(served.url)
            oidc = f"{url}/.well-known/openid-configuration"
            served_metadata(idp)
            table: dict[str, Any] = {"issuer": url}
            message, failure = START_FAILED, "bad_idp_reply"
            match case:
                case "metadata-not-json":
                    idp.documents[oidc] = text_reply(200, "<html>Welcome to the IdP</html>")
                    message, failure, hint = DISCOVERY_FAILED, "discovery_failed", rfc8628.HINT_METADATA_NOT_JSON
                    detail = f"HTTP 200, not JSON, from {host}"  # closer than the RFC 8414 URL's 404
                case "metadata-without-device-endpoint":
                    served_metadata(idp, device_authorization_endpoint=None)
                    message, failure, hint = DISCOVERY_FAILED, "discovery_failed", rfc8628.HINT_NO_DEVICE_ENDPOINT
                    detail = f"the document from {host} has no device_authorization_endpoint"
                case "no-metadata":
                    idp.documents.clear()
                    message, failure, hint = DISCOVERY_FAILED, "discovery_failed", rfc8628.HINT_NO_METADATA
                    detail = f"HTTP 404 from {host}"
                case "metadata-with-cleartext-endpoint":
                    served_metadata(idp, token_endpoint="http://idp.example/token")
                    message, failure, hint = DISCOVERY_FAILED, "discovery_failed", rfc8628.HINT_ENDPOINT_REFUSED
                    problem = "must use https (http is allowed only for loopback hosts)"
                    detail = f"the document's token_endpoint {problem}, from {host}"
                case "unauthorized-client":
                    idp.device_replies.append(oauth_error("unauthorized_client"))
                    failure, hint = "client_rejected", oauth.HINT_GRANT_NOT_ENABLED
                    detail = f"HTTP 400 error=unauthorized_client from {host}"
                case "invalid-scope":
                    idp.device_replies.append(oauth_error("invalid_scope"))
                    failure, hint = "request_rejected", oauth.HINT_INVALID_SCOPE
                    detail = f"HTTP 400 error=invalid_scope from {host}"
                case "client-secret-unset":
                    table["client_secret_env"] = "ACME_SECRET"  # and the daemon's environment has none
                    message = "acme: the client secret could not be read"
                    failure, hint = "client_secret_unavailable", rfc8628.HINT_SECRET_UNAVAILABLE
                    detail = "$ACME_SECRET is unset or empty"
                case "device-endpoint-serves-a-page":
                    idp.device_replies.append(text_reply(200, "<html>Sign in</html>"))
                    hint, detail = oauth.HINT_NOT_JSON, f"HTTP 200, not JSON, from {host}"
                case "device-endpoint-404":
                    idp.device_replies.append(text_reply(404, "Not Found", "text/plain"))
                    hint, detail = oauth.HINT_NOT_AN_ENDPOINT, f"HTTP 404 from {host}"
                case _:
                    idp.device_replies.append(text_reply(503, "<html>down for maintenance</html>"))
                    hint, detail = oauth.HINT_IDP_FAILING, f"HTTP 503 from {host}"
            response, lines = await failed_start(start_daemon, acme_config(**table), auth)

    assert response.status_code == 502
    assert response.json() == {"error": message, "code": "upstream_error", "failure": failure, "hint": hint}
    assert lines == [start_line(failure, detail, hint)]


async def test_an_idp_that_never_answers_is_idp_timeout(start_daemon: StartDaemon, auth: dict[str, str]) -> None:
    with trio.fail_after(10):
        # Accepts connections (the kernel does) and never reads or answers.
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        try:
            config = acme_config({"start_timeout_s": 0.3}, issuer=f"http://127.0.0.1:{port}")
            response, lines = await failed_start(start_daemon, config, auth)
        finally:
            for listener in listeners:
                await listener.aclose()
    assert response.status_code == 502
    assert response.json() == {
        "error": START_TIMEOUT_MESSAGE,
        "code": "upstream_error",
        "failure": "idp_timeout",
        "hint": oauth.HINT_TIMEOUT,
    }
    assert lines == [
        start_line("idp_timeout", "no device authorization within start_timeout_s (0.3 s)", oauth.HINT_TIMEOUT)
    ]


async def test_coalesced_starts_log_one_line_and_each_caller_gets_the_hint(
    start_daemon: StartDaemon, auth: dict[str, str]
) -> None:
    idp = PickyIdP(client_id="another-client")
    with trio.fail_after(10), captured("serve.registry", logging.WARNING) as records:
        async with serve_idp(idp) as served:
            served.device_delay_s = 0.3  # the three starts arrive while the first IdP call is in flight
            served_metadata(idp)
            async with (
                start_daemon(acme_config(issuer=served.url)) as daemon,
                loopback_client(base_url=daemon.url, headers=auth) as http,
            ):
                bodies: list[dict[str, Any]] = []

                async def post() -> None:
                    bodies.append((await http.post(FLOWS_PATH, json={"providerId": "acme"})).json())

                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(post)
    assert [(body["failure"], body["hint"]) for body in bodies] == [("client_rejected", oauth.HINT_CLIENT_PUBLIC)] * 3
    detail = f"HTTP 401 error=invalid_client from {host_of(served.url)}"
    assert messages(records, logging.WARNING) == [start_line("client_rejected", detail, oauth.HINT_CLIENT_PUBLIC)]


# --- failed polls ---------------------------------------------------------------------------------------------


async def wait_for_end(http: httpx.AsyncClient, flow_id: str) -> dict[str, Any]:
    """The flow's view once it is no longer pending (callers bound it with `fail_after`)."""
    while True:
        view: dict[str, Any] = (await http.get(f"{FLOWS_PATH}/{flow_id}")).json()
        if view["status"] != "pending":
            return view
        await trio.sleep(0.02)


def sent_secrets(idp: PickyIdP) -> list[str]:
    """Every device code and PKCE verifier the daemon sent the IdP: none may show anywhere else."""
    found = []
    for request in idp.requests:
        form = dict(httpx.QueryParams(request.content.decode()))
        found += [form[key] for key in ("device_code", "code_verifier") if key in form]
    return found


async def test_a_client_rejected_at_the_token_endpoint_ends_the_flow_with_its_class_on_stderr(
    start_daemon: StartDaemon, auth: dict[str, str]
) -> None:
    idp = PickyIdP()
    with trio.fail_after(10), captured("serve.registry", logging.WARNING) as records:
        async with serve_idp(idp) as served:
            script_devices(idp, interval=0.05)
            idp.token_replies.append(
                json_reply(401, {"error": "invalid_client", "error_description": INVALID_CLIENT_TEXT})
            )
            served_metadata(idp)
            async with (
                start_daemon(acme_config(issuer=served.url)) as daemon,
                loopback_client(base_url=daemon.url, headers=auth) as http,
            ):
                started = await http.post(FLOWS_PATH, json={"providerId": "acme"})
                flow_id = started.json()["deviceFlowId"]
                view = await wait_for_end(http, flow_id)
    assert (view["status"], view["errorKind"], view["hint"]) == (
        "error",
        "upstream_error",
        "acme IdP returned invalid_client",
    )
    (line,) = messages(records, logging.WARNING)
    assert line == (
        f"device-flow poll failed: provider=acme deviceFlowId={flow_id[:8]}... failure=client_rejected "
        f"detail={json_text(f'HTTP 401 error=invalid_client from {host_of(served.url)}')} "
        f"outcome={json_text('the flow ends error (upstream_error)')} hint={json_text(oauth.HINT_CLIENT_PUBLIC)}"
    )
    secrets = sent_secrets(idp)
    assert secrets, "the daemon polled with a device code and a verifier"
    for seen in (line, json.dumps(view)):
        assert "IDP-FREE-TEXT" not in seen
        assert not [secret for secret in secrets if secret in seen]


async def test_transient_poll_faults_each_log_a_line_and_the_last_ends_the_flow(
    start_daemon: StartDaemon, auth: dict[str, str]
) -> None:
    idp = PickyIdP()
    with trio.fail_after(10), captured("serve.registry", logging.WARNING) as records:
        async with serve_idp(idp) as served:
            script_devices(idp, interval=0.05)
            idp.token_replies += [text_reply(503, "<html>maintenance</html>")] * 3
            served_metadata(idp)
            async with (
                start_daemon(acme_config(issuer=served.url)) as daemon,
                loopback_client(base_url=daemon.url, headers=auth) as http,
            ):
                flow_id = (await http.post(FLOWS_PATH, json={"providerId": "acme"})).json()["deviceFlowId"]
                view = await wait_for_end(http, flow_id)
    assert (view["status"], view["errorKind"]) == ("error", "upstream_error")
    detail = json_text(f"HTTP 503 from {host_of(served.url)}")
    prefix = (
        f"device-flow poll failed: provider=acme deviceFlowId={flow_id[:8]}... failure=bad_idp_reply detail={detail}"
    )
    hint = f"hint={json_text(oauth.HINT_IDP_FAILING)}"
    assert messages(records, logging.WARNING) == [
        f"{prefix} outcome={json_text('next poll in 0.1 s (1 of 3 faults)')} {hint}",
        f"{prefix} outcome={json_text('next poll in 0.2 s (2 of 3 faults)')} {hint}",
        f"{prefix} outcome={json_text('the flow ends error (upstream_error): 3 transient faults in a row')} {hint}",
    ]


# --- at start-up ----------------------------------------------------------------------------------------------


async def test_start_up_lists_the_providers_and_their_kind(start_daemon: StartDaemon) -> None:
    qwen_url = closed_port_url()
    providers = {
        "keycloak": {"kind": "rfc8628", "issuer": "http://127.0.0.1:8080/realms/dev", "client_id": "c"},
        "github": {
            "kind": "rfc8628",
            "device_authorization_endpoint": "https://github.com/login/device/code",
            "token_endpoint": "https://github.com/login/oauth/access_token",
            "client_id": "Iv1.0123456789abcdef",
        },
    }
    with trio.fail_after(10), captured("serve.daemon", logging.INFO) as records:
        async with start_daemon(login_config(qwen_url, providers=providers)):
            pass
    assert (
        f"providers: qwen-oauth (qwen-oauth, base_url {qwen_url}), "
        "keycloak (rfc8628, issuer http://127.0.0.1:8080/realms/dev), "
        "github (rfc8628, device_authorization_endpoint https://github.com/login/device/code)"
    ) in messages(records, logging.INFO)


# --- on the real stderr of `qwen-serve run` ---------------------------------------------------------------------


@pytest.fixture
def run_env(qwen_home: Path, token: str) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("QWEN_SERVE_CONFIG", "QWEN_OAUTH_BASE_URL")}
    env.update(QWEN_HOME=str(qwen_home), QWEN_SERVER_TOKEN=token, ACME_SECRET=CLIENT_SECRET)
    yield env


async def test_qwen_serve_run_writes_the_providers_and_the_failure_on_stderr(
    run_env: dict[str, str], workspace: Path, tmp_path: Path, auth: dict[str, str]
) -> None:
    idp = PickyIdP()
    config_file = tmp_path / "serve.toml"
    with trio.fail_after(20):
        async with serve_idp(idp) as served:
            served_metadata(idp)
            # A secret sent for a client the IdP registers as public.
            config_file.write_text(
                '[providers.qwen-oauth]\nenabled = false\n\n[providers.acme]\nkind = "rfc8628"\n'
                f'issuer = "{served.url}"\nclient_id = "client-1"\nclient_secret_env = "ACME_SECRET"\n'
            )
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "serve", "run", "--port", "0", "--config", str(config_file)],
                cwd=workspace,
                env=run_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert process.stdout is not None and process.stderr is not None
            try:
                line = b""
                while not line.endswith(b"\n"):
                    line += await process.stdout.receive_some(1)
                url = line.decode().split(" ")[3]
                async with loopback_client(base_url=url, headers=auth) as http:
                    response = await http.post(FLOWS_PATH, json={"providerId": "acme"})
                process.send_signal(signal.SIGTERM)
                stderr = b""
                while chunk := await process.stderr.receive_some(65536):
                    stderr += chunk
                assert await process.wait() == 0
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    text = stderr.decode()
    assert response.json()["failure"] == "client_rejected"
    assert f"INFO serve.daemon: providers: acme (rfc8628, issuer {served.url})\n" in text
    expected = start_line(
        "client_rejected", f"HTTP 401 error=invalid_client from {host_of(served.url)}", oauth.HINT_CLIENT_CONFIDENTIAL
    )
    assert f"WARNING serve.registry: {expected}\n" in text
    assert CLIENT_SECRET not in text
    assert "IDP-FREE-TEXT" not in text
