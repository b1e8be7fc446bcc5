"""`GET /openapi.json` (SPEC §2): the document describes what the daemon really answers.

Every response a real client got during a login, a cancel, an IdP error and the error paths is validated
against the document's own schema for its (path, method, status) with JSON Schema 2020-12; the document's
paths and the routes the app registers are the same set.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio_websocket
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from support.daemon import loopback_client
from support.idp_server import serve_idp
from support.login import (
    CLIENT_ID_HEADER,
    EVENTS_PATH,
    FLOWS_PATH,
    STATUS_PATH,
    Recorder,
    StartDaemon,
    closed_port_url,
    generic_idp,
    generic_provider,
    login_config,
    next_event,
    oauth_error,
    open_events,
    qwen_idp,
    qwen_tokens,
    script_devices,
    ws_url,
)
from support.openapi_checker import DOC_URI, HTTP_METHODS, Checker, pointer

from serve.daemon import RunningDaemon
from serve.http.app import create_app
from serve.http.openapi import openapi_document


@pytest.fixture
async def daemon(start_daemon: StartDaemon) -> AsyncIterator[RunningDaemon]:
    async with start_daemon(login_config(closed_port_url())) as running:
        yield running


async def fetch_document(daemon: RunningDaemon, auth: dict[str, str]) -> dict[str, Any]:
    async with loopback_client(base_url=daemon.url) as http:
        assert (await http.get("/openapi.json")).status_code == 401, "behind the bearer"
        response = await http.get("/openapi.json", headers=auth)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document: dict[str, Any] = response.json()
    return document


def test_the_document_and_its_schemas_are_valid_2020_12() -> None:
    document = openapi_document()
    assert document["openapi"] == "3.1.0"
    for schema in document["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    registry: Registry[Any] = Registry().with_resource(DOC_URI, DRAFT202012.create_resource(document))
    for template, item in document["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            for status, response in operation["responses"].items():
                for media in response.get("content", {}).values():
                    Draft202012Validator.check_schema(media["schema"])
                    # Every $ref resolves inside the document.
                    where = pointer("paths", template, method, "responses", status, "content", "application/json")
                    resolver = registry.resolver(DOC_URI)
                    resolver.lookup(f"{DOC_URI}#{where}/schema")
                    for ref in re.findall(r'"\$ref": "([^"]+)"', json.dumps(media["schema"])):
                        resolver.lookup(f"{DOC_URI}{ref}")


@pytest.mark.parametrize(
    ("path", "method", "status", "body"),
    [
        ("/workspace/auth/device-flow/x", "GET", 200, b'{"deviceFlowId":"x"}'),  # required fields missing
        (
            "/workspace/auth/device-flow/x",
            "GET",
            200,
            b'{"deviceFlowId":"x","providerId":"p","status":"pending","createdAt":1,"accessToken":"t"}',
        ),  # a field the contract does not name
        (
            "/workspace/auth/device-flow/x",
            "GET",
            200,
            b'{"deviceFlowId":"x","providerId":"p","status":"done","createdAt":1}',
        ),  # not a status
        ("/workspace/auth/status", "GET", 200, b'{"v":1}'),
        ("/workspace/auth/device-flow", "POST", 200, b'{"error":"x","code":"y","detail":"z"}'),
        ("/workspace/auth/device-flow", "POST", 418, b'{"error":"x"}'),  # an undocumented status
        ("/workspace/auth/device-flow/x", "DELETE", 204, b"{}"),  # 204 has no body
    ],
)
def test_the_checker_refuses_what_the_document_does_not_allow(path: str, method: str, status: int, body: bytes) -> None:
    with pytest.raises(AssertionError):
        Checker(openapi_document()).check(path, method, status, body, "application/json")


async def test_every_real_response_matches_the_document(
    start_daemon: StartDaemon, auth: dict[str, str], token: str
) -> None:
    qwen = qwen_idp(token_replies=[oauth_error("authorization_pending"), qwen_tokens(), oauth_error("access_denied")])
    script_devices(qwen, interval=0.3)  # the login
    script_devices(qwen, interval=30)  # the cancelled flow
    script_devices(qwen, interval=0.05)  # the denied one
    down = generic_idp()
    recorder = Recorder()
    anonymous = Recorder()
    with trio.fail_after(15):
        async with serve_idp(qwen) as served:
            # `down` names a loopback port nothing listens on: its starts are 502s.
            down.base_url = closed_port_url()
            config = login_config(served.url, max_active=1, providers={"down": generic_provider(down)})
            async with (
                start_daemon(config) as daemon,
                recorder.client(daemon, auth) as http,
                anonymous.client(daemon, {}) as no_token,
                open_events(daemon, auth) as ws,
            ):
                document = await fetch_document(daemon, auth)
                checker = Checker(document)
                a, b = {CLIENT_ID_HEADER: "cli-A"}, {CLIENT_ID_HEADER: "cli-B"}

                await http.get("/health")
                await http.get("/capabilities")
                await http.get("/openapi.json")

                # A login, attached to by others, then a no-op DELETE.
                login = await http.post(FLOWS_PATH, json={"providerId": "qwen-oauth"}, headers=a)
                assert login.status_code == 201
                login_id = login.json()["deviceFlowId"]
                assert (await http.post(FLOWS_PATH, json={"providerId": "down"})).status_code == 409
                assert (await http.post(FLOWS_PATH, json={"providerId": "qwen-oauth"}, headers=a)).status_code == 200
                assert (await http.post(FLOWS_PATH, json={"providerId": "qwen-oauth"}, headers=b)).status_code == 200
                await http.get(f"{FLOWS_PATH}/{login_id}", headers=a)
                await http.get(f"{FLOWS_PATH}/{login_id}", headers=b)
                await http.get(STATUS_PATH)
                assert (await next_event(ws))["type"] == "auth_device_flow_started"
                assert (await next_event(ws))["type"] == "auth_device_flow_authorized"
                await http.get(f"{FLOWS_PATH}/{login_id}", headers=a)
                await http.get(STATUS_PATH)
                assert (await http.delete(f"{FLOWS_PATH}/{login_id}")).status_code == 204

                # A cancel.
                cancel_id = (await http.post(FLOWS_PATH, json={"providerId": "qwen-oauth"}, headers=a)).json()[
                    "deviceFlowId"
                ]
                assert (await http.delete(f"{FLOWS_PATH}/{cancel_id}", headers=b)).status_code == 204
                await http.get(f"{FLOWS_PATH}/{cancel_id}", headers=a)
                await http.get(f"{FLOWS_PATH}/{cancel_id}", headers=b)

                # An IdP error.
                denied_id = (await http.post(FLOWS_PATH, json={"providerId": "qwen-oauth"})).json()["deviceFlowId"]
                for expected in ("started", "cancelled", "started", "failed"):
                    assert (await next_event(ws))["type"] == f"auth_device_flow_{expected}"
                assert (await http.get(f"{FLOWS_PATH}/{denied_id}")).json()["errorKind"] == "access_denied"

                # The error paths.
                assert (await http.post(FLOWS_PATH, json={"providerId": "down"})).status_code == 502
                await http.post(FLOWS_PATH, json={})
                await http.post(FLOWS_PATH, content=b"{", headers={"Content-Type": "application/json"})
                await http.post(FLOWS_PATH, json={"providerId": "github"})
                await http.post(FLOWS_PATH, json={"providerId": "qwen-oauth"}, headers={CLIENT_ID_HEADER: "bad id"})
                await http.get(f"{FLOWS_PATH}/{denied_id}", headers={CLIENT_ID_HEADER: "bad id"})
                await http.delete(f"{FLOWS_PATH}/{denied_id}", headers={CLIENT_ID_HEADER: "bad id"})
                await http.get(f"{FLOWS_PATH}/unknown")
                await http.delete(f"{FLOWS_PATH}/unknown")
                await http.post(FLOWS_PATH, content=b"x" * 70_000, headers={"Content-Type": "application/json"})
                for method, path in [
                    ("GET", "/capabilities"),
                    ("GET", "/openapi.json"),
                    ("POST", FLOWS_PATH),
                    ("GET", f"{FLOWS_PATH}/{denied_id}"),
                    ("DELETE", f"{FLOWS_PATH}/{denied_id}"),
                    ("GET", STATUS_PATH),
                ]:
                    assert (await no_token.request(method, path)).status_code == 401

                # Gates 1–2 answer on every route, /health included.
                evil_host = {"Host": "evil.example:4170"}
                assert (await no_token.get("/health", headers=evil_host)).status_code == 403
                assert (await http.post(FLOWS_PATH, json={}, headers=evil_host)).status_code == 403
                assert (await http.get(STATUS_PATH, headers={"Origin": "https://evil.example"})).status_code == 403

                # The event stream's handshake refusals are HTTP responses too.
                with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                    async with trio_websocket.open_websocket_url(ws_url(daemon)):
                        pass
                checker.check(
                    EVENTS_PATH, "GET", rejected.value.status_code, rejected.value.body or b"", "application/json"
                )

                daemon.services.shutdown.begin()
                assert (await http.post(FLOWS_PATH, json={"providerId": "qwen-oauth"})).status_code == 503

    for response in recorder.responses + anonymous.responses:
        checker.check_response(response)
    expected_statuses = {"200", "201", "204", "400", "401", "403", "404", "409", "413", "502", "503"}
    assert {status for _, _, status in checker.seen} == expected_statuses
    assert ("/workspace/auth/device-flow/{deviceFlowId}", "get", "200") in checker.seen
    assert token not in json.dumps(document)


def routes_of_app(daemon: RunningDaemon) -> set[tuple[str, str]]:
    """(path template with `{}` for each variable, method) for every rule the daemon's app registers."""
    app = create_app(daemon.services)
    routes = set()
    for rule in app.url_map.iter_rules():
        template = re.sub(r"<(?:[^:>]+:)?[^>]+>", "{}", rule.rule)
        methods = {"get"} if rule.websocket else {m.lower() for m in rule.methods or ()} - {"head", "options"}
        routes |= {(template, method) for method in methods}
    return routes


def routes_of_document(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (re.sub(r"\{[^}]+\}", "{}", template), method)
        for template, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


async def test_every_documented_route_is_registered(daemon: RunningDaemon, auth: dict[str, str]) -> None:
    with trio.fail_after(5):
        document = await fetch_document(daemon, auth)
    assert routes_of_document(document) <= routes_of_app(daemon)


async def test_every_registered_route_but_quarts_static_is_documented(
    daemon: RunningDaemon, auth: dict[str, str]
) -> None:
    with trio.fail_after(5):
        document = await fetch_document(daemon, auth)
    registered = {route for route in routes_of_app(daemon) if route != ("/static/{}", "get")}
    assert registered == routes_of_document(document)


async def test_the_app_registers_no_route_outside_the_document(daemon: RunningDaemon, auth: dict[str, str]) -> None:
    with trio.fail_after(5):
        document = await fetch_document(daemon, auth)
    assert routes_of_app(daemon) == routes_of_document(document)
