"""`qwen-oauth`: the built-in provider, speaking to Qwen's IdP exactly as qwen-code does (SPEC §5).

Its credentials file is the one qwen-code itself reads (`$QWEN_HOME/oauth_creds.json`), so the key set and
order are fixed: `access_token, refresh_token, token_type, resource_url, expiry_date`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping

import httpx

from serve.config import QWEN_OAUTH_ID, QwenOAuthConfig
from serve.credentials import QWEN_CREDENTIALS_FILE, Credentials
from serve.providers import oauth
from serve.providers.base import DeviceAuthorization, PollResult, PollSuccess
from serve.secrets import Secret

QWEN_CLIENT_ID = "f0304373b74a44d2b584a3fb70ca9e56"
QWEN_SCOPE = "openid profile email model.completion"
START_FAILED = "Qwen IdP device authorization request failed"
_LABEL = "Qwen"
# qwen-code's file, in its order; keys the IdP did not send are left out.
_DOCUMENT_KEYS = ("access_token", "refresh_token", "token_type", "resource_url")


class QwenOAuthProvider:
    """Device flow against `{base_url}/api/v1/oauth2/*`, form-encoded, with PKCE S256."""

    def __init__(self, config: QwenOAuthConfig, http: httpx.AsyncClient, *, now_ms: Callable[[], int]) -> None:
        base = config.base_url.rstrip("/")
        self._device_code_url = f"{base}/api/v1/oauth2/device/code"
        self._token_url = f"{base}/api/v1/oauth2/token"
        self._http = http
        self._now_ms = now_ms

    def __repr__(self) -> str:
        return f"QwenOAuthProvider({self._device_code_url!r})"

    @property
    def provider_id(self) -> str:
        return QWEN_OAUTH_ID

    @property
    def credentials_file(self) -> str:
        return QWEN_CREDENTIALS_FILE

    async def start(self) -> DeviceAuthorization:
        """POST the device code request. Raises `UpstreamError` (static message) on any failure."""
        code_verifier = oauth.new_code_verifier()
        request = oauth.form_request(
            self._http,
            self._device_code_url,
            {
                "client_id": QWEN_CLIENT_ID,
                "scope": QWEN_SCOPE,
                "code_challenge": oauth.s256_code_challenge(code_verifier),
                "code_challenge_method": "S256",
            },
            headers={"x-request-id": str(uuid.uuid4())},
        )
        return await oauth.request_device_authorization(
            self._http, request, code_verifier, failure=START_FAILED, client="builtin"
        )

    async def poll(self, authorization: DeviceAuthorization) -> PollResult:
        """One token request; IdP and network faults come back as `PollResult`s."""
        form = {
            "grant_type": oauth.DEVICE_CODE_GRANT_TYPE,
            "client_id": QWEN_CLIENT_ID,
            "device_code": authorization.device_code.reveal(),
        }
        if authorization.code_verifier is not None:
            form["code_verifier"] = authorization.code_verifier.reveal()
        request = oauth.form_request(self._http, self._token_url, form)
        return await oauth.poll_token_endpoint(
            self._http, request, label=_LABEL, on_success=self._success, client="builtin"
        )

    def _success(self, fields: Mapping[str, object]) -> PollResult:
        document: dict[str, object] = {key: fields[key] for key in _DOCUMENT_KEYS if fields.get(key) is not None}
        expires_at_ms = oauth.expiry_ms(self._now_ms(), fields.get("expires_in"))
        if expires_at_ms is not None:
            document["expiry_date"] = expires_at_ms
        return PollSuccess(
            Credentials(
                file_name=QWEN_CREDENTIALS_FILE,
                document=Secret(document),
                expires_at_ms=expires_at_ms,
            )
        )
