"""reduce_auth_event over recorded event logs: order, stale and repeated frames, unknown kinds."""

from __future__ import annotations

from functools import reduce

from serve import wire
from serve.client import AuthEventState, ProviderLoginState, ReceivedEvent, reduce_auth_event
from serve.models import StreamHello

# Frames as a daemon sent them (ids, order and bodies from a real run: two logins of qwen-oauth, the first
# throttled then cancelled, the second authorized; one acme login that expired).
RECORDED = [
    '{"v":1,"type":"hello","data":{"lastEventId":0,"epoch":"e1"}}',
    '{"id":1,"v":1,"type":"auth_device_flow_started","data":{"deviceFlowId":"f1","providerId":"qwen-oauth",'
    '"expiresAt":1700000600000},"originatorClientId":"cli-A","_meta":{"serverTimestamp":1700000000000}}',
    '{"id":2,"v":1,"type":"auth_device_flow_throttled","data":{"deviceFlowId":"f1","intervalMs":10000},'
    '"_meta":{"serverTimestamp":1700000010000}}',
    '{"id":3,"v":1,"type":"auth_device_flow_started","data":{"deviceFlowId":"a1","providerId":"acme",'
    '"expiresAt":1700000300000},"_meta":{"serverTimestamp":1700000011000}}',
    '{"id":4,"v":1,"type":"auth_device_flow_cancelled","data":{"deviceFlowId":"f1"},"originatorClientId":"cli-B",'
    '"_meta":{"serverTimestamp":1700000012000}}',
    '{"v":1,"type":"heartbeat","data":{"lastEventId":4}}',
    '{"id":5,"v":1,"type":"auth_device_flow_started","data":{"deviceFlowId":"f2","providerId":"qwen-oauth",'
    '"expiresAt":1700000900000},"_meta":{"serverTimestamp":1700000300000}}',
    '{"id":6,"v":1,"type":"auth_device_flow_failed","data":{"deviceFlowId":"a1","errorKind":"expired_token",'
    '"hint":"device-flow expired without authorization","status":"expired"},"_meta":{"serverTimestamp":1700000300001}}',
    '{"id":7,"v":1,"type":"auth_credentials_refreshed","data":{"providerId":"acme","expiresAt":1}}',
    '{"id":8,"v":1,"type":"auth_device_flow_authorized","data":{"deviceFlowId":"f2","providerId":"qwen-oauth",'
    '"expiresAt":1700003900000,"accountAlias":"uid:0a1b2c3d"},"_meta":{"serverTimestamp":1700000400000}}',
]


def fold(frames: list[str], state: AuthEventState | None = None) -> AuthEventState:
    items = [wire.parse_frame(frame) for frame in frames]
    events = [item for item in items if isinstance(item, ReceivedEvent | StreamHello)]
    return reduce(reduce_auth_event, events, state or AuthEventState())


def test_a_recorded_log_projects_to_the_latest_login_of_each_provider() -> None:
    state = fold(RECORDED)
    assert state.last_event_id == 8
    assert state.providers["qwen-oauth"] == ProviderLoginState(
        "qwen-oauth", "f2", "authorized", expires_at_ms=1700003900000, account_alias="uid:0a1b2c3d", event_id=8
    )
    assert state.providers["acme"] == ProviderLoginState(
        "acme",
        "a1",
        "expired",
        expires_at_ms=1700000300000,
        error_kind="expired_token",
        hint="device-flow expired without authorization",
        event_id=6,
    )


def test_each_step_of_the_log() -> None:
    states = []
    state = AuthEventState()
    for frame in RECORDED:
        item = wire.parse_frame(frame)
        if isinstance(item, ReceivedEvent):
            state = reduce_auth_event(state, item)
            states.append(state)
    qwen = [s.providers["qwen-oauth"] for s in states]
    assert [(p.device_flow_id, p.status, p.interval_ms) for p in qwen] == [
        ("f1", "pending", None),
        ("f1", "pending", 10000),
        ("f1", "pending", 10000),
        ("f1", "cancelled", 10000),
        ("f2", "pending", None),
        ("f2", "pending", None),
        ("f2", "pending", None),
        ("f2", "authorized", None),
    ]


def test_stale_and_repeated_ids_change_nothing() -> None:
    state = fold(RECORDED)
    replayed = fold(RECORDED[1:5], state)  # ids 1-4 again, after 8
    assert replayed is state
    assert reduce_auth_event(state, wire.parse_frame(RECORDED[8])) is state  # id 8 once more


def test_an_event_about_an_older_flow_does_not_overwrite_the_newer_one() -> None:
    state = fold(RECORDED[:2] + RECORDED[6:7])  # f1 started (1), then f2 started (5)
    late = '{"id":9,"v":1,"type":"auth_device_flow_cancelled","data":{"deviceFlowId":"f1"}}'
    after = fold([late], state)
    assert after.providers["qwen-oauth"].device_flow_id == "f2"
    assert after.providers["qwen-oauth"].status == "pending"
    assert after.last_event_id == 9


def test_unknown_types_and_frames_only_advance_the_id() -> None:
    state = fold(RECORDED[:2])
    unknown = '{"id":2,"v":1,"type":"auth_something_new","data":{"deviceFlowId":"f1","providerId":"qwen-oauth"}}'
    after = fold([unknown], state)
    assert after.providers == state.providers and after.last_event_id == 2
    assert reduce_auth_event(after, StreamHello(99, "e1")) is after


def test_a_failed_event_without_a_status_falls_back_by_its_kind() -> None:
    state = fold(RECORDED[:2])
    denied = '{"id":2,"v":1,"type":"auth_device_flow_failed","data":{"deviceFlowId":"f1","errorKind":"access_denied"}}'
    expired = '{"id":2,"v":1,"type":"auth_device_flow_failed","data":{"deviceFlowId":"f1","errorKind":"expired_token"}}'
    assert fold([denied], state).providers["qwen-oauth"].status == "error"
    assert fold([expired], state).providers["qwen-oauth"].status == "expired"
