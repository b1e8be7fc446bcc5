"""`qwen-serve token PROVIDER`: the current access token, for scripts on the daemon's machine.

It reads the credentials file the daemon wrote (same user, `$QWEN_HOME`), as `gh auth token` and
`oidc-token` do: a token never crosses HTTP, not even to a local client. Stdlib only, and no daemon needed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from serve.audit import sanitize
from serve.config import PROVIDER_ID_RE
from serve.credentials import credentials_file, epoch_ms
from serve.private_files import read_private
from serve.token import qwen_home

EXIT_OK, EXIT_NO_TOKEN, EXIT_USAGE = 0, 1, 2
WAIT_POLL_S = 0.25

DESCRIPTION = "Print the access token the daemon holds for PROVIDER (read from its credentials file)."
EPILOG = """\
For scripts on the daemon's machine, as the same user:

  curl -H "Authorization: Bearer $(qwen-serve token keycloak)" https://api.example.com/

The token is read from $QWEN_HOME/device-flow/PROVIDER.json ($QWEN_HOME/oauth_creds.json for qwen-oauth),
never asked of the daemon over HTTP. A daemon whose provider has refresh = "auto" renews it before it
expires; --wait S waits up to S seconds for that when the token on disk has expired.

output and exit codes:
  0  stdout: the access token and a newline (--json: {"providerId","accessToken","tokenType","expiresAt"})
  1  no credentials, an unreadable file, or an expired token: one line on stderr saying which and what to do
  2  a bad flag or provider id
"""


def add_token_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("provider_id", metavar="PROVIDER", help="the provider whose token to print")
    parser.add_argument("--json", action="store_true", help="one JSON object with the token, its type and expiry")
    parser.add_argument(
        "--wait",
        metavar="S",
        type=float,
        default=0.0,
        help="when the token has expired, wait up to S seconds for the daemon's refresh (default: do not wait)",
    )


def run_token(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    provider_id: str = args.provider_id
    if not PROVIDER_ID_RE.match(provider_id):
        return _fail(f"not a provider id: {sanitize(provider_id)}", EXIT_USAGE)
    if not (math.isfinite(args.wait) and args.wait >= 0):
        return _fail("--wait takes a number of seconds, 0 or more", EXIT_USAGE)
    home = qwen_home(env)
    relative = credentials_file(provider_id)
    deadline = time.monotonic() + args.wait
    while True:
        found = _read(home, relative, provider_id)
        if isinstance(found, str):
            return _fail(found, EXIT_NO_TOKEN)
        token, token_type, expires_at_ms = found
        now_ms = time.time() * 1000
        if expires_at_ms is None or expires_at_ms > now_ms:
            break
        if time.monotonic() >= deadline:
            when = datetime.fromtimestamp(expires_at_ms / 1000).isoformat(sep=" ", timespec="seconds")
            hint = (
                f"waited {args.wait:g} s and no refresh came"
                if args.wait
                else 'a daemon with refresh = "auto" renews it (try --wait 30)'
            )
            return _fail(f"{provider_id}: the access token expired at {when}; {hint}, else log in again", EXIT_NO_TOKEN)
        time.sleep(WAIT_POLL_S)
    if args.json:
        out = {"providerId": provider_id, "accessToken": token, "tokenType": token_type, "expiresAt": expires_at_ms}
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        sys.stdout.write(token + "\n")
    sys.stdout.flush()
    return EXIT_OK


def _read(home: Path, relative: str, provider_id: str) -> tuple[str, str, int | None] | str:
    """(token, token type, expiry in epoch ms) from the file, or a one-line reason it cannot be had."""
    path = home / relative
    login = f"log in with `qwen-serve login --provider {provider_id}`"
    try:
        found = read_private(home, relative)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or type(exc).__name__}"
    if found is None:
        return f"no credentials in {path}: {login}"
    try:
        document = json.loads(found[1])
    except (ValueError, RecursionError):
        return f"{path} is not JSON (being rewritten? try again)"
    token = document.get("access_token") if isinstance(document, dict) else None
    if not isinstance(token, str) or not token:
        return f"{path} holds no access token: {login}"
    token_type = document.get("token_type")
    kind = token_type if isinstance(token_type, str) else "Bearer"
    return token, kind, epoch_ms(document.get("expiry_date"))


def _fail(line: str, code: int) -> int:
    print(f"qwen-serve: {line}", file=sys.stderr)
    return code
