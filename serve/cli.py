"""The `qwen-serve` command line (SPEC §7).

Each subcommand is a `Command`: `add_arguments` for its parser and `run(args, env)` returning the exit code;
`COMMANDS` lists them. Exit codes: 0 done, 1 failed at run time (a port in use), 2 bad usage or
configuration. stdout carries only what scripts read (the listening line); everything else goes to stderr.

`run` and `config` are the daemon's; `login`, `status`, `events` and `cancel` are its clients, with their
bodies in `serve.cli_client` (which loads `serve.client` only when one of them runs, and never the daemon).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import trio

from serve import __version__, cli_check, cli_client, cli_token
from serve.config import DEFAULTS_FILE, Config, config_layers, effective_config_toml, load_config
from serve.errors import ConfigError
from serve.netloc import is_loopback_host
from serve.token import ResolvedToken, qwen_home, resolve_token

CONFIG_ENV = "QWEN_SERVE_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger("serve.cli")


@dataclass(frozen=True, slots=True)
class Command:
    """One `qwen-serve` subcommand."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Mapping[str, str]], int]
    epilog: str | None = None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default `sys.argv[1:]`), run the subcommand, return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse has printed what to say
        return exc.code if isinstance(exc.code, int) else 2
    command: Command = args.command
    return command.run(args, os.environ)


def entry() -> NoReturn:
    """The `qwen-serve` executable: `main()`, then a quick exit.

    Everything is finished when `main` returns (the daemon drained, files written and fsynced), so the
    interpreter's teardown (≈0.3 s of freeing modules) is skipped: atexit handlers run, logs and the
    standard streams are flushed, then `os._exit`.
    """
    code = main()
    atexit._run_exitfuncs()
    logging.shutdown()
    cli_client.exit_now(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-serve",
        description="A daemon that brokers OAuth 2.0 device logins (RFC 8628) for remote clients.",
        epilog="Run `qwen-serve run --help` for the daemon's options, token and environment, and "
        "`qwen-serve login --help` for logging a daemon in (exit codes included).",
    )
    parser.add_argument("--version", action="version", version=f"qwen-serve {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(sub)
        sub.set_defaults(command=command)
    return parser


def fail_config(error: ConfigError) -> int:
    """SPEC §7: one line naming the key, exit 2."""
    print(f"qwen-serve: config error: {error.key}: {error.problem}", file=sys.stderr)
    return 2


def setup_logging(level: str) -> None:
    """Send the daemon's and hypercorn's log records to stderr at `level` (idempotent)."""
    handler_name = "qwen-serve-stderr"
    for name in ("serve", "hypercorn"):
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        logger.propagate = False
        if not any(h.get_name() == handler_name for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.set_name(handler_name)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)


# --- run ----------------------------------------------------------------------------------------------


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that shape the configuration, shared by `run` and `config`."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"a TOML file layered over the defaults (`qwen-serve config --defaults`); default: ${CONFIG_ENV} if set",
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port to bind; 0 picks a free one (default 4170)")
    parser.add_argument("--workspace", metavar="DIR", help="the workspace this daemon serves (default: cwd)")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token", metavar="T", help="the bearer token clients must send (beats QWEN_SERVER_TOKEN)")
    token.add_argument(
        "--token-file",
        metavar="F",
        help="read the bearer token from F (refused if group or others have any access, or a parent "
        "directory is group/world-writable or another user's)",
    )
    token.add_argument(
        "--no-token",
        action="store_true",
        help="run without a bearer token (loopback only; device-flow routes then answer token_required)",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="stderr log level (default info)")
    parser.add_argument(
        "--dev-idp",
        action="store_true",
        help="also run a DEVELOPMENT identity provider on 127.0.0.1 and add its provider `dev`: a login that "
        "works offline, for demos and trying things out (its page approves whoever presses Approve; loopback "
        "--host only)",
    )


def _run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    setup_logging(args.log_level)
    try:
        config = load_run_config(args, env)
        workspace = _workspace(config)
        if args.dev_idp:
            _check_dev_idp(config)
        home = qwen_home(env)
        token = resolve_token(
            flag_token=args.token,
            token_file=config.server.token_file,
            no_token=args.no_token,
            host=config.server.host,
            env=env,
            home=home,
        )
    except ConfigError as exc:
        return fail_config(exc)
    except _UsageError as exc:
        print(f"qwen-serve: {exc}", file=sys.stderr)
        return 2
    _announce_token(token)
    # Outside the daemon's own signal receiver (while it starts, and once the graceful shutdown finished:
    # trio restores these handlers when it leaves), a stop signal exits at once, still with 0, rather
    # than killing the process with the signal's default action.
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda _signum, _frame: cli_client.exit_now(0))
    try:
        return trio.run(
            partial(_serve, config, token=token.token, workspace=workspace, home=home, dev_idp=args.dev_idp)
        )
    except KeyboardInterrupt:
        # A SIGINT in the instant between the signal receiver closing and trio.run returning: trio's own
        # handler turns it into KeyboardInterrupt. The daemon had already shut down; it was asked twice.
        return 0


