"""`serve.http.fast.fast_gets` answers exactly the hot GETs itself and hands everything else on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve.clock import WallClock
from serve.config import load_config
from serve.daemon import compose
from serve.http.fast import fast_gets
from serve.store import FileCredentialStore


@pytest.mark.parametrize(
    ("method", "path", "answered_here"),
    [
        ("GET", "/health", True),
        ("GET", "/capabilities", True),
        ("GET", "/workspace/auth/status", True),
        ("HEAD", "/health", False),
        ("GET", "/health/", False),
        ("POST", "/workspace/auth/status", False),
        ("GET", "/workspace/auth/device-flow/x", False),
    ],
)
async def test_only_exact_hot_gets_are_answered_here(
    tmp_path: Path, method: str, path: str, answered_here: bool
) -> None:
    services = compose(
        load_config(),
        token=None,
        workspace=tmp_path,
        http=httpx.AsyncClient(),
        store=FileCredentialStore(tmp_path / "home"),
        clock=WallClock(),
        env={},
    )
    passed_on: list[str] = []

    async def downstream(scope: Any, receive: Any, send: Any) -> None:
        passed_on.append(scope["path"])

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    await fast_gets(downstream, services)(scope, receive, send)
    assert passed_on == ([] if answered_here else [path])
    if answered_here:
        start, body = sent
        assert start["status"] == 200
        assert dict(start["headers"])[b"content-length"] == str(len(body["body"])).encode()
        assert isinstance(json.loads(body["body"]), dict)
