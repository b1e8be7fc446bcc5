"""The client commands of `qwen-serve`: `login`, `status`, `events` and `cancel`, driving a daemon over its API.

`serve.cli` builds the parser and dispatches; this module holds the commands' flags, bodies and help. It
imports `serve.client` (httpx, trio-websocket) and `segno` only when a command runs, so `qwen-serve run`
starts no slower, and never imports the daemon (quart, hypercorn, the registry).

Where the daemon is: `--daemon URL`, else `$QWEN_SERVE_URL`, else http://127.0.0.1:4170. Its bearer token:
`--token`, else `$QWEN_SERVER_TOKEN`, else, for a loopback URL only, the daemon's own generated token file
`$QWEN_HOME/serve/token`. Failures are one line on stderr (`qwen-serve: ...`), never a traceback.

`login` writes what a person needs on stdout (the verification URL, the user code, a QR code when stdout is
a terminal) and the live countdown on stderr when stderr is a terminal; with `--json`, stdout carries one
JSON object per state change and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn, TextIO
from urllib.parse import urlsplit

import trio

from serve.audit import sanitize
from serve.netloc import is_loopback_host
from serve.token import default_token_path, qwen_home

if TYPE_CHECKING:
    from serve.client import AuthResult, DaemonClient, DaemonError, LoginHandle
    from serve.models import AuthStatusSnapshot, ReceivedEvent

DEFAULT_URL = "http://127.0.0.1:4170"  # serve.client.DEFAULT_DAEMON_URL, without importing httpx here
URL_ENV = "QWEN_SERVE_URL"
TOKEN_ENV = "QWEN_SERVER_TOKEN"
QWEN_OAUTH = "qwen-oauth"

# login's exit codes (the epilog and the README say the same).
EXIT_AUTHORIZED = 0
EXIT_FAILED = 1  # unreachable daemon, a refused token, a daemon error, not a qwen-serve daemon
EXIT_USAGE = 2  # a bad flag or URL, an unknown provider, a malformed client id
EXIT_DENIED = 3
EXIT_EXPIRED = 4
EXIT_ERROR = 5
EXIT_CANCELLED = 6
EXIT_TIMEOUT = 7
EXIT_INTERRUPTED = 130

# How long to wait for the daemon to confirm a cancel after Ctrl-C or --timeout before giving up.
CANCEL_WAIT_S = 5.0


class UsageError(Exception):
    """A bad flag, URL or provider: one line, exit 2."""


# --- where the daemon is, and its token ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connection:
    """The daemon's URL, the token to send (None: none) and where it came from, and the client id."""

    url: str
    token: str | None
    token_source: str | None
    client_id: str | None

    @property
    def loopback(self) -> bool:
        return is_loopback_host(urlsplit(self.url).hostname or "")


