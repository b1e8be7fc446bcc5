"""The status snapshot's `providers` cells (SPEC §2): one per configured provider, three states."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from serve.config import Config, build_config
from serve.credentials import Credentials
from serve.models import AuthState, CredentialSummary, ProviderAuthStatus
from serve.providers import build_providers
from serve.secrets import Secret
from serve.status import provider_statuses
from serve.store import FileCredentialStore

NOW_MS = 1_795_830_303_695


@dataclass(frozen=True)
class Named:
    provider_id: str
    credentials_file: str


class DictStore:
    """A thread-free store: summaries by file name."""

    def __init__(self, summaries: dict[str, CredentialSummary]) -> None:
        self.summaries = summaries

    async def save(self, credentials: Credentials) -> None:
        raise NotImplementedError

    def summary(self, file_name: str) -> CredentialSummary | None:
        return self.summaries.get(file_name)


def statuses(summaries: dict[str, CredentialSummary], *providers: Named) -> list[ProviderAuthStatus]:
    return provider_statuses(providers, DictStore(summaries), NOW_MS)  # type: ignore[arg-type]


def test_no_file_is_unauthenticated() -> None:
    assert statuses({}, Named("qwen-oauth", "oauth_creds.json")) == [
        ProviderAuthStatus("qwen-oauth", AuthState.UNAUTHENTICATED)
    ]


def test_a_future_expiry_is_authenticated() -> None:
    summary = CredentialSummary(NOW_MS + 1, NOW_MS - 10, "Mika")
    assert statuses({"device-flow/acme.json": summary}, Named("acme", "device-flow/acme.json")) == [
        ProviderAuthStatus("acme", AuthState.AUTHENTICATED, NOW_MS + 1, NOW_MS - 10, "Mika")
    ]


def test_an_unknown_expiry_is_authenticated() -> None:
    summary = CredentialSummary(None, NOW_MS - 10)
    assert statuses({"oauth_creds.json": summary}, Named("qwen-oauth", "oauth_creds.json")) == [
        ProviderAuthStatus("qwen-oauth", AuthState.AUTHENTICATED, None, NOW_MS - 10)
    ]


def test_a_past_or_present_expiry_is_expired() -> None:
    for expires_at_ms in (NOW_MS, NOW_MS - 1):
        summary = CredentialSummary(expires_at_ms, NOW_MS - 10)
        assert statuses({"oauth_creds.json": summary}, Named("qwen-oauth", "oauth_creds.json")) == [
            ProviderAuthStatus("qwen-oauth", AuthState.EXPIRED, expires_at_ms, NOW_MS - 10)
        ]


async def test_one_cell_per_configured_provider_in_order_from_the_real_store(tmp_path: Path) -> None:
    config: Config = build_config(
        {
            "providers": {
                "zeta": {"kind": "rfc8628", "client_id": "c", "issuer": "https://zeta.example"},
                "acme": {"kind": "rfc8628", "client_id": "c", "issuer": "https://acme.example"},
            }
        }
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500))) as http:
        providers = build_providers(config, http, env={})
    store = FileCredentialStore(tmp_path)
    await store.load(p.credentials_file for p in providers.values())
    await store.save(Credentials("oauth_creds.json", Secret({"access_token": "a", "expiry_date": NOW_MS - 1})))
    await store.save(Credentials("device-flow/acme.json", Secret({"access_token": "a", "expiry_date": NOW_MS + 1})))
    cells = provider_statuses(providers.values(), store, NOW_MS)
    assert [(c.provider_id, c.auth_state) for c in cells] == [
        ("qwen-oauth", AuthState.EXPIRED),
        ("zeta", AuthState.UNAUTHENTICATED),
        ("acme", AuthState.AUTHENTICATED),
    ]
    assert all(c.updated_at_ms is not None for c in cells if c.auth_state is not AuthState.UNAUTHENTICATED)
