"""FakeIdP: an RFC 8628 identity provider behind `httpx.MockTransport`.

It validates every request it receives (method, content type, `Accept`, client authentication, the form's
`grant_type`, `client_id`, `device_code`, and that `code_verifier` hashes to the `code_challenge` sent with
that device code) and answers from scripts. A validation failure raises `AssertionError` through the
client call, so a drifting request fails the test that made it. A device code that has been redeemed
once is refused loudly: re-polling a used code makes real IdPs revoke the grant.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode

import httpx

DEVICE_CODE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
_B64URL_43 = re.compile(r"^[A-Za-z0-9_-]{43}$")

Responder = httpx.Response | Callable[[httpx.Request], httpx.Response]


def json_reply(status: int, body: Any, headers: Mapping[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status, content=json.dumps(body).encode(), headers={"content-type": "application/json", **(headers or {})}
    )


def form_reply(status: int, body: Mapping[str, str]) -> httpx.Response:
    """GitHub's default: `application/x-www-form-urlencoded` replies."""
    return httpx.Response(
        status, content=urlencode(dict(body)).encode(), headers={"content-type": "application/x-www-form-urlencoded"}
    )


def text_reply(status: int, text: str, content_type: str = "text/html") -> httpx.Response:
    return httpx.Response(status, content=text.encode(), headers={"content-type": content_type})


class EndlessStream(httpx.AsyncByteStream):
    """A reply body that never ends (64 KiB chunks); counts what was pulled from it.

    A reader that stops early abandons httpx's own async generators (`Response.aiter_bytes` and below),
    which Trio reports with a `ResourceWarning` when they are collected; tests that use this stream
    ignore that warning (`ABANDONED_STREAM_WARNING`).
    """

    def __init__(self, chunk: bytes = b"{" + b" " * 65535) -> None:
        self.chunk = chunk
        self.chunks_read = 0
        self.closed = False

    def __aiter__(self) -> EndlessStream:
        return self

    async def __anext__(self) -> bytes:
        self.chunks_read += 1
        return self.chunk

    async def aclose(self) -> None:
        self.closed = True


ABANDONED_STREAM_WARNING = "ignore:Async generator .* was garbage collected:ResourceWarning"


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


