"""The status snapshot's `providers` cells (SPEC §2), projected from the credential store's cache."""

from __future__ import annotations

from collections.abc import Iterable

from serve.credentials import CredentialStore
from serve.models import AuthState, ProviderAuthStatus
from serve.providers.base import DeviceFlowProvider


def provider_statuses(
    providers: Iterable[DeviceFlowProvider],
    store: CredentialStore,
    now_ms: int,
) -> list[ProviderAuthStatus]:
    """One cell per configured provider, in the given order. Never blocks (the store's cache only).

    `authenticated`: a credentials file whose access token has not expired (or whose expiry is unknown);
    `expired`: its expiry is at or before `now_ms`; `unauthenticated`: no file.
    """
    cells = []
    for provider in providers:
        summary = store.summary(provider.credentials_file)
        if summary is None:
            cells.append(ProviderAuthStatus(provider.provider_id, AuthState.UNAUTHENTICATED))
            continue
        expired = summary.expires_at_ms is not None and summary.expires_at_ms <= now_ms
        cells.append(
            ProviderAuthStatus(
                provider_id=provider.provider_id,
                auth_state=AuthState.EXPIRED if expired else AuthState.AUTHENTICATED,
                expires_at_ms=summary.expires_at_ms,
                updated_at_ms=summary.updated_at_ms,
                account_alias=summary.account_alias,
            )
        )
    return cells
