"""conf/examples/ (issue 11): each IdP's snippet loads through the real loader as shipped, builds its provider
without touching the network, and, once its placeholders are filled in, logs in against a FakeIdP that
answers the way that IdP does (its discovery document, endpoints, client authentication and quirks)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
from support.fake_idp import FakeIdP, json_reply

from serve.config import Config, load_config
from serve.providers import build_providers
from serve.providers.base import PollPending, PollSuccess

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "conf" / "examples"
# What a user exports before `qwen-serve run`: the files only name the variable.
ENV = {"GOOGLE_CLIENT_SECRET": "google-secret-1"}
PENDING = {"error": "authorization_pending"}


@dataclass(frozen=True)
class Example:
    """What one file must configure, and how its IdP answers. Strings may hold the file's placeholders;
    `fill` maps each to a value a user might put there."""

    doc_url: str
    client_id: str
    scope: str
    fill: Mapping[str, str]
    device_reply: Mapping[str, Any]  # the device authorization reply, less its device code
    issuer: str | None = None
    endpoints: tuple[str, str] | None = None  # configured (device authorization, token)
    metadata: Mapping[str, Any] | None = None  # the discovery document, when endpoints are discovered
    client_auth: str = "none"
    client_secret_env: str | None = None
    pkce: str = "auto"
    sends_pkce: bool = False  # what the daemon makes of `pkce` with this IdP's metadata
    extra_params: Mapping[str, str] = field(default_factory=dict)
    pending: tuple[int, Mapping[str, Any]] = (400, PENDING)

    def device_and_token_urls(self) -> tuple[str, str]:
        if self.endpoints is not None:
            return self.endpoints
        assert self.metadata is not None
        return self.metadata["device_authorization_endpoint"], self.metadata["token_endpoint"]


# The issuers the IdPs' own discovery documents name (the daemon compares them exactly). Written apart from
# each Example's `issuer` (what the file must say) so that changing the file and its expectation together
# still fails the login test when the result no longer matches the IdP.
KEYCLOAK_ISSUER = "https://YOUR_KEYCLOAK_HOST/realms/YOUR_REALM"
ENTRA_ISSUER = "https://login.microsoftonline.com/YOUR_TENANT_ID/v2.0"
ENTRA_BASE = "https://login.microsoftonline.com/YOUR_TENANT_ID/oauth2/v2.0"
GOOGLE_ISSUER = "https://accounts.google.com"
OKTA_ISSUER = "https://YOUR_OKTA_DOMAIN/oauth2/default"
AUTH0_ISSUER = "https://YOUR_TENANT.us.auth0.com/"

EXAMPLES: dict[str, Example] = {
    "keycloak": Example(
        doc_url="https://www.keycloak.org/docs/latest/server_admin/index.html",
        issuer="https://YOUR_KEYCLOAK_HOST/realms/YOUR_REALM",
        metadata={
            "issuer": KEYCLOAK_ISSUER,
            "device_authorization_endpoint": f"{KEYCLOAK_ISSUER}/protocol/openid-connect/auth/device",
            "token_endpoint": f"{KEYCLOAK_ISSUER}/protocol/openid-connect/token",
            "code_challenge_methods_supported": ["plain", "S256"],
        },
        client_id="YOUR_CLIENT_ID",
        scope="openid profile",
        sends_pkce=True,
        fill={"YOUR_KEYCLOAK_HOST": "sso.example.com", "YOUR_REALM": "dev", "YOUR_CLIENT_ID": "qwen-serve"},
        device_reply={
            "user_code": "WXYZ-ABCD",
            "verification_uri": f"{KEYCLOAK_ISSUER}/device",
            "verification_uri_complete": f"{KEYCLOAK_ISSUER}/device?user_code=WXYZ-ABCD",
            "expires_in": 600,
            "interval": 5,
        },
    ),
    "entra": Example(
        doc_url="https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-device-code",
        issuer="https://login.microsoftonline.com/YOUR_TENANT_ID/v2.0",
        # A tenant's own document: its issuer is the tenant's, and it lists no PKCE methods.
        metadata={
            "issuer": ENTRA_ISSUER,
            "device_authorization_endpoint": f"{ENTRA_BASE}/devicecode",
            "token_endpoint": f"{ENTRA_BASE}/token",
        },
        client_id="YOUR_APPLICATION_CLIENT_ID",
        scope="openid profile offline_access User.Read",
        fill={
            "YOUR_TENANT_ID": "8eaef023-2b34-4da1-9baa-8bc8c9d6a490",
            "YOUR_APPLICATION_CLIENT_ID": "535fb089-9ff3-47b6-9bfb-4f1264799865",
        },
        device_reply={
            "user_code": "YZMYLD4K",
            "verification_uri": "https://microsoft.com/devicelogin",
            "expires_in": 900,
            "interval": 5,
            "message": "To sign in, use a web browser to open the page https://microsoft.com/devicelogin ...",
        },
        pending=(400, {**PENDING, "error_codes": [70016]}),
    ),
    "google": Example(
        doc_url="https://developers.google.com/identity/protocols/oauth2/limited-input-device",
        issuer="https://accounts.google.com",
        metadata={
            "issuer": GOOGLE_ISSUER,
            "device_authorization_endpoint": "https://oauth2.googleapis.com/device/code",
            "token_endpoint": "https://oauth2.googleapis.com/token",
            "code_challenge_methods_supported": ["plain", "S256"],
        },
        client_id="YOUR_CLIENT_ID.apps.googleusercontent.com",
        client_auth="client_secret_post",
        client_secret_env="GOOGLE_CLIENT_SECRET",
        scope="openid email profile",
        pkce="off",
        fill={"YOUR_CLIENT_ID": "1045882053369-example"},
        # Google's name for the page: `verification_url`.
        device_reply={
            "user_code": "GQVQ-JKEC",
            "verification_url": "https://www.google.com/device",
            "expires_in": 1800,
            "interval": 5,
        },
        pending=(428, PENDING),
    ),
    "github": Example(
        doc_url="https://docs.github.com/en/apps/oauth-apps/building-oauth-apps/authorizing-oauth-apps#device-flow",
        endpoints=("https://github.com/login/device/code", "https://github.com/login/oauth/access_token"),
        client_id="YOUR_GITHUB_CLIENT_ID",
        scope="read:user",
        pkce="off",
        fill={"YOUR_GITHUB_CLIENT_ID": "Ov23liExampleClient01"},
        device_reply={
            "user_code": "WDJB-MJHT",
            "verification_uri": "https://github.com/login/device",
            "expires_in": 900,
            "interval": 5,
        },
        pending=(200, PENDING),  # GitHub sends its errors with HTTP 200
    ),
    "okta": Example(
        doc_url="https://developer.okta.com/docs/guides/device-authorization-grant/main/",
        issuer="https://YOUR_OKTA_DOMAIN/oauth2/default",
        metadata={
            "issuer": OKTA_ISSUER,
            "device_authorization_endpoint": f"{OKTA_ISSUER}/v1/device/authorize",
            "token_endpoint": f"{OKTA_ISSUER}/v1/token",
            "code_challenge_methods_supported": ["S256"],
        },
        client_id="YOUR_OKTA_CLIENT_ID",
        scope="openid profile offline_access",
        pkce="off",
        fill={"YOUR_OKTA_DOMAIN": "dev-123456.okta.com", "YOUR_OKTA_CLIENT_ID": "0oa1example2client3"},
        device_reply={
            "user_code": "HMBSRJRC",
            "verification_uri": "https://YOUR_OKTA_DOMAIN/activate",
            "verification_uri_complete": "https://YOUR_OKTA_DOMAIN/activate?user_code=HMBSRJRC",
            "expires_in": 600,
            "interval": 5,
        },
    ),
    "auth0": Example(
        doc_url="https://auth0.com/docs/quickstart/native/device",
        issuer="https://YOUR_TENANT.us.auth0.com/",
        # Auth0 names its issuer with a trailing slash and its endpoints without a double one.
        metadata={
            "issuer": AUTH0_ISSUER,
            "device_authorization_endpoint": f"{AUTH0_ISSUER}oauth/device/code",
            "token_endpoint": f"{AUTH0_ISSUER}oauth/token",
            "code_challenge_methods_supported": ["S256", "plain"],
        },
        client_id="YOUR_AUTH0_CLIENT_ID",
        scope="openid profile email offline_access",
        pkce="off",
        extra_params={"audience": "YOUR_API_IDENTIFIER"},
        fill={
            "YOUR_TENANT": "example-tenant",
            "YOUR_AUTH0_CLIENT_ID": "kBx3example9AuthZeroClient",
            "YOUR_API_IDENTIFIER": "https://api.example.com",
        },
        device_reply={
            "user_code": "WDJB-MJHT",
            "verification_uri": "https://YOUR_TENANT.us.auth0.com/activate",
            "verification_uri_complete": "https://YOUR_TENANT.us.auth0.com/activate?user_code=WDJB-MJHT",
            "expires_in": 900,
            "interval": 5,
        },
        pending=(403, PENDING),
    ),
}


def fill(value: Any, values: Mapping[str, str]) -> Any:
    """`value` with every placeholder in its strings replaced, through mappings, lists and tuples."""
    if isinstance(value, str):
        for placeholder, replacement in values.items():
            value = value.replace(placeholder, replacement)
        return value
    if isinstance(value, Mapping):
        return {key: fill(item, values) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(fill(item, values) for item in value)
    return value


def header(text: str) -> str:
    """The comment block the file opens with."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def refuse_requests(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"building a provider must not contact its IdP: {request.method} {request.url}")