@dataclass
class FakeIdP:
    """Scripted replies for one IdP. Call it as a `MockTransport` handler.

    `device_replies` / `token_replies` are consumed one per request; when empty, the device endpoint
    issues a standard authorization and the token endpoint issues tokens. `documents` maps other URLs
    (discovery) to replies; anything else is a 404.
    """

    base_url: str = "https://idp.example"
    device_path: str = "/device"
    token_path: str = "/token"
    client_id: str = "client-1"
    scope: str | None = None
    client_auth: str = "none"  # none | client_secret_basic | client_secret_post
    client_secret: str | None = None
    pkce: bool = True
    expect_request_id: bool = False
    extra_params: Mapping[str, str] = field(default_factory=dict)
    device_replies: list[Responder] = field(default_factory=list)
    token_replies: list[Responder] = field(default_factory=list)
    documents: dict[str, Responder] = field(default_factory=dict)
    token_fields: dict[str, Any] = field(
        default_factory=lambda: {
            "access_token": "fake-access-1",
            "refresh_token": "fake-refresh-1",
            "token_type": "Bearer",
            "expires_in": 3600,
        }
    )
    requests: list[httpx.Request] = field(default_factory=list)
    issued: dict[str, str | None] = field(default_factory=dict)  # device code -> code challenge
    redeemed: set[str] = field(default_factory=set)

    @property
    def device_url(self) -> str:
        return self.base_url + self.device_path

    @property
    def token_url(self) -> str:
        return self.base_url + self.token_path

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport())

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = str(request.url)
        if request.method == "POST" and url == self.device_url:
            return self._device(request)
        if request.method == "POST" and url == self.token_url:
            return self._token(request)
        if url in self.documents:
            return _respond(self.documents[url], request)
        return text_reply(404, "not found", "text/plain")

    # --- endpoints ------------------------------------------------------------------------------

    def _device(self, request: httpx.Request) -> httpx.Response:
        form = self._check_form_post(request)
        if self.expect_request_id:
            assert re.fullmatch(
                r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", request.headers["x-request-id"]
            )
        if self.scope is not None:
            assert form.pop("scope") == self.scope
        else:
            assert "scope" not in form
        challenge = None
        if self.pkce:
            assert form.pop("code_challenge_method") == "S256"
            challenge = form.pop("code_challenge")
            assert _B64URL_43.fullmatch(challenge), challenge
        else:
            assert "code_challenge" not in form and "code_challenge_method" not in form
        for key, value in self.extra_params.items():
            assert form.pop(key) == value
        assert form == {}, f"unexpected device authorization parameters: {sorted(form)}"
        device_code = f"device-code-{len(self.issued) + 1}"
        self.issued[device_code] = challenge
        if self.device_replies:
            return _respond(self.device_replies.pop(0), request)
        return json_reply(
            200,
            {
                "device_code": device_code,
                "user_code": "USER-0001",
                "verification_uri": f"{self.base_url}/authorize",
                "verification_uri_complete": f"{self.base_url}/authorize?user_code=USER-0001&client=qwen-code",
                "expires_in": 600,
                "interval": 5,
            },
        )

    def _token(self, request: httpx.Request) -> httpx.Response:
        form = self._check_form_post(request)
        assert form.pop("grant_type") == DEVICE_CODE_GRANT_TYPE
        device_code = form.pop("device_code")
        assert device_code in self.issued, "a device code this IdP never issued"
        assert device_code not in self.redeemed, "a device code polled again after success"
        challenge = self.issued[device_code]
        if challenge is not None:
            assert s256(form.pop("code_verifier")) == challenge, "code_verifier does not match code_challenge"
        else:
            assert "code_verifier" not in form
        assert form == {}, f"unexpected token parameters: {sorted(form)}"
        reply = (
            _respond(self.token_replies.pop(0), request) if self.token_replies else json_reply(200, self.token_fields)
        )
        if _grants_tokens(reply):
            self.redeemed.add(device_code)
        return reply

    def _check_form_post(self, request: httpx.Request) -> dict[str, str]:
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        assert request.headers["accept"] == "application/json"
        pairs = parse_qsl(request.content.decode(), keep_blank_values=True, strict_parsing=True)
        form = dict(pairs)
        assert len(form) == len(pairs), "a repeated form parameter"
        if self.client_auth == "client_secret_basic":
            assert "client_id" not in form and "client_secret" not in form
            # RFC 6749 §2.3.1: each part form-urlencoded, then Basic.
            pair = f"{quote_plus(self.client_id)}:{quote_plus(self.client_secret or '')}"
            expected = base64.b64encode(pair.encode()).decode()
            assert request.headers["authorization"] == f"Basic {expected}"
        else:
            assert "authorization" not in request.headers
            assert form.pop("client_id") == self.client_id
            if self.client_auth == "client_secret_post":
                assert form.pop("client_secret") == self.client_secret
            else:
                assert "client_secret" not in form
        return form

    # --- discovery ------------------------------------------------------------------------------

    def metadata(self, issuer: str | None = None, **overrides: Any) -> dict[str, Any]:
        """A standards-following authorization server metadata document for this IdP."""
        doc: dict[str, Any] = {
            "issuer": issuer if issuer is not None else self.base_url,
            "device_authorization_endpoint": self.device_url,
            "token_endpoint": self.token_url,
            "grant_types_supported": [DEVICE_CODE_GRANT_TYPE],
            "code_challenge_methods_supported": ["S256"],
        }
        doc.update(overrides)
        return {k: v for k, v in doc.items() if v is not None}


def _grants_tokens(reply: httpx.Response) -> bool:
    """Whether a scripted token reply hands out tokens (so its device code is spent)."""
    if not 200 <= reply.status_code < 300 or not isinstance(reply.stream, httpx.ByteStream):
        return False
    content = reply.content
    try:
        fields = json.loads(content)
    except ValueError:
        fields = dict(parse_qsl(content.decode(errors="replace")))
    return isinstance(fields, dict) and "access_token" in fields and "error" not in fields


def _respond(responder: Responder, request: httpx.Request) -> httpx.Response:
    return responder(request) if callable(responder) else responder
