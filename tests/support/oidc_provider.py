"""A real OpenID provider for end-to-end tests: `tests/e2e/oidc_idp.mjs` (panva's `oidc-provider`) as a child
process, and a person who uses its pages.

`serve_oidc_provider(node, *args)` starts the script on 127.0.0.1 (a free port), waits for its ready line, reads
its event lines (one per device authorization and per token request, never a code or a token) into
`OidcProvider.events`, and stops it on exit by closing its stdin. `Person` is someone at a browser: httpx with
a cookie jar, following redirects, submitting the provider's own HTML forms (code entry, confirm, login,
consent). Codes and tokens the tests handle travel in `Secret`s, so no assertion message can print one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from serve.secrets import Secret
from support.daemon import loopback_client
from support.html_forms import Page, Submission, parse_page

E2E_DIR = Path(__file__).resolve().parents[1] / "e2e"
SCRIPT = "oidc_idp.mjs"
PACKAGE = E2E_DIR / "node_modules" / "oidc-provider" / "package.json"
PACKAGE_VERSION = "9.13.3"
SECRET_ENV = "OIDC_IDP_CLIENT_SECRET"
DEVICE_CODE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 5

LOGIN = "alice"  # the account the person signs in as (the dev login form takes any login and password)
NICKNAME = "e2e-tester"  # the script's `nickname` claim for every account

# What the provider's pages are called (oidc-provider 9's built-in device and devInteractions pages).
CODE_ENTRY_FORM = "op.deviceInputForm"
CONFIRM_FORM = "op.deviceConfirmForm"
CONFIRM_TITLE = "Device Login Confirmation"
SUCCESS_TITLE = "Sign-in Success"
WRONG_CODE_TEXT = "The code you entered is incorrect. Try again"
ABORTED_TEXT = "The Sign-in request was interrupted"


def node_for_oidc_provider() -> str:
    """Node and the pinned `oidc-provider`, checked before anything starts so that a missing install fails
    plainly (these tests do not skip)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the oidc-provider tests need Node.js (>= 20)", pytrace=False)
    if not PACKAGE.is_file():
        pytest.fail(
            f"{PACKAGE.parent} is missing: install it first with `npm ci --prefix tests/e2e --omit=peer` "
            "(the nox `tests` session does this)",
            pytrace=False,
        )
    installed = json.loads(PACKAGE.read_text())["version"]
    if installed != PACKAGE_VERSION:
        pytest.fail(
            f"tests/e2e/node_modules holds oidc-provider {installed}, not {PACKAGE_VERSION}: "
            "run `npm ci --prefix tests/e2e --omit=peer`",
            pytrace=False,
        )
    return node


@dataclass(frozen=True, slots=True)
class DeviceAuthorization:
    """A device authorization the test itself requested (as a client of the provider)."""

    device_code: Secret[str]
    user_code: str
    verification_uri: str
    verification_uri_complete: str