# --- the files ----------------------------------------------------------------------------------------


def test_there_is_one_example_per_idp() -> None:
    names = sorted(path.stem for path in EXAMPLES_DIR.glob("*.toml"))
    assert len(names) >= 6, names
    assert names == sorted(EXAMPLES), "each conf/examples/*.toml needs its expectations in EXAMPLES, and back"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_header_names_the_idps_device_grant_docs(name: str) -> None:
    opening = header((EXAMPLES_DIR / f"{name}.toml").read_text(encoding="utf-8"))
    assert "https://" in opening
    assert EXAMPLES[name].doc_url in opening


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_no_example_writes_a_secret_inline(name: str) -> None:
    text = (EXAMPLES_DIR / f"{name}.toml").read_text(encoding="utf-8")
    assert re.search(r"\bclient_secret\s*=", text) is None  # not even in a comment
    assert "YOUR_" in text  # what a user must change is marked


# --- through the real loader, as shipped ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_example_loads_as_shipped(name: str) -> None:
    example = EXAMPLES[name]
    config = load_config([EXAMPLES_DIR / f"{name}.toml"], env={}, overrides=None)
    (provider,) = config.providers
    assert provider.provider_id == name
    assert provider.kind == "rfc8628"
    assert provider.issuer == example.issuer
    configured = (provider.device_authorization_endpoint, provider.token_endpoint)
    assert configured == (example.endpoints or (None, None))
    assert provider.client_id == example.client_id
    assert provider.scope == example.scope
    assert (provider.client_auth, provider.client_secret_env) == (example.client_auth, example.client_secret_env)
    assert provider.client_secret_file is None
    assert provider.pkce == example.pkce
    assert dict(provider.extra_params) == example.extra_params
    # An example adds one provider and changes nothing else.
    assert dataclasses.replace(config, providers=()) == Config()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