class _UsageError(Exception):
    """A flag that cannot be used as given; the CLI prints it on one line and exits 2."""


def _check_dev_idp(config: Config) -> None:
    from serve import dev_idp

    if not is_loopback_host(config.server.host):
        raise _UsageError(
            f"--dev-idp is a local demo: it needs a loopback --host (127.0.0.1, ::1, localhost), not {config.server.host}"
        )
    dev_idp.check_config(config)


def config_files(args: argparse.Namespace, env: Mapping[str, str]) -> list[Path]:
    path = args.config or env.get(CONFIG_ENV) or None
    return [Path(path)] if path else []


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    server: dict[str, Any] = {}
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    if args.workspace is not None:
        server["workspace"] = args.workspace
    if args.token_file is not None:
        server["token_file"] = args.token_file
    return {"server": server} if server else {}


def load_run_config(args: argparse.Namespace, env: Mapping[str, str]) -> Config:
    """Defaults → `--config` (or `$QWEN_SERVE_CONFIG`) → environment → the `run` flags."""
    return load_config(config_files(args, env), env=env, overrides=_flag_overrides(args) or None)


# --- config ---------------------------------------------------------------------------------------------


def _add_config_command_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument("--token-file", metavar="F", help="as for `run` (shown as the source of server.token_file)")
    parser.add_argument("--defaults", action="store_true", help="print every key with its default, commented, and exit")


