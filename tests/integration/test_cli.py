"""`qwen-serve run` (SPEC §7): the listening line, signals, exit codes, and a token that is never printed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from support.daemon import loopback_client

from serve import __version__
from serve.cli import main

LISTENING = re.compile(r"^qwen-serve listening on (http://127\.0\.0\.1:(\d+)) \(workspace=(.+)\)\n$")


@pytest.fixture
def cli_env(qwen_home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of a `qwen-serve` process: a private QWEN_HOME, no token or config from outside."""
    monkeypatch.setenv("QWEN_HOME", str(qwen_home))
    monkeypatch.delenv("QWEN_SERVER_TOKEN", raising=False)
    monkeypatch.delenv("QWEN_SERVE_CONFIG", raising=False)
    return dict(os.environ)


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        line += chunk
    return line


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_run_prints_the_listening_line_serves_and_exits_0_on_a_signal(
    cli_env: dict[str, str], workspace: Path, qwen_home: Path, signum: signal.Signals
) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "serve", "run", "--port", "0"],
        cwd=workspace,
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    resolved_workspace = str(await trio.Path(workspace).resolve())
    try:
        with trio.fail_after(20):
            line = (await read_line(process.stdout)).decode()
        match = LISTENING.match(line)
        assert match, line
        url, _, shown_workspace = match.groups()
        assert shown_workspace == resolved_workspace

        token = (qwen_home / "serve" / "token").read_text().strip()
        async with loopback_client(base_url=url) as client:
            with trio.fail_after(5):
                assert (await client.get("/health")).json() == {"status": "ok"}
                assert (await client.get("/capabilities")).status_code == 401
                capabilities = await client.get("/capabilities", headers={"Authorization": f"Bearer {token}"})
                assert capabilities.json()["workspaceCwd"] == resolved_workspace

        process.send_signal(signum)
        started = trio.current_time()
        with trio.fail_after(5):
            rest_of_stdout = await read_all(process.stdout)
            stderr = (await read_all(process.stderr)).decode()
            returncode = await process.wait()
        took = trio.current_time() - started
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert returncode == 0, stderr
    assert took < 1.0, f"exit took {took:.2f} s"
    assert rest_of_stdout == b""  # exactly one line on stdout
    assert str(qwen_home / "serve" / "token") in stderr
    assert token not in stderr
    assert token not in line


def test_a_port_in_use_is_one_line_and_exit_1(
    cli_env: dict[str, str], workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["run", "--port", str(port), "--workspace", str(workspace), "--log-level", "error"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.splitlines()[-1] == f"qwen-serve: cannot listen on 127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        ("[server]\nnope = 1\n", "qwen-serve: config error: server.nope: unknown key"),
        (
            '[server]\nport = "x"\n',
            "qwen-serve: config error: server.port: expected an integer from 0 to 65535, got 'x'",
        ),
    ],
)
def test_a_config_error_is_one_line_and_exit_2(
    cli_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, line: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert main(["run", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", line + "\n")


def test_qwen_serve_config_names_the_file(
    cli_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[events]\nring_size = 0\n")
    monkeypatch.setenv("QWEN_SERVE_CONFIG", str(path))
    assert main(["run"]) == 2
    assert capsys.readouterr().err.startswith("qwen-serve: config error: events.ring_size: ")


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--no-token", "--host", "0.0.0.0"], "server.host"),
        (["--workspace", "/nonexistent/dir"], "server.workspace"),
        (["--port", "-1"], "server.port"),
    ],
)
def test_start_up_refusals_exit_2(
    cli_env: dict[str, str], capsys: pytest.CaptureFixture[str], argv: list[str], key: str
) -> None:
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qwen-serve: config error: {key}: ")
    assert len(err.splitlines()) == 1


def test_a_token_file_others_can_read_exits_2_without_showing_it(
    cli_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "token"
    path.write_text("very-secret-token-value\n")
    path.chmod(0o644)
    assert main(["run", "--token-file", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("qwen-serve: config error: server.token_file: ")
    assert "very-secret" not in out + err


def test_token_flags_are_mutually_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--token", "t", "--no-token"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"qwen-serve {__version__}\n"
    assert main(["--help"]) == 0
    assert "run" in capsys.readouterr().out
    assert main(["run", "--help"]) == 0
    help_text = capsys.readouterr().out
    for flag in ("--config", "--host", "--port", "--workspace", "--token", "--token-file", "--no-token", "--log-level"):
        assert flag in help_text
    assert main([]) == 2


async def test_peers_hanging_up_on_an_early_reject_log_no_tracebacks(
    cli_env: dict[str, str], workspace: Path, tmp_path: Path
) -> None:
    # A client that declares a body, gets its early 401 and hangs up races hypercorn's reader, which closes
    # the socket without taking the send lock: the final send raised BusyResourceError and hypercorn logged
    # a 2 KB traceback per request ("Error in ASGI Framework"), a log flood anyone could trigger without a
    # token. The race needs a separate process (in-process, the loop orders the two tasks).
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as stderr_file:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "serve", "run", "--port", "0", "--token", "t0ken-for-this-test"],
            cwd=workspace,
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
        )
    assert process.stdout is not None
    try:
        with trio.fail_after(20):
            match = LISTENING.match((await read_line(process.stdout)).decode())
            assert match
            port = int(match.group(1).rsplit(":", 1)[1])
            request = (
                f"POST /workspace/auth/device-flow HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 26\r\n\r\n{{"
            ).encode()
            statuses = set()
            for _ in range(200):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(request)
                    response = b""
                    while not response.endswith(b'"Unauthorized"}'):  # the whole 401, then hang up at once
                        chunk = await stream.receive_some(65536)
                        assert chunk, response
                        response += chunk
                    statuses.add(response[:12])
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert statuses == {b"HTTP/1.1 401"}
    stderr = stderr_path.read_text()
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr[:3000]


def test_the_executable_skips_teardown_but_keeps_exit_codes_atexit_handlers_and_output() -> None:
    script = (
        "import atexit, sys; atexit.register(lambda: print('atexit ran', flush=True)); "
        "sys.argv = ['qwen-serve', *sys.argv[1:]]; from serve.cli import entry; entry()"
    )
    done = subprocess.run([sys.executable, "-c", script, "--version"], capture_output=True, text=True, timeout=20)
    assert (done.returncode, done.stdout) == (0, f"qwen-serve {__version__}\natexit ran\n")
    done = subprocess.run([sys.executable, "-c", script, "token", "../x"], capture_output=True, text=True, timeout=20)
    assert (done.returncode, done.stderr) == (2, "qwen-serve: not a provider id: ../x\n")