async def test_the_example_builds_its_provider_without_the_network(name: str) -> None:
    config = load_config([EXAMPLES_DIR / f"{name}.toml"], env=ENV, overrides=None)
    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse_requests)) as http:
        providers = build_providers(config, http, env=ENV)
    assert list(providers) == ["qwen-oauth", name]
    assert providers[name].credentials_file == f"device-flow/{name}.json"


# --- filled in, against an IdP that answers like the real one ----------------------------------------


@pytest.mark.parametrize("name", sorted(EXAMPLES))
async def test_the_filled_in_example_logs_in(name: str, tmp_path: Path) -> None:
    example = EXAMPLES[name]
    path = tmp_path / f"{name}.toml"
    path.write_text(fill((EXAMPLES_DIR / f"{name}.toml").read_text(encoding="utf-8"), example.fill), encoding="utf-8")
    config = load_config([path], env=ENV, overrides=None)
    (provider_config,) = config.providers
    assert "YOUR_" not in repr(provider_config), "a placeholder `fill` does not know"

    device_url, token_url = fill(example.device_and_token_urls(), example.fill)
    device, token = urlsplit(device_url), urlsplit(token_url)
    assert (device.scheme, device.netloc) == (token.scheme, token.netloc)
    device_reply = fill(example.device_reply, example.fill)
    status, pending = example.pending
    idp = FakeIdP(
        base_url=f"{device.scheme}://{device.netloc}",
        device_path=device.path,
        token_path=token.path,
        client_id=fill(example.client_id, example.fill),
        scope=example.scope,
        client_auth=example.client_auth,
        client_secret=ENV[example.client_secret_env] if example.client_secret_env else None,
        pkce=example.sends_pkce,
        extra_params=fill(example.extra_params, example.fill),
        # FakeIdP names the first device code it issues `device-code-1`.
        device_replies=[json_reply(200, {"device_code": "device-code-1", **device_reply})],
        token_replies=[json_reply(status, pending)],
    )
    expected_requests = []
    if example.metadata is not None:
        issuer = fill(example.issuer, example.fill)
        discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        idp.documents[discovery_url] = json_reply(200, fill(example.metadata, example.fill))
        expected_requests.append(("GET", discovery_url))
    expected_requests += [("POST", device_url), ("POST", token_url), ("POST", token_url)]

    async with idp.client() as http:
        provider = build_providers(config, http, env=ENV)[name]
        with trio.fail_after(5):
            authorization = await provider.start()
            first = await provider.poll(authorization)
            second = await provider.poll(authorization)

    assert authorization.user_code == device_reply["user_code"]
    assert authorization.verification_uri == device_reply.get("verification_uri", device_reply.get("verification_url"))
    assert authorization.verification_uri_complete == device_reply.get("verification_uri_complete")
    assert (authorization.code_verifier is not None) is example.sends_pkce
    assert isinstance(first, PollPending)
    assert isinstance(second, PollSuccess)
    document = second.credentials.document.reveal()
    assert document["access_token"] == "fake-access-1"
    assert document.get("issuer") == fill(example.issuer, example.fill)
    assert [(request.method, str(request.url)) for request in idp.requests] == expected_requests
