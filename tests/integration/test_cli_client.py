"""The client commands of `qwen-serve` (`login`, `status`, `events`, `cancel`), run as real processes.

Each test runs a real daemon in-process (`start_daemon`) whose qwen-oauth talks to the fake IdP over real
HTTP, and `python -m serve ...` as a subprocess with a private QWEN_HOME and no proxies. Every exit code of
`login`, its `--json` lines, the QR code on a pseudo-terminal (and its absence on a pipe), the live
countdown, Ctrl-C, the attach case, and the one-line failures (refused connection, wrong token, not a
qwen-serve daemon, unknown provider). Every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast
from unittest.mock import ANY

import httpx
import pytest
import trio
from support.daemon import StartDaemon, loopback_client, port_of
from support.idp_server import serve_idp
from support.login import (
    FLOWS_PATH,
    STATUS_PATH,
    closed_port_url,
    generic_idp,
    generic_provider,
    login_config,
    oauth_error,
    pending_replies,
    qwen_daemon,
    qwen_idp,
    qwen_tokens,
    script_devices,
    token_requests,
    wait_until,
)

from serve import cli_client
from serve.cli import main
from serve.client import (
    AuthResult,
    DaemonError,
    DaemonHTTPError,
    DaemonUnreachable,
    DeviceFlowInfo,
    LoginHandle,
    ReceivedEvent,
)
from serve.config import Config, load_config
from serve.daemon import RunningDaemon

QWEN = "qwen-oauth"
QR_BLOCKS = ("█", "▀", "▄")
WHITE_ON_BLACK, RESET = "\x1b[97;40m", "\x1b[0m"
WAIT_S = 20  # a bound on any one process; each normally ends in well under a second
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A client's environment: its own QWEN_HOME (no token file), no token, URL or proxy from outside."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in PROXY_VARS}
    for name in ("QWEN_SERVER_TOKEN", "QWEN_SERVE_URL", "QWEN_SERVE_CONFIG"):
        env.pop(name, None)
    env["QWEN_HOME"] = str(tmp_path / "client-home")
    env["PYTHONUTF8"] = "1"  # the QR's block characters, whatever the locale
    return env


@dataclass
class Done:
    code: int
    out: str
    err: str

    @property
    def out_lines(self) -> list[str]:
        return self.out.splitlines()

    def json_lines(self) -> list[dict[str, Any]]:
        """Every stdout line, each of which must be one JSON object."""
        objects = []
        for line in self.out_lines:
            value = json.loads(line)
            assert isinstance(value, dict), line
            objects.append(value)
        return objects


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "serve", *args]


async def run_cli(args: Sequence[str], env: Mapping[str, str]) -> Done:
    with trio.fail_after(WAIT_S):
        done = await trio.run_process(
            cli(*args), env=dict(env), check=False, capture_stdout=True, capture_stderr=True, stdin=b""
        )
    return Done(done.returncode, done.stdout.decode(), done.stderr.decode())


def assert_one_line_failure(done: Done, code: int, text: str) -> None:
    assert done.code == code, done
    assert done.out == "", done
    assert "Traceback" not in done.err, done.err
    [line] = done.err.splitlines()
    assert line.startswith("qwen-serve: ") and text in line, line


class Lines:
    """Lines from a process's pipe, read as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream | None) -> None:
        assert stream is not None
        self.stream = stream
        self.buffer = b""
        self.seen: list[str] = []

    async def next(self) -> str:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(f"the stream ended; lines so far: {self.seen}, then {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        text = line.decode()
        self.seen.append(text)
        return text

    async def rest(self) -> str:
        data = self.buffer
        while chunk := await self.stream.receive_some(65536):
            data += chunk
        self.buffer = b""
        return data.decode()


@asynccontextmanager
async def cli_process(args: Sequence[str], env: Mapping[str, str]) -> AsyncIterator[trio.Process]:
    """A running `qwen-serve` client with piped stdout and stderr, killed if the test leaves it running."""
    process = await trio.lowlevel.open_process(
        cli(*args), env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5):
                await process.wait()


def api(daemon: RunningDaemon, token: str) -> httpx.AsyncClient:
    return loopback_client(base_url=daemon.url, headers={"Authorization": f"Bearer {token}"})


def login_args(daemon: RunningDaemon, *extra: str) -> list[str]:
    return ["login", "--daemon", daemon.url, *extra]


def with_token(env: Mapping[str, str], token: str) -> dict[str, str]:
    return {**env, "QWEN_SERVER_TOKEN": token}


# --- how a login ends: one exit code each ------------------------------------------------------------------


async def test_login_json_authorized_states_in_order_exit_0(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str, qwen_home: Path
) -> None:
    idp = qwen_idp(token_replies=[oauth_error("authorization_pending"), oauth_error("slow_down"), qwen_tokens()])
    script_devices(idp, interval=0.05)
    async with qwen_daemon(start_daemon, idp) as (served, daemon):
        done = await run_cli(login_args(daemon, "--json"), with_token(cli_env, token))
    assert done.code == 0, done
    assert done.err == ""
    started, throttled, ended = done.json_lines()
    flow_id = started["deviceFlowId"]
    assert started == {
        "event": "started",
        "deviceFlowId": flow_id,
        "providerId": QWEN,
        "status": "pending",
        "attached": False,
        "expiresAt": started["expiresAt"],
        "intervalMs": 50,
        "userCode": "USER-0001",
        "verificationUri": f"{served.url}/authorize",
        "verificationUriComplete": f"{served.url}/authorize?user_code=USER-0001&client=qwen-code",
    }
    assert throttled == {"event": "throttled", "deviceFlowId": flow_id, "providerId": QWEN, "intervalMs": 250}
    creds = json.loads((qwen_home / "oauth_creds.json").read_text())
    assert ended == {
        "event": "ended",
        "deviceFlowId": flow_id,
        "providerId": QWEN,
        "result": "authorized",
        "status": "authorized",
        "expiresAt": creds["expiry_date"],
        "exitCode": 0,
    }
    assert len(token_requests(idp)) == 3


async def test_login_human_authorized_prints_url_code_and_result_without_qr_on_a_pipe(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    idp = qwen_idp(token_replies=[oauth_error("authorization_pending"), qwen_tokens()])
    script_devices(idp, interval=0.05)
    async with qwen_daemon(start_daemon, idp) as (served, daemon):
        done = await run_cli(login_args(daemon, "--token", token), cli_env)
    assert done.code == 0, done
    assert done.out_lines[:5] == [
        f"Log in to {QWEN} on any device with a browser:",
        "",
        f"  open   {served.url}/authorize",
        "  enter  USER-0001",
        "",
    ]
    assert done.out_lines[5] == f"or open {served.url}/authorize?user_code=USER-0001&client=qwen-code"
    assert done.out_lines[-1].startswith(f"Logged in: the daemon holds {QWEN} credentials (access token valid until")
    assert not any(block in done.out for block in QR_BLOCKS), "no QR code on a pipe"
    assert "scan" not in done.out
    assert done.err == "", "no countdown when stderr is not a terminal, and nothing else"


@pytest.mark.parametrize(
    ("idp_error", "code", "result", "status", "line"),
    [
        ("access_denied", 3, "denied", "error", f"qwen-serve: login denied at {QWEN}"),
        ("expired_token", 4, "expired", "expired", "qwen-serve: login expired: the code was not approved in time"),
        ("invalid_grant", 5, "error", "error", "qwen-serve: login failed: invalid_grant"),
    ],
)
async def test_login_failures_have_their_exit_code_and_one_line(
    start_daemon: StartDaemon,
    cli_env: dict[str, str],
    token: str,
    idp_error: str,
    code: int,
    result: str,
    status: str,
    line: str,
) -> None:
    idp = qwen_idp(token_replies=[oauth_error(idp_error)])
    script_devices(idp, interval=0.05)
    async with qwen_daemon(start_daemon, idp) as (_, daemon):
        env = with_token(cli_env, token)
        human = await run_cli(login_args(daemon), env)
        idp.token_replies.append(oauth_error(idp_error))
        script_devices(idp, interval=0.05)
        machine = await run_cli(login_args(daemon, "--json"), env)
    assert human.code == code, human
    [err_line] = human.err.splitlines()
    assert err_line.startswith(line), err_line
    assert "USER-0001" in human.out

    assert machine.code == code, machine
    started, ended = machine.json_lines()
    assert started["event"] == "started"
    assert ended["event"] == "ended"
    assert (ended["result"], ended["status"], ended["exitCode"]) == (result, status, code)
    assert ended["errorKind"] == idp_error
    assert machine.err.splitlines() == [err_line], "the reason is on stderr under --json too"


async def test_login_cancelled_by_another_client_exits_6(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    script_devices(idp, interval=0.05)
    async with (
        qwen_daemon(start_daemon, idp) as (_, daemon),
        api(daemon, token) as http,
        cli_process(login_args(daemon, "--json"), with_token(cli_env, token)) as process,
    ):
        out, err = Lines(process.stdout), Lines(process.stderr)
        with trio.fail_after(WAIT_S):
            started = json.loads(await out.next())
            assert (await http.delete(f"{FLOWS_PATH}/{started['deviceFlowId']}")).status_code == 204
            ended = json.loads(await out.next())
            assert await out.rest() == ""
            assert await process.wait() == 6
            assert (await err.rest()).startswith("qwen-serve: login cancelled on the daemon")
    assert (ended["result"], ended["status"], ended["exitCode"]) == ("cancelled", "cancelled", 6)


async def test_login_timeout_cancels_the_flow_and_exits_7(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    script_devices(idp, interval=5)  # no poll tick in flight at the timeout's DELETE (see the Ctrl-C test)
    async with qwen_daemon(start_daemon, idp) as (_, daemon), api(daemon, token) as http:
        done = await run_cli(login_args(daemon, "--json", "--timeout", "0.5"), with_token(cli_env, token))
        assert done.code == 7, done
        started, ended = done.json_lines()
        assert (ended["result"], ended["status"], ended["exitCode"]) == ("timeout", "cancelled", 7)
        assert done.err == "qwen-serve: no approval within 0.5 s: the login was cancelled on the daemon\n"
        view = (await http.get(f"{FLOWS_PATH}/{started['deviceFlowId']}")).json()
        assert view["status"] == "cancelled"


async def test_ctrl_c_cancels_the_flow_on_the_daemon_and_exits_130(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    # No poll before the Ctrl-C: a DELETE during a poll tick leaves the flow `pending` until the tick ends
    # (an approval in that reply would win), and the CLI would then report `pending`, rightly.
    script_devices(idp, interval=5)
    async with qwen_daemon(start_daemon, idp) as (_, daemon), api(daemon, token) as http:
        async with cli_process(login_args(daemon, "--json"), with_token(cli_env, token)) as process:
            out, err = Lines(process.stdout), Lines(process.stderr)
            with trio.fail_after(WAIT_S):
                started = json.loads(await out.next())
                process.send_signal(signal.SIGINT)
                ended = json.loads(await out.next())
                assert await process.wait() == 130
                assert await err.rest() == "qwen-serve: interrupted: the login was cancelled on the daemon\n"
        view = (await http.get(f"{FLOWS_PATH}/{started['deviceFlowId']}")).json()
    assert view["status"] == "cancelled"
    assert (ended["result"], ended["status"], ended["exitCode"]) == ("interrupted", "cancelled", 130)


# --- a terminal: the QR code and the live countdown ---------------------------------------------------------


def read_pty(master: int) -> bytes:
    """Everything the child writes to the terminal, until its side is closed (Linux then says EIO)."""
    data = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return data
            raise
        if not chunk:
            return data
        data += chunk


async def test_on_a_terminal_the_qr_code_and_a_live_countdown_with_throttling(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    script_devices(idp, interval=0.05)
    async with qwen_daemon(start_daemon, idp) as (served, daemon), api(daemon, token) as http:
        master, slave = pty.openpty()
        try:
            process = await trio.lowlevel.open_process(
                cli(*login_args(daemon)),
                env={**with_token(cli_env, token), "TERM": "xterm"},
                stdin=subprocess.DEVNULL,
                stdout=slave,
                stderr=slave,
            )
        finally:
            os.close(slave)
        screen = b""
        try:
            with trio.fail_after(WAIT_S):
                async with trio.open_nursery() as nursery:

                    async def read_all() -> None:
                        nonlocal screen
                        screen = await trio.to_thread.run_sync(read_pty, master, abandon_on_cancel=True)

                    nursery.start_soon(read_all)
                    # Once the login follows the event stream, the IdP says slow_down; the countdown shows
                    # it at its next tick (each second).
                    await wait_until(lambda: daemon.services.bus.subscriber_count == 1)
                    polls = len(token_requests(idp))
                    idp.token_replies.insert(0, oauth_error("slow_down"))
                    await wait_until(lambda: len(token_requests(idp)) > polls)
                    await trio.sleep(1.2)
                    flow_id = (await http.get(STATUS_PATH)).json()["pendingDeviceFlows"][0]["deviceFlowId"]
                    assert (await http.delete(f"{FLOWS_PATH}/{flow_id}")).status_code == 204
                    assert await process.wait() == 6
        finally:
            if process.returncode is None:
                process.kill()
            os.close(master)
    text = screen.decode()
    assert f"{served.url}/authorize?user_code=USER-0001&client=qwen-code" in text
    assert "USER-0001" in text and "or scan this QR code:" in text
    # Each line of the code is set white on black (so a light terminal does not invert it).
    qr_lines = [
        line.removeprefix(WHITE_ON_BLACK).removesuffix(RESET)
        for line in text.split("\r\n")
        if line.startswith(WHITE_ON_BLACK) and line.endswith(RESET)
    ]
    assert len(qr_lines) >= 15, text  # a version-2+ code, two modules a line
    assert all(set(line) <= set("█▀▄ ") for line in qr_lines), qr_lines
    assert len({len(line) for line in qr_lines}) == 1, "a square of equal lines"
    assert any("▀" in line or "▄" in line for line in qr_lines)
    assert re.search(r"\r\x1b\[KWaiting for approval: \d+:\d\d left", text), text
    assert "(the provider asked to slow down: polling every 0.25 s)" in text, text
    assert text.rstrip().endswith(
        "qwen-serve: login cancelled on the daemon (by another client, or the daemon stopped)"
    ), text[-300:]


async def test_no_qr_on_a_terminal_with_no_qr(start_daemon: StartDaemon, cli_env: dict[str, str], token: str) -> None:
    idp = qwen_idp(token_replies=[oauth_error("access_denied")])
    script_devices(idp, interval=0.05)
    async with qwen_daemon(start_daemon, idp) as (_, daemon):
        master, slave = pty.openpty()
        try:
            process = await trio.lowlevel.open_process(
                cli(*login_args(daemon, "--no-qr")),
                env=with_token(cli_env, token),
                stdin=subprocess.DEVNULL,
                stdout=slave,
                stderr=subprocess.DEVNULL,
            )
        finally:
            os.close(slave)
        try:
            with trio.fail_after(WAIT_S):
                screen = await trio.to_thread.run_sync(read_pty, master, abandon_on_cancel=True)
                assert await process.wait() == 3
        finally:
            if process.returncode is None:
                process.kill()
            os.close(master)
    text = screen.decode()
    assert "USER-0001" in text
    assert not any(block in text for block in QR_BLOCKS)


# --- joining a pending login ------------------------------------------------------------------------------------


async def test_a_second_login_attaches_and_shows_the_same_code_to_the_same_client(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    script_devices(idp, interval=0.05)
    env = with_token(cli_env, token)
    async with (
        qwen_daemon(start_daemon, idp) as (_, daemon),
        api(daemon, token) as http,
        cli_process(login_args(daemon, "--json", "--client-id", "laptop"), env) as first,
    ):
        with trio.fail_after(WAIT_S):
            started = json.loads(await Lines(first.stdout).next())
            assert started["attached"] is False
            flow_id = started["deviceFlowId"]
            async with cli_process(login_args(daemon, "--client-id", "laptop"), env) as second:
                # The same client id joins the pending login and is shown its code.
                out2 = Lines(second.stdout)
                joined = [await out2.next() for _ in range(4)]
                assert joined[2:] == [f"  open   {started['verificationUri']}", "  enter  USER-0001"], joined
                assert (await Lines(second.stderr).next()) == (
                    f"qwen-serve: a login for {QWEN} was already pending: joined it ({flow_id})"
                )
                # Another client id joins too, without the code; its --timeout does not cancel another's login.
                other = await run_cli(login_args(daemon, "--json", "--client-id", "phone", "--timeout", "0.3"), env)
                assert other.code == 7, other
                other_started, other_ended = other.json_lines()
                assert (other_started["deviceFlowId"], other_started["attached"]) == (flow_id, True)
                assert "userCode" not in other_started and "verificationUri" not in other_started
                assert (other_ended["result"], other_ended["status"]) == ("timeout", "pending")
                assert other.err == (
                    "qwen-serve: no approval within 0.3 s: stopped waiting; "
                    "the login started by another client is still pending\n"
                )
                assert (await http.get(f"{FLOWS_PATH}/{flow_id}")).json()["status"] == "pending"
                # The daemon started one flow only; cancelling it ends both waiting logins.
                assert len(idp.issued) == 1
                assert (await http.delete(f"{FLOWS_PATH}/{flow_id}")).status_code == 204
                assert await first.wait() == 6
                assert await second.wait() == 6


# --- failures before a login: one line, no traceback ---------------------------------------------------------


async def test_a_refused_connection_is_one_line_exit_1(cli_env: dict[str, str], token: str) -> None:
    url = closed_port_url()
    env = with_token(cli_env, token)
    for args in (["login", "--daemon", url], ["status", "--daemon", url], ["events", "--daemon", url]):
        done = await run_cli(args, env)
        assert_one_line_failure(done, 1, f"cannot reach the daemon at {url}")
    done = await run_cli(["login", "--json", "--daemon", url], env)
    assert_one_line_failure(done, 1, "cannot reach the daemon")


async def test_a_wrong_or_missing_token_is_one_line_exit_1(daemon: RunningDaemon, cli_env: dict[str, str]) -> None:
    for args in (["login"], ["status"], ["events"], ["cancel", "some-id"]):
        wrong = await run_cli([*args, "--daemon", daemon.url, "--token", "not-the-token"], cli_env)
        assert_one_line_failure(wrong, 1, f"the daemon at {daemon.url} refused the bearer token from --token")
        assert "not-the-token" not in wrong.err
    from_env = await run_cli(["status", "--daemon", daemon.url], with_token(cli_env, "also-wrong"))
    assert_one_line_failure(from_env, 1, "refused the bearer token from $QWEN_SERVER_TOKEN")
    missing = await run_cli(["status", "--daemon", daemon.url], cli_env)
    assert_one_line_failure(missing, 1, "wants a bearer token: pass --token or set $QWEN_SERVER_TOKEN")


async def test_not_a_qwen_serve_daemon_is_one_line_exit_1(cli_env: dict[str, str], token: str) -> None:
    async with serve_idp(qwen_idp()) as served:  # an HTTP server answering 404 text/plain to everything here
        env = with_token(cli_env, token)
        for args in (["status"], ["login", "--provider", QWEN], ["login"], ["events"]):
            done = await run_cli([*args, "--daemon", served.url], env)
            assert_one_line_failure(done, 1, f"{served.url} does not answer as a qwen-serve daemon does")


async def test_an_unknown_provider_is_exit_2_listing_the_supported_ones(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    async with qwen_daemon(start_daemon, qwen_idp()) as (_, daemon):
        done = await run_cli(login_args(daemon, "--provider", "nope"), with_token(cli_env, token))
    assert_one_line_failure(done, 2, f"unknown provider nope; the daemon supports: {QWEN}")


async def test_the_default_provider_is_the_only_one_or_qwen_oauth_else_exit_2(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    acme, beta = generic_idp(token_replies=[oauth_error("authorization_pending")]), generic_idp()
    script_devices(acme, interval=0.05)
    env = with_token(cli_env, token)
    async with serve_idp(acme), serve_idp(beta):
        no_qwen = {"enabled": False}
        only_acme = {"qwen-oauth": no_qwen, "acme": generic_provider(acme)}
        async with qwen_daemon(start_daemon, qwen_idp(), providers=only_acme) as (_, daemon):
            done = await run_cli(login_args(daemon, "--json"), env)
        assert done.code == 0, done
        assert [line["providerId"] for line in done.json_lines()] == ["acme", "acme"]

        qwen = qwen_idp()
        script_devices(qwen, interval=0.05)
        async with qwen_daemon(start_daemon, qwen, providers={"acme": generic_provider(acme)}) as (_, daemon):
            done = await run_cli(login_args(daemon, "--json"), env)
        assert done.code == 0, done
        assert [line["providerId"] for line in done.json_lines()] == [QWEN, QWEN]

        two = {**only_acme, "beta": generic_provider(beta)}
        async with qwen_daemon(start_daemon, qwen_idp(), providers=two) as (_, daemon):
            done = await run_cli(login_args(daemon), env)
        assert_one_line_failure(done, 2, "pick one with --provider: acme, beta")
        assert beta.requests == []


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWEN_SERVE_URL", raising=False)
    assert main(["login", "--timeout", "0"]) == 2
    assert "positive number of seconds" in capsys.readouterr().err
    assert main(["events", "--since", "-1"]) == 2
    capsys.readouterr()
    for url in ("ftp://127.0.0.1:4170", "127.0.0.1:4170", "http://user:pw@127.0.0.1:4170", "http://127.0.0.1:0"):
        assert main(["status", "--daemon", url]) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("qwen-serve: --daemon: ") and "pw" not in line
    monkeypatch.setenv("QWEN_SERVE_URL", "nope")
    assert main(["status"]) == 2
    assert capsys.readouterr().err.startswith("qwen-serve: $QWEN_SERVE_URL: expected an http(s) URL")
    monkeypatch.delenv("QWEN_SERVE_URL")
    assert main(["login", "--token", " "]) == 2
    assert capsys.readouterr().err == "qwen-serve: --token: must not be empty\n"


async def test_a_malformed_client_id_is_exit_2(daemon: RunningDaemon, cli_env: dict[str, str], token: str) -> None:
    done = await run_cli(
        ["login", "--daemon", daemon.url, "--provider", QWEN, "--client-id", "bad id"], with_token(cli_env, token)
    )
    assert_one_line_failure(done, 2, "--client-id: ")


# --- finding the daemon and its token ---------------------------------------------------------------------------


async def test_url_from_env_token_from_the_daemons_file_and_proxies_bypassed_for_loopback(
    daemon: RunningDaemon, cli_env: dict[str, str], token: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "client-home" / "serve" / "token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    proxy = closed_port_url()  # were the proxy used, every request would be refused
    env = {**cli_env, "QWEN_SERVE_URL": daemon.url, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "ALL_PROXY": proxy}
    done = await run_cli(["status", "--json"], env)
    assert done.code == 0, done
    assert json.loads(done.out)["supportedDeviceFlowProviders"] == [QWEN]
    # The flag beats the file.
    wrong = await run_cli(["status", "--token", "nope"], env)
    assert_one_line_failure(wrong, 1, "refused the bearer token from --token")


# --- status, events, cancel -----------------------------------------------------------------------------------


async def test_status_table_and_json(start_daemon: StartDaemon, cli_env: dict[str, str], token: str) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    script_devices(idp, interval=0.05)
    env = with_token(cli_env, token)
    async with qwen_daemon(start_daemon, idp) as (_, daemon), api(daemon, token) as http:
        before = await run_cli(["status", "--daemon", daemon.url], env)
        flow_id = (await http.post(FLOWS_PATH, json={"providerId": QWEN})).json()["deviceFlowId"]
        table = await run_cli(["status", "--daemon", daemon.url], env)
        machine = await run_cli(["status", "--daemon", daemon.url, "--json"], env)
        wire = (await http.get(STATUS_PATH)).json()
    assert before.code == 0 and before.err == "", before
    assert re.match(
        r"^daemon workspace: .+\n\nPROVIDER +STATUS +AUTH STATE +ACCOUNT +TOKEN EXPIRES +UPDATED\n", before.out
    )
    assert re.search(rf"^{QWEN} +not_started +unauthenticated +- +- +-$", before.out, re.M), before.out
    assert "no login pending" in before.out
    assert before.out_lines[-1] == f"providers this daemon can log in to: {QWEN}"

    assert table.code == 0, table
    assert re.search(r"^PENDING LOGIN +PROVIDER +CODE EXPIRES$", table.out, re.M), table.out
    assert re.search(rf"^{flow_id} +{QWEN} +\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \(in (9|10)m\)$", table.out, re.M), (
        table.out
    )

    assert machine.code == 0 and machine.err == "", machine
    [line] = machine.out_lines
    shown = json.loads(line)
    assert shown["workspaceCwd"] == wire["workspaceCwd"]
    assert shown["pendingDeviceFlows"] == wire["pendingDeviceFlows"]
    assert shown["supportedDeviceFlowProviders"] == wire["supportedDeviceFlowProviders"]
    assert shown["providers"] == [{k: v for k, v in cell.items() if k != "kind"} for cell in wire["providers"]]


async def test_status_shows_an_authorized_provider(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    idp = qwen_idp()
    script_devices(idp, interval=0.05)
    env = with_token(cli_env, token)
    async with qwen_daemon(start_daemon, idp) as (_, daemon):
        assert (await run_cli(login_args(daemon, "--json"), env)).code == 0
        done = await run_cli(["status", "--daemon", daemon.url], env)
    assert done.code == 0, done
    assert re.search(rf"^{QWEN} +ok +authenticated +- +\S+ \S+ \(in (59m|1h00m)\) +\S+ \S+$", done.out, re.M), done.out


async def test_events_json_prints_each_event_as_it_happens_until_sigint_exit_0(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    script_devices(idp, interval=0.05, count=2)
    env = with_token(cli_env, token)
    async with qwen_daemon(start_daemon, idp) as (_, daemon), api(daemon, token) as http:
        async with cli_process(["events", "--json", "--daemon", daemon.url, "--client-id", "watcher"], env) as process:
            out, err = Lines(process.stdout), Lines(process.stderr)
            with trio.fail_after(WAIT_S):
                note = await err.next()
                assert note == f"qwen-serve: following the events of {daemon.url} (newest event id 0); Ctrl-C stops"
                started = (
                    await http.post(FLOWS_PATH, json={"providerId": QWEN}, headers={"X-Qwen-Client-Id": "api"})
                ).json()
                first = json.loads(await out.next())  # printed while the process runs on
                assert process.returncode is None
                await http.delete(f"{FLOWS_PATH}/{started['deviceFlowId']}")
                second = json.loads(await out.next())
                process.send_signal(signal.SIGINT)
                assert await process.wait() == 0
                assert await out.rest() == ""
                assert await err.rest() == ""
        # Asked to resume after an id the daemon never had: a reset line says so.
        reset_json = await run_cli_until_lines(["events", "--json", "--since", "99", "--daemon", daemon.url], env, 1)
        reset_text = await run_cli_until_lines(["events", "--since", "99", "--daemon", daemon.url], env, 1)
        # Replayed from the ring, in the readable form.
        replay = await run_cli_until_lines(["events", "--since", "0", "--daemon", daemon.url], env, 2)
    flow_id = started["deviceFlowId"]
    assert json.loads(reset_json[0]) == {"v": 1, "type": "reset", "data": {"lastEventId": 2, "epoch": ANY}}
    assert reset_text == ["reset: the daemon could not replay the events missed (now at id 2)"]
    assert first["type"] == "auth_device_flow_started" and first["id"] == 1 and first["v"] == 1
    assert first["data"] == {"deviceFlowId": flow_id, "providerId": QWEN, "expiresAt": started["expiresAt"]}
    assert first["originatorClientId"] == "api" and isinstance(first["_meta"]["serverTimestamp"], int)
    assert (second["id"], second["type"], second["data"]) == (
        2,
        "auth_device_flow_cancelled",
        {"deviceFlowId": flow_id},
    )
    assert re.fullmatch(
        rf"#1 \d\d:\d\d:\d\d auth_device_flow_started deviceFlowId={flow_id} providerId={QWEN} "
        r"expiresAt=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d by=api",
        replay[0],
    ), replay[0]
    assert re.fullmatch(rf"#2 \d\d:\d\d:\d\d auth_device_flow_cancelled deviceFlowId={flow_id}", replay[1]), replay[1]


async def test_events_end_quietly_when_the_reader_closes_stdout(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    script_devices(idp, interval=0.05)
    async with (
        qwen_daemon(start_daemon, idp) as (_, daemon),
        api(daemon, token) as http,
        cli_process(["events", "--daemon", daemon.url], with_token(cli_env, token)) as process,
    ):
        out, err = Lines(process.stdout), Lines(process.stderr)
        assert process.stdout is not None
        with trio.fail_after(WAIT_S):
            await err.next()  # following
            flow_id = (await http.post(FLOWS_PATH, json={"providerId": QWEN})).json()["deviceFlowId"]
            assert (await out.next()).startswith("#1 ")
            await process.stdout.aclose()  # as `qwen-serve events | head -1` does
            await http.delete(f"{FLOWS_PATH}/{flow_id}")
            assert await process.wait() == 0
            assert await err.rest() == ""


async def run_cli_until_lines(args: Sequence[str], env: Mapping[str, str], count: int) -> list[str]:
    """Run a command that runs until interrupted: read `count` stdout lines, then SIGTERM it (exit 0)."""
    async with cli_process(args, env) as process:
        out = Lines(process.stdout)
        with trio.fail_after(WAIT_S):
            lines = [await out.next() for _ in range(count)]
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    return lines


async def test_cancel_by_id(start_daemon: StartDaemon, cli_env: dict[str, str], token: str) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    script_devices(idp, interval=0.05)
    env = with_token(cli_env, token)
    async with qwen_daemon(start_daemon, idp) as (_, daemon), api(daemon, token) as http:
        flow_id = (await http.post(FLOWS_PATH, json={"providerId": QWEN})).json()["deviceFlowId"]
        done = await run_cli(["cancel", flow_id, "--daemon", daemon.url], env)
        assert (done.code, done.out, done.err) == (0, f"cancelled {flow_id} ({QWEN})\n", "")
        assert (await http.get(f"{FLOWS_PATH}/{flow_id}")).json()["status"] == "cancelled"
        again = await run_cli(["cancel", flow_id, "--daemon", daemon.url], env)
        assert (again.code, again.out) == (0, f"{flow_id} ({QWEN}) had already ended: cancelled\n")
        unknown = await run_cli(["cancel", "00000000-0000-0000-0000-000000000000", "--daemon", daemon.url], env)
        assert_one_line_failure(unknown, 1, "the daemon knows no such login")


# --- what the CLI loads ------------------------------------------------------------------------------------------


IMPORT_CHECK = """
import sys
import serve.cli
heavy = ("quart", "quart_trio", "hypercorn", "serve.daemon", "serve.registry", "serve.http", "serve.client",
    "httpx", "trio_websocket", "segno")
print(",".join(name for name in heavy if name in sys.modules))
"""


def test_importing_the_cli_loads_no_server_module_and_no_client_library() -> None:
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "", f"loaded: {done.stdout.strip()}"


def test_the_default_url_is_the_clients() -> None:
    from serve.client import DEFAULT_DAEMON_URL

    assert cli_client.DEFAULT_URL == DEFAULT_DAEMON_URL


# --- a daemon that goes away, or stops answering, during a login ------------------------------------------------


@dataclass
class Proxy:
    """A TCP proxy in front of a daemon: `cut()` closes everything (connections are refused from then on);
    `freeze()` drops the open connections and holds new ones without a byte of answer."""

    url: str
    listener_scope: trio.CancelScope
    dropped: trio.Event
    frozen: bool = False
    forwarding: int = 0  # connections being forwarded now
    answers: list[bytes] = field(default_factory=list)  # what the daemon sent back, chunk by chunk

    async def wait_dropped(self) -> None:
        """Until no connection is forwarded any more (so nothing already sent can still get through)."""
        with trio.fail_after(5):
            await wait_until(lambda: self.forwarding == 0)

    def cut(self) -> None:
        self.dropped.set()
        self.listener_scope.cancel()

    def freeze(self) -> None:
        self.frozen = True
        self.dropped.set()


@asynccontextmanager
async def tcp_proxy(target_url: str, *, hold_streams: bool = False) -> AsyncIterator[Proxy]:
    target_port = port_of(target_url)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    proxy = Proxy(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", trio.CancelScope(), trio.Event())

    async def pump(
        source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope, *, answers: bool = False
    ) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while data := await source.receive_some(65536):
                await sink.send_all(data)
                if answers:
                    proxy.answers.append(data)
        done.cancel()

    async def handle(client: trio.SocketStream) -> None:
        async with client:
            if proxy.frozen:
                await trio.sleep_forever()
            if proxy.dropped.is_set():  # cut, and accepted before the listener closed: close it unanswered
                return
            first = b""
            if hold_streams:  # as a reverse proxy that does not pass WebSocket upgrades, and never answers them
                with contextlib.suppress(trio.BrokenResourceError, OSError):
                    first = await client.receive_some(65536)
                if first.startswith(b"GET /workspace/auth/events"):
                    await trio.sleep_forever()
            proxy.forwarding += 1
            try:
                async with await trio.open_tcp_stream("127.0.0.1", target_port) as upstream, trio.open_nursery() as n:
                    if first:
                        await upstream.send_all(first)
                    n.start_soon(pump, client, upstream, n.cancel_scope)
                    n.start_soon(partial(pump, upstream, client, n.cancel_scope, answers=True))
                    await proxy.dropped.wait()
                    n.cancel_scope.cancel()
            finally:
                proxy.forwarding -= 1

    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            with proxy.listener_scope:
                await trio.serve_listeners(handle, listeners)

        nursery.start_soon(serve)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


def proxied_config(idp_url: str, **device_flow: Any) -> Config:
    """A daemon reached through `tcp_proxy` (so another Host port), that accepts codes expiring within 1 s."""
    return load_config(
        overrides={
            "server": {"port": 0, "graceful_timeout_s": 0.5, "extra_hosts": ["127.0.0.1"]},
            "device_flow": {"min_interval_s": 0.05, "min_expires_in_s": 0.3, **device_flow},
            "providers": {"qwen-oauth": {"base_url": idp_url}},
        }
    )


@asynccontextmanager
async def proxied_login(
    start_daemon: StartDaemon, env: Mapping[str, str], *args: str, expires_in: float = 600
) -> AsyncIterator[tuple[Proxy, trio.Process, Lines, Lines, dict[str, Any]]]:
    """A pending login through a proxy, past its `started` line."""
    idp = qwen_idp(token_replies=pending_replies())
    script_devices(idp, interval=0.05, expires_in=expires_in)
    async with (
        serve_idp(idp) as served,
        start_daemon(proxied_config(served.url)) as daemon,
        tcp_proxy(daemon.url) as proxy,
        cli_process(["login", "--json", "--provider", QWEN, "--daemon", proxy.url, *args], env) as process,
    ):
        out, err = Lines(process.stdout), Lines(process.stderr)
        with trio.fail_after(WAIT_S):
            started = json.loads(await out.next())
            # Following the event stream, and past the check of the flow that its hello triggers (a cut
            # before that answer would fail the check, and the login with it, at once): 201 to the POST,
            # 101 to the WebSocket handshake, 200 to the GET.
            await wait_until(lambda: any(chunk.startswith(b"HTTP/1.1 200 ") for chunk in proxy.answers))
        yield proxy, process, out, err, started


async def test_a_daemon_gone_mid_login_is_exit_1_soon_after_the_codes_expiry(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    env = with_token(cli_env, token)
    async with proxied_login(start_daemon, env, expires_in=1) as (proxy, process, out, err, started):
        proxy.cut()  # the event stream drops and is retried in vain; nothing says the login ended
        await proxy.wait_dropped()
        with trio.fail_after(WAIT_S):
            ended = json.loads(await out.next())
            assert await process.wait() == 1
            line = await err.rest()
    assert (ended["result"], ended["status"], ended["exitCode"]) == ("failed", None, 1)
    assert ended["deviceFlowId"] == started["deviceFlowId"]
    assert line.startswith(f"qwen-serve: cannot reach the daemon at {proxy.url}: "), line
    assert line.count("\n") == 1 and "Traceback" not in line


@pytest.mark.parametrize(
    ("grace_s", "code", "result", "error_kind"),
    [(300, 4, "expired", "expired_token"), (0.5, 5, "error", "not_found_or_evicted")],
)
async def test_a_stream_that_never_opens_is_made_up_for_by_rest_after_the_expiry(
    start_daemon: StartDaemon,
    cli_env: dict[str, str],
    token: str,
    grace_s: float,
    code: int,
    result: str,
    error_kind: str,
) -> None:
    idp = qwen_idp(token_replies=pending_replies())
    script_devices(idp, interval=0.05, expires_in=1)
    async with (
        serve_idp(idp) as served,
        start_daemon(proxied_config(served.url, terminal_grace_s=grace_s)) as daemon,
        tcp_proxy(daemon.url, hold_streams=True) as proxy,
    ):
        done = await run_cli(["login", "--json", "--daemon", proxy.url], with_token(cli_env, token))
    assert done.code == code, done
    _, ended = done.json_lines()
    assert (ended["result"], ended.get("errorKind"), ended["exitCode"]) == (result, error_kind, code)


async def test_ctrl_c_when_the_daemon_is_gone_says_the_cancel_failed(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    env = with_token(cli_env, token)
    async with proxied_login(start_daemon, env) as (proxy, process, out, err, _):
        proxy.cut()
        await proxy.wait_dropped()
        process.send_signal(signal.SIGINT)
        with trio.fail_after(WAIT_S):
            ended = json.loads(await out.next())
            line = await err.rest()
            assert await process.wait() == 130, (ended, line)
    assert (ended["result"], ended["status"], ended["exitCode"]) == ("interrupted", None, 130)
    assert line.startswith(
        f"qwen-serve: interrupted; cancelling the login on the daemon failed: cannot reach the daemon at {proxy.url}"
    ), line


async def test_a_second_ctrl_c_exits_at_once_while_the_cancel_hangs(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    env = with_token(cli_env, token)
    async with proxied_login(start_daemon, env) as (proxy, process, out, _, _):
        proxy.freeze()  # the cancel's DELETE gets no answer
        await proxy.wait_dropped()
        process.send_signal(signal.SIGINT)
        await trio.sleep(0.3)
        asked_again = trio.current_time()
        process.send_signal(signal.SIGINT)
        with trio.fail_after(WAIT_S):
            assert await process.wait() == 130
        assert trio.current_time() - asked_again < cli_client.CANCEL_WAIT_S
        assert await out.rest() == "", "no end line: the cancel was left unconfirmed"


# --- the pieces, in-process ----------------------------------------------------------------------------------------


def handle_of(**info: Any) -> LoginHandle:
    fields: dict[str, Any] = {"device_flow_id": "f-1", "provider_id": QWEN, "status": "pending", **info}
    return LoginHandle(cast(Any, None), DeviceFlowInfo(**fields))


def test_login_output_without_a_verification_uri_or_an_expiry() -> None:
    out, err = io.StringIO(), io.StringIO()
    output = cli_client.LoginOutput(json_mode=False, qr=False, live=True, out=out, err=err)
    output.started(handle_of(user_code="ABCD-EFGH"))
    assert out.getvalue() == f"Log in to {QWEN} on any device with a browser:\n\n  code   ABCD-EFGH\n\n"
    assert output.live_line(None, throttled=False) == "Waiting for approval"
    assert output.live_line(0, throttled=False) == "Waiting for approval: expiring"


def test_login_output_of_another_clients_login_names_it_on_stderr() -> None:
    out, err = io.StringIO(), io.StringIO()
    output = cli_client.LoginOutput(json_mode=False, qr=True, live=False, out=out, err=err)
    output.started(handle_of(attached=True, expires_at_ms=1, interval_ms=5000))
    assert out.getvalue() == ""
    assert err.getvalue().startswith(f"qwen-serve: a login for {QWEN} is already pending (f-1), started by another")
    assert "`qwen-serve cancel f-1` cancels it" in err.getvalue()


def test_untrusted_text_is_shown_without_control_characters() -> None:
    out, err = io.StringIO(), io.StringIO()
    output = cli_client.LoginOutput(json_mode=False, qr=False, live=False, out=out, err=err)
    output.started(handle_of(user_code="AB\x1b[2JCD", verification_uri="https://idp.example/\u202edevice"))
    assert "\x1b" not in out.getvalue() and "\u202e" not in out.getvalue()
    assert "AB?[2JCD" in out.getvalue()


def test_draw_qr_falls_back_to_colour_cells_and_skips_colour_on_a_dumb_terminal() -> None:
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    cli_client.draw_qr("https://idp.example/device", ascii_out, term="xterm")
    ascii_out.flush()
    cells = ascii_out.buffer.getvalue().decode("ascii")
    assert "\x1b[" in cells and "█" not in cells
    dumb = io.StringIO()
    cli_client.draw_qr("https://idp.example/device", dumb, term="dumb")
    assert "\x1b" not in dumb.getvalue() and "▀" in dumb.getvalue()


def test_outcome_lines() -> None:
    authorized = cli_client.outcome_of(AuthResult("f", QWEN, "authorized", account_alias="al***", expires_at_ms=None))
    assert authorized == ("authorized", 0, f"Logged in: the daemon holds {QWEN} credentials (account al***).")
    evicted = cli_client.outcome_of(AuthResult("f", QWEN, "error", error_kind="not_found_or_evicted", hint="gone"))
    assert evicted == ("error", 5, "login failed: not_found_or_evicted (gone)")
    newer = cli_client.outcome_of(AuthResult("f", QWEN, "paused"))
    assert newer == ("error", 5, "login failed: paused")


def test_describe_error_lines() -> None:
    conn = cli_client.Connection("http://127.0.0.1:4170", "t", "--token", None)
    url = conn.url
    assert cli_client.describe_error(DaemonUnreachable(url, "no answer in time"), conn) == (
        1,
        f"the daemon at {url} did not answer in time",
    )
    no_token = DaemonHTTPError(401, "token_required", "Token required", {})
    assert cli_client.describe_error(no_token, conn)[1].endswith(
        "runs without a bearer token (--no-token): it cannot log in"
    )
    busy = DaemonHTTPError(409, "too_many_active_flows", "too many active device flows", {})
    assert cli_client.describe_error(busy, conn) == (
        1,
        f"the daemon at {url} answered 409 too_many_active_flows: too many active device flows",
    )
    assert cli_client.describe_error(DaemonHTTPError(403, None, "Invalid Host header", None), conn) == (
        1,
        f"the daemon at {url} answered 403: Invalid Host header",
    )
    assert cli_client.describe_error(DaemonError("odd\nthing"), conn) == (1, "odd?thing")


def test_times_and_event_lines() -> None:
    now = 1_800_000_000_000
    assert cli_client._when(now + 30_000, now).endswith("(in 30s)")
    assert cli_client._when(now - 90_000, now).endswith("(1m ago)")
    assert cli_client._when(now + 3 * 86400_000, now).endswith("(in 3d)")
    assert cli_client._when(None, now) == "-"
    assert cli_client.format_duration(3725) == "1:02:05"
    event = ReceivedEvent(7, "auth_device_flow_throttled", {"deviceFlowId": "f", "intervalMs": 7000, "x": [1]})
    assert cli_client.event_text(event) == "#7 - auth_device_flow_throttled deviceFlowId=f intervalMs=7000 x=[1]"
    assert cli_client.event_json(event) == {"id": 7, "v": 1, "type": event.type, "data": dict(event.data)}


def test_more_usage_errors_and_an_early_ctrl_c(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QWEN_SERVE_URL", raising=False)
    for args, line in [
        (["login", "--timeout", "soon"], "expected seconds, got 'soon'"),
        (["events", "--since", "x"], "expected an event id (0 or more), got 'x'"),
        (["login", "--client-id", ""], "qwen-serve: --client-id: must not be empty"),
        (["status", "--daemon", "http://127.0.0.1:4170/?a=b"], "must not carry a query or a fragment"),
        (["status", "--daemon", "http://127.0.0.1:99999"], "(bad port)"),
        (["status", "--daemon", "http://dæmon:4170"], "expected a URL such as"),
    ]:
        assert main(args) == 2, args
        assert line in capsys.readouterr().err, args

    async def interrupted(conn: cli_client.Connection, args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    run = cli_client._run_async(interrupted)
    handler = signal.getsignal(signal.SIGINT)
    try:
        assert run(argparse.Namespace(daemon=None, token=None, client_id=None), {}) == 130
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN, "ignored from the end of the command on"
    finally:
        signal.signal(signal.SIGINT, handler)


async def test_stop_waiting_before_any_login_started(capsys: pytest.CaptureFixture[str]) -> None:
    conn = cli_client.Connection("http://127.0.0.1:4170", None, None, None)
    output = cli_client.LoginOutput(json_mode=False, qr=False, live=False, out=io.StringIO(), err=io.StringIO())
    state = cli_client._LoginState()
    code = await cli_client._stop_waiting(cast(Any, None), conn, output, state, interrupted=True, timeout_s=None)
    assert code == 130
    assert capsys.readouterr().err == "qwen-serve: interrupted before a login started\n"


async def test_a_failed_start_shows_the_daemons_hint(
    start_daemon: StartDaemon, cli_env: dict[str, str], token: str
) -> None:
    async with start_daemon(login_config(closed_port_url())) as daemon:
        done = await run_cli(login_args(daemon), with_token(cli_env, token))
    assert_one_line_failure(done, cli_client.EXIT_FAILED, "answered 502 upstream_error: ")
    assert "the identity provider could not be reached" in done.err and "the daemon's log has the details" in done.err
