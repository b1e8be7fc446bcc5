"""The Python client of a qwen-serve daemon (SPEC §6): REST, the event stream, and logins that complete.

    async with DaemonClient("http://127.0.0.1:4170") as client:     # token: argument, else $QWEN_SERVER_TOKEN
        login = await client.auth.start("qwen-oauth")
        print(login.verification_uri_complete or login.verification_uri, login.user_code)
        result = await login.await_completion(timeout=600)         # events, else polling
        print(result.status, result.account_alias)

Imports nothing of the server (no quart, hypercorn or registry): only `serve.wire`, `serve.models`, httpx
and trio-websocket.
"""

from __future__ import annotations

from serve.client.auth import AuthEventState, AuthFlow, AuthResult, LoginHandle, ProviderLoginState, reduce_auth_event
from serve.client.daemon import DEFAULT_DAEMON_URL, DaemonClient, StreamLagged
from serve.client.errors import DaemonError, DaemonHTTPError, DaemonProtocolError, DaemonUnreachable
from serve.models import (
    AuthStatusSnapshot,
    Capabilities,
    DeviceFlowInfo,
    PendingFlow,
    ProviderCell,
    ReceivedEvent,
    StreamReset,
)

__all__ = [
    "DEFAULT_DAEMON_URL",
    "AuthEventState",
    "AuthFlow",
    "AuthResult",
    "AuthStatusSnapshot",
    "Capabilities",
    "DaemonClient",
    "DaemonError",
    "DaemonHTTPError",
    "DaemonProtocolError",
    "DaemonUnreachable",
    "DeviceFlowInfo",
    "LoginHandle",
    "PendingFlow",
    "ProviderCell",
    "ProviderLoginState",
    "ReceivedEvent",
    "StreamLagged",
    "StreamReset",
    "reduce_auth_event",
]
