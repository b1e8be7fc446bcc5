"""Audit breadcrumbs (SPEC §3): the exact line format, and the sanitizer for every untrusted string."""

from __future__ import annotations

import json

import pytest

from serve.audit import HINT_MAX_CHARS, Audit, format_line, sanitize

FLOW_ID = "58bf61e3-659f-4fa4-9e82-4b5273596b64"


def test_the_lines_of_the_original_are_reproduced_exactly() -> None:
    lines: list[str] = []
    audit = Audit(lines.append)
    audit.record(
        provider_id="qwen-oauth", device_flow_id=FLOW_ID, client_id=None, status="started", expires_in_ms=599999
    )
    audit.record(
        provider_id="qwen-oauth",
        device_flow_id=FLOW_ID,
        client_id="other-client",
        status="started",
        hint="take-over (per-provider singleton; original initiator=(none))",
    )
    assert lines == [
        "[serve] auth.device-flow: provider=qwen-oauth deviceFlowId=58bf61e3... clientId=- status=started "
        "expiresInMs=599999",
        "[serve] auth.device-flow: provider=qwen-oauth deviceFlowId=58bf61e3... clientId=other-client "
        'status=started hint="take-over (per-provider singleton; original initiator=(none))"',
    ]


def test_optional_fields_come_in_order() -> None:
    line = format_line(
        provider_id="p",
        device_flow_id=FLOW_ID,
        client_id="cli-A",
        status="expired",
        error_kind="expired_token",
        expires_in_ms=0,
        hint="device-flow expired without authorization",
    )
    assert line == (
        "[serve] auth.device-flow: provider=p deviceFlowId=58bf61e3... clientId=cli-A status=expired "
        'errorKind=expired_token expiresInMs=0 hint="device-flow expired without authorization"'
    )


def test_the_hint_is_json_escaped() -> None:
    hint = 'say "hi" \\ then — ünïcode'
    line = format_line(provider_id="p", device_flow_id=FLOW_ID, client_id=None, status="failed", hint=hint)
    encoded = line.split(" hint=", 1)[1]
    assert encoded == '"say \\"hi\\" \\\\ then — ünïcode"'
    assert json.loads(encoded) == hint


def test_a_long_hint_is_cut_to_1024_characters() -> None:
    line = format_line(provider_id="p", device_flow_id=FLOW_ID, client_id=None, status="failed", hint="x" * 5000)
    hint = json.loads(line.split(" hint=", 1)[1])
    assert len(hint) == HINT_MAX_CHARS == 1024
    assert hint.endswith("…")
    exact = format_line(provider_id="p", device_flow_id=FLOW_ID, client_id=None, status="failed", hint="y" * 1024)
    assert json.loads(exact.split(" hint=", 1)[1]) == "y" * 1024


UNSAFE = [
    *(chr(c) for c in range(0x00, 0x20)),  # C0
    "\x7f",  # DEL
    *(chr(c) for c in range(0x80, 0xA0)),  # C1
    "\u2028",
    "\u2029",
    *(chr(c) for c in range(0x200B, 0x2010)),  # zero-width and directional marks
    *(chr(c) for c in range(0x202A, 0x202F)),  # bidi embeddings and overrides
    *(chr(c) for c in range(0x2066, 0x206A)),  # bidi isolates
    "\ufeff",
]


@pytest.mark.parametrize("char", UNSAFE, ids=[f"U+{ord(c):04X}" for c in UNSAFE])
def test_sanitize_replaces_every_control_and_bidi_mark(char: str) -> None:
    assert sanitize(f"a{char}b") == "a?b"


@pytest.mark.parametrize(
    "char", [" ", "~", "\xa0", "é", "\u200a", "\u2010", "\u2027", "\u202f", "\u2065", "\u206a", "😀"]
)
def test_sanitize_keeps_ordinary_characters_next_to_the_ranges(char: str) -> None:
    assert sanitize(f"a{char}b") == f"a{char}b"


def test_every_untrusted_field_is_sanitized() -> None:
    forged = "x\n[serve] auth.device-flow: provider=evil status=authorized"
    line = format_line(
        provider_id="qwen\u202eoauth",
        device_flow_id=FLOW_ID,
        client_id=forged,
        status="started",
        hint="evil\r\nhint\u2028\u2066",
    )
    assert "\n" not in line and "\r" not in line and "\u2028" not in line and "\u202e" not in line
    assert "provider=qwen?oauth " in line
    assert "clientId=x?[serve] auth.device-flow:" in line
    assert line.endswith('hint="evil??hint??"')


def test_the_default_sink_writes_one_flushed_line_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    Audit().record(provider_id="p", device_flow_id=FLOW_ID, client_id="c", status="cancelled")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "[serve] auth.device-flow: provider=p deviceFlowId=58bf61e3... clientId=c status=cancelled\n"
