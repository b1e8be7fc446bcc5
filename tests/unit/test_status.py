"""The status snapshot's `providers` cells (SPEC §2): one per configured provider, three states."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

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


# --- the alias: only one the provider itself could have written (attack-run finding) -----------------


@pytest.mark.parametrize("alias", ["Mika", "uid:0a1b2c3d", "alice@example.com"])
def test_qwen_oauth_never_shows_an_alias(alias: str) -> None:
    # qwen-code writes oauth_creds.json itself, and our qwen-oauth provider derives no alias at all.
    summary = CredentialSummary(NOW_MS + 1, NOW_MS - 10, alias)
    assert statuses({"oauth_creds.json": summary}, Named("qwen-oauth", "oauth_creds.json")) == [
        ProviderAuthStatus("qwen-oauth", AuthState.AUTHENTICATED, NOW_MS + 1, NOW_MS - 10)
    ]


@pytest.mark.parametrize(
    ("alias", "shown"),
    [
        ("Mika", "Mika"),
        ("uid:0a1b2c3d", "uid:0a1b2c3d"),
        ("alice@example.com", None),
        ("+1 (555) 010-9999", None),
        ("  Mika", None),
        ("Mika\u202e", None),
        ("x" * 65, None),
    ],
)
def test_a_generic_provider_shows_only_an_alias_of_the_derived_shape(alias: str, shown: str | None) -> None:
    summary = CredentialSummary(NOW_MS + 1, NOW_MS - 10, alias)
    (cell,) = statuses({"device-flow/acme.json": summary}, Named("acme", "device-flow/acme.json"))
    assert cell.account_alias == shown


async def test_an_alias_written_by_someone_else_is_not_shown(tmp_path: Path) -> None:
    config = build_config({"providers": {"acme": {"kind": "rfc8628", "client_id": "c", "issuer": "https://a.example"}}})
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500))) as http:
        providers = build_providers(config, http, env={})
    store = FileCredentialStore(tmp_path)
    await store.load(p.credentials_file for p in providers.values())
    planted = {"access_token": "a", "account_alias": "alice@example.com", "scope": "x"}
    await store.save(Credentials("oauth_creds.json", Secret({**planted, "account_alias": "Mika"})))
    await store.save(Credentials("device-flow/acme.json", Secret(planted)))
    cells = provider_statuses(providers.values(), store, NOW_MS)
    assert [(c.provider_id, c.auth_state, c.account_alias) for c in cells] == [
        ("qwen-oauth", AuthState.AUTHENTICATED, None),
        ("acme", AuthState.AUTHENTICATED, None),
    ]
