"""The credential keeper (`serve.keeper`): refresh at the skew, rotation, retries, refusals, locks, logout.

Real parts (the generic provider, the file store on a tmp `$QWEN_HOME`, the event bus) under an
autojump clock; the IdP is a scripted `httpx.MockTransport` handler. Wall time is virtual: t=0 is EPOCH_S.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import trio
import trio.testing
from support.registry_fakes import EPOCH_MS, EPOCH_S, RecordingBus

from serve.clock import WallClock
from serve.config import RefreshConfig, Rfc8628ProviderConfig
from serve.credentials import Credentials
from serve.errors import PersistError
from serve.keeper import CredentialKeeper
from serve.models import AuthState, CredentialsInvalid, CredentialsRefreshed, CredentialsRemoved, ErrorKind
from serve.providers.rfc8628 import Rfc8628Provider
from serve.secrets import Secret
from serve.status import provider_statuses
from serve.store import FileCredentialStore

BASE = "https://idp.example"
TOKEN_URL = f"{BASE}/token"
REVOKE_URL = f"{BASE}/revoke"
FILE = "device-flow/acme.json"
LIFETIME_S = 600
SKEW_S = 60
CONFIG = RefreshConfig(skew_s=SKEW_S, retry_min_s=5, retry_max_s=40, lock_wait_s=10)


@dataclass
class RefreshIdP:
    """Answers refresh grants (new tokens each time, a new refresh token unless `rotate` is off) and RFC 7009
    revocations; `replies` are used first, one per refresh request (an exception is raised as the transport's)."""

    rotate: bool = True
    expires_in: int = LIFETIME_S
    revoke_status: int = 200
    replies: list[httpx.Response | Exception] = field(default_factory=list)
    refreshes: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    revoked: list[dict[str, str]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        if str(request.url) == REVOKE_URL:
            self.revoked.append(form)
            return httpx.Response(self.revoke_status)
        assert str(request.url) == TOKEN_URL and form.pop("grant_type") == "refresh_token"
        self.refreshes.append((trio.current_time(), form))
        if self.replies:
            reply = self.replies.pop(0)
            if isinstance(reply, Exception):
                raise reply
            return reply
        n = len(self.refreshes)
        body: dict[str, Any] = {"access_token": f"at-{n}", "token_type": "Bearer", "expires_in": self.expires_in}
        if self.rotate:
            body["refresh_token"] = f"rt-{n}"
        return httpx.Response(200, json=body)


def provider(idp: RefreshIdP, **overrides: Any) -> Rfc8628Provider:
    config = Rfc8628ProviderConfig(
        provider_id="acme",
        client_id="client-1",
        device_authorization_endpoint=f"{BASE}/device",
        token_endpoint=TOKEN_URL,
        **{"revocation_endpoint": REVOKE_URL, **overrides},
    )
    clock = WallClock(EPOCH_S)
    return Rfc8628Provider(config, httpx.AsyncClient(transport=httpx.MockTransport(idp)), env={}, now_ms=clock.now_ms)


def document(now_ms: int, *, lifetime_s: int = LIFETIME_S, refresh_token: str | None = "rt-0") -> dict[str, Any]:
    doc: dict[str, Any] = {"access_token": "at-0", "token_type": "Bearer", "expires_in": lifetime_s}
    if refresh_token is not None:
        doc["refresh_token"] = refresh_token
    doc.update(expiry_date=now_ms + lifetime_s * 1000, obtained_at=now_ms, account_alias="alice")
    return doc


async def write(store: FileCredentialStore, doc: dict[str, Any]) -> None:
    await store.save(Credentials(FILE, Secret(doc), doc.get("expiry_date")))


def on_disk(home: Path) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((home / FILE).read_text())
    return value


@dataclass
class Setup:
    keeper: CredentialKeeper
    store: FileCredentialStore
    bus: RecordingBus
    clock: WallClock


def make(home: Path, idp: RefreshIdP, **overrides: Any) -> Setup:
    clock = WallClock(EPOCH_S)
    bus = RecordingBus(clock=clock)
    store = FileCredentialStore(home)
    keeper = CredentialKeeper(
        providers={"acme": provider(idp, **overrides)}, store=store, bus=bus, clock=clock, config=CONFIG
    )
    return Setup(keeper, store, bus, clock)


@asynccontextmanager
async def running(setup: Setup) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await setup.store.load([FILE])
        await nursery.start(setup.keeper.run)
        yield
        nursery.cancel_scope.cancel()


def refreshed_count(setup: Setup) -> int:
    return sum(isinstance(event, CredentialsRefreshed) for event in setup.bus.events)


async def until(predicate: Any, limit_s: float = 100_000) -> None:
    """Wait in virtual time, in steps short beside the timings tested (each jump costs 20 ms of real time)."""
    with trio.fail_after(limit_s):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(20)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Autojump, but only after 20 ms of real idleness: the store works on threads, and a clock that jumped
    while a thread ran would move virtual time in the middle of a refresh."""
    return trio.testing.MockClock(autojump_threshold=0.02)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


async def test_refreshes_at_the_skew_and_persists_each_rotation(home: Path, clock: trio.testing.MockClock) -> None:
    idp = RefreshIdP()
    setup = make(home, idp)
    await write(setup.store, document(EPOCH_MS))
    async with running(setup):
        await until(lambda: refreshed_count(setup) >= 2)  # written and announced, not only requested
    (first_at, first_form), (second_at, second_form) = idp.refreshes[:2]
    # Due `skew` before expiry (600 - 60 s), never after it.
    assert LIFETIME_S - SKEW_S <= first_at < LIFETIME_S
    assert first_form == {"client_id": "client-1", "refresh_token": "rt-0"}
    assert second_form["refresh_token"] == "rt-1"  # the rotated token was persisted, then used
    assert first_at + LIFETIME_S - SKEW_S <= second_at < first_at + LIFETIME_S
    saved = on_disk(home)
    assert saved["access_token"] == "at-2" and saved["refresh_token"] == "rt-2"
    assert saved["account_alias"] == "alice"  # kept though the refresh reply has no id token
    assert stat.S_IMODE((home / FILE).stat().st_mode) == 0o600
    refreshed = [e for e in setup.bus.events if isinstance(e, CredentialsRefreshed)]
    # Each event names the expiry of the token it wrote: the last one, the file's.
    assert refreshed[-1] == CredentialsRefreshed("acme", saved["expiry_date"])
    assert refreshed[0].expires_at_ms is not None
    assert refreshed[0].expires_at_ms >= EPOCH_MS + int((first_at + LIFETIME_S) * 1000)
    assert '"type":"auth_credentials_refreshed"' in setup.bus.encoded[0]
    assert "at-" not in "".join(setup.bus.encoded) and "rt-" not in "".join(setup.bus.encoded)


async def test_the_old_refresh_token_is_kept_when_the_idp_sends_none(home: Path, clock: trio.testing.MockClock) -> None:
    idp = RefreshIdP(rotate=False)
    setup = make(home, idp)
    await write(setup.store, document(EPOCH_MS))
    async with running(setup):
        await until(lambda: refreshed_count(setup) >= 2)  # written and announced, not only requested
    assert [form["refresh_token"] for _, form in idp.refreshes[:2]] == ["rt-0", "rt-0"]
    assert on_disk(home)["refresh_token"] == "rt-0"


async def test_transient_failures_are_retried_with_growing_back_off(home: Path, clock: trio.testing.MockClock) -> None:
    idp = RefreshIdP(
        replies=[httpx.Response(503), httpx.ConnectError("down"), httpx.Response(500, json={"error": "server_error"})]
    )
    setup = make(home, idp)
    await write(setup.store, document(EPOCH_MS))
    async with running(setup):
        await until(lambda: any(isinstance(e, CredentialsRefreshed) for e in setup.bus.events))
    times = [at for at, _ in idp.refreshes[:4]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(gaps) == 3 and gaps[0] >= 5 and gaps[1] >= 10 and gaps[2] >= 20, gaps
    assert on_disk(home)["access_token"] == "at-4"
    assert not any(isinstance(e, CredentialsInvalid) for e in setup.bus.events)


async def test_invalid_grant_marks_the_credentials_until_a_new_login(home: Path, clock: trio.testing.MockClock) -> None:
    idp = RefreshIdP(
        replies=[httpx.Response(400, json={"error": "invalid_grant", "error_description": "rt-0 is revoked"})]
    )
    setup = make(home, idp)
    await write(setup.store, document(EPOCH_MS))
    async with running(setup):
        await until(lambda: bool(setup.bus.events))
        assert setup.bus.events == [CredentialsInvalid("acme", ErrorKind.INVALID_GRANT)]
        [cell] = provider_statuses([provider(idp)], setup.store, setup.clock.now_ms(), setup.keeper.is_invalid)
        assert cell.auth_state is AuthState.INVALID
        await trio.sleep(2 * LIFETIME_S)
        assert len(idp.refreshes) == 1  # never retried: only a new login helps
        await write(setup.store, document(setup.clock.now_ms()))  # the new login
        await until(lambda: refreshed_count(setup) == 1)
    assert on_disk(home)["access_token"] == "at-2"
    assert "rt-0 is revoked" not in "".join(setup.bus.encoded)


async def test_no_refresh_token_is_invalid_without_asking_the_idp(home: Path, clock: trio.testing.MockClock) -> None:
    idp = RefreshIdP()
    setup = make(home, idp)
    await write(setup.store, document(EPOCH_MS, refresh_token=None))
    async with running(setup):
        await until(lambda: bool(setup.bus.events))
    assert setup.bus.events == [CredentialsInvalid("acme", ErrorKind.INVALID_GRANT)] and idp.refreshes == []


async def test_concurrent_triggers_make_one_request(home: Path, clock: trio.testing.MockClock) -> None:
    idp = RefreshIdP()
    setup = make(home, idp)
    await write(setup.store, document(EPOCH_MS - LIFETIME_S * 1000))  # expired now
    outcomes: list[str] = []
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(lambda: _record(outcomes, setup.keeper.refresh("acme")))
    assert sorted(outcomes) == ["fresh"] * 4 + ["refreshed"] and len(idp.refreshes) == 1


async def _record(outcomes: list[str], call: Any) -> None:
    outcomes.append(await call)


async def test_a_file_another_process_refreshed_meanwhile_is_not_refreshed_again(
    home: Path, clock: trio.testing.MockClock
) -> None:
    idp = RefreshIdP()
    setup = make(home, idp)
    await write(setup.store, document(EPOCH_MS - LIFETIME_S * 1000))
    await setup.store.load([FILE])  # the cache says: due
    other = FileCredentialStore(home)  # another process writes a fresh document
    await write(other, {**document(setup.clock.now_ms()), "access_token": "theirs"})
    assert await setup.keeper.refresh("acme") == "fresh"
    assert idp.refreshes == [] and on_disk(home)["access_token"] == "theirs"


async def test_two_daemons_on_one_home_refresh_once(home: Path, clock: trio.testing.MockClock) -> None:
    idp = RefreshIdP()
    first, second = make(home, idp), make(home, idp)
    await write(first.store, document(EPOCH_MS - LIFETIME_S * 1000))
    for setup in (first, second):
        await setup.store.load([FILE])
    outcomes: list[str] = []
    async with trio.open_nursery() as nursery:
        for setup in (first, second):
            nursery.start_soon(_record, outcomes, setup.keeper.refresh("acme"))
    assert sorted(outcomes) == ["fresh", "refreshed"] and len(idp.refreshes) == 1
    assert (home / (FILE + ".lock")).exists() and stat.S_IMODE((home / (FILE + ".lock")).stat().st_mode) == 0o600


async def test_a_due_file_that_cannot_be_read_is_retried_with_back_off_not_at_once(
    home: Path, clock: trio.testing.MockClock
) -> None:
    """The store keeps the last good summary of a file it cannot parse (its writer may not be done), so the
    cache still says due: the keeper must not try again at once, over and over."""
    setup = make(home, RefreshIdP())
    await write(setup.store, document(EPOCH_MS - LIFETIME_S * 1000))
    await setup.store.load([FILE])
    (home / FILE).write_text("{not json")
    reads = 0
    read_current = setup.store.read_current
    # Virtual time: back-offs of 5, 10, 20 s fit in 60 s; a spin never lets time pass, so 50 reads end it.
    with trio.move_on_after(60) as bound:

        async def counted(file_name: str) -> Any:
            nonlocal reads
            reads += 1
            if reads >= 50:
                bound.cancel()
            return await read_current(file_name)

        setup.store.read_current = counted  # type: ignore[method-assign]
        await setup.keeper.keep_fresh("acme")
    assert reads <= 5


async def test_waiting_for_another_process_lock_leaves_no_descriptor_behind(
    home: Path, clock: trio.testing.MockClock
) -> None:
    """Another process holds the lock file: a refresh that gives up after `lock_wait_s`, and one cancelled
    while it waits (a shutdown), both close the lock file they opened."""
    setup = make(home, RefreshIdP())
    await write(setup.store, document(EPOCH_MS - LIFETIME_S * 1000))
    await setup.store.load([FILE])
    other = os.open(home / (FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other, fcntl.LOCK_EX)  # flock is per open file: this holds it against the keeper's own open
    try:
        open_before = len(os.listdir("/proc/self/fd"))
        assert await setup.keeper.refresh("acme") == "locked"
        with trio.move_on_after(CONFIG.lock_wait_s / 2) as waiting:
            await setup.keeper.refresh("acme")
        assert waiting.cancelled_caught
        assert len(os.listdir("/proc/self/fd")) == open_before
    finally:
        os.close(other)


@pytest.mark.parametrize(
    ("overrides", "revoke_status", "expected", "revoked"),
    [
        ({}, 200, "revoked", ["rt-0", "at-0"]),
        ({"revocation_endpoint": None}, 200, "unsupported", []),
        ({}, 503, "failed", ["rt-0", "at-0"]),
    ],
)
async def test_logout_revokes_when_it_can_and_always_removes(
    home: Path, overrides: dict[str, Any], revoke_status: int, expected: str, revoked: list[str]
) -> None:
    idp = RefreshIdP(revoke_status=revoke_status)
    setup = make(home, idp, **overrides)
    await write(setup.store, document(EPOCH_MS))
    result = await setup.keeper.logout("acme")
    assert (result.removed, result.revocation) == (True, expected)
    assert [form["token"] for form in idp.revoked] == revoked
    assert [form.get("token_type_hint") for form in idp.revoked] == ["refresh_token", "access_token"][: len(revoked)]
    assert not (home / FILE).exists() and setup.store.summary(FILE) is None
    assert setup.bus.events == [CredentialsRemoved("acme")]
    again = await setup.keeper.logout("acme")
    assert (again.removed, again.revocation) == (False, "none") and len(setup.bus.events) == 1


async def test_a_symlinked_credentials_directory_is_neither_read_nor_written_through(
    home: Path, tmp_path: Path
) -> None:
    """`device-flow/` replaced by a symlink to another folder: the keeper refuses it as the store does."""
    idp = RefreshIdP()
    setup = make(home, idp)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "acme.json").write_text(json.dumps(document(EPOCH_MS - LIFETIME_S * 1000)))
    home.mkdir(mode=0o700)
    (home / "device-flow").symlink_to(elsewhere)
    assert await setup.keeper.refresh("acme") == "transient"  # retried with back-off, never written through
    with pytest.raises(PersistError):
        await setup.keeper.logout("acme")
    assert idp.refreshes == [] and idp.revoked == []
    assert sorted(p.name for p in elsewhere.iterdir()) == ["acme.json"]  # no lock file, nothing removed