def resolve_connection(args: argparse.Namespace, env: Mapping[str, str]) -> Connection:
    """`--daemon` / `$QWEN_SERVE_URL` / the default; `--token` / `$QWEN_SERVER_TOKEN` / the token file."""
    url = args.daemon or env.get(URL_ENV, "").strip() or DEFAULT_URL
    origin = "--daemon" if args.daemon else f"${URL_ENV}" if env.get(URL_ENV, "").strip() else "the default URL"
    problem = _daemon_url_problem(url)
    if problem is not None:
        raise UsageError(f"{origin}: {problem}")
    url = url.rstrip("/")
    token: str | None = None
    source: str | None = None
    if args.token is not None:
        token, source = args.token.strip(), "--token"
        if not token:
            raise UsageError("--token: must not be empty")
    elif env.get(TOKEN_ENV, "").strip():
        token, source = env[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    elif is_loopback_host(urlsplit(url).hostname or ""):
        # The daemon's generated token, readable by the user who runs it: only sent to a loopback daemon.
        path = default_token_path(qwen_home(env))
        with contextlib.suppress(OSError, UnicodeDecodeError):
            token = path.read_text(encoding="utf-8").strip() or None
            source = str(path) if token else None
    client_id = args.client_id
    if client_id is not None and not client_id:
        raise UsageError("--client-id: must not be empty")
    return Connection(url=url, token=token, token_source=source, client_id=client_id)


def _daemon_url_problem(url: str) -> str | None:
    if not url.isascii() or not url.isprintable() or " " in url:
        return "expected a URL such as http://127.0.0.1:4170"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "expected a URL such as http://127.0.0.1:4170 (bad port)"
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        return f"expected an http(s) URL such as http://127.0.0.1:4170, got {url!r}"
    if parts.username is not None or parts.password is not None:
        return "must not carry user:password@ (the token goes in --token or $QWEN_SERVER_TOKEN)"
    if parts.query or parts.fragment:
        return "must not carry a query or a fragment"
    return None


def open_client(conn: Connection) -> DaemonClient:
    """A `DaemonClient` for `conn` (which reaches a loopback daemon directly, whatever `HTTP(S)_PROXY` says)."""
    from serve.client import DaemonClient

    return DaemonClient(conn.url, token=conn.token or "", client_id=conn.client_id)


def describe_error(exc: DaemonError, conn: Connection, *, provider_id: str | None = None) -> tuple[int, str]:
    """The exit code and the one line for a `DaemonError` (the line has no `qwen-serve:` prefix)."""
    from serve.client import DaemonHTTPError, DaemonProtocolError, DaemonUnreachable

    url = conn.url
    if isinstance(exc, DaemonUnreachable):
        if exc.reason == "no answer in time":
            return EXIT_FAILED, f"the daemon at {url} did not answer in time"
        return EXIT_FAILED, (
            f"cannot reach the daemon at {url}: {sanitize(exc.reason)} (is `qwen-serve run` running there? "
            f"--daemon or ${URL_ENV} name another)"
        )
    if isinstance(exc, DaemonProtocolError):
        return EXIT_FAILED, f"{url} does not answer as a qwen-serve daemon does ({sanitize(str(exc))})"
    if isinstance(exc, DaemonHTTPError):
        message = sanitize(exc.message)
        if exc.status == 401 and exc.code == "token_required":
            return EXIT_FAILED, f"the daemon at {url} runs without a bearer token (--no-token): it cannot log in"
        if exc.status == 401:
            if conn.token is None:
                return EXIT_FAILED, (
                    f"the daemon at {url} wants a bearer token: pass --token or set ${TOKEN_ENV} "
                    "(on the daemon's machine it is in $QWEN_HOME/serve/token)"
                )
            return EXIT_FAILED, f"the daemon at {url} refused the bearer token from {conn.token_source}"
        if exc.code == "unsupported_provider":
            supported = exc.body.get("supportedProviders") if isinstance(exc.body, dict) else None
            names = ", ".join(sanitize(p) for p in supported if isinstance(p, str)) if supported else "none"
            return EXIT_USAGE, f"unknown provider {sanitize(provider_id or '?')}; the daemon supports: {names}"
        if exc.code == "invalid_client_id":
            return EXIT_USAGE, f"--client-id: {message} (letters, digits and ._:- only, at most 128)"
        if exc.code == "device_flow_not_found":
            return EXIT_FAILED, "the daemon knows no such login (a wrong id, or it ended over 5 minutes ago)"
        code = f" {exc.code}" if exc.code else ""
        line = f"the daemon at {url} answered {exc.status}{code}: {message}"
        hint = exc.body.get("hint") if isinstance(exc.body, dict) else None
        if isinstance(hint, str) and hint:
            line += f" ({sanitize(hint)}; the daemon's log has the details)"
        return EXIT_FAILED, line
    return EXIT_FAILED, sanitize(str(exc))


def fail(line: str, code: int) -> int:
    print(f"qwen-serve: {line}", file=sys.stderr, flush=True)
    return code


def fail_with(exc: DaemonError, conn: Connection, *, provider_id: str | None = None) -> int:
    code, line = describe_error(exc, conn, provider_id=provider_id)
    return fail(line, code)


def _run_async(
    body: Callable[[Connection, argparse.Namespace], Awaitable[int]], *, stdout_closed_code: int = EXIT_FAILED
) -> Callable[..., int]:
    """A command's `run(args, env)`: resolve the connection, run `body` under trio, map what escapes.

    A reader that closes stdout (`qwen-serve events | head -3`) ends the command quietly, with
    `stdout_closed_code`.
    """

    def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
        try:
            conn = resolve_connection(args, env)
        except UsageError as exc:
            return fail(str(exc), EXIT_USAGE)
        try:
            try:
                code = trio.run(body, conn, args)
            finally:
                # Done (the flow, if any, is settled): a Ctrl-C from here to the exit changes nothing.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        except KeyboardInterrupt:  # a Ctrl-C before the command's own SIGINT handling was in place, or after
            code = EXIT_INTERRUPTED
        except BaseExceptionGroup as group:  # raised through a nursery
            closed, rest = group.split(BrokenPipeError)
            if closed is None or rest is not None:
                raise
            code = _stdout_closed(stdout_closed_code)
        except BrokenPipeError:
            code = _stdout_closed(stdout_closed_code)
        return code

    return run


def _stdout_closed(code: int) -> int:
    """stdout's reader went away: point stdout at /dev/null, so the interpreter's last flush cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return code


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the daemon")
    group.add_argument("--daemon", metavar="URL", help=f"the daemon's URL (default: ${URL_ENV}, else {DEFAULT_URL})")
    group.add_argument(
        "--token",
        metavar="T",
        help=f"its bearer token (default: ${TOKEN_ENV}, else, for a loopback URL, $QWEN_HOME/serve/token)",
    )
    group.add_argument(
        "--client-id",
        metavar="ID",
        help="sent as X-Qwen-Client-Id: a login's code is shown only to the client id that started it",
    )


# --- login ------------------------------------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_login_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--provider",
        metavar="ID",
        help="the provider to log in to (default: the daemon's only one, else qwen-oauth if it has it)",
    )
    _add_connection_arguments(parser)
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per state change on stdout, and nothing else there"
    )
    parser.add_argument("--no-qr", action="store_true", help="do not draw the QR code (drawn only on a terminal)")
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=_positive_seconds,
        help="give up after S seconds: cancel the login on the daemon and exit 7",
    )


LOGIN_DESCRIPTION = """\
Log the daemon in to an identity provider (OAuth 2.0 device authorization, RFC 8628): the daemon asks the
provider for a code; you open the URL on any device (a phone can scan the QR code), check or enter the code
and approve. The tokens go to the daemon's disk, never here. A login already pending for the provider is
joined rather than started again (its code is shown only to the client id that started it)."""

LOGIN_EPILOG = f"""\
output:
  stdout   the verification URL, the user code and, when stdout is a terminal, a QR code of the URL;
           then one result line (`Logged in ...`) on success
  stderr   a live countdown to the code's expiry (only when stderr is a terminal), the result line of a
           failure, and errors, each one line starting `qwen-serve:`
  --json   stdout holds only JSON objects, one per line: {{"event":"started",...}} with the flow, the code and
           the URLs; {{"event":"throttled","intervalMs":N}} when the provider asks to poll more slowly; then
           {{"event":"ended","result":R,"status":S,"exitCode":N,...}}, R being the word in the table below

exit codes:
  {EXIT_AUTHORIZED}    authorized: the daemon holds the new credentials
  {EXIT_FAILED}    the daemon is unreachable, refused the token, failed, or is not a qwen-serve daemon
  {EXIT_USAGE}    usage: a bad flag or URL, an unknown provider (the supported ones are listed)
  {EXIT_DENIED}    denied: the login was refused at the provider (error kind access_denied)
  {EXIT_EXPIRED}    expired: the code was not approved in time
  {EXIT_ERROR}    error: any other failure of the flow (upstream_error, persist_failed, invalid_grant, the
       daemon no longer knowing the flow: not_found_or_evicted, ...)
  {EXIT_CANCELLED}    cancelled: by another client (`qwen-serve cancel`), or the daemon shut down
  {EXIT_TIMEOUT}    timeout: --timeout passed; the login was cancelled on the daemon
  {EXIT_INTERRUPTED}  interrupted: Ctrl-C; the login was cancelled on the daemon first (a second Ctrl-C exits at once)
  A login started by another client id (joined, without its code) is never cancelled by this command:
  Ctrl-C and --timeout only stop waiting for it.

environment:
  {URL_ENV}       the daemon's URL, as --daemon (default {DEFAULT_URL})
  {TOKEN_ENV}    its bearer token, as --token
  QWEN_HOME            where a loopback daemon's generated token is read ($QWEN_HOME/serve/token, default ~/.qwen)

examples:
  qwen-serve login
  qwen-serve login --daemon http://10.0.0.5:4170 --token "$TOKEN" --provider github --timeout 300
  qwen-serve login --json | jq -r 'select(.event == "started") | .userCode'
"""


@dataclass
class _LoginState:
    handle: LoginHandle | None = None


class LoginOutput:
    """What `login` writes, and where: human text, or JSON lines under `--json`."""

    def __init__(
        self, *, json_mode: bool, qr: bool, live: bool, out: TextIO, err: TextIO, term: str | None = None
    ) -> None:
        self.json_mode = json_mode
        self.term = term
        self.qr = qr
        self.live = live
        self.out = out
        self.err = err
        self.interval_ms: int | None = None
        self._live_shown = False

    def _json(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.out.flush()

    def _note(self, line: str) -> None:
        self.clear_live()
        self.err.write(f"qwen-serve: {line}\n")
        self.err.flush()

    def started(self, handle: LoginHandle) -> None:
        self.interval_ms = handle.interval_ms
        if self.json_mode:
            obj: dict[str, Any] = {
                "event": "started",
                "deviceFlowId": handle.device_flow_id,
                "providerId": handle.provider_id,
                "status": handle.info.status,
                "attached": handle.attached,
                "expiresAt": handle.expires_at_ms,
                "intervalMs": handle.interval_ms,
            }
            if handle.user_code is not None:
                obj["userCode"] = handle.user_code
            if handle.verification_uri is not None:
                obj["verificationUri"] = handle.verification_uri
            if handle.verification_uri_complete is not None:
                obj["verificationUriComplete"] = handle.verification_uri_complete
            self._json(obj)
            return
        provider = sanitize(handle.provider_id)
        flow_id = sanitize(handle.device_flow_id)
        if handle.user_code is None:
            self._note(
                f"a login for {provider} is already pending ({flow_id}), started by another client: only that "
                f"client is shown its code. Waiting for it to end (`qwen-serve cancel {flow_id}` cancels it)."
            )
            return
        if handle.attached:
            self._note(f"a login for {provider} was already pending: joined it ({flow_id})")
        code = sanitize(handle.user_code)
        uri = sanitize(handle.verification_uri or "")
        complete = sanitize(handle.verification_uri_complete) if handle.verification_uri_complete else None
        lines = [f"Log in to {provider} on any device with a browser:", ""]
        if uri:
            lines += [f"  open   {uri}", f"  enter  {code}", ""]
        else:
            lines += [f"  code   {code}", ""]
        qr_url = complete or uri
        if complete:
            lines.append(f"or open {complete}")
        if self.qr and qr_url:
            lines.append("or scan this QR code:" if complete else "or scan this QR code to open the page:")
        self.out.write("\n".join(lines) + "\n")
        if self.qr and qr_url:
            draw_qr(qr_url, self.out, term=self.term)
        self.out.flush()

    def throttled(self, handle: LoginHandle, interval_ms: int) -> None:
        self.interval_ms = interval_ms
        if self.json_mode:
            self._json(
                {
                    "event": "throttled",
                    "deviceFlowId": handle.device_flow_id,
                    "providerId": handle.provider_id,
                    "intervalMs": interval_ms,
                }
            )

    def live_line(self, expires_at_ms: int | None, throttled: bool) -> str:
        if expires_at_ms is None:
            left = ""
        else:
            seconds = max(0, math.ceil(expires_at_ms / 1000 - time.time()))
            left = f": {format_duration(seconds)} left" if seconds else ": expiring"
        line = f"Waiting for approval{left}"
        if throttled and self.interval_ms is not None:
            line += f" (the provider asked to slow down: polling every {self.interval_ms / 1000:g} s)"
        return line

    async def countdown(self, handle: LoginHandle) -> None:
        """Rewrite one stderr line each second until cancelled (only when stderr is a terminal)."""
        first_interval = handle.interval_ms
        while True:
            throttled = self.interval_ms is not None and self.interval_ms != first_interval
            self.err.write("\r\x1b[K" + self.live_line(handle.expires_at_ms, throttled))
            self.err.flush()
            self._live_shown = True
            await trio.sleep(1 - (time.time() % 1) + 0.01)  # tick on the second, so the count steps evenly

    def clear_live(self) -> None:
        if self._live_shown:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self._live_shown = False

    def ended(
        self,
        handle: LoginHandle,
        *,
        result: str,
        exit_code: int,
        line: str,
        status: str | None,
        outcome: AuthResult | None = None,
    ) -> int:
        self.clear_live()
        if self.json_mode:
            obj: dict[str, Any] = {
                "event": "ended",
                "deviceFlowId": handle.device_flow_id,
                "providerId": handle.provider_id,
                "result": result,
                "status": status,
            }
            if outcome is not None:
                for key, value in (
                    ("errorKind", outcome.error_kind),
                    ("hint", outcome.hint),
                    ("accountAlias", outcome.account_alias),
                    ("expiresAt", outcome.expires_at_ms),
                ):
                    if value is not None:
                        obj[key] = value
            obj["exitCode"] = exit_code
            self._json(obj)
        if exit_code == EXIT_AUTHORIZED:
            if not self.json_mode:
                self.out.write(line + "\n")
                self.out.flush()
        else:
            self._note(line)
        return exit_code


def draw_qr(url: str, out: TextIO, *, term: str | None) -> None:
    """`url` as a QR code (segno, error correction L) in half-block characters, two modules a line, or, when
    `out` cannot encode those, in ANSI colour cells.

    Half blocks draw light modules in the foreground colour: each line is set bright white on black, so
    the code is not inverted on a light-background terminal (unless TERM is `dumb`).
    """
    import io

    import segno

    encoding = getattr(out, "encoding", None) or "utf-8"  # None: an in-memory text stream
    try:
        "█▀▄".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        segno.make(url, error="l").terminal(out=out)
        return
    drawn = io.StringIO()
    segno.make(url, error="l").terminal(out=drawn, compact=True)
    colour, reset = ("\x1b[97;40m", "\x1b[0m") if term != "dumb" else ("", "")
    for line in drawn.getvalue().splitlines():
        out.write(f"{colour}{line}{reset}\n")


def format_duration(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def outcome_of(result: AuthResult) -> tuple[str, int, str]:
    """`result` word, exit code and one line for how a flow ended."""
    provider = sanitize(result.provider_id)
    hint = f" ({sanitize(result.hint)})" if result.hint else ""
    kind = sanitize(result.error_kind) if result.error_kind else None
    if result.status == "authorized":
        facts = []
        if result.account_alias:
            facts.append(f"account {sanitize(result.account_alias)}")
        if result.expires_at_ms is not None:
            facts.append(f"access token valid until {format_time(result.expires_at_ms)}")
        detail = f" ({'; '.join(facts)})" if facts else ""
        return "authorized", EXIT_AUTHORIZED, f"Logged in: the daemon holds {provider} credentials{detail}."
    if result.status == "expired":
        return "expired", EXIT_EXPIRED, f"login expired: the code was not approved in time{hint}"
    if result.status == "cancelled":
        return "cancelled", EXIT_CANCELLED, "login cancelled on the daemon (by another client, or the daemon stopped)"
    if result.error_kind == "access_denied":
        return "denied", EXIT_DENIED, f"login denied at {provider}{hint}"
    return "error", EXIT_ERROR, f"login failed: {kind or result.status}{hint}"


async def _default_provider(client: DaemonClient) -> str:
    snapshot = await client.get_auth_status()
    supported = snapshot.supported_providers
    if len(supported) == 1:
        return supported[0]
    if QWEN_OAUTH in supported:
        return QWEN_OAUTH
    names = ", ".join(sanitize(p) for p in supported) or "none"
    raise UsageError(f"the daemon supports several providers; pick one with --provider: {names}")


async def _login(conn: Connection, args: argparse.Namespace) -> int:
    output = LoginOutput(
        json_mode=args.json,
        qr=not args.json and not args.no_qr and sys.stdout.isatty(),
        live=not args.json and sys.stderr.isatty(),
        out=sys.stdout,
        err=sys.stderr,
        term=os.environ.get("TERM"),
    )
    state = _LoginState()
    code = EXIT_FAILED
    with trio.open_signal_receiver(signal.SIGINT) as sigint:
        async with open_client(conn) as client, trio.open_nursery() as nursery:
            work = trio.CancelScope()

            async def watch_sigint() -> None:
                async for _ in sigint:
                    if work.cancel_called:
                        output.clear_live()
                        exit_now(EXIT_INTERRUPTED)  # asked twice: leave the cancel unconfirmed
                    work.cancel()

            nursery.start_soon(watch_sigint)
            with work:
                code = await _login_steps(client, conn, args, output, state, nursery)
            if work.cancelled_caught:
                code = await _stop_waiting(client, conn, output, state, interrupted=True, timeout_s=None)
            nursery.cancel_scope.cancel()
    return code


async def _login_steps(
    client: DaemonClient,
    conn: Connection,
    args: argparse.Namespace,
    output: LoginOutput,
    state: _LoginState,
    nursery: trio.Nursery,
) -> int:
    from serve.client import DaemonError

    provider_id: str | None = args.provider
    try:
        if provider_id is None:
            provider_id = await _default_provider(client)
        # Shielded: a Ctrl-C while the daemon starts the flow waits for its id, so the flow can be cancelled.
        with trio.CancelScope(shield=True):
            handle = await client.auth.start(provider_id)
        state.handle = handle
    except UsageError as exc:
        return fail(str(exc), EXIT_USAGE)
    except DaemonError as exc:
        return fail_with(exc, conn, provider_id=provider_id)
    await trio.lowlevel.checkpoint()  # a Ctrl-C during the start lands here, with the handle known
    output.started(handle)
    live = trio.CancelScope()
    if output.live:

        async def countdown() -> None:
            with live:
                await output.countdown(handle)

        nursery.start_soon(countdown)
    try:
        result = await handle.await_completion(timeout=args.timeout, on_throttled=partial(output.throttled, handle))
    except TimeoutError:
        live.cancel()
        return await _stop_waiting(client, conn, output, state, interrupted=False, timeout_s=args.timeout)
    except DaemonError as exc:
        live.cancel()
        exit_code, line = describe_error(exc, conn, provider_id=provider_id)
        return output.ended(handle, result="failed", exit_code=exit_code, line=line, status=None)
    finally:
        live.cancel()
    word, exit_code, line = outcome_of(result)
    return output.ended(handle, result=word, exit_code=exit_code, line=line, status=result.status, outcome=result)


async def _stop_waiting(
    client: DaemonClient,
    conn: Connection,
    output: LoginOutput,
    state: _LoginState,
    *,
    interrupted: bool,
    timeout_s: float | None,
) -> int:
    """After Ctrl-C or --timeout: cancel the flow on the daemon when this client started it, and say so."""
    from serve.client import DaemonError

    exit_code, result = (EXIT_INTERRUPTED, "interrupted") if interrupted else (EXIT_TIMEOUT, "timeout")
    reason = "interrupted" if interrupted else f"no approval within {timeout_s:g} s"
    handle = state.handle
    if handle is None:
        return fail(f"{reason} before a login started", exit_code)
    if handle.user_code is None:  # another client's login: not ours to cancel
        line = f"{reason}: stopped waiting; the login started by another client is still pending"
        return output.ended(handle, result=result, exit_code=exit_code, line=line, status="pending")
    status: str | None = None
    problem: str | None = None
    with trio.move_on_after(CANCEL_WAIT_S) as scope:
        try:
            await handle.cancel()
            status = (await client.get_device_flow(handle.device_flow_id)).status
        except DaemonError as exc:
            problem = describe_error(exc, conn)[1]
    if scope.cancelled_caught:
        problem = f"the daemon did not confirm within {CANCEL_WAIT_S:g} s"
    if problem is not None:
        line = f"{reason}; cancelling the login on the daemon failed: {problem}"
    elif status in ("cancelled", "pending"):  # pending: a credential write is in flight; an approval wins
        line = f"{reason}: the login was cancelled on the daemon"
    else:
        line = f"{reason}; the login had already ended on the daemon: {sanitize(status or '?')}"
    return output.ended(handle, result=result, exit_code=exit_code, line=line, status=status)


def exit_now(code: int) -> NoReturn:
    """Leave the process at once (a second signal): flush what was written, skip interpreter teardown."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


run_login = _run_async(_login)


# --- status -----------------------------------------------------------------------------------------------


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    _add_connection_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the snapshot as one JSON object")


STATUS_EPILOG = """\
The table shows each provider's credentials as the daemon sees them (status ok, warning for an expired
access token, not_started before any login), then the logins pending. Exit 0, or 1 with one line on stderr
when the daemon cannot be asked (2 for a bad flag).
"""


def status_json(snapshot: AuthStatusSnapshot) -> dict[str, Any]:
    """The snapshot with the wire's camelCase names (members the daemon did not send are left out)."""
    providers = []
    for cell in snapshot.providers:
        out: dict[str, Any] = {"providerId": cell.provider_id, "status": cell.status}
        for key, value in (
            ("authState", cell.auth_state),
            ("hint", cell.hint),
            ("expiresAt", cell.expires_at_ms),
            ("accountAlias", cell.account_alias),
            ("updatedAt", cell.updated_at_ms),
        ):
            if value is not None:
                out[key] = value
        providers.append(out)
    return {
        "workspaceCwd": snapshot.workspace_cwd,
        "providers": providers,
        "pendingDeviceFlows": [
            {"deviceFlowId": p.device_flow_id, "providerId": p.provider_id, "expiresAt": p.expires_at_ms}
            for p in snapshot.pending_device_flows
        ],
        "supportedDeviceFlowProviders": list(snapshot.supported_providers),
    }


def table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def status_text(snapshot: AuthStatusSnapshot, now_ms: int) -> str:
    lines = [f"daemon workspace: {sanitize(snapshot.workspace_cwd)}", ""]
    rows = [["PROVIDER", "STATUS", "AUTH STATE", "ACCOUNT", "TOKEN EXPIRES", "UPDATED"]]
    for cell in snapshot.providers:
        rows.append(
            [
                sanitize(cell.provider_id),
                sanitize(cell.status),
                sanitize(cell.auth_state or "-"),
                sanitize(cell.account_alias or "-"),
                _when(cell.expires_at_ms, now_ms),
                format_time(cell.updated_at_ms) if cell.updated_at_ms is not None else "-",
            ]
        )
    lines += table(rows)
    lines.append("")
    if snapshot.pending_device_flows:
        rows = [["PENDING LOGIN", "PROVIDER", "CODE EXPIRES"]]
        rows += [
            [sanitize(p.device_flow_id), sanitize(p.provider_id), _when(p.expires_at_ms, now_ms)]
            for p in snapshot.pending_device_flows
        ]
        lines += table(rows)
    else:
        lines.append("no login pending")
    supported = ", ".join(sanitize(p) for p in snapshot.supported_providers) or "none"
    lines.append(f"providers this daemon can log in to: {supported}")
    return "\n".join(lines) + "\n"


def _when(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "-"
    delta = round((ms - now_ms) / 1000)
    relative = f"in {_rough(delta)}" if delta >= 0 else f"{_rough(-delta)} ago"
    return f"{format_time(ms)} ({relative})"


def _rough(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d"


async def _status(conn: Connection, args: argparse.Namespace) -> int:
    from serve.client import DaemonError

    try:
        async with open_client(conn) as client:
            snapshot = await client.get_auth_status()
    except DaemonError as exc:
        return fail_with(exc, conn)
    if args.json:
        sys.stdout.write(json.dumps(status_json(snapshot), ensure_ascii=False, separators=(",", ":")) + "\n")
    else:
        sys.stdout.write(status_text(snapshot, int(time.time() * 1000)))
    sys.stdout.flush()
    return 0


run_status = _run_async(_status)


# --- events -----------------------------------------------------------------------------------------------


def _event_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an event id (0 or more), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an event id (0 or more), got {text!r}")
    return value


def add_events_arguments(parser: argparse.ArgumentParser) -> None:
    _add_connection_arguments(parser)
    parser.add_argument(
        "--since",
        metavar="N",
        type=_event_id,
        help="first replay every event after id N that the daemon still holds (its last 1024); 0: all of them",
    )
    parser.add_argument("--json", action="store_true", help="print each event as its JSON envelope, one per line")


EVENTS_EPILOG = """\
Prints one line per event as it happens, until Ctrl-C (or SIGTERM), which exits 0: stopping is how this
command ends. Lines are flushed one by one, so a pipe sees each at once. A dropped connection is
re-opened and resumed after the last id printed, with nothing lost or repeated; when the daemon cannot
replay (it restarted, or the gap is over 1024 events) a `reset` line says so (re-read `qwen-serve status`).
Connection notes go to stderr. Exit 1 with one line on stderr when the daemon cannot be reached at the
start or refuses the token, 2 for a bad flag.

--json lines are the daemon's envelopes, {"id":N,"v":1,"type":...,"data":{...},"originatorClientId"?:...,
"_meta":{"serverTimestamp":ms}}, and {"v":1,"type":"reset","data":{"lastEventId":N,"epoch":E}} or
{"v":1,"type":"lagged","data":{"lastEventId":N}} when the stream could not be followed without a gap.
"""


def event_json(event: ReceivedEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"id": event.id, "v": 1, "type": event.type, "data": dict(event.data)}
    if event.originator_client_id is not None:
        out["originatorClientId"] = event.originator_client_id
    if event.server_timestamp_ms is not None:
        out["_meta"] = {"serverTimestamp": event.server_timestamp_ms}
    return out


_TIME_KEYS = frozenset({"expiresAt"})


def event_text(event: ReceivedEvent) -> str:
    when = (
        time.strftime("%H:%M:%S", time.localtime(event.server_timestamp_ms / 1000))
        if event.server_timestamp_ms
        else "-"
    )
    fields = []
    for key, value in event.data.items():
        if key in _TIME_KEYS and isinstance(value, int) and not isinstance(value, bool):
            shown = datetime.fromtimestamp(value / 1000).astimezone().strftime("%Y-%m-%dT%H:%M:%S")
        elif isinstance(value, str):
            shown = value
        else:
            shown = json.dumps(value, ensure_ascii=False)
        fields.append(f"{sanitize(str(key))}={sanitize(shown)}")
    if event.originator_client_id is not None:
        fields.append(f"by={sanitize(event.originator_client_id)}")
    return f"#{event.id} {when} {sanitize(event.type)} " + " ".join(fields)


async def _events(conn: Connection, args: argparse.Namespace) -> int:
    from serve.client import DaemonError, ReceivedEvent, StreamLagged, StreamReset
    from serve.models import StreamHello

    code = 0

    def emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def follow(client: DaemonClient) -> None:
        nonlocal code
        try:
            async with client.events(args.since) as stream:
                async for item in stream:
                    if isinstance(item, ReceivedEvent):
                        emit(
                            json.dumps(event_json(item), ensure_ascii=False, separators=(",", ":"))
                            if args.json
                            else event_text(item)
                        )
                    elif isinstance(item, StreamHello):
                        print(
                            f"qwen-serve: following the events of {conn.url} (newest event id {item.last_event_id}); "
                            "Ctrl-C stops",
                            file=sys.stderr,
                            flush=True,
                        )
                    elif isinstance(item, StreamReset):
                        if args.json:
                            data = {"lastEventId": item.last_event_id, "epoch": item.epoch}
                            emit(json.dumps({"v": 1, "type": "reset", "data": data}, separators=(",", ":")))
                        else:
                            emit(
                                f"reset: the daemon could not replay the events missed (now at id {item.last_event_id})"
                            )
                    elif isinstance(item, StreamLagged):
                        if args.json:
                            data_lag = {"lastEventId": item.last_event_id}
                            emit(json.dumps({"v": 1, "type": "lagged", "data": data_lag}, separators=(",", ":")))
                        else:
                            emit(f"lagged: this reader fell behind after id {item.last_event_id}; resuming")
        except DaemonError as exc:
            code = fail_with(exc, conn)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_client(conn) as client, trio.open_nursery() as nursery:

            async def watch() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            async def run() -> None:
                await follow(client)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(run)
    return code


run_events = _run_async(_events, stdout_closed_code=0)  # the reader stopped: as Ctrl-C


# --- cancel -----------------------------------------------------------------------------------------------


def add_cancel_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("device_flow_id", metavar="ID", help="the device flow id (`qwen-serve status` lists them)")
    _add_connection_arguments(parser)


CANCEL_EPILOG = """\
Any client holding the token may cancel any login. A login that already ended is left as it was (the
line says how it ended); one whose credentials are being written ends authorized, since the approval came
first. Exit 0 when the login is no longer pending, 1 when the daemon knows no such id (or cannot be
reached), 2 for a bad flag.
"""


async def _cancel(conn: Connection, args: argparse.Namespace) -> int:
    from serve.client import DaemonError

    flow_id: str = args.device_flow_id
    shown = sanitize(flow_id)
    try:
        async with open_client(conn) as client:
            before = await client.get_device_flow(flow_id)
            if before.status == "pending":
                await client.cancel_device_flow(flow_id)
                after = await client.get_device_flow(flow_id)
    except DaemonError as exc:
        return fail_with(exc, conn)
    provider = sanitize(before.provider_id)
    if before.status != "pending":
        print(f"{shown} ({provider}) had already ended: {sanitize(before.status)}", flush=True)
    elif after.status == "cancelled":
        print(f"cancelled {shown} ({provider})", flush=True)
    elif after.status == "pending":
        print(f"cancel of {shown} ({provider}) requested: its credentials are being written, so it may end authorized")
    else:
        print(f"{shown} ({provider}) ended before the cancel: {sanitize(after.status)}", flush=True)
    return 0


run_cancel = _run_async(_cancel)


# --- logout ---------------------------------------------------------------------------------------------


def add_logout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("provider_id", metavar="PROVIDER", help="the provider to log out of (`qwen-serve status`)")
    _add_connection_arguments(parser)


LOGOUT_EPILOG = """\
Calls `DELETE /workspace/auth/providers/PROVIDER`: the daemon cancels a login pending for it, revokes its
refresh and access tokens at the identity provider when the provider's metadata names a revocation endpoint
(RFC 7009), and deletes its credentials file. A revocation the IdP does not confirm is reported, and the
local logout happens all the same. Exit 0 when the daemon holds no credentials for it any more, 1 when the
daemon cannot be reached or could not delete the file, 2 for a bad flag or an unknown provider.
"""

_REVOCATION_WORDS = {
    "revoked": "its tokens are revoked at the identity provider",
    "failed": "the identity provider did not confirm the revocation (the tokens may stay valid until they expire)",
    "unsupported": "the identity provider offers no revocation (the tokens stay valid until they expire)",
    "none": "there were no tokens to revoke",
}


async def _logout(conn: Connection, args: argparse.Namespace) -> int:
    from serve.client import DaemonError

    provider_id: str = args.provider_id
    try:
        async with open_client(conn) as client:
            result = await client.logout(provider_id)
    except DaemonError as exc:
        return fail_with(exc, conn, provider_id=provider_id)
    shown = sanitize(result.provider_id)
    what = "credentials deleted" if result.removed else "no credentials were stored"
    words = _REVOCATION_WORDS.get(result.revocation, sanitize(result.revocation))
    print(f"Logged out of {shown}: {what}; {words}.", flush=True)
    return 0


run_logout = _run_async(_logout)
