"""Identity providers: each builds device-flow requests and parses replies; timing lives in the registry."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import httpx

from serve.config import Config
from serve.providers.base import DeviceFlowProvider
from serve.providers.qwen import QwenOAuthProvider
from serve.providers.rfc8628 import Rfc8628Provider

__all__ = ["build_providers"]


def _system_now_ms() -> int:
    return time.time_ns() // 1_000_000


def build_providers(
    config: Config,
    http: httpx.AsyncClient,
    *,
    env: Mapping[str, str],
    now_ms: Callable[[], int] = _system_now_ms,
) -> dict[str, DeviceFlowProvider]:
    """The configured providers by id: `qwen-oauth` first (unless disabled), then `[providers.<id>]` in order.

    Contacts no IdP (discovery happens on first use). `env` is where `client_secret_env` is looked up;
    `now_ms` (epoch milliseconds; the daemon passes `WallClock.now_ms`) dates the credential documents.
    """
    providers: dict[str, DeviceFlowProvider] = {}
    if config.qwen_oauth.enabled:
        qwen = QwenOAuthProvider(config.qwen_oauth, http, now_ms=now_ms)
        providers[qwen.provider_id] = qwen
    for provider_config in config.providers:
        providers[provider_config.provider_id] = Rfc8628Provider(provider_config, http, env=env, now_ms=now_ms)
    return providers