@dataclass
class OidcProvider:
    """The running script: its issuer, its two clients, and what it has reported so far."""

    issuer: str
    public_client_id: str
    confidential_client_id: str
    client_secret: Secret[str]
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def device_authorization_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "device_authorization"]

    def token_outcomes(self, grant_type: str = DEVICE_CODE_GRANT_TYPE) -> list[str]:
        """Each token request of that grant type, in order: `ok`, or the OAuth error code it got."""
        return [
            e.get("error", "ok" if e["status"] == 200 else f"HTTP {e['status']}")
            for e in self.events
            if e["event"] == "token" and e["grantType"] == grant_type
        ]

    def _client(self) -> httpx.AsyncClient:
        return loopback_client(base_url=self.issuer, trust_env=False)

    async def introspect(self, token: Secret[str]) -> dict[str, Any]:
        """RFC 7662 introspection as the confidential client (allowed to introspect any client's token).

        The reply names the token's state, client, subject and scope, never the token itself.
        """
        auth = (self.confidential_client_id, self.client_secret.reveal())
        async with self._client() as client:
            reply = await client.post("/token/introspection", data={"token": token.reveal()}, auth=auth)
        assert reply.status_code == 200, f"introspection answered HTTP {reply.status_code}"
        body: dict[str, Any] = reply.json()
        return body

    async def metadata(self) -> dict[str, Any]:
        """The provider's OpenID Connect discovery document."""
        async with self._client() as client:
            reply = await client.get("/.well-known/openid-configuration")
        assert reply.status_code == 200, f"discovery answered HTTP {reply.status_code}"
        body: dict[str, Any] = reply.json()
        return body

    async def authorize_device(self, scope: str) -> DeviceAuthorization:
        """RFC 8628 §3.1 as the public client."""
        async with self._client() as client:
            reply = await client.post("/device/auth", data={"client_id": self.public_client_id, "scope": scope})
        assert reply.status_code == 200, f"device authorization answered HTTP {reply.status_code}"
        body = reply.json()
        return DeviceAuthorization(
            Secret(body["device_code"]), body["user_code"], body["verification_uri"], body["verification_uri_complete"]
        )

    async def redeem(self, authorization: DeviceAuthorization) -> tuple[str, Secret[dict[str, Any]]]:
        """RFC 8628 §3.4 as the public client: `ok` (and the token reply) or the error code (and `{}`)."""
        form = {
            "grant_type": DEVICE_CODE_GRANT_TYPE,
            "device_code": authorization.device_code.reveal(),
            "client_id": self.public_client_id,
        }
        async with self._client() as client:
            reply = await client.post("/token", data=form)
        body = reply.json()
        if reply.status_code == 200:
            return "ok", Secret(body)
        return str(body["error"]), Secret({})


