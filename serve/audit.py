"""Audit breadcrumbs (SPEC §3): one machine-greppable stderr line per device-flow transition, and the
sanitizer every untrusted string goes through before it reaches a log.

    [serve] auth.device-flow: provider=<id> deviceFlowId=<first 8 chars>... clientId=<id|-> status=<s>
        [errorKind=<k>] [expiresInMs=<n>] [hint="<json-escaped, ≤1024 chars>"]

(one line; wrapped here). Events can be dropped by a slow subscriber; stderr, collected by journald or
docker, is the record nobody can falsify after the fact. A line never holds a device code, verifier or token:
the registry passes only ids, statuses and static hints.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable

AuditSink = Callable[[str], object]

HINT_MAX_CHARS = 1024

# C0 controls and DEL, C1 controls, zero-width and directional marks (U+200B–200F), line/paragraph
# separators (U+2028/2029), bidi embeddings and overrides (U+202A–202E), bidi isolates (U+2066–2069) and
# the BOM / zero-width no-break space (U+FEFF): each can forge a second log line or disguise what a line
# says ("Trojan Source", CVE-2021-42574).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")


def sanitize(text: str) -> str:
    """`text` with every control, line separator and bidi mark replaced by `?`."""
    return _UNSAFE.sub("?", text)


def quoted(text: str, max_chars: int | None = None) -> str:
    """`text` sanitized (and cut to `max_chars`) as a JSON string: one line in a log, whatever it quotes
    (quotes, backslashes and control characters included)."""
    clean = sanitize(text)
    if max_chars is not None and len(clean) > max_chars:
        clean = clean[: max_chars - 1] + "…"
    return json.dumps(clean, ensure_ascii=False)


def format_line(
    *,
    provider_id: str,
    device_flow_id: str,
    client_id: str | None,
    status: str,
    error_kind: str | None = None,
    expires_in_ms: int | None = None,
    hint: str | None = None,
) -> str:
    """One audit line, without the trailing newline."""
    parts = [
        "[serve] auth.device-flow:",
        f"provider={sanitize(provider_id)}",
        f"deviceFlowId={sanitize(device_flow_id[:8])}...",
        f"clientId={sanitize(client_id) if client_id else '-'}",
        f"status={sanitize(status)}",
    ]
    if error_kind is not None:
        parts.append(f"errorKind={sanitize(error_kind)}")
    if expires_in_ms is not None:
        parts.append(f"expiresInMs={expires_in_ms}")
    if hint is not None:
        parts.append(f"hint={quoted(hint, HINT_MAX_CHARS)}")
    return " ".join(parts)


def _write_stderr(line: str) -> None:
    # Flushed per line: a crash right after a transition must not lose its breadcrumb.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Audit:
    """Writes audit lines to a sink: stderr by default; tests pass `list.append`.

    The sink receives each line without its newline. It must not block (stderr writes are small).
    """

    __slots__ = ("_sink",)

    def __init__(self, sink: AuditSink | None = None) -> None:
        self._sink: AuditSink = sink if sink is not None else _write_stderr

    def record(
        self,
        *,
        provider_id: str,
        device_flow_id: str,
        client_id: str | None,
        status: str,
        error_kind: str | None = None,
        expires_in_ms: int | None = None,
        hint: str | None = None,
    ) -> None:
        """Write one line (see `format_line`); every string in it is sanitized."""
        self._sink(
            format_line(
                provider_id=provider_id,
                device_flow_id=device_flow_id,
                client_id=client_id,
                status=status,
                error_kind=error_kind,
                expires_in_ms=expires_in_ms,
                hint=hint,
            )
        )
