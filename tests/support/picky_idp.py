"""`PickyIdP`: a `FakeIdP` that answers client mistakes as real IdPs do instead of failing the test.

The plain `FakeIdP` asserts on every request, which is right for a daemon that must send exactly the right
thing. The failure tests send the wrong thing on purpose (an unknown `client_id`, a secret for a public
client, a device code never issued), and need the answer a real IdP gives:

- an unknown client, or client authentication the client is not registered for: `401 invalid_client`
  (what Ory Hydra, Okta and Keycloak answer; RFC 6749 §5.2);
- a token request for a device code it never issued: `400 invalid_grant` (`qwen-serve check`'s probe).

Everything else goes to `FakeIdP`, which still validates it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote_plus

import httpx

from support.fake_idp import FakeIdP, json_reply

INVALID_CLIENT_TEXT = "IDP-FREE-TEXT: Client authentication failed (unknown client or wrong method)"
INVALID_GRANT_TEXT = "IDP-FREE-TEXT: device code not found"


@dataclass
class PickyIdP(FakeIdP):
    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if request.method == "POST" and url in (self.device_url, self.token_url):
            form = dict(parse_qsl(request.content.decode(), keep_blank_values=True))
            client_id, secret = _presented_client(request, form)
            public_with_secret = self.client_auth == "none" and secret is not None
            if client_id != self.client_id or public_with_secret:
                self.requests.append(request)
                return json_reply(401, {"error": "invalid_client", "error_description": INVALID_CLIENT_TEXT})
            if url == self.token_url and form.get("device_code") not in self.issued:
                self.requests.append(request)
                return json_reply(400, {"error": "invalid_grant", "error_description": INVALID_GRANT_TEXT})
        return super().__call__(request)


def _presented_client(request: httpx.Request, form: dict[str, str]) -> tuple[str | None, str | None]:
    """The client id and secret a request authenticates with: HTTP Basic (RFC 6749 §2.3.1), else the form."""
    header = request.headers.get("authorization", "")
    if header.startswith("Basic "):
        try:
            pair = base64.b64decode(header.removeprefix("Basic ")).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        client_id, _, secret = pair.partition(":")
        return unquote_plus(client_id), unquote_plus(secret)
    return form.get("client_id"), form.get("client_secret")