class _Lines:
    """Newline-terminated lines from a byte stream; None at its end."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str | None:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


async def _read_events(lines: _Lines, provider: OidcProvider) -> None:
    while (line := await lines.next()) is not None:
        assert line.startswith("{"), f"{SCRIPT} wrote a line that is not JSON on stdout"
        provider.events.append(json.loads(line))


@asynccontextmanager
async def serve_oidc_provider(node: str, *args: str, log_dir: Path) -> AsyncIterator[OidcProvider]:
    """Run `node oidc_idp.mjs *args` until the block ends; its stderr goes to `log_dir/oidc_idp.stderr`.

    Fails the test when the script is not ready within `START_TIMEOUT_S` or exits other than 0 when stopped.
    Stopping (closing its stdin) is shielded and bounded by `STOP_TIMEOUT_S`, then the process is killed.
    """
    client_secret = secrets.token_urlsafe(24)
    stderr_path = log_dir / "oidc_idp.stderr"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [node, SCRIPT, *args],
            cwd=E2E_DIR,
            env={**os.environ, SECRET_ENV: client_secret},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    assert process.stdin is not None and process.stdout is not None
    try:
        lines = _Lines(process.stdout)
        ready: str | None = None
        with trio.move_on_after(START_TIMEOUT_S):
            ready = await lines.next()
        if ready is None:
            await _stop(process, at_once=True)
            pytest.fail(f"{SCRIPT} did not start:\n{stderr_path.read_text()}", pytrace=False)
        fields = json.loads(ready)
        provider = OidcProvider(
            issuer=fields["issuer"],
            public_client_id=fields["publicClientId"],
            confidential_client_id=fields["confidentialClientId"],
            client_secret=Secret(client_secret),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_events, lines, provider)
            yield provider
            await _stop(process)  # its stdout ends with it, and so does the reader
        if process.returncode != 0:
            pytest.fail(f"{SCRIPT} exited {process.returncode}:\n{stderr_path.read_text()}", pytrace=False)
    finally:
        await _stop(process, at_once=True)
        # Only now, the reader gone: closing a stream another task is reading from raises in that task.
        await process.stdin.aclose()
        await process.stdout.aclose()


async def _stop(process: trio.Process, *, at_once: bool = False) -> None:
    """Close the script's stdin (it exits 0 on that) and wait for it at most `STOP_TIMEOUT_S`, then kill it;
    `at_once` kills it straight away. Shielded (bounded cleanup); a no-op once it has exited."""
    assert process.stdin is not None
    with trio.CancelScope(shield=True):
        if not at_once:
            with trio.move_on_after(STOP_TIMEOUT_S):
                await process.stdin.aclose()
                await process.wait()
        if process.returncode is None:
            process.kill()
        await process.wait()


# --- the person at the browser -----------------------------------------------------------------------------


class Person:
    """Someone using the provider's pages in a browser: one cookie jar, redirects followed, forms submitted
    as they are written (hidden fields and CSRF tokens included)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def open(self, url: str) -> Page:
        return self._page(await self._client.get(url))

    async def send(self, submission: Submission) -> Page:
        if submission.method == "POST":
            response = await self._client.post(submission.url, data=dict(submission.data))
        else:
            response = await self._client.get(submission.url, params=dict(submission.data))
        return self._page(response)

    def _page(self, response: httpx.Response) -> Page:
        # Not the body in the message: the provider's pages carry CSRF tokens and a debug dump of the session.
        assert response.status_code == 200, (
            f"{response.request.method} {response.url.path}: HTTP {response.status_code}"
        )
        return parse_page(response.text, str(response.url), response.status_code)

    async def enter_code(self, verification_uri: str, user_code: str) -> Page:
        """Open the verification page, type the code, press Continue: the confirmation page for a good code,
        the code entry page again (saying the code is incorrect) for a wrong one."""
        page = await self.open(verification_uri)
        return await self.send(page.form(CODE_ENTRY_FORM).submit(user_code=user_code))

    async def open_complete(self, verification_uri_complete: str) -> Page:
        """Open the complete URL (the code in it): a self-submitting form, then the confirmation page."""
        page = await self.open(verification_uri_complete)
        return await self.send(page.form().submit())

    async def approve(self, confirmation: Page, *, login: str = LOGIN) -> Page:
        """On the confirmation page press Continue, sign in, consent: the success page."""
        assert confirmation.title == CONFIRM_TITLE, f"not the confirmation page: {describe(confirmation)}"
        sign_in = await self.send(confirmation.form(CONFIRM_FORM).submit("Continue"))
        assert _prompt(sign_in) == "login", f"not the sign-in page: {describe(sign_in)}"
        consent = await self.send(sign_in.form().submit(login=login, password="any password"))
        assert _prompt(consent) == "consent", f"not the consent page: {describe(consent)}"
        done = await self.send(consent.form().submit())
        assert done.title == SUCCESS_TITLE, f"not the success page: {describe(done)}"
        return done

    async def deny(self, confirmation: Page) -> Page:
        """On the confirmation page press Abort: the code entry page, saying the sign-in was interrupted."""
        assert confirmation.title == CONFIRM_TITLE, f"not the confirmation page: {describe(confirmation)}"
        return await self.send(confirmation.form(CONFIRM_FORM).submit("[ Abort ]"))


def _prompt(page: Page) -> str | None:
    """Which devInteractions page this is (`login` or `consent`), by its form's hidden `prompt` field."""
    return next((value for form in page.forms for name, value in form.fields if name == "prompt"), None)


def describe(page: Page) -> str:
    """A page for a failure message: its title and its forms' field names, never a value (the provider's
    pages carry CSRF tokens and, in devInteractions' debug section, the session)."""
    forms = [(form.id, [name for name, _ in form.fields]) for form in page.forms]
    return f"{page.title!r} at {httpx.URL(page.url).path}, forms {forms}"


@asynccontextmanager
async def open_person() -> AsyncIterator[Person]:
    async with loopback_client(follow_redirects=True, trust_env=False) as client:
        yield Person(client)
