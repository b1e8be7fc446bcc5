"""What the HTTP layer serves from: built by the daemon (the composition root), shared by reference."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from serve.clock import WallClock
from serve.config import Config
from serve.credentials import CredentialStore
from serve.events import EventBus
from serve.keeper import CredentialKeeper
from serve.lifecycle import Shutdown
from serve.providers.base import DeviceFlowProvider
from serve.registry import DeviceFlowRegistry


@dataclass(frozen=True, slots=True)
class Services:
    """The daemon's parts the routes use. `token` None means token-less (strict routes: `token_required`)."""

    config: Config
    token: bytes | None
    workspace: Path
    clock: WallClock
    bus: EventBus
    registry: DeviceFlowRegistry
    store: CredentialStore
    providers: Mapping[str, DeviceFlowProvider]
    shutdown: Shutdown
    keeper: CredentialKeeper | None = None  # refresh and logout; None over a store that is not files
