"""The status snapshot's `providers` cells (SPEC §2), projected from the credential store's cache."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from serve.config import QWEN_OAUTH_ID
from serve.credentials import CredentialStore
from serve.models import AuthState, CredentialSummary, ProviderAuthStatus
from serve.providers.base import DeviceFlowProvider
from serve.providers.rfc8628 import is_derived_alias


def provider_statuses(
    providers: Iterable[DeviceFlowProvider],
    store: CredentialStore,
    now_ms: int,
    is_invalid: Callable[[str, CredentialSummary], bool] | None = None,
) -> list[ProviderAuthStatus]:
    """One cell per configured provider, in the given order. Never blocks (the store's cache only).

    `authenticated`: a credentials file whose access token has not expired (or whose expiry is unknown);
    `expired`: its expiry is at or before `now_ms`; `unauthenticated`: no file. The alias is the file's
    only when `shown_alias` vouches for it. `invalid`: the file the IdP refused to refresh (`is_invalid`, given
    when the daemon refreshes).
    """
    cells = []
    for provider in providers:
        summary = store.summary(provider.credentials_file)
        if summary is None:
            cells.append(ProviderAuthStatus(provider.provider_id, AuthState.UNAUTHENTICATED))
            continue
        expired = summary.expires_at_ms is not None and summary.expires_at_ms <= now_ms
        state = AuthState.EXPIRED if expired else AuthState.AUTHENTICATED
        if is_invalid is not None and is_invalid(provider.provider_id, summary):
            state = AuthState.INVALID
        cells.append(
            ProviderAuthStatus(
                provider_id=provider.provider_id,
                auth_state=state,
                expires_at_ms=summary.expires_at_ms,
                updated_at_ms=summary.updated_at_ms,
                account_alias=shown_alias(provider.provider_id, summary.account_alias),
            )
        )
    return cells


def shown_alias(provider_id: str, alias: str | None) -> str | None:
    """The alias a provider's cell may show: one that provider itself could have written, else None.

    The files are not only ours: qwen-code rewrites `oauth_creds.json` (and anyone with the user's rights
    may write any of them), so an alias is shown only in the shape our derivation gives (SPEC §5: never
    an email or phone number). qwen-oauth derives none at all (its token reply names no one).
    """
    if alias is None or provider_id == QWEN_OAUTH_ID:
        return None
    return alias if is_derived_alias(alias) else None