def _config(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    if args.defaults:
        sys.stdout.write(DEFAULTS_FILE.read_text(encoding="utf-8"))
        return 0
    try:
        files = config_files(args, env)
        overrides = _flag_overrides(args)
        load_config(files, env=env, overrides=overrides or None)  # the same validation as `run`: exit 2
        layers = config_layers(files, env=env, overrides=overrides, override_source="flag")
    except ConfigError as exc:
        return fail_config(exc)
    sys.stdout.write(effective_config_toml(layers))
    return 0


def _workspace(config: Config) -> Path:
    path = Path(config.server.workspace or os.getcwd()).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError("server.workspace", f"not a directory: {path}")
    return path


def _announce_token(token: ResolvedToken) -> None:
    """Say where the token is (never what it is), so local clients can find it."""
    if token.source == "none":
        print("qwen-serve: no bearer token (--no-token): device-flow routes answer token_required", file=sys.stderr)
    elif token.path is not None:
        print(f"qwen-serve: bearer token ({token.source}) in {token.path}", file=sys.stderr)
    else:
        origin = "--token" if token.source == "flag" else "QWEN_SERVER_TOKEN"
        print(f"qwen-serve: bearer token from {origin}", file=sys.stderr)


# SIGHUP is what a dropped SSH session sends, SIGQUIT what Ctrl-\\ sends: both stop as gracefully as SIGTERM.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


async def _serve(config: Config, *, token: bytes | None, workspace: Path, home: Path, dev_idp: bool = False) -> int:
    """Run the daemon until a stop signal; print the listening line once bound.

    The first signal starts the graceful shutdown (SPEC §3); a second one exits at once, still with 0: the
    user asked twice. Credential writes are atomic (temp file, fsync, rename), so the worst a second signal
    leaves is a temp file, which the next start sweeps away.
    """
    # Imported here: the client commands the CLI will grow must not load quart and hypercorn.
    from serve.daemon import ListenError, RoutesUnavailable, RunningDaemon, run_daemon

    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        first = trio.Event()

        async def watch_signals() -> None:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not first.is_set():
                    log.info("%s received: shutting down (send it again to exit at once)", name)
                    first.set()
                else:
                    log.warning("%s received again: exiting now", name)
                    cli_client.exit_now(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)

            exit_code = 0

            async def run(*, task_status: trio.TaskStatus[RunningDaemon]) -> None:
                nonlocal exit_code
                try:
                    await run_daemon(
                        config,
                        token=token,
                        workspace=workspace,
                        qwen_home=home,
                        shutdown_trigger=first.wait,
                        dev_idp=dev_idp,
                        task_status=task_status,
                    )
                except RoutesUnavailable as exc:
                    print(f"qwen-serve: {exc}; the daemon stopped", file=sys.stderr)
                    exit_code = 1
                nursery.cancel_scope.cancel()  # drained: stop watching signals

            try:
                daemon = await nursery.start(run)
            except ListenError as exc:
                print(f"qwen-serve: {exc}", file=sys.stderr)
                nursery.cancel_scope.cancel()
                return 1
            # stdout is block-buffered when piped: flush, or whoever waits for this line hangs.
            print(f"qwen-serve listening on {daemon.url} (workspace={workspace})", flush=True)
    return exit_code


RUN_EPILOG = """\
bearer token (first that is set wins):
  --token T            visible to other local users in `ps`: prefer the env or a file
  $QWEN_SERVER_TOKEN   (empty counts as unset)
  --token-file F       refused (exit 2) if group or others have any access to it, or a parent directory
                       is group/world-writable or another user's, as ssh's StrictModes refuses a key
  otherwise            $QWEN_HOME/serve/token, reused if mode 0600, else generated (dir 0700, file 0600);
                       its path is printed on stderr, never the token. Clients send
                       `Authorization: Bearer <token>`; only GET /health is open.
  --no-token           loopback binds only; reads work, starting or cancelling a login answers 401

environment:
  QWEN_HOME            where credentials and the generated token live (default ~/.qwen)
  QWEN_SERVE_CONFIG    a config file, as --config
  QWEN_OAUTH_BASE_URL  the qwen-oauth IdP (default https://chat.qwen.ai)
  HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE apply to requests to identity providers

A non-loopback --host needs a token and should use TLS ([server] certfile/keyfile). Every key and its
default is printed, commented, by `qwen-serve config --defaults`; `qwen-serve config` shows the
configuration a run would use and where each value comes from.

output and exit codes:
  stdout gets exactly one line once bound: `qwen-serve listening on URL (workspace=DIR)`; logs and audit
  lines go to stderr. SIGINT, SIGTERM, SIGHUP and SIGQUIT stop gracefully (within 1 s, 5 s while a
  credential write is in flight); a second one exits at once. Exit 0 after a signal, 1 if the address
  cannot be bound or the HTTP routes cannot be loaded, 2 for a bad flag, configuration key or token file.

development identity provider (--dev-idp):
  A DEVELOPMENT IdP in the daemon's own process, on 127.0.0.1 at a free port (its URL is logged on
  stderr), added as the provider `dev`, so a login works with no network: run
  `qwen-serve login --provider dev`, open the URL it prints and press Approve. It keeps its codes and tokens in memory (a restart forgets
  them), stops with the daemon, and approves whoever can open its page: for demos, never real accounts.

examples:
  qwen-serve run --port 0 --workspace ~/src/project --config ~/.config/qwen-serve.toml
  qwen-serve run --dev-idp
"""

CONFIG_EPILOG = """\
Prints TOML that `--config` accepts: the defaults, then the file from --config or $QWEN_SERVE_CONFIG,
then the environment ($QWEN_OAUTH_BASE_URL), then these flags; after each value, where it came from.
Values of keys named like a secret are elided (client secrets are never inline: only the names of the
variable or file that hold them appear). Exit 2 with one line for a bad key, as `run` would.
"""

COMMANDS: list[Command] = [
    Command(
        name="run",
        help="run the daemon",
        description="Serve the device-flow API for one workspace until SIGINT, SIGTERM, SIGHUP or SIGQUIT.",
        epilog=RUN_EPILOG,
        add_arguments=_add_run_arguments,
        run=_run,
    ),
    Command(
        name="config",
        help="print the configuration a run would use, and where each value comes from",
        description="Print the effective configuration as TOML (or, with --defaults, every default, commented).",
        epilog=CONFIG_EPILOG,
        add_arguments=_add_config_command_arguments,
        run=_config,
    ),
    Command(
        name="check",
        help="check each provider's discovery, client and endpoints without running the daemon",
        description=cli_check.CHECK_DESCRIPTION,
        epilog=cli_check.CHECK_EPILOG,
        add_arguments=cli_check.add_check_arguments,
        run=cli_check.run_check,
    ),
    Command(
        name="login",
        help="log a daemon in to an identity provider (shows the URL, the code and a QR code)",
        description=cli_client.LOGIN_DESCRIPTION,
        epilog=cli_client.LOGIN_EPILOG,
        add_arguments=cli_client.add_login_arguments,
        run=cli_client.run_login,
    ),
    Command(
        name="status",
        help="show a daemon's providers, their credentials and the logins pending",
        description="Show what `GET /workspace/auth/status` says, as a table (or JSON).",
        epilog=cli_client.STATUS_EPILOG,
        add_arguments=cli_client.add_status_arguments,
        run=cli_client.run_status,
    ),
    Command(
        name="events",
        help="print a daemon's login events as they happen",
        description="Follow `WS /workspace/auth/events`: one line per event until interrupted.",
        epilog=cli_client.EVENTS_EPILOG,
        add_arguments=cli_client.add_events_arguments,
        run=cli_client.run_events,
    ),
    Command(
        name="token",
        help="print a provider's current access token, for scripts on the daemon's machine",
        description=cli_token.DESCRIPTION,
        epilog=cli_token.EPILOG,
        add_arguments=cli_token.add_token_arguments,
        run=cli_token.run_token,
    ),
    Command(
        name="logout",
        help="log the daemon out of a provider: revoke its tokens and delete its credentials",
        description="Log out (`DELETE /workspace/auth/providers/PROVIDER`).",
        epilog=cli_client.LOGOUT_EPILOG,
        add_arguments=cli_client.add_logout_arguments,
        run=cli_client.run_logout,
    ),
    Command(
        name="cancel",
        help="cancel a pending login",
        description="Cancel a device flow by its id (`DELETE /workspace/auth/device-flow/ID`).",
        epilog=cli_client.CANCEL_EPILOG,
        add_arguments=cli_client.add_cancel_arguments,
        run=cli_client.run_cancel,
    ),
]
